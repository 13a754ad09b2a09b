"""The fast CPU kernels against the reference path: outputs, statistics and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab
from normlab.kernels import explain_dispatch, use_reference
from normlab.normalize import affine_view, normalize_batch, normalize_with
from normlab.pattern import plan


@pytest.fixture(autouse=True)
def small_tensors_take_the_kernel(numba_kernels):
    # Test shapes are small: the Numba kernels take them regardless of size (not ATen's),
    # cut into 3 chunks on the thread pool as if they were large.
    yield


def _params(kind, x, pattern, sizes, dtype):
    if kind is None:
        return None, None
    if kind == "channel":
        c = x.shape[1] if not pattern.startswith("n ... c") else x.shape[-1]
        shape = (c,)
    else:  # "trailing": LayerNorm's elementwise affine over the reduced trailing dims
        shape = tuple(x.shape[kind:])
    g = torch.Generator().manual_seed(1)
    w = (1 + 0.5 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    return w, b


def _run(x, pattern, sizes, w, b, center=True, reference=False):
    xr = x.detach().clone().requires_grad_()
    with use_reference(reference):
        y = normlab.normalize(xr, pattern, weight=w, bias=b, center=center, **sizes)
    return xr, y


def check(x, pattern, sizes=None, affine="channel", center=True, tol=None):
    """Fast path (x's dtype) against the float64 reference path: y, dx, dweight, dbias."""
    sizes = sizes or {}
    w, b = _params(affine, x, pattern, sizes, x.dtype)
    assert explain_dispatch(x, pattern, weight=w, **sizes).startswith("cpu"), explain_dispatch(
        x, pattern, weight=w, **sizes
    )
    xf, y = _run(x, pattern, sizes, w, b, center)
    w64 = None if w is None else w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    x64, y64 = _run(x.double(), pattern, sizes, w64, b64, center, reference=True)
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    tol = tol or {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2}[x.dtype]
    torch.testing.assert_close(y.double(), y64.detach(), atol=tol * 10, rtol=tol)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params = [t for t in (w, b) if t is not None]
    got = torch.autograd.grad(y, [xf, *params], g.to(x.dtype))
    params64 = [t for t in (w64, b64) if t is not None]
    want = torch.autograd.grad(y64, [x64, *params64], g)
    for mine, ref in zip(got, want, strict=True):
        scale = ref.abs().max().item() + 1.0
        torch.testing.assert_close(mine.double(), ref, atol=tol * 20 * scale, rtol=tol * 10)


def _cl(x):
    return x.contiguous(memory_format=torch.channels_last)


def _cl3d(x):
    return x.contiguous(memory_format=torch.channels_last_3d)


def _randn(*shape, mean=0.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + mean


# (input, pattern, sizes, affine): every family, odd sizes, rank 3 and 5, channels_last.
CASES = [
    ("bn nchw", lambda: _randn(5, 7, 9, 3), "n c h w -> c", {}, "channel"),
    ("bn cl", lambda: _cl(_randn(5, 7, 9, 3)), "n c h w -> c", {}, "channel"),
    ("bn 2d input", lambda: _randn(37, 13), "n c -> c", {}, "channel"),
    ("bn 3d", lambda: _randn(4, 6, 11), "n c ... -> c", {}, "channel"),
    ("bn 5d cl", lambda: _cl3d(_randn(3, 5, 4, 3, 2)), "n c ... -> c", {}, "channel"),
    ("bn per activation", lambda: _randn(6, 5, 3, 3), "n c h w -> c h w", {}, None),
    ("in nchw", lambda: _randn(3, 5, 7, 6), "n c h w -> n c", {}, "channel"),
    ("in cl", lambda: _cl(_randn(3, 5, 7, 6)), "n c h w -> n c", {}, "channel"),
    ("in 5d", lambda: _randn(2, 3, 4, 5, 3), "n c ... -> n c", {}, None),
    (
        "in spatial 1",
        lambda: _randn(4, 6, 1, 1) * 0 + _randn(4, 6, 1, 2),
        "n c h w -> n c",
        {},
        None,
    ),
    ("gn nchw", lambda: _randn(3, 12, 5, 7), "n (g k) h w -> n g", {"g": 4}, "channel"),
    ("gn cl", lambda: _cl(_randn(3, 12, 5, 7)), "n (g k) h w -> n g", {"g": 4}, "channel"),
    ("gn group size 1", lambda: _randn(2, 6, 5, 3), "n (g k) h w -> n g", {"g": 6}, "channel"),
    ("gn one group cl", lambda: _cl(_randn(2, 6, 5, 3)), "n (g k) h w -> n g", {"g": 1}, "channel"),
    ("ln chw", lambda: _randn(4, 5, 6, 7), "n c h w -> n", {}, 1),
    ("ln chw per channel", lambda: _cl(_randn(4, 5, 6, 7)), "n c h w -> n", {}, "channel"),
    ("ln last dim", lambda: _randn(3, 17, 33), "... d -> ...", {}, 2),
    ("ln last two dims", lambda: _randn(3, 5, 4, 9), "n t h d -> n t", {}, 2),
    ("ln2d nchw", lambda: _randn(3, 10, 4, 5), "n c h w -> n h w", {}, "channel"),
    ("ln2d cl", lambda: _cl(_randn(3, 10, 4, 5)), "n c h w -> n h w", {}, "channel"),
    ("ln2d wide", lambda: _randn(6, 5, 24, 25), "n c h w -> n h w", {}, "channel"),
    ("gn wide cl", lambda: _cl(_randn(6, 640, 3, 2)), "n (g k) h w -> n g", {"g": 32}, "channel"),
    ("channel-last bn", lambda: _randn(4, 5, 3, 8), "n ... c -> c", {}, "channel"),
    ("channel-last in", lambda: _randn(4, 5, 3, 8), "n ... c -> n c", {}, "channel"),
    ("one set", lambda: _randn(3, 50), "n c ->", {}, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fast_path_matches_reference(case, dtype):
    _, make, pattern, sizes, affine = case
    check(make().to(dtype), pattern, sizes, affine)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bfloat16_keeps_dtype_and_float32_statistics(case):
    _, make, pattern, sizes, affine = case
    x = make().to(torch.bfloat16)
    check(x, pattern, sizes, affine)
    p = plan(pattern, x.shape, **sizes)
    _, m = normalize_batch(x, p)
    assert m.mean.dtype == torch.float32


def test_float16_goes_through_float32():
    check(_cl(_randn(4, 6, 5, 3)).half(), "n c h w -> n c", tol=3e-3)


def test_nan_stays_in_its_set():
    for dtype in (torch.float32, torch.bfloat16):
        x = _randn(4, 6, 5, 3).to(dtype)
        x[1, 2, 0, 0] = float("nan")
        y = normlab.normalize(x, "n c h w -> n c")
        assert torch.isnan(y[1, 2]).all()
        assert not torch.isnan(y[0]).any() and not torch.isnan(y[1, 3]).any()


@pytest.mark.parametrize("case", CASES[::4], ids=[c[0] for c in CASES[::4]])
def test_rms_without_centering(case):
    _, make, pattern, sizes, affine = case
    check(make() + 3, pattern, sizes, affine, center=False)


def test_non_contiguous_input_is_handled():
    base = _randn(4, 6, 10, 8)
    check(base[:, :, ::2, 1:], "n c h w -> c")  # not dense: copied in memory order
    check(base.transpose(2, 3), "n c h w -> n c")  # dense, unusual order
    check(base.permute(0, 2, 3, 1), "n ... c -> n c")  # channels-last style view


def test_batch_statistics_match_reference():
    x = _cl(_randn(6, 5, 7, 3, mean=4.0))
    p = plan("n (g k) h w -> n g", x.shape, g=5)
    _, fast = normalize_batch(x, p)
    with use_reference():
        _, ref = normalize_batch(x.double(), p)
    torch.testing.assert_close(fast.mean.double(), ref.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.var.double(), ref.var, atol=1e-5, rtol=1e-5)


def test_large_mean_normalizes_correctly_in_float32():
    # mean 2000, std 1: E[x²] − E[x]² would lose every digit of the variance in float32.
    g = torch.Generator().manual_seed(3)
    for x in (
        torch.randn(8, 16, 32, 32, generator=g) + 2000,
        _cl(torch.randn(8, 16, 32, 32, generator=g) * 0.01 + 100),
    ):
        for pattern in ("n c h w -> c", "n c h w -> n c", "n c h w -> n"):
            y = normlab.normalize(x, pattern, eps=1e-12)
            assert explain_dispatch(x, pattern).startswith("cpu")
            p = plan(pattern, x.shape)
            z = y.double().reshape(p.expanded_shape)
            mean = z.mean(p.reduced)
            std = z.std(p.reduced, correction=0)
            assert mean.abs().max() < 1e-3, pattern
            assert (std - 1).abs().max() < 1e-3, pattern


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_given_statistics_path_and_gradients(dtype):
    # running-statistics path (eval-mode batch norm): fast path vs float64 reference
    x = _cl(_randn(6, 5, 4, 3)).to(dtype)
    p = plan("n c h w -> c", x.shape)
    g = torch.Generator().manual_seed(4)
    mean = torch.randn(5, generator=g, dtype=torch.float64)
    var = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    w = torch.randn(5, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)

    def run(x, reference):
        x = x.detach().requires_grad_()
        wr, br = (t.to(x.dtype).requires_grad_() for t in (w, b))
        wv, bv = affine_view(wr, x, p, "weight"), affine_view(br, x, p, "bias")
        with use_reference(reference):
            y = normalize_with(x, p, mean.to(x.dtype), var.to(x.dtype), wv, bv)
        grads = torch.autograd.grad(y, (x, wr, br), torch.ones_like(y) * 0.5)
        return [y, *grads]

    assert explain_dispatch(x, "n c h w -> c", weight=w.to(dtype)).startswith("cpu")
    mine, ref = run(x, False), run(x.double(), True)
    assert mine[0].is_contiguous(memory_format=torch.channels_last)
    tol = 1e-9 if dtype == torch.float64 else 3e-2
    for a, b_ in zip(mine, ref, strict=True):
        torch.testing.assert_close(a.double(), b_.double(), atol=tol * 10, rtol=tol)


def test_gradcheck_and_double_backward_through_the_fast_path():
    x = _randn(3, 4, 5, 2).double().requires_grad_()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for pattern in ("n c h w -> c", "n c h w -> n c"):

        def f(x, w, b, pattern=pattern):
            return normlab.normalize(x, pattern, weight=w, bias=b)

        assert torch.autograd.gradcheck(f, (x, w, b))
        # create_graph recomputes through the reference path, so second derivatives hold
        assert torch.autograd.gradgradcheck(f, (x, w, b))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    c=st.sampled_from([1, 2, 3, 6]),
    h=st.integers(1, 6),
    w=st.integers(1, 7),
    kept=st.sampled_from(["c", "n c", "n", "n g", "n h w", "c h w", "n w"]),
    channels_last=st.booleans(),
    affine=st.booleans(),
)
def test_random_shapes_and_patterns(n, c, h, w, kept, channels_last, affine):
    x = _randn(n, c, h, w)
    if channels_last:
        x = _cl(x)
    sizes = {}
    pattern = f"n c h w -> {kept}"
    if kept == "n g":
        pattern, sizes = "n (g k) h w -> n g", {"g": c // 2 if c % 2 == 0 else c}
    p = plan(pattern, x.shape, **sizes)
    if p.set_size < 2:
        return  # nothing to normalize: the dispatcher sends it to the reference path
    check(x, pattern, sizes, "channel" if affine else None)


def _timm_layer_norm_2d(ref):
    def run(x):
        y = torch.nn.functional.layer_norm(
            x.permute(0, 2, 3, 1), ref.normalized_shape, ref.weight, ref.bias, ref.eps
        )
        return y.permute(0, 3, 1, 2)

    return run


LAYERS = [
    ("bn", lambda c, h, w: (normlab.BatchNorm2d(c), torch.nn.BatchNorm2d(c))),
    (
        "in",
        lambda c, h, w: (
            normlab.InstanceNorm2d(c, affine=True),
            torch.nn.InstanceNorm2d(c, affine=True),
        ),
    ),
    ("ln", lambda c, h, w: (normlab.LayerNorm([c, h, w]), torch.nn.LayerNorm([c, h, w]))),
    ("gn", lambda c, h, w: (normlab.GroupNorm(3, c), torch.nn.GroupNorm(3, c))),
    (
        "rms",
        lambda c, h, w: (
            normlab.RMSNorm([c, h, w], eps=1e-5),
            torch.nn.RMSNorm([c, h, w], eps=1e-5),
        ),
    ),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("layer", LAYERS, ids=[name for name, _ in LAYERS])
def test_layers_on_the_fast_path_match_torch_nn(layer, channels_last):
    _, make = layer
    x = _randn(4, 6, 5, 7)
    if channels_last:
        x = _cl(x)
    mine, ref = make(6, 5, 7)
    mine.load_state_dict(ref.state_dict())
    for p in ref.parameters():  # non-trivial affine
        torch.nn.init.normal_(p, 1.0, 0.3)
    mine.load_state_dict(ref.state_dict())
    for mode in ("train", "eval"):
        mine.train(mode == "train")
        ref.train(mode == "train")
        xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        ym, yr = mine(xm), ref(xr)
        torch.testing.assert_close(ym, yr, atol=1e-4, rtol=1e-4)
        if channels_last:
            assert ym.is_contiguous(memory_format=torch.channels_last)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        gm = torch.autograd.grad(ym, [xm, *mine.parameters()], g)
        gr = torch.autograd.grad(yr, [xr, *ref.parameters()], g)
        for a, b in zip(gm, gr, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for name, buf in ref.named_buffers():  # running statistics updated alike
        torch.testing.assert_close(dict(mine.named_buffers())[name], buf)


def test_layer_norm_2d_on_the_fast_path_matches_permute_layer_norm():
    ref = torch.nn.LayerNorm(6, eps=1e-6)  # LayerNorm2d's default eps, as in ConvNeXt
    torch.nn.init.normal_(ref.weight, 1.0, 0.3)
    mine = normlab.LayerNorm2d(6, eps=1e-6)
    mine.load_state_dict(ref.state_dict())
    for x in (_randn(4, 6, 5, 7), _cl(_randn(4, 6, 5, 7))):
        assert explain_dispatch(x, "n c h w -> n h w", weight=mine.weight).startswith("cpu")
        torch.testing.assert_close(mine(x), _timm_layer_norm_2d(ref)(x), atol=1e-5, rtol=1e-5)
