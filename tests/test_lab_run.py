"""`normlab compare` end to end: outputs and their schema, resuming, determinism, the
report's spread marks, and a two-process (gloo) run against the single-process one."""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from normlab.lab import cli
from normlab.lab.data import load_data
from normlab.lab.report import batch_size_findings, batch_size_table, shift_table, within_spread
from normlab.lab.shifts import SHIFTS
from normlab.lab.sweep import DataSpec, plan_runs, run_sweep
from normlab.lab.train import RunConfig, train_run

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = [
    "--norms",
    "bn",
    "gn",
    "--batch-sizes",
    "4",
    "8",
    "--epochs",
    "1",
    "--seeds",
    "1",
    "--limit",
    "40",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: threads only add overhead, and test workers run side by side.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data():
    return load_data("digits", limit=40)


def compare(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(list(argv)))


def test_tiny_run_writes_every_output_with_the_schema(tmp_path, capsys):
    assert compare(*TINY, "--out", str(tmp_path), "--jobs", "2") == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert {(r["norm"], r["batch_size"]) for r in records} == {
        ("bn", 4),
        ("bn", 8),
        ("gn", 4),
        ("gn", 8),
    }
    for r in records:
        assert r["seed"] == 0 and r["epochs"] == 1 and r["wall_time"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0 and r["error"] == pytest.approx(1 - r["accuracy"])
        assert set(r["shifted"]) == set(SHIFTS)
        assert all(0.0 <= v <= 1.0 for v in r["shifted"].values())
        assert len(r["train_loss"]) == len(r["test_accuracy"]) == 1
        assert r["lr"] == pytest.approx(0.1 * r["batch_size"] / 32)  # linear scaling rule
        assert r["steps"] == r["train_images"] // r["batch_size"] and r["train_images"] == 40
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 4 and {"norm", "batch_size", "seed", "accuracy", "shift_contrast"} <= set(
        rows[0]
    )
    summary = (tmp_path / "summary.md").read_text()
    for heading in ["vs batch size", "appearance shifts", "Training curves"]:
        assert heading in summary
    for png in ["batch-size.png", "shift.png", "curves.png"]:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "runs").glob("*.json"))) == 4
    printed = capsys.readouterr().out
    assert "| bn |" in printed and "| gn |" in printed


def test_resume_skips_finished_runs(tmp_path):
    data = DataSpec("digits", limit=40)
    configs = plan_runs(["bn", "ln"], [4, 8], ["batch-size"], seeds=1, epochs=1)
    first, executed = run_sweep(configs, tmp_path, data, progress=False)
    assert executed == 4
    again, executed = run_sweep(configs, tmp_path, data, progress=False)
    assert executed == 0 and again == first
    victim = next((tmp_path / "runs").glob("*-ln-b8-*.json"))
    victim.write_text("{half a file")  # an interrupted write counts as not finished
    more = plan_runs(["bn", "ln"], [4, 8], ["batch-size"], seeds=2, epochs=1)
    _, executed = run_sweep(more, tmp_path, data, progress=False)
    assert executed == 1 + 4  # the broken one, and the four runs of seed 1


def test_plan_runs_shift_and_curves_use_the_reference_batch():
    configs = plan_runs(["bn", "in"], [2, 32], ["shift", "curves"], seeds=2, epochs=3)
    assert {(c.norm, c.batch_size, c.seed) for c in configs} == {
        (n, 32, s) for n in ("bn", "in") for s in (0, 1)
    }
    with pytest.raises(ValueError, match="experiment"):
        plan_runs(["bn"], [2], ["speed"], seeds=1, epochs=1)
    with pytest.raises(ValueError, match="at least one norm"):
        plan_runs([], [2], ["shift"], seeds=1, epochs=1)


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_data):
    data = tiny_data
    config = RunConfig(norm="bn", batch_size=4, epochs=2, seed=3)
    a, b = train_run(config, data), train_run(config, data)
    c = train_run(RunConfig(norm="bn", batch_size=4, epochs=2, seed=4), data)
    for key in ("train_loss", "test_accuracy", "shifted", "accuracy"):
        assert a[key] == b[key]
    assert a["train_loss"] != c["train_loss"]


def test_a_run_leaves_the_callers_random_state_and_settings_alone(tiny_data):
    import torch

    data = tiny_data
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_run(RunConfig(norm="gn", batch_size=8, epochs=1), data)
    assert torch.equal(torch.rand(3), expected)
    assert not torch.are_deterministic_algorithms_enabled()


def test_bad_training_requests(tiny_data):
    data = tiny_data
    with pytest.raises(ValueError, match="at most 40"):
        train_run(RunConfig(norm="bn", batch_size=64, epochs=1), data)
    with pytest.raises(ValueError, match="positive multiple"):
        train_run(RunConfig(norm="bn", batch_size=0, epochs=1), data)


