"""The dispatcher: which path each call takes, the switches that force the reference path."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

import normlab
from normlab.kernels import (
    backends,
    dispatch,
    explain_dispatch,
    set_reference,
    use_backend,
    use_reference,
)

BIG = (8, 16, 32, 32)  # 131072 elements: above the small-tensor threshold


@pytest.fixture
def numba_only():
    with use_backend("numba"):
        yield


def first(line):
    return line.splitlines()[0]


def test_small_tensors_take_aten_where_exact_else_reference():
    # one ATen op costs less than the reference path's several
    assert (
        explain_dispatch(torch.randn(2, 3, 4, 4), "n c h w -> c") == "cpu (aten): native_batch_norm"
    )
    # LayerNorm2d on NCHW data: ATen's layer norm through a copy beats the reference path
    small = explain_dispatch(torch.randn(2, 3, 4, 4), "n c h w -> n h w")
    assert small == "cpu (aten): native_layer_norm on a contiguous copy (small input)"
    # RMS norm over trailing dims: ATen's rms_norm
    rms = explain_dispatch(torch.randn(2, 3, 4, 4), "n c h w -> n", center=False)
    assert rms == "cpu (aten): rms_norm"
    # no ATen kernel for RMS norm over channels (not trailing): a Numba call costs more
    small = explain_dispatch(torch.randn(2, 3, 4, 4), "n c h w -> n h w", center=False)
    assert small.startswith("reference") and "elements" in first(small)
    assert "aten refused" in small


@pytest.mark.parametrize(
    ("pattern", "layout", "family"),
    [
        ("n c h w -> c", None, "RKR"),
        ("n c h w -> c", torch.channels_last, "RK"),
        ("n c h w -> n c", None, "KR"),
        ("n c h w -> n c", torch.channels_last, "KRK"),
        ("n c h w -> n h w", None, "KRK"),
        ("n c h w -> n", None, "KR"),
    ],
)
def test_fast_path_chosen_by_family(pattern, layout, family, numba_only):
    x = torch.randn(BIG)
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    assert explain_dispatch(x, pattern).startswith(f"cpu (numba): family {family},")


def test_contiguous_inner_run_is_the_reduced_block(numba_only):
    x = torch.randn(BIG)
    # instance norm, with or without affine: rows of H*W contiguous elements
    assert explain_dispatch(x, "n c h w -> n c").endswith("(128, 1, 1, 1024)")
    assert explain_dispatch(x, "n c h w -> n c", weight=torch.ones(16)).endswith(
        "(128, 1, 1, 1024)"
    )
    # group norm with a per-channel affine: the channel-in-group axis is split off
    assert explain_dispatch(x, "n (g k) h w -> n g", g=4, weight=torch.ones(16)).endswith(
        "(32, 4, 1, 1024)"
    )


def test_group_norm_channels_last_is_krkr():
    x = torch.randn(BIG).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert "family KRKR" in explain_dispatch(x, "n (g k) h w -> n g", g=4)


def test_unsupported_cases_fall_back_with_a_reason(monkeypatch):
    x = torch.randn(BIG)
    # R K R K in memory order does not fit K R K R
    assert "does not fit" in explain_dispatch(x, "n c h w -> c w")
    assert "dtype" in explain_dispatch(torch.randn(BIG, dtype=torch.complex64), "n c h w -> c")
    monkeypatch.setitem(backends._available, "numba", False)
    assert first(explain_dispatch(x, "n c h w -> n h w")) == "reference: numba is not installed"
    # without numba, ATen's batch norm is the faster path at every size
    assert first(explain_dispatch(x, "n c h w -> c")) == "cpu (aten): native_batch_norm"
    # and the results are still right
    y = normlab.normalize(x, "n c h w -> n h w")
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + 1e-5), atol=1e-5, rtol=1e-5)


def test_statistics_with_gradient_use_reference():
    x = torch.randn(BIG)
    p = normlab.plan("n c h w -> c", x.shape)
    mean = torch.zeros(p.stats_shape, requires_grad=True)
    var = torch.ones(p.stats_shape, requires_grad=True)
    y = dispatch.normalize_with(x, p, mean, var, None, None, 1e-5)
    (gm,) = torch.autograd.grad(y.sum(), mean)
    torch.testing.assert_close(gm, torch.full_like(gm, -x[:, 0].numel() / (1 + 1e-5) ** 0.5))


def test_forcing_the_reference_path():
    x = torch.randn(BIG)
    assert explain_dispatch(x, "n c h w -> c").startswith("cpu")
    with use_reference():
        assert explain_dispatch(x, "n c h w -> c") == "reference: reference path forced"
        with use_reference(False):  # an inner block may re-enable the fast path
            assert explain_dispatch(x, "n c h w -> c").startswith("cpu")
    with use_backend("reference"):
        assert explain_dispatch(x, "n c h w -> c") == "reference: reference path forced"
    assert explain_dispatch(x, "n c h w -> c").startswith("cpu")
    previous = set_reference(True)
    try:
        assert explain_dispatch(x, "n c h w -> c").startswith("reference")
    finally:
        set_reference(previous)
    # the environment variable is read when normlab is imported
    script = (
        "import torch, normlab; from normlab.kernels import explain_dispatch; "
        "print(explain_dispatch(torch.randn(2, 3, 4, 4), 'n c h w -> c'))"
    )
    for value, path in (("1", "reference"), ("0", "cpu")):
        env = dict(os.environ, NORMLAB_REFERENCE=value)
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.startswith(path), out.stdout


def test_choice_is_logged(caplog, numba_only):
    x = torch.randn(BIG)
    with caplog.at_level(logging.DEBUG, logger="normlab.kernels"):
        normlab.normalize(x, "n c h w -> n c")
        with use_reference():
            normlab.normalize(x, "n c h w -> n c")
    lines = [r.getMessage() for r in caplog.records]
    assert any("family KR" in line for line in lines)
    assert any("reference path forced" in line for line in lines)


def test_gpu_path_only_for_cuda_tensors():
    # CPU tensors never reach the Triton kernels, installed or not.
    assert not explain_dispatch(torch.randn(BIG), "n c h w -> c").startswith("gpu")


def test_explain_dispatch_rejects_bad_input():
    with pytest.raises(normlab.PatternError):
        explain_dispatch(torch.randn(BIG), "n c h -> c")
    with pytest.raises(ValueError, match="channels"):
        explain_dispatch(torch.randn(BIG), "n c h w -> c", weight=torch.ones(3))


def test_use_backend_forces_one_backend_without_a_size_floor():
    x = torch.randn(2, 3, 4, 4)
    with use_backend("numba"):
        assert explain_dispatch(x, "n c h w -> n h w").startswith("cpu (numba)")
        # a call the forced backend refuses takes the reference path, with the reason
        assert "does not fit" in explain_dispatch(x, "n c h w -> c w")
    with use_backend("aten"):
        assert first(explain_dispatch(torch.randn(BIG), "n c h w -> c")) == (
            "cpu (aten): native_batch_norm"
        )
        # no ATen kernel for RMS norm over NCHW channels (rms_norm takes trailing dims)
        assert explain_dispatch(x, "n c h w -> n h w", center=False).startswith("reference")
    # the switch is undone on leaving the block
    assert first(explain_dispatch(torch.randn(BIG), "n c h w -> c")).startswith("cpu (numba)")
    with pytest.raises(ValueError, match="expected one of"):
        with use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="threads"):
        with use_backend("numba", threads=0):
            pass


def test_use_backend_threads_split_small_inputs_and_agree_with_one_thread():
    x = torch.randn(6, 5, 7, 8, dtype=torch.float64, requires_grad=True)
    outs = []
    for threads in (1, 3):
        with use_backend("numba", threads=threads):
            p = normlab.plan("n c h w -> c", x.shape)
            call = backends.Call(x, p, None, None, 1e-5, True, forced=True, threads=threads)
            assert len(backends.NUMBA.accept(call).prep.chunks) - 1 == threads
            y = normlab.normalize(x, "n c h w -> c")
            outs.append((y, *torch.autograd.grad(y.square().sum(), x)))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(
        outs[0][0], torch.nn.functional.batch_norm(x, None, None, training=True)
    )


@pytest.mark.parametrize(
    ("pattern", "fmt", "dtype", "expected"),
    [
        ("n c h w -> c", None, torch.float32, "aten"),  # cuDNN batch norm
        ("n c h w -> c", torch.channels_last, torch.bfloat16, "aten"),
        ("n (g k) h w -> n g", None, torch.float32, "aten"),  # native group norm
        ("n c h w -> n c", None, torch.float32, "aten"),  # group norm with G = C
        ("n h w c -> n h w", None, torch.float32, "aten"),  # layer norm over the last dim
        ("n c h w -> n h w", torch.channels_last, torch.float32, "aten"),  # channels innermost
        ("n c h w -> n h w", None, torch.float32, "reference"),  # LayerNorm2d on NCHW
        ("n (g k) h w -> n g", torch.channels_last, torch.float32, "reference"),
        ("n c h w -> c h w", None, torch.float32, "reference"),  # per-activation batch norm
    ],
)
def test_cuda_order_takes_aten_wherever_exact(pattern, fmt, dtype, expected, monkeypatch):
    """The CUDA order, checked with CPU tensors standing in (``device="cuda"``)."""
    monkeypatch.setitem(backends._available, "triton", True)
    x = torch.randn(4, 8, 6, 5, dtype=dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    sizes = {"g": 2} if "(g k)" in pattern else {}
    line = first(explain_dispatch(x.requires_grad_(), pattern, device="cuda", **sizes))
    if expected == "aten":
        assert line.startswith("cuda (aten)"), line
    else:  # the Triton kernels are not in the CUDA order (measured slower, less exact)
        assert line.startswith("reference"), line
    # RMS norm over the dims innermost in memory: ATen's rms_norm; over others, none
    rms = first(explain_dispatch(x, "n c h w -> n", center=False, device="cuda"))
    assert rms == "cuda (aten): rms_norm", rms
    rms = first(explain_dispatch(x, "n c h w -> n c w", center=False, device="cuda"))
    assert rms.startswith("reference"), rms


def test_cuda_triton_only_when_asked_for(monkeypatch):
    monkeypatch.setitem(backends._available, "triton", True)
    x = torch.randn(4, 8, 6, 5)
    got = explain_dispatch(x, "n c h w -> n h w", device="cuda")
    assert first(got).startswith("reference") and "not one of ATen's" in got
    with use_backend("triton"):
        forced = first(explain_dispatch(x, "n c h w -> n h w", device="cuda"))
    assert forced.startswith("gpu (triton)"), forced


@pytest.mark.parametrize("mode", ["export", "func", "fx", "jit", "compile"])
def test_path_under_each_transform_is_the_decomposition(mode):
    x = torch.randn(BIG)
    got = explain_dispatch(x, "n c h w -> n h w", mode=mode)
    assert got.startswith("reference: under torch.")
    # batch norm under compile: ATen's own kernel (torch.nn's operator), else the decomposition
    bn = explain_dispatch(x, "n c h w -> c", mode=mode)
    if mode == "compile":
        assert bn.startswith("cpu (aten): native_batch_norm"), bn
        assert "torch.nn's operator" in bn
        # half-precision layer norm with an affine and a gradient: the decomposition, as in
        # eager (ATen's affine gradients are too coarse there)
        xh = torch.randn(4, 8, 16, dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(16, dtype=torch.bfloat16, requires_grad=True)
        ln = explain_dispatch(xh, "b t d -> b t", weight=w, mode=mode)
        assert ln.startswith("reference: under torch.compile"), ln
        assert explain_dispatch(xh.detach(), "b t d -> b t", mode=mode).startswith("cpu (aten)")
    else:
        assert bn.startswith("reference: under torch."), bn
    assert explain_dispatch(x, "n c h w -> c", mode="eager").startswith("cpu")
    with pytest.raises(ValueError, match="mode"):
        explain_dispatch(x, "n c h w -> c", mode="trace")


def test_transform_detection():
    from normlab.kernels import transform

    x = torch.randn(3, 4)
    assert transform(x) == "eager"
    seen = []

    def f(t):
        seen.append(transform(t))
        return t * 2

    torch.func.vmap(f)(x)
    torch.func.grad(lambda t: f(t).sum())(x)
    torch.jit.trace(f, (x,), check_trace=False)
    torch.fx.symbolic_trace(f)
    assert seen == ["func", "func", "jit", "fx"]


def test_cuda_paths_script_lists_every_case_without_a_gpu(capsys, monkeypatch):
    """benchmarks/cuda_paths.py, for the day a GPU is lent: its CPU-side logic runs here."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "cuda_paths.py"
    spec = importlib.util.spec_from_file_location("cuda_paths", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "cuda_paths", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    module.dry_run((2, 64, 3, 4))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(module.FAMILIES) * len(module.DTYPES) * len(module.LAYOUTS)
    bn = [r for r in rows if r.startswith("| batch norm |")]
    assert bn and all("cuda (aten): native_batch_norm" in r for r in bn)


def test_cuda_layer_and_group_norm_need_parameters_of_the_input_dtype():
    """CUDA's native layer/group norm refuse float32 parameters beside bfloat16 input."""
    x = torch.randn(4, 8, 6, 5, dtype=torch.bfloat16)
    w = torch.ones(8)
    gn = first(explain_dispatch(x, "n (g k) h w -> n g", weight=w, device="cuda", g=2))
    assert gn.startswith("reference"), gn
    same = first(explain_dispatch(x, "n (g k) h w -> n g", weight=w.bfloat16(), device="cuda", g=2))
    assert same.startswith("cuda (aten)"), same
    bn = first(explain_dispatch(x, "n c h w -> c", weight=w, device="cuda"))
    assert bn.startswith("cuda (aten)"), bn  # cuDNN batch norm takes float32 beside bfloat16
