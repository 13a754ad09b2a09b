"""The claims experiments: IN in the first k norm layers, ghost batch norm in the models,
the runs each experiment plans, and `normlab compare --experiment noise ghost in-depth`."""

import argparse
import json

import pytest
import torch

from normlab.lab import cli
from normlab.lab.models import build_model, count_norm_layers
from normlab.lab.norm_layers import norm_layers_in_forward_order
from normlab.lab.sweep import DEFAULT_EXPERIMENTS, plan_runs
from normlab.layers.batchnorm import BatchNorm
from normlab.layers.ghost import GhostBatchNorm
from normlab.layers.instancenorm import InstanceNorm

# The order a forward pass calls the norm layers, written out by hand from the models'
# forward methods (a block computes its downsample branch first).
CNN_ORDER = [f"features.{i}" for i in (1, 4, 7, 10, 13)]
RESNET_ORDER = [
    "bn1",
    "layer1.0.bn1",
    "layer1.0.bn2",
    *(f"layer{s}.0.{n}" for s in (2, 3, 4) for n in ("downsample.1", "bn1", "bn2")),
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model, order", [("cnn", CNN_ORDER), ("resnet", RESNET_ORDER)])
def test_in_first_k_has_instance_norm_exactly_in_the_first_k_layers(model, order):
    assert count_norm_layers(model) == len(order)
    x = torch.rand(4, 1, 16, 16)
    for k in range(len(order) + 1):
        net = build_model(model, f"in-first-{k}", image_shape=(1, 16, 16), num_classes=10)
        found = norm_layers_in_forward_order(net, x)
        assert [name for name, _ in found] == order
        for i, (name, layer) in enumerate(found):
            expected = InstanceNorm if i < k else BatchNorm
            assert type(layer) is expected, (k, name, type(layer))
            if i < k:  # per sample: the output of one image does not depend on the others
                assert layer.affine and layer.running_mean is None
        assert net(x).shape == (4, 10)
    with pytest.raises(ValueError, match=f"expected k in 0..{len(order)}"):
        build_model(model, f"in-first-{len(order) + 1}", image_shape=(1, 16, 16), num_classes=10)


def test_in_first_k_needs_conv_layers():
    with pytest.raises(ValueError, match="needs conv layers"):
        build_model("rnn", "in-first-1", image_shape=(1, 16, 16), num_classes=10)


@pytest.mark.parametrize("model", ["cnn", "resnet", "rnn"])
def test_ghost_norm_names_build_ghost_batch_norm(model):
    net = build_model(model, "gbn8", image_shape=(1, 16, 16), num_classes=10)
    ghosts = [m for m in net.modules() if isinstance(m, GhostBatchNorm)]
    assert ghosts and all(m.ghost_size == 8 for m in ghosts)
    assert net(torch.rand(16, 1, 16, 16)).shape == (16, 10)


def test_plans_of_the_experiments():
    assert DEFAULT_EXPERIMENTS == ("batch-size", "shift", "curves")
    plain = plan_runs(["bn"], [4, 32], ["batch-size"], seeds=1, epochs=1)
    assert all(c.probes == 0 for c in plain)
    noise = plan_runs(["bn", "ln"], [4, 32], ["noise"], seeds=2, epochs=1, probes=8, companions=3)
    assert {(c.norm, c.batch_size, c.seed) for c in noise} == {
        (n, b, s) for n in ("bn", "ln") for b in (4, 32) for s in (0, 1)
    }
    assert all(c.probes == 8 and c.companions == 3 for c in noise)
    ghost = plan_runs(["bn"], [4, 32], ["ghost"], seeds=1, epochs=1)
    assert [(c.norm, c.batch_size) for c in ghost] == [(f"gbn{g}", 32) for g in (2, 4, 8, 16, 32)]
    assert all(c.probes > 0 for c in ghost)  # the ghost experiment always measures the noise
    depth = plan_runs(["bn"], [8], ["in-depth"], seeds=1, epochs=1, model="resnet")
    assert [c.norm for c in depth] == [f"in-first-{k}" for k in range(13)]
    assert {c.batch_size for c in depth} == {8}


def compare(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(list(argv)))


def test_compare_noise_ghost_and_in_depth_end_to_end(tmp_path, capsys):
    common = ["--epochs", "1", "--seeds", "1", "--limit", "40", "--no-progress", "--jobs", "1"]
    common += ["--probes", "4", "--companions", "3"]
    out = tmp_path / "a"
    argv = ["--norms", "bn", "ln", "--batch-sizes", "4", "8", "--experiment", "batch-size"]
    assert compare(*argv, "noise", "ghost", "--out", str(out), *common) == 0
    records = json.loads((out / "results.json").read_text())
    assert {r["norm"] for r in records} == {"bn", "ln", "gbn2", "gbn4", "gbn8"}
    assert all("batch_noise" in r for r in records)
    assert all(r["batch_noise"] < 1e-5 for r in records if r["norm"] == "ln")
    summary = (out / "summary.md").read_text()
    assert "## Batch noise vs batch size" in summary and "## Ghost batch norm" in summary
    batch_section = summary.split("## Test error (%) vs batch size")[1].split("##")[0]
    assert "gbn" not in batch_section  # the ghost runs stay in their own section
    for png in ("noise.png", "ghost.png", "batch-size.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "Batch noise vs batch size" in capsys.readouterr().out
    out = tmp_path / "b"
    argv = ["--model", "cnn", "--batch-sizes", "8", "--experiment", "in-depth", "--depth", "2"]
    assert compare(*argv, "--out", str(out), *common) == 0
    records = json.loads((out / "results.json").read_text())
    assert sorted(r["norm"] for r in records) == ["in-first-0", "in-first-1", "in-first-2"]
    assert "## Instance norm in the first k layers" in (out / "summary.md").read_text()
    assert (out / "in-depth.png").read_bytes()[:4] == b"\x89PNG"


def test_layer_groups_merge_only_an_rnns_per_step_copies():
    from normlab.lab.claims_report import layer_groups

    layers = {"norm_h.0": 1.0, "norm_h.1": 3.0, "norm_x.0": 0.5, "features.1": 2.0}
    assert layer_groups(layers, steps=True) == {"norm_h": 2.0, "norm_x": 0.5, "features": 2.0}
    assert layer_groups(layers, steps=False) == layers


def test_layer_groups_skip_copies_without_a_ratio():
    from normlab.lab.claims_report import layer_groups

    assert layer_groups({"norm_h.0": float("nan"), "norm_h.1": 0.5}, steps=True) == {"norm_h": 0.5}


def test_prepare_takes_the_experiments_norms_and_noise_options():
    from normlab.lab.api import is_known_norm, known_norms, prepare

    assert {"wn", "wn-mobn"} <= set(known_norms())
    assert is_known_norm("gbn8") and is_known_norm("in-first-0", "resnet")
    assert not is_known_norm("gbn0") and not is_known_norm("in-first-1", "rnn")
    assert not is_known_norm("wn", None)  # the user's model: no weight-norm candidates
    sweep = prepare(
        norms=["bn", "wn"],
        batch_sizes=[4, 8],
        experiments=["noise", "ghost"],
        epochs=1,
        seeds=1,
        limit=60,
        probes=5,
        companions=3,
    )
    norms = {(c.norm, c.batch_size) for c in sweep.configs}
    assert norms == {
        ("bn", 4),
        ("bn", 8),
        ("wn", 4),
        ("wn", 8),
        ("gbn2", 8),
        ("gbn4", 8),
        ("gbn8", 8),
    }
    assert all((c.probes, c.companions) == (5, 3) for c in sweep.configs)
    with pytest.raises(ValueError, match="in-depth"):
        prepare(norms=["bn"], model="rnn", experiments=["in-depth"], limit=60)
    with pytest.raises(ValueError, match="companions"):
        prepare(norms=["bn"], companions=0, limit=60)
