"""The ``normlab::`` operators: opcheck (PyTorch's operator checks), and their values against the reference path."""

from __future__ import annotations

import pytest
import torch
from torch import library as torch_library

from normlab.kernels import ops, reference
from normlab.normalize import affine_view
from normlab.pattern import plan

# pattern, sizes, channels_last, center
PATTERNS = [
    ("n c h w -> c", {}, False, True),  # batch norm (RKR)
    ("n c h w -> c", {}, True, True),  # batch norm, channels-last (RK)
    ("n (g k) h w -> n g", {"g": 2}, False, True),  # group norm
    ("n c h w -> n h w", {}, False, True),  # LayerNorm2d (KRK)
    ("n c h w -> n", {}, True, False),  # RMS norm over C, H, W
]
SHAPES = [(2, 4, 3, 5), (8, 16, 32, 32)]  # small, and fast-path size


def _case(shape, pattern, sizes, channels_last, dtype, grad=True):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p = plan(pattern, x.shape, **sizes)
    wdtype = torch.float32 if dtype == torch.bfloat16 else dtype
    w = (1 + 0.3 * torch.randn(shape[1], generator=g)).to(wdtype)
    b = (0.3 * torch.randn(shape[1], generator=g)).to(wdtype)
    wv, bv = (affine_view(t, x, p, r).requires_grad_(grad) for t, r in ((w, "weight"), (b, "bias")))
    return x.requires_grad_(grad), p, wv, bv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("pattern", "sizes", "channels_last", "center"), PATTERNS)
def test_opcheck(pattern, sizes, channels_last, center, shape, dtype):
    x, p, w, b = _case(shape, pattern, sizes, channels_last, dtype)
    spec = ops.plan_spec(p)
    torch_library.opcheck(
        torch.ops.normlab.batch_forward.default, (x, w, b, spec, 1e-5, center, "numba")
    )
    torch_library.opcheck(
        torch.ops.normlab.batch_forward.default, (x, None, None, spec, 1e-5, center, "numba")
    )
    mean = x.detach().float().mean().expand(p.stats_shape).contiguous()
    var = (x.detach().float().var() + 0.5).expand(p.stats_shape).contiguous()
    torch_library.opcheck(
        torch.ops.normlab.given_forward.default, (x, w, b, mean, var, spec, 1e-5, "numba")
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("pattern", "sizes", "channels_last", "center"), PATTERNS)
def test_operators_match_the_reference_path(pattern, sizes, channels_last, center, dtype):
    """Outputs, statistics and gradients against the float64 reference path."""
    x, p, w, b = _case((6, 4, 5, 7), pattern, sizes, channels_last, dtype)
    spec = ops.plan_spec(p)
    y, mean, var, rstd = torch.ops.normlab.batch_forward(x, w, b, spec, 1e-5, center, "numba")
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64, mean64, var64 = reference.normalize_batch(x64, p, w64, b64, 1e-5, center)
    tol = {"atol": 1e-9, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 5e-2, "rtol": 3e-2}
    assert y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(mean.double(), mean64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double(), var64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var64 + 1e-5), atol=1e-4, rtol=1e-4)
    gy = torch.randn(x.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w, b), gy.to(dtype))
    want = torch.autograd.grad(y64, (x64, w64, b64), gy)
    for mine, theirs in zip(got, want, strict=True):
        scale = theirs.abs().max().item() + 1
        torch.testing.assert_close(
            mine.double(), theirs, atol=tol["atol"] * scale * 4, rtol=tol["rtol"]
        )
    # given statistics: the moments of x itself, without a gradient through them
    yg = torch.ops.normlab.given_forward(
        x, w, b, mean64.detach(), var64.detach(), spec, 1e-5, "numba"
    )
    wanted = reference.normalize_with(x64, p, mean64.detach(), var64.detach(), w64, b64, 1e-5)
    torch.testing.assert_close(yg.double(), wanted, **tol)
    got = torch.autograd.grad(yg, (x, w, b), gy.to(dtype))
    want = torch.autograd.grad(wanted, (x64, w64, b64), gy)
    for mine, theirs in zip(got, want, strict=True):
        scale = theirs.abs().max().item() + 1
        torch.testing.assert_close(
            mine.double(), theirs, atol=tol["atol"] * scale * 4, rtol=tol["rtol"]
        )


