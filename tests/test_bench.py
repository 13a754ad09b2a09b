"""`normlab bench` and its hybrid baselines, the releases' compositions.

The compositions in normlab.releases are written from the releases' formulations in
plain torch; matching normlab's layers (outputs, gradients, running buffers) checks
both the layers and the baseline the bench times them against.
"""

import argparse
import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import normlab
from normlab import bench
from normlab.releases import (
    ReleaseBatchInstanceNorm,
    ReleaseIBN,
    ReleaseSwitchNorm2d,
    release_of,
)

LAYERS = {
    "ibn": lambda c: normlab.IBN(c, momentum=0.3),
    "bin": lambda c: normlab.BatchInstanceNorm(c, momentum=0.3),
    "sn": lambda c: normlab.SwitchableNorm(c, momentum=0.3),
}


def randomized(kind, c):
    """A layer with random parameters and running buffers (gate kept in [0, 1])."""
    layer = LAYERS[kind](c)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "gate":
                p.uniform_(0, 1)
            else:
                p.copy_(torch.randn_like(p))
        for name, b in layer.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b))
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return layer


def data(shape, channels_last):
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def grads(module, x, dy):
    xg = x.detach().clone().requires_grad_()
    y = module(xg)
    y.backward(dy)
    named = {k: p.grad.reshape(-1) for k, p in module.named_parameters()}
    return y.detach(), xg.grad, named


