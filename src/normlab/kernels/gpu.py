"""GPU kernels (Triton) on the canonical ``(A, B, C, D)`` form.

Checked against the reference path under Triton's interpreter on the CPU
(``tests/test_gpu_interpreter.py``) and, on a machine with a CUDA device, compiled
(``tests/test_gpu_kernels.py``). The dispatcher sends only CUDA tensors to them, and
only when triton imports.

One program per set ``(a, c)``: the set's ``B·D`` elements are visited in blocks of
``BLOCK`` (element ``(b, d)`` at ``((a·B + b)·C + c)·D + d``), so every family is
served by the same kernels, built from four per-set pieces (moments, normalize,
gradient sums, input gradient). The fused kernels chain them in one program; the
split ones serve statistics derived between the passes (the hybrid norms). The layout is coalesced for the row families
(KR, RKR, GN) and strided for the column ones (RK, KRK); statistics are two-pass in
float32 (mean, then squared deviations), never E[x²] − E[x]².
"""

# ruff: noqa: ANN001  (Triton reads kernel annotations; only tl.constexpr is given)
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _offsets(j, a, c, n, B, C, D, oa_ptr, ob_ptr, oc_ptr, od_ptr):
    """Mask, element offsets and affine offsets of positions j of set (a, c)."""
    mask = j < n
    b = j // D
    d = j % D
    off = ((a * B + b) * C + c) * D + d
    woff = (
        tl.load(oa_ptr + a)
        + tl.load(ob_ptr + b, mask=mask, other=0)
        + tl.load(oc_ptr + c)
        + tl.load(od_ptr + d, mask=mask, other=0)
    )
    return mask, off, woff