def test_plan_spec_round_trips_group_sizes():
    p = plan("n (g k) h w -> n g", (2, 8, 4, 4), g=2)
    assert ops.plan_spec(p) == "n (g k) h w -> n g;g=2"
    assert ops._stats_shape(ops.plan_spec(p), torch.Size((2, 8, 4, 4))) == list(p.stats_shape)
    q = plan("n c ... -> c", (2, 3, 4, 5, 6))
    assert ops._stats_shape(ops.plan_spec(q), torch.Size(q.shape)) == list(q.stats_shape)
    r = plan("n ... c -> n ...", (2, 3, 4, 5))
    assert ops._stats_shape(ops.plan_spec(r), torch.Size(r.shape)) == list(r.stats_shape)


@pytest.mark.parametrize("center", [True, False])
def test_calls_the_backend_refuses_take_the_reference_path_inside(center):
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    p = plan("n c h w -> c w", x.shape)  # R K R K: no canonical form
    spec = ops.plan_spec(p)
    args = (x, w, b, spec, 1e-5, center, "numba")
    torch_library.opcheck(torch.ops.normlab.batch_forward.default, args)
    y, mean, var, rstd = torch.ops.normlab.batch_forward(*args)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    yr, mean_r, var_r = reference.normalize_batch(leaves[0], p, *leaves[1:], 1e-5, center)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(var, var_r)
    gy = torch.randn_like(x)
    for mine, theirs in zip(
        torch.autograd.grad(y, (x, w, b), gy), torch.autograd.grad(yr, leaves, gy), strict=True
    ):
        torch.testing.assert_close(mine, theirs)
    # given statistics: gx = rstd·gy·w
    yg = torch.ops.normlab.given_forward(
        x, w, b, mean_r.detach(), var_r.detach(), spec, 1e-5, "numba"
    )
    want = reference.normalize_with(
        leaves[0], p, mean_r.detach(), var_r.detach(), *leaves[1:], 1e-5
    )
    for mine, theirs in zip(
        torch.autograd.grad(yg, (x, w, b), gy), torch.autograd.grad(want, leaves, gy), strict=True
    ):
        torch.testing.assert_close(mine, theirs)
    with pytest.raises(ValueError, match="expected backend"):
        torch.ops.normlab.batch_forward(x, None, None, spec, 1e-5, True, "cuda")


def test_the_operator_compiles_and_matches_eager():
    """A graph that calls the normlab:: operator compiles whole (fake implementation,
    registered autograd): outputs, statistics and gradients as on the reference path.
    (The dispatcher itself takes ATen's kernel under torch.compile: measured faster.)"""
    from normlab.kernels import dispatch, explain_dispatch, use_reference

    x = torch.randn(8, 16, 32, 32)
    p = plan("n c h w -> c", x.shape)
    path = explain_dispatch(x, "n c h w -> c", mode="compile").splitlines()
    assert path == [
        "cpu (aten): native_batch_norm",
        "  under torch.compile ATen's own kernel (torch.nn's operator), where exact",
    ]
    graphs = []

    def capture(gm, inputs):  # noqa: ARG001
        graphs.append(gm)
        return gm.forward

    spec = ops.plan_spec(p)

    def f(x, w):
        return torch.ops.normlab.batch_forward(x, w, None, spec, 1e-5, True, "numba")[:3]

    compiled = torch.compile(f, backend=capture, fullgraph=True)
    w = torch.linspace(0.5, 1.5, 16).reshape(1, 16, 1, 1).requires_grad_()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w, w.detach().clone().requires_grad_()]
    y, mean, var = compiled(xs[0], ws[0])
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("normlab.batch_forward" in t for t in targets), targets
    with use_reference():
        yr, mean_r, var_r = dispatch.normalize_batch(xs[1], p, ws[1], None, 1e-5, True)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, var_r, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(x)
    for mine, theirs in zip(
        torch.autograd.grad(y, (xs[0], ws[0]), gy),
        torch.autograd.grad(yr, (xs[1], ws[1]), gy),
        strict=True,
    ):
        torch.testing.assert_close(mine, theirs, atol=1e-3, rtol=1e-4)