def buffers(module):
    return {
        k: b.reshape(-1).float()
        for k, b in module.named_buffers()
        if k.endswith(("running_mean", "running_var"))
    }


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("shape", [(4, 6, 5, 5), (4, 16, 32, 32)])  # reference path; kernels
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_release_matches_layer(kind, shape, channels_last, training):
    layer = randomized(kind, shape[1]).train(training)
    release = release_of(layer)
    assert release.training == training
    x, dy = data(shape, channels_last), torch.randn(shape)
    y, dx, dp = grads(layer, x, dy)
    y_r, dx_r, dp_r = grads(release, x, dy)
    close = {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(y, y_r, **close)
    torch.testing.assert_close(dx, dx_r, **close)
    assert dp.keys() == dp_r.keys()
    for name in dp:
        torch.testing.assert_close(dp[name], dp_r[name], **close, msg=name)
    # after the step: the release's old-value momentum (0.7) is torch's 0.3
    after, after_r = buffers(layer), buffers(release)
    assert after.keys() == after_r.keys() and after
    for name in after:
        torch.testing.assert_close(after[name], after_r[name], **close, msg=name)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_release_tracks_like_layer_then_evaluates_alike(kind):
    layer = randomized(kind, 8)
    release = release_of(layer)
    for _ in range(3):
        x = torch.randn(4, 8, 6, 6) * 3 + 1
        layer(x), release(x)
    layer.eval(), release.eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(layer(x), release(x), atol=1e-4, rtol=1e-4)


@given(
    kind=st.sampled_from(sorted(LAYERS)),
    n=st.integers(2, 4),
    c=st.integers(2, 9),
    h=st.integers(1, 5),
    w=st.integers(2, 5),
)
def test_release_matches_layer_on_any_small_shape(kind, n, c, h, w):
    layer = randomized(kind, c)
    release = release_of(layer)
    x = torch.randn(n, c, h, w)
    torch.testing.assert_close(layer(x), release(x), atol=1e-4, rtol=1e-4)


def test_release_copies_values_not_tensors():
    layer = randomized("bin", 4)
    release = release_of(layer)
    with torch.no_grad():
        release.gate.zero_()
    assert layer.gate.abs().sum() > 0
    assert release_of(layer.to(torch.bfloat16)).gate.dtype == torch.bfloat16


def test_release_errors():
    with pytest.raises(TypeError, match="expected a normlab IBN.*got BatchNorm2d"):
        release_of(torch.nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="channel_axis=1, got -1"):
        release_of(normlab.SwitchableNorm(4, channel_axis=-1))
    with pytest.raises(ValueError, match="float momentum, got None"):
        release_of(normlab.IBN(4, momentum=None))
    with pytest.raises(ValueError, match="variance='paper'"):
        release_of(normlab.SwitchableNorm(4, variance="paper"))
    with pytest.raises(ValueError, match="using_bn=False"):
        release_of(normlab.SwitchableNorm(4, using_bn=False))
    with pytest.raises(ValueError, match="affine=False"):
        release_of(normlab.BatchInstanceNorm(4, affine=False))
    with pytest.raises(ValueError, match="0 < half < planes=4, got half=4"):
        ReleaseIBN(4, 4)
    for module in (ReleaseIBN(4, 2), ReleaseBatchInstanceNorm(4), ReleaseSwitchNorm2d(4)):
        with pytest.raises(ValueError, match=r"expected \(N, C, H, W\).*got \(2, 4, 5\)"):
            module(torch.randn(2, 4, 5))


def test_bench_table_and_its_errors():
    names = [c.name for c in bench.cases()]
    assert "bn 32x64x56x56 nchw fp32" in names and "ln 16x512x768 btd bf16" in names
    assert {c.kind for c in bench.cases()} == set(bench.KINDS)
    assert all(c.dtype == "fp32" for c in bench.cases(quick=True))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(ValueError, match="no case matches"):
        bench.run(parser.parse_args(["--cases", "no-such-case"]))
    with pytest.raises(ValueError, match="--threads"):
        bench.run(parser.parse_args(["--threads", "0"]))
    with pytest.raises(ValueError, match="expected --device cpu or cuda, got 'tpu'"):
        bench.run(parser.parse_args(["--device", "tpu"]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            bench.run(parser.parse_args(["--device", "cuda"]))


def test_bench_table_has_the_hybrids_on_cnn_shapes():
    hybrid = [c for c in bench.cases() if c.kind in bench.HYBRIDS]
    assert {c.kind for c in hybrid} == {"ibn", "bin", "sn"}
    combos = {(c.kind, c.shape, c.channels_last, c.dtype) for c in hybrid}
    assert len(combos) == 3 * len(bench.CNN_SHAPES) * 2 * 2 == len(hybrid)
    assert all(c.shape in bench.CNN_SHAPES for c in hybrid)
    assert {c.kind for c in bench.cases(quick=True)} == set(bench.KINDS)


def test_cases_pick_a_kind_by_its_whole_name():
    table = bench.cases()
    assert {c.kind for c in table if bench.matches(c, "bn")} == {"bn"}
    assert {c.kind for c in table if bench.matches(c, "in")} == {"in"}
    assert {c.kind for c in table if bench.matches(c, "ln")} == {"ln"}
    picked = [c for c in table if bench.matches(c, "bf16")]
    assert picked and all(c.dtype == "bf16" for c in picked)
    assert all(c.channels_last for c in table if bench.matches(c, "cl"))


@pytest.mark.parametrize("kind", bench.HYBRIDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_measure_a_hybrid_on_a_tiny_shape(kind, channels_last, dtype):
    case = bench.Case(kind, (2, 8, 4, 4), channels_last, dtype)
    result = bench.measure(case, repeats=1)
    for key in ("copy", "torch", "normlab", "torch_fb", "normlab_fb"):
        assert result[key] > 0
    assert result["saved_normlab"] >= 0 and result["saved_torch"] > 0
    if kind == "bin" and dtype == "fp32" and not channels_last:
        # tiny float32 NCHW: ATen's batch and instance norm mixed by the gate, no dispatch
        assert result["path"] == "no dispatcher call (the layer's own torch ops)"
    else:
        assert "->" in result["path"]  # what the dispatcher chose, pattern by pattern
    assert len(bench.row(case, result)) == len(bench.COLUMNS)


def test_dispatched_leaves_the_logger_as_it_was():
    log = logging.getLogger("normlab.kernels")
    level, propagate, handlers = log.level, log.propagate, list(log.handlers)
    path = bench._dispatched(normlab.IBN(8), torch.randn(2, 8, 4, 4))
    # tiny: the halves apart, the IN half on ATen's instance_norm, the BN half dispatched
    assert path == "n c ... -> c: cpu (aten): native_batch_norm", path
    assert (log.level, log.propagate, log.handlers) == (level, propagate, handlers)
    assert bench._dispatched(torch.nn.Identity(), torch.randn(2)).startswith("no dispatcher")


def test_run_filters_the_hybrid_rows(monkeypatch, capsys):
    monkeypatch.setattr(bench, "CNN_SHAPES", ((2, 8, 4, 4),))
    monkeypatch.setattr(bench, "TRANSFORMER_SHAPE", (2, 4, 8))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--cases", "ibn", "--quick", "--repeats", "1", "--format", "md"])
    assert bench.run(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| case |")
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| ibn 2x8x4x4 nchw fp32",
        "| ibn 2x8x4x4 cl fp32",
    ]