@triton.jit
def _moments(x_ptr, a, c, B, C, D, CENTER: tl.constexpr, BLOCK: tl.constexpr):
    """Mean (0 without CENTER) and mean squared deviation of set (a, c): two passes."""
    n = B * D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if CENTER:
        for start in range(0, n, BLOCK):
            j = start + tl.arange(0, BLOCK)
            mask = j < n
            off = ((a * B + j // D) * C + c) * D + j % D
            acc += tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        j = start + tl.arange(0, BLOCK)
        mask = j < n
        off = ((a * B + j // D) * C + c) * D + j % D
        v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) - mean
        acc += tl.where(mask, v * v, 0.0)
    return mean, tl.sum(acc, axis=0) / n


@triton.jit
def _normalize(
    x_ptr, y_ptr, mean, rstd, w_ptr, b_ptr, oa_ptr, ob_ptr, oc_ptr, od_ptr,
    a, c, B, C, D, BLOCK: tl.constexpr,
):  # fmt: skip
    """y = (x − mean)·rstd·w + bias over set (a, c)."""
    n = B * D
    for start in range(0, n, BLOCK):
        j = start + tl.arange(0, BLOCK)
        mask, off, woff = _offsets(j, a, c, n, B, C, D, oa_ptr, ob_ptr, oc_ptr, od_ptr)
        xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + woff, mask=mask, other=1.0).to(tl.float32)
        bv = tl.load(b_ptr + woff, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + off, ((xv - mean) * rstd * wv + bv).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums(
    x_ptr, gy_ptr, mean, rstd, w_ptr, dw_ptr, db_ptr, oa_ptr, ob_ptr, oc_ptr, od_ptr,
    a, c, B, C, D, BLOCK: tl.constexpr,
):  # fmt: skip
    """Σ w·gy and Σ w·gy·x̂ over set (a, c); Σ gy·x̂ and Σ gy added atomically into dw, db."""
    n = B * D
    sg = tl.zeros([BLOCK], dtype=tl.float32)
    sgx = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        j = start + tl.arange(0, BLOCK)
        mask, off, woff = _offsets(j, a, c, n, B, C, D, oa_ptr, ob_ptr, oc_ptr, od_ptr)
        xh = (tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        g = tl.load(gy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + woff, mask=mask, other=0.0).to(tl.float32)
        sg += g * wv
        sgx += g * wv * xh
        tl.atomic_add(dw_ptr + woff, g * xh, mask=mask)
        tl.atomic_add(db_ptr + woff, g, mask=mask)
    return tl.sum(sg, axis=0), tl.sum(sgx, axis=0)


@triton.jit
def _grad_input(
    x_ptr, gy_ptr, gx_ptr, mean, rstd, k1, k2, w_ptr, oa_ptr, ob_ptr, oc_ptr, od_ptr,
    a, c, B, C, D, BLOCK: tl.constexpr,
):  # fmt: skip
    """gx = rstd·(gy·w − k1 − x̂·k2) over set (a, c)."""
    n = B * D
    for start in range(0, n, BLOCK):
        j = start + tl.arange(0, BLOCK)
        mask, off, woff = _offsets(j, a, c, n, B, C, D, oa_ptr, ob_ptr, oc_ptr, od_ptr)
        xh = (tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        g = tl.load(gy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + woff, mask=mask, other=0.0).to(tl.float32)
        gx = rstd * (g * wv - k1 - xh * k2)
        tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def forward_kernel(  # noqa: ANN201
    x_ptr, y_ptr, mean_ptr, var_ptr, rstd_ptr, w_ptr, b_ptr,
    oa_ptr, ob_ptr, oc_ptr, od_ptr,
    B, C, D, eps, CENTER: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Statistics of set (a, c) = program id, then its normalized output."""
    s = tl.program_id(0)
    a, c = s // C, s % C
    mean, var = _moments(x_ptr, a, c, B, C, D, CENTER, BLOCK)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + s, mean)
    tl.store(var_ptr + s, var)
    tl.store(rstd_ptr + s, rstd)
    _normalize(x_ptr, y_ptr, mean, rstd, w_ptr, b_ptr, oa_ptr, ob_ptr, oc_ptr, od_ptr, a, c, B, C, D, BLOCK)  # fmt: skip


@triton.jit
def backward_kernel(  # noqa: ANN201
    x_ptr, gy_ptr, gx_ptr, mean_ptr, rstd_ptr, w_ptr, dw_ptr, db_ptr,
    oa_ptr, ob_ptr, oc_ptr, od_ptr,
    B, C, D, BATCH: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """gx of set (a, c); Σ gy·x̂ and Σ gy added atomically into dw, db (float32)."""
    s = tl.program_id(0)
    a, c = s // C, s % C
    mean = tl.load(mean_ptr + s)
    rstd = tl.load(rstd_ptr + s)
    sg, sgx = _grad_sums(x_ptr, gy_ptr, mean, rstd, w_ptr, dw_ptr, db_ptr, oa_ptr, ob_ptr, oc_ptr, od_ptr, a, c, B, C, D, BLOCK)  # fmt: skip
    n = B * D
    k1 = sg / n
    k2 = sgx / n
    if not CENTER:
        k1 = 0.0
    if not BATCH:
        k1 = 0.0
        k2 = 0.0
    _grad_input(x_ptr, gy_ptr, gx_ptr, mean, rstd, k1, k2, w_ptr, oa_ptr, ob_ptr, oc_ptr, od_ptr, a, c, B, C, D, BLOCK)  # fmt: skip


@triton.jit
def apply_kernel(  # noqa: ANN201
    x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, oa_ptr, ob_ptr, oc_ptr, od_ptr,
    B, C, D, BLOCK: tl.constexpr,
):  # fmt: skip
    """y = (x − mean)·rstd·w + bias for set (a, c) with given statistics."""
    s = tl.program_id(0)
    a, c = s // C, s % C
    mean = tl.load(mean_ptr + s)
    rstd = tl.load(rstd_ptr + s)
    _normalize(x_ptr, y_ptr, mean, rstd, w_ptr, b_ptr, oa_ptr, ob_ptr, oc_ptr, od_ptr, a, c, B, C, D, BLOCK)  # fmt: skip


@triton.jit
def moments_kernel(x_ptr, mean_ptr, var_ptr, B, C, D, BLOCK: tl.constexpr):  # noqa: ANN201
    """Mean and biased variance of set (a, c) only."""
    s = tl.program_id(0)
    mean, var = _moments(x_ptr, s // C, s % C, B, C, D, True, BLOCK)
    tl.store(mean_ptr + s, mean)
    tl.store(var_ptr + s, var)


@triton.jit
def grad_sums_kernel(  # noqa: ANN201
    x_ptr, gy_ptr, mean_ptr, rstd_ptr, w_ptr, dw_ptr, db_ptr, s1_ptr, s2_ptr,
    oa_ptr, ob_ptr, oc_ptr, od_ptr, B, C, D, BLOCK: tl.constexpr,
):  # fmt: skip
    """Σ w·gy and Σ w·gy·x̂ of set (a, c) into s1, s2; dw, db as in backward_kernel."""
    s = tl.program_id(0)
    mean = tl.load(mean_ptr + s)
    rstd = tl.load(rstd_ptr + s)
    sg, sgx = _grad_sums(x_ptr, gy_ptr, mean, rstd, w_ptr, dw_ptr, db_ptr, oa_ptr, ob_ptr, oc_ptr, od_ptr, s // C, s % C, B, C, D, BLOCK)  # fmt: skip
    tl.store(s1_ptr + s, sg)
    tl.store(s2_ptr + s, sgx)


@triton.jit
def grad_input_kernel(  # noqa: ANN201
    x_ptr, gy_ptr, gx_ptr, mean_ptr, rstd_ptr, k1_ptr, k2_ptr, w_ptr,
    oa_ptr, ob_ptr, oc_ptr, od_ptr, B, C, D, BLOCK: tl.constexpr,
):  # fmt: skip
    """gx = rstd·(gy·w − k1 − x̂·k2) of set (a, c) with given per-set k1, k2."""
    s = tl.program_id(0)
    mean = tl.load(mean_ptr + s)
    rstd = tl.load(rstd_ptr + s)
    k1 = tl.load(k1_ptr + s)
    k2 = tl.load(k2_ptr + s)
    _grad_input(x_ptr, gy_ptr, gx_ptr, mean, rstd, k1, k2, w_ptr, oa_ptr, ob_ptr, oc_ptr, od_ptr, s // C, s % C, B, C, D, BLOCK)  # fmt: skip