# ---------------------------------------------------------------- report marks


def _records(norm, batch, errors):
    return [
        {
            "norm": norm,
            "batch_size": batch,
            "seed": s,
            "error": e,
            "accuracy": 1 - e,
            "shifted": dict.fromkeys(SHIFTS, 1 - e),
        }
        for s, e in enumerate(errors)
    ]


def test_spread_marks():
    assert within_spread([0.10, 0.20], [0.16, 0.26])  # 0.06 apart, stds 0.07 each
    assert not within_spread([0.10, 0.11], [0.50, 0.51])
    assert not within_spread([0.1], [0.1])  # one seed: no spread known, nothing claimed
    records = (
        _records("bn", 2, [0.50, 0.60])
        + _records("gn", 2, [0.10, 0.12])
        + _records("ln", 2, [0.11, 0.13])
        + _records("bn", 32, [0.10, 0.11])
        + _records("gn", 32, [0.10, 0.12])
        + _records("ln", 32, [0.30, 0.32])
    )
    table = batch_size_table(records)
    bn, gn, ln = table[2], table[3], table[4]
    assert "55.0 ± 7.1" in bn and "≈" not in bn.split("|")[2]
    assert "**11.0 ± 1.4**" in gn and "12.0 ± 1.4 ≈" in ln
    findings = "\n".join(batch_size_findings(records))
    assert "bn: 55.0% error at batch 2 vs 10.5% at batch 32" in findings
    assert "gn: 11.0% error at batch 2 vs 11.0% at batch 32 (+0.0 points; within" in findings
    shifts = shift_table([r for r in records if r["batch_size"] == 2])
    assert "≈" not in shifts[2] and "≈" not in shifts[3]  # gn and ln differ from bn beyond spread


# ---------------------------------------------------------------- two processes


WORKER = textwrap.dedent(
    """
    import argparse, sys
    from normlab.lab import cli
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    sys.exit(cli.run(parser.parse_args(sys.argv[1:])))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(argv: list[str], timeout: float = 150.0) -> None:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            PYTHONPATH=SRC,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out


def test_two_process_syncbn_matches_one_process_on_the_same_global_batch(tmp_path):
    argv = [
        "--norms",
        "syncbn",
        "bn",
        "--batch-sizes",
        "8",
        "--epochs",
        "2",
        "--seeds",
        "1",
        "--limit",
        "40",
        "--experiment",
        "curves",
        "--no-progress",
        "--jobs",
        "1",
    ]
    _two_processes([*argv, "--out", str(tmp_path / "two")])
    assert compare(*argv, "--out", str(tmp_path / "one")) == 0
    two = {r["norm"]: r for r in json.loads((tmp_path / "two" / "results.json").read_text())}
    one = {r["norm"]: r for r in json.loads((tmp_path / "one" / "results.json").read_text())}
    assert two["syncbn"]["world_size"] == 2 and two["syncbn"]["per_process_batch"] == 4
    # syncbn over 2 x 4 images == batch norm over 8 images in one process
    assert two["syncbn"]["train_loss"] == pytest.approx(one["syncbn"]["train_loss"], rel=1e-4)
    assert two["syncbn"]["test_accuracy"] == one["syncbn"]["test_accuracy"]
    # plain bn under two processes normalizes over 4 images only: not the same run
    assert two["bn"]["train_loss"] != pytest.approx(one["bn"]["train_loss"], rel=1e-4)


def test_a_run_the_norm_cannot_do_is_recorded_as_failed(tmp_path):
    # Batch norm in the row-by-row RNN at batch 1: one value per unit and time step.
    # Layer norm normalizes each sample by itself and trains at any batch size.
    argv = [
        "--model",
        "rnn",
        "--width",
        "16",
        "--norms",
        "bn",
        "ln",
        "--batch-sizes",
        "1",
        "4",
        "--epochs",
        "1",
        "--seeds",
        "1",
        "--limit",
        "24",
        "--experiment",
        "batch-size",
        "--no-progress",
        "--jobs",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert compare(*argv) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert {(r["norm"], r["batch_size"]) for r in records} == {("ln", 1), ("ln", 4), ("bn", 4)}
    summary = (tmp_path / "summary.md").read_text()
    assert "could not train" in summary and "bn at batch 1" in summary
    assert "more than 1 value per channel" in summary
    configs = plan_runs(
        ["bn", "ln"], [1, 4], ["batch-size"], seeds=1, epochs=1, model="rnn", limit=24, width=16
    )
    _, executed = run_sweep(configs, tmp_path, DataSpec("digits", limit=24), progress=False)
    assert executed == 0  # the failed run is not tried again
