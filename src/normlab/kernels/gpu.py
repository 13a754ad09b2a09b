"""GPU kernels (Triton) on the canonical ``(A, B, C, D)`` form.

Checked against the reference path under Triton's interpreter on the CPU
(``tests/test_gpu_interpreter.py``) and, on a machine with a CUDA device, compiled
(``tests/test_gpu_kernels.py``). The dispatcher sends only CUDA tensors to them, and
only when triton imports.

One program per set ``(a, c)``: the set's ``B·D`` elements are visited in blocks of
``BLOCK`` (element ``(b, d)`` at ``((a·B + b)·C + c)·D + d``), so every family is
served by the same three kernels. The layout is coalesced for the row families
(KR, RKR, GN) and strided for the column ones (RK, KRK); statistics are two-pass in
float32 (mean, then squared deviations), never E[x²] − E[x]².
"""

# ruff: noqa: ANN001  (Triton reads kernel annotations; only tl.constexpr is given)
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def forward_kernel(  # noqa: ANN201
    x_ptr, y_ptr, mean_ptr, var_ptr, rstd_ptr, w_ptr, b_ptr,
    oa_ptr, ob_ptr, oc_ptr, od_ptr,
    B, C, D, eps, CENTER: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Statistics of set (a, c) = program id, then its normalized output."""
    s = tl.program_id(0)
    a = s // C
    c = s % C
    n = B * D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if CENTER:
        for start in range(0, n, BLOCK):
            j = start + tl.arange(0, BLOCK)
            mask = j < n
            b = j // D
            off = ((a * B + b) * C + c) * D + j % D
            acc += tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        j = start + tl.arange(0, BLOCK)
        mask = j < n
        b = j // D
        off = ((a * B + b) * C + c) * D + j % D
        v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) - mean
        acc += tl.where(mask, v * v, 0.0)
    var = tl.sum(acc, axis=0) / n
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + s, mean)
    tl.store(var_ptr + s, var)
    tl.store(rstd_ptr + s, rstd)
    for start in range(0, n, BLOCK):
        j = start + tl.arange(0, BLOCK)
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
        xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + woff, mask=mask, other=1.0).to(tl.float32)
        bv = tl.load(b_ptr + woff, mask=mask, other=0.0).to(tl.float32)
        yv = (xv - mean) * rstd * wv + bv
        tl.store(y_ptr + off, yv.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_kernel(  # noqa: ANN201
    x_ptr, gy_ptr, gx_ptr, mean_ptr, rstd_ptr, w_ptr, dw_ptr, db_ptr,
    oa_ptr, ob_ptr, oc_ptr, od_ptr,
    B, C, D, BATCH: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """gx of set (a, c); Σ gy·x̂ and Σ gy added atomically into dw, db (float32)."""
    s = tl.program_id(0)
    a = s // C
    c = s % C
    n = B * D
    mean = tl.load(mean_ptr + s)
    rstd = tl.load(rstd_ptr + s)
    sg = tl.zeros([BLOCK], dtype=tl.float32)
    sgx = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        j = start + tl.arange(0, BLOCK)
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
        xh = (tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        g = tl.load(gy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + woff, mask=mask, other=0.0).to(tl.float32)
        sg += g * wv
        sgx += g * wv * xh
        tl.atomic_add(dw_ptr + woff, g * xh, mask=mask)
        tl.atomic_add(db_ptr + woff, g, mask=mask)
    k1 = tl.sum(sg, axis=0) / n
    k2 = tl.sum(sgx, axis=0) / n
    if not CENTER:
        k1 = 0.0
    if not BATCH:
        k1 = 0.0
        k2 = 0.0
    for start in range(0, n, BLOCK):
        j = start + tl.arange(0, BLOCK)
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
        xh = (tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        g = tl.load(gy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + woff, mask=mask, other=0.0).to(tl.float32)
        gx = rstd * (g * wv - k1 - xh * k2)
        tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def apply_kernel(  # noqa: ANN201
    x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, oa_ptr, ob_ptr, oc_ptr, od_ptr,
    B, C, D, BLOCK: tl.constexpr,
):  # fmt: skip
    """y = (x − mean)·rstd·w + bias for set (a, c) with given statistics."""
    s = tl.program_id(0)
    a = s // C
    c = s % C
    n = B * D
    mean = tl.load(mean_ptr + s)
    rstd = tl.load(rstd_ptr + s)
    for start in range(0, n, BLOCK):
        j = start + tl.arange(0, BLOCK)
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
        xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + woff, mask=mask, other=1.0).to(tl.float32)
        bv = tl.load(b_ptr + woff, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + off, ((xv - mean) * rstd * wv + bv).to(y_ptr.dtype.element_ty), mask=mask)
