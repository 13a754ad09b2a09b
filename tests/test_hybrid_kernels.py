"""Hybrid norms in one pass (statistics derived from instance moments) against the reference path."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import normlab
from normlab.kernels import backends, use_reference
from normlab.moments import from_stats
from normlab.normalize import normalize_derived
from normlab.pattern import plan


class _Paths(logging.Handler):
    """The derived-statistics calls that took the Numba kernels (from the dispatcher's log)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.calls = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("normalize_derived") and "cpu (numba)" in message:
            self.calls.append(message.split(" ")[1])


@pytest.fixture(autouse=True)
def small_tensors_take_the_kernel(numba_kernels):
    # Small test shapes through the Numba path, cut into 3 chunks as if they were large;
    # count the one-pass calls so that each test knows the fast path ran.
    logger = logging.getLogger("normlab.kernels")
    handler, level = _Paths(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.calls
    logger.removeHandler(handler)
    logger.setLevel(level)


def _make(kind, c, channel_axis, dtype):
    torch.manual_seed(0)
    if kind == "ibn":
        m = normlab.IBN(c, ratio=0.3, channel_axis=channel_axis)
    elif kind == "bin":
        m = normlab.BatchInstanceNorm(c, channel_axis=channel_axis)
        with torch.no_grad():  # gates inside, on and outside [0, 1] (clamped in forward)
            m.gate.copy_(torch.linspace(-0.2, 1.2, c))
    elif kind == "sn":
        m = normlab.SwitchableNorm(c, channel_axis=channel_axis)
    elif kind == "sn-paper":
        m = normlab.SwitchableNorm(c, variance="paper", channel_axis=channel_axis)
    else:  # switchable norm without its batch term
        m = normlab.SwitchableNorm(c, using_bn=False, channel_axis=channel_axis)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if (
                name.endswith("weight")
                and p.dim() == 1
                and "mean" not in name
                and "var" not in name
            ):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif name in ("mean_weight", "var_weight"):
                p.copy_(torch.randn_like(p))
    return m.to(dtype)


KINDS = ("ibn", "bin", "sn", "sn-paper", "sn-no-bn")
LAYOUTS = {
    "nchw": (lambda x: x, 1),
    "channels_last": (lambda x: x.contiguous(memory_format=torch.channels_last), 1),
    "non_contiguous": (lambda x: x.transpose(2, 3), 1),
    "channel_axis_-1": (lambda x: x.permute(0, 2, 3, 1).contiguous(), -1),
}


def _compare(m, x, fast_calls, dtype, steps=2):
    """Train `steps` steps then eval: fast path vs the float64 reference on a copy."""
    ref = copy.deepcopy(m).double()
    tol = {torch.float64: 1e-9, torch.float32: 3e-5, torch.bfloat16: 3e-2}[dtype]
    for training in [True] * steps + [False]:
        m.train(training)
        ref.train(training)
        xa = x.detach().clone().requires_grad_()
        xr = x.detach().double().requires_grad_()
        before = len(fast_calls)
        y = m(xa)
        assert len(fast_calls) == before + 1, "the one-pass kernel path did not run"
        with use_reference():
            yr = ref(xr)
        assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == xa.stride()
        torch.testing.assert_close(y.double(), yr, atol=10 * tol, rtol=tol)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        params, params_r = list(m.parameters()), list(ref.parameters())
        got = torch.autograd.grad(y, [xa, *params], g.to(dtype), allow_unused=True)
        want = torch.autograd.grad(yr, [xr, *params_r], g, allow_unused=True)
        for mine, theirs in zip(got, want, strict=True):
            if theirs is None:
                assert mine is None or not mine.any()
                continue
            scale = theirs.abs().max().item() + 1.0
            torch.testing.assert_close(mine.double(), theirs, atol=20 * tol * scale, rtol=10 * tol)
        for (name, b), (_, br) in zip(m.named_buffers(), ref.named_buffers(), strict=True):
            torch.testing.assert_close(b.double(), br.double(), atol=tol, rtol=tol, msg=name)
    with torch.no_grad():  # inference: the passes without autograd
        before = len(fast_calls)
        y = m(x)
        assert len(fast_calls) == before + 1
        with use_reference():
            yr = ref(x.double())
        torch.testing.assert_close(y.double(), yr, atol=10 * tol, rtol=tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_pass_hybrids_match_the_reference_path(kind, layout, small_tensors_take_the_kernel):
    make_layout, axis = LAYOUTS[layout]
    x = make_layout(torch.randn(5, 7, 6, 9, dtype=torch.float64) * 2 + 0.5)
    m = _make(kind, 7, axis, torch.float32)
    _compare(m, x.float(), small_tensors_take_the_kernel, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 6, 33), (3, 5, 2, 3, 4), (6, 4, 2)])
def test_one_pass_hybrids_in_other_dtypes_and_ranks(
    kind, dtype, shape, small_tensors_take_the_kernel
):
    x = (torch.randn(shape, dtype=torch.float64) * 3 - 1).to(dtype)
    m = _make(kind, shape[1], 1, dtype if dtype == torch.float64 else torch.float32)
    _compare(m, x, small_tensors_take_the_kernel, dtype)


def test_derived_batch_norm_equals_torch_batch_norm(small_tensors_take_the_kernel):
    """Batch norm derived from instance moments (Chan's formula) is torch's BatchNorm2d."""
    x = torch.randn(6, 5, 7, 8, dtype=torch.float64, requires_grad=True)
    p = plan("n c h w -> n c", x.shape)
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def as_batch_norm(mean, var):
        batch = from_stats(mean, var, p).reduce("n")
        rstd = torch.rsqrt(batch.var + 1e-5)
        return p.to_stats(batch.mean.expand(6, 5)), p.to_stats(rstd.expand(6, 5))

    y, inst = normalize_derived(x, p, as_batch_norm, weight.view(1, 5, 1, 1))
    assert small_tensors_take_the_kernel
    torch.testing.assert_close(inst.mean, x.mean((2, 3)))
    torch.testing.assert_close(inst.var, x.var((2, 3), correction=0))
    bn = torch.nn.BatchNorm2d(5, affine=False).double()
    want = bn(x) * weight.view(1, 5, 1, 1)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(x)
    for mine, theirs in zip(
        torch.autograd.grad(y, (x, weight), g),
        torch.autograd.grad(want, (x, weight), g),
        strict=True,
    ):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("kind", ["ibn", "bin", "sn"])
def test_gradcheck_and_double_backward_on_the_one_pass_path(kind, small_tensors_take_the_kernel):
    m = _make(kind, 4, 1, torch.float64).train()
    for buffer in m.buffers():  # gradcheck runs forward many times: no running updates
        buffer.requires_grad_(False)
    for layer in m.modules():
        if hasattr(layer, "track_running_stats"):
            layer.momentum = 0.0
    x = torch.randn(3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    params = tuple(p for p in m.parameters())

    def fn(x, *values):
        with torch.nn.utils.stateless._reparametrize_module(
            m, dict(zip([n for n, _ in m.named_parameters()], values, strict=True))
        ):
            return m(x)

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))
    assert small_tensors_take_the_kernel


