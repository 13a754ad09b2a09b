"""Checks of the Triton kernels under Triton's interpreter (CPU), run in a child process.

Triton decides at import whether it interprets, so ``tests/test_gpu_interpreter.py``
runs this file with ``TRITON_INTERPRET=1`` in a fresh interpreter; it prints one JSON
object mapping each check's name to "ok" or the failure.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

# triton_passes imports triton (through normlab.kernels.gpu) only when a kernel runs
from normlab.kernels import function, reference, triton_passes
from normlab.normalize import affine_view
from normlab.pattern import plan

CASES = [  # shape, pattern, sizes, channels_last: every family, odd sizes, a set > BLOCK
    ((4, 6, 5, 7), "n c h w -> c", {}, False),  # RKR
    ((4, 6, 5, 7), "n c h w -> c", {}, True),  # RK
    ((3, 5, 7, 9), "n c h w -> n c", {}, False),  # KR
    ((3, 5, 7, 9), "n c h w -> n c", {}, True),  # KRK
    ((2, 3, 40, 30), "n c h w -> n c", {}, False),  # KR, 1200 elements per set: 2 blocks
    ((3, 8, 5, 3), "n (g k) h w -> n g", {"g": 4}, False),  # KR (groups)
    ((3, 8, 5, 3), "n (g k) h w -> n g", {"g": 4}, True),  # KRKR
    ((3, 6, 4, 5), "n c h w -> n h w", {}, False),  # KRK (LayerNorm2d)
    ((3, 6, 1, 1), "n c h w -> c", {}, False),  # spatial size 1
    ((3, 4, 5, 2, 3), "n c d h w -> n c", {}, False),  # 5-D
]


def _prepare(x, pattern, sizes, affine=True):
    p = plan(pattern, x.shape, **sizes)
    g = torch.Generator().manual_seed(1)
    w = (1 + 0.5 * torch.randn(x.shape[1], generator=g)).requires_grad_(affine)
    b = (0.5 * torch.randn(x.shape[1], generator=g)).requires_grad_(affine)
    wv, bv = (affine_view(t, x, p, r) for t, r in ((w, "weight"), (b, "bias")))
    if not affine:
        wv = bv = w = b = None
    prep = triton_passes.prepare_gpu(x, p, wv, bv)
    assert not isinstance(prep, str), prep
    return p, w, b, wv, bv, triton_passes.TritonPasses(prep, p)


def _input(shape, channels_last, dtype=torch.float32):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 100).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _check_grads(y, yr, inputs, inputs_r, tol):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad(y, inputs, g.to(y.dtype))
    want = torch.autograd.grad(yr, inputs_r, g)
    for mine, ref in zip(got, want, strict=True):
        scale = ref.abs().max().item() + 1.0
        torch.testing.assert_close(mine.double(), ref.double(), atol=tol * scale, rtol=tol)


def batch_statistics(shape, pattern, sizes, channels_last, center):
    x = _input(shape, channels_last)
    p, w, b, wv, bv, prep = _prepare(x, pattern, sizes)
    xf = x.clone().requires_grad_()
    y, mean, var = function.BatchFunction.apply(xf, wv, bv, p, 1e-5, center, prep, True, None)
    xr = x.double().requires_grad_()
    yr, mean_r, var_r = reference.normalize_batch(xr, p, wv.double(), bv.double(), 1e-5, center)
    assert y.stride() == x.stride() and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), yr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mean.double(), mean_r, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(var.double(), var_r, atol=1e-3, rtol=1e-4)
    _check_grads(y, yr, (xf, w, b), (xr, w, b), 1e-4)


def given_statistics(shape, pattern, sizes, channels_last):
    x = _input(shape, channels_last)
    p, w, b, wv, bv, prep = _prepare(x, pattern, sizes)
    g = torch.Generator().manual_seed(3)
    mean = 100 + torch.randn(p.stats_shape, generator=g)
    var = 9 * torch.rand(p.stats_shape, generator=g) + 1
    xf = x.clone().requires_grad_()
    y = function.GivenFunction.apply(xf, wv, bv, p, mean, var, 1e-5, prep)
    xr = x.double().requires_grad_()
    yr = reference.normalize_with(
        xr, p, mean.double(), var.double(), wv.double(), bv.double(), 1e-5
    )
    torch.testing.assert_close(y.double(), yr, atol=1e-4, rtol=1e-4)
    _check_grads(y, yr, (xf, w, b), (xr, w, b), 1e-4)


def bfloat16_and_no_affine():
    x = _input((4, 6, 5, 7), True, torch.bfloat16)
    p, *_, prep = _prepare(x, "n c h w -> n c", {}, affine=False)
    xf = x.clone().requires_grad_()
    y, mean, _ = function.BatchFunction.apply(xf, None, None, p, 1e-5, True, prep, True, None)
    assert y.dtype == torch.bfloat16 and mean.dtype == torch.float32
    xr = x.double().requires_grad_()
    yr = reference.normalize_batch(xr, p, None, None, 1e-5, True)[0]
    torch.testing.assert_close(y.double(), yr, atol=3e-2, rtol=3e-2)
    _check_grads(y, yr, (xf,), (xr,), 5e-2)


def double_backward_through_the_reference_path():
    x = _input((3, 4, 3, 5), False, torch.float64).float()
    p, w, b, wv, bv, prep = _prepare(x, "n c h w -> c", {})
    xf = x.clone().requires_grad_()
    y = function.BatchFunction.apply(xf, wv, bv, p, 1e-5, True, prep, True, None)[0]
    (gx,) = torch.autograd.grad(y.square().sum(), xf, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), xf)
    xr = x.clone().requires_grad_()
    yr = reference.normalize_batch(xr, p, wv, bv, 1e-5, True)[0]
    (gxr,) = torch.autograd.grad(yr.square().sum(), xr, create_graph=True)
    (ggxr,) = torch.autograd.grad(gxr.sum(), xr)
    torch.testing.assert_close(ggx, ggxr, atol=1e-4, rtol=1e-4)


def float64_is_refused_with_a_reason():
    x = torch.randn(4, 6, 5, 7, dtype=torch.float64)
    assert "float64" in triton_passes.prepare_gpu(x, plan("n c h w -> c", x.shape), None, None)


def derived_statistics(channels_last):
    """A Batch-Instance mixture on the split kernels (moments, normalize, sums, input grad)."""
    from normlab.moments import from_stats

    x = _input((4, 5, 6, 7), channels_last)
    p, w, b, wv, bv, prep = _prepare(x, "n c h w -> n c", {})
    gate = torch.linspace(0.1, 0.9, 5, requires_grad=True)

    def derive(mean, var, gate):
        inst = from_stats(mean, var, p)
        batch = inst.reduce("n")
        r_in, r_bn = torch.rsqrt(inst.var + 1e-5), torch.rsqrt(batch.var + 1e-5)
        r = gate * r_bn + (1 - gate) * r_in
        m = (gate * r_bn * batch.mean + (1 - gate) * r_in * inst.mean) / r
        return p.to_stats(m), p.to_stats(r)

    xf = x.clone().requires_grad_()
    y, mean, var = function.DerivedFunction.apply(xf, wv, bv, p, derive, prep, gate)
    xr = x.double().requires_grad_()
    yr, mean_r, var_r = reference.normalize_derived(
        xr, p, derive, wv.double(), bv.double(), (gate,)
    )
    assert y.stride() == x.stride()
    torch.testing.assert_close(y.double(), yr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mean.double(), mean_r, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(var.double(), var_r, atol=1e-3, rtol=1e-4)
    _check_grads(y, yr, (xf, w, b, gate), (xr, w, b, gate), 1e-4)


def checks() -> dict:
    """Every check by name: the kernels on every case, both centerings, then the rest."""
    out = {}
    for i, case in enumerate(CASES):
        for center in (True, False):
            out[f"batch-{i}-{'center' if center else 'rms'}"] = (batch_statistics, (*case, center))
        if i < 4:
            out[f"given-{i}"] = (given_statistics, case)
    for fn in (bfloat16_and_no_affine, double_backward_through_the_reference_path,
               float64_is_refused_with_a_reason):  # fmt: skip
        out[fn.__name__] = (fn, ())
    for channels_last in (False, True):
        out[f"derived-{'cl' if channels_last else 'nchw'}"] = (derived_statistics, (channels_last,))
    return out


def main() -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    results = {}
    for name, (fn, args) in checks().items():
        try:
            fn(*args)
            results[name] = "ok"
        except Exception:  # noqa: BLE001  (reported to the parent test, which fails)
            results[name] = traceback.format_exc(limit=3)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