def test_only_the_affine_needs_a_gradient(small_tensors_take_the_kernel):
    m = _make("sn", 6, 1, torch.float32)
    m.mean_weight.requires_grad_(False)
    m.var_weight.requires_grad_(False)
    x = torch.randn(4, 6, 5, 5)
    y = m(x)
    y.sum().backward()
    with use_reference():
        ref = copy.deepcopy(m)
        ref.weight.grad = ref.bias.grad = None
        ref(x).sum().backward()
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-4)


def test_converted_halves_keep_the_composition(small_tensors_take_the_kernel):
    """An IBN whose BN half was frozen no longer takes the one-pass path."""
    m = normlab.IBN(8)
    m.BN = normlab.freeze(m.BN)
    before = len(small_tensors_take_the_kernel)
    m(torch.randn(4, 8, 5, 5))
    assert len(small_tensors_take_the_kernel) == before


def test_fast_false_stays_on_the_reference_path(small_tensors_take_the_kernel):
    x = torch.randn(4, 3, 5, 5)
    p = plan("n c h w -> n c", x.shape)

    def identity(mean, var):
        return mean, torch.rsqrt(var + 1e-5)

    y, _ = normalize_derived(x, p, identity, fast=False)
    assert not small_tensors_take_the_kernel
    torch.testing.assert_close(y, torch.nn.functional.instance_norm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("shape", "channels_last", "fused"),
    [
        ((6, 5, 7, 8), False, True),  # whole sets per task, short rows
        ((3, 2, 100, 90), False, True),  # whole sets per task, rows longer than a block
        ((2, 5, 7, 8), True, False),  # sets cut across tasks (channels-last, N < threads·4)
        ((6, 4, 3, 2), False, True),  # short innermost runs folded into columns
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_every_kernel_layout_of_the_derived_path(shape, channels_last, fused, dtype):
    """Batch norm derived from instance moments against torch's, on each kernel layout."""
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p = plan("n c h w -> n c", x.shape)
    assert (
        backends.NUMBA.accept(
            backends.Call(x, p, None, None, 0.0, True, forced=True, threads=3)
        ).prep.fused
        is fused
    )
    n, c = shape[:2]
    weight = torch.linspace(0.5, 1.5, c, dtype=torch.float64, requires_grad=True)

    def as_batch_norm(mean, var):
        batch = from_stats(mean, var, p).reduce("n")
        rstd = torch.rsqrt(batch.var + 1e-5)
        return p.to_stats(batch.mean.expand(n, c)), p.to_stats(rstd.expand(n, c))

    xa = x.detach().clone().requires_grad_()
    w = weight.detach().to(torch.float32 if dtype == torch.bfloat16 else dtype).requires_grad_()
    y, _ = normalize_derived(xa, p, as_batch_norm, w.view(1, c, 1, 1))
    x64 = x.detach().double().requires_grad_()
    want = torch.nn.functional.batch_norm(x64, None, None, training=True) * weight.view(1, c, 1, 1)
    tol = 1e-9 if dtype == torch.float64 else 3e-2
    torch.testing.assert_close(y.double(), want, atol=10 * tol, rtol=tol)
    g = torch.randn(shape, dtype=torch.float64)
    got = torch.autograd.grad(y, (xa, w), g.to(dtype))
    expected = torch.autograd.grad(want, (x64, weight), g)
    for mine, theirs in zip(got, expected, strict=True):
        scale = theirs.abs().max().item() + 1.0
        torch.testing.assert_close(mine.double(), theirs, atol=20 * tol * scale, rtol=10 * tol)
