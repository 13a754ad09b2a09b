"""The Numba kernels' passes (CPU): statistics, normalize, gradient sums, input gradient.

:func:`prepare` turns one call into the kernels' view of it (canonical form, affine
offset tables, the work split into tasks, cached per shape, strides and pattern);
:class:`NumbaPasses` runs the passes on it. The autograd formula over the passes is
written once, in :mod:`normlab.kernels.function`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from normlab.kernels.canonical import (
    Canonical,
    affine_offsets,
    canonicalize,
    stats_from_plan,
    stats_to_plan,
)
from normlab.moments import stats_dtype
from normlab.pattern import Plan

KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Prepared:
    """Everything a kernel call needs besides the data: canonical form, affine, work split."""

    canon: Canonical
    shape: tuple[int, int, int, int]  # what the kernel sees: canon.shape, or (A, B, C·D, 1)
    gs: int  # columns per set: D when a short innermost reduced block is folded into c
    w: np.ndarray  # flat weight in the compute dtype (ones when absent)
    b: np.ndarray  # flat bias (zeros when absent)
    tables: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    mode: int
    tasks: np.ndarray
    chunks: np.ndarray
    remap: np.ndarray | None  # w, b were gathered as w[remap]: scatter gradients back
    fused: bool  # every task holds whole sets


#: A reduced innermost block shorter than this is folded into the columns (per-column
#: statistics, merged per set): loops over runs of 2 elements would cost more than the data.
FOLD_BELOW = 32


def _mode(shape: tuple[int, int, int, int], tables: list[np.ndarray]) -> int:
    inner = tables[3] if shape[3] > 1 else tables[2]
    if not inner.any():
        return 0
    if np.array_equal(inner, np.arange(len(inner))):
        return 1
    return 2


@lru_cache(maxsize=256)
def _split(shape: tuple[int, int, int, int], threads: int) -> tuple[np.ndarray, np.ndarray, bool]:
    from normlab.kernels import cpu

    return cpu.split_tasks(shape, threads)


def threads() -> int:
    """Threads the kernels use: torch's setting (``torch.set_num_threads``)."""
    return max(1, torch.get_num_threads())


@dataclass(frozen=True)
class Layout:
    """The data-independent part of a call (cached per shape, strides, pattern, affine shape)."""

    canon: Canonical
    shape: tuple[int, int, int, int]
    gs: int
    tables: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    mode: int
    tasks: np.ndarray
    chunks: np.ndarray
    remap: np.ndarray | None
    fused: bool


#: Below this many elements one thread does the whole call: handing work to another
#: thread costs more than it saves.
SERIAL_BELOW = 1 << 18


@lru_cache(maxsize=512)
def _layout(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    p: Plan,
    param_shape: tuple[int, ...] | None,
    nthreads: int,
) -> Layout | str:
    x = torch.empty_strided(shape, strides, device="meta")
    param = None if param_shape is None else torch.empty(param_shape, device="meta")
    c = canonicalize(x, p, param)
    if c is None:
        return f"pattern '{p.pattern.text}' does not fit K R K R in memory order"
    remap = None
    if param is None:
        tables = [np.zeros(size, np.int64) for size in c.shape]
    else:
        _, tables = affine_offsets(param, x, p, c)
        inner = 3 if c.shape[3] > 1 else 2
        if not any(tables[i].any() for i in range(4) if i != inner):
            # the affine varies only along the innermost run, in another order than
            # memory (LayerNorm over C,H,W of a channels_last input): gather it once
            remap = tables[inner]
            if remap.any() and not np.array_equal(remap, np.arange(len(remap))):
                tables[inner] = np.arange(len(remap), dtype=np.int64)
            else:
                remap = None
    kshape, gs = c.shape, 1
    A, B, C, D = kshape
    if 1 < D < FOLD_BELOW:
        kshape, gs = (A, B, C * D, 1), D
        tables = [tables[0], tables[1], (tables[2][:, None] + tables[3][None, :]).reshape(-1)]
        tables.append(np.zeros(1, np.int64))
    tasks, chunks, fused = _split(kshape, nthreads)
    mode = _mode(kshape, tables)
    return Layout(c, kshape, gs, tuple(tables), mode, tasks, chunks, remap, fused)


def prepare(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    nthreads: int | None = None,
) -> Prepared | str:
    """The kernel's view of one call, or the reason it cannot take it.

    `nthreads` forces the split into that many chunks (tests cut small inputs as if they
    were large); by default torch's thread count, one thread below `SERIAL_BELOW`.
    """
    if weight is not None and bias is not None and weight.shape != bias.shape:
        return "weight and bias broadcast differently"
    param = weight if weight is not None else bias
    param_shape = None if param is None else tuple(param.shape)
    if nthreads is None:
        nthreads = 1 if x.numel() < SERIAL_BELOW else threads()
    lay = _layout(tuple(x.shape), tuple(x.stride()), p, param_shape, nthreads)
    if isinstance(lay, str):
        return lay
    dtype = np.float64 if x.dtype == torch.float64 else np.float32
    if param is None:
        w, b = _constant(1, dtype, 1.0), _constant(1, dtype, 0.0)
    else:
        size = param.numel()
        w = _as_numpy(weight, dtype) if weight is not None else _constant(size, dtype, 1.0)
        b = _as_numpy(bias, dtype) if bias is not None else _constant(size, dtype, 0.0)
        if lay.remap is not None:
            w, b = w[lay.remap], b[lay.remap]
    return Prepared(
        lay.canon, lay.shape, lay.gs, w, b, lay.tables, lay.mode, lay.tasks, lay.chunks,
        lay.remap, lay.fused,
    )  # fmt: skip


@lru_cache(maxsize=64)
def _constant(size: int, dtype: type, value: float) -> np.ndarray:
    """A missing weight (ones) or bias (zeros), made once per size: the kernels only read it
    (making RMSNorm's zero bias of C·H·W elements anew cost more than a small call's kernel)."""
    return np.full(size, value, dtype)


def _as_numpy(t: torch.Tensor, dtype: type) -> np.ndarray:
    t = t.detach().contiguous().reshape(-1)
    return t.to(torch.float64 if dtype is np.float64 else torch.float32).numpy()


def _rows(t: torch.Tensor, c: Canonical) -> np.ndarray:
    """The canonical (A, B·C·D) view of a tensor laid out like the input.

    The canonical form is the input's memory order, so for a dense tensor this is its
    storage as A rows: one strided view (permute and reshape cost several µs a call).
    bfloat16 comes as its uint16 bits (the kernels widen it in cache).
    """
    rows = c.shape[0]
    size = t.numel() // rows
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16).as_strided((rows, size), (size, 1))
        return bits.numpy().view(np.uint16)
    return t.as_strided((rows, size), (size, 1)).numpy()


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    # float16 (which numba lacks) is widened once, layout kept; bfloat16 is widened in
    # the kernels. Statistics are float32 or wider either way.
    x = x.detach()
    if x.dtype in (torch.float32, torch.float64, torch.bfloat16):
        return x
    return x.to(torch.float32)


def _like(gy: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    """gy in the kernel's dtype and in x's memory order (the kernels read both alike)."""
    gyc = gy.detach().to(xc.dtype)
    if gyc.stride() != xc.stride():
        gyc = torch.empty_like(xc).copy_(gyc)
    return gyc


def _affine_rows(prep: Prepared) -> tuple[np.ndarray, np.ndarray]:
    # per-chunk partial sums in the statistics dtype (a float64 row per chunk doubled the
    # traffic of LayerNorm's per-element affine); the rows are summed in float64
    nchunks = len(prep.chunks) - 1
    return (np.zeros((nchunks, len(prep.w)), prep.w.dtype) for _ in range(2))


def _summed(rows: np.ndarray, prep: Prepared) -> torch.Tensor:
    """Per-chunk rows of partial affine sums → one float64 sum per parameter entry."""
    total = rows.sum(0, dtype=np.float64)
    if prep.remap is not None:  # back from the gathered order
        total = _scatter(total, prep.remap, int(prep.remap.max()) + 1)
    return torch.from_numpy(total)


def _scatter(values: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    """out[index[i]] += values[i]."""
    return np.bincount(index, weights=values, minlength=size)


@dataclass(slots=True)
class NumbaPasses:
    """The Numba kernels' passes for one call (see :class:`normlab.kernels.function.Passes`).

    Batch statistics run fused (statistics and output while a task's sets are in cache;
    gradient sums and input gradient likewise); statistics derived between passes (the
    hybrid norms) run the pieces: when every task holds whole sets, the fused kernels
    in parts, so many short sets cost no per-set overhead; otherwise the two-pass
    kernels' pieces.
    """

    prep: Prepared
    p: Plan
    threads: int | None = None

    name = "numba"

    def rebind(
        self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> NumbaPasses:
        """The same passes for another call of the same geometry (cached choice)."""
        prep = prepare(x, self.p, weight, bias, self.threads)
        assert not isinstance(prep, str), prep  # the same geometry was accepted
        return NumbaPasses(prep, self.p, self.threads)

    @property
    def canon(self) -> Canonical:
        return self.prep.canon

    def describe(self) -> str:
        c = self.prep.canon
        return f"cpu (numba): family {c.family}, canonical (A, B, C, D) = {c.shape}"

    def forward(
        self, x: torch.Tensor, eps: float, center: bool, stats: bool = True, running: object = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None, torch.Tensor | None]:
        """Batch statistics and y: ``(y, saved for backward, mean, var)`` (plan's stats shape)."""
        from normlab.kernels import cpu

        prep, c = self.prep, self.prep.canon
        xc = _kernel_input(x)
        yc = torch.empty_like(xc)
        mean = np.empty((c.shape[0], c.shape[2]))
        var = np.empty_like(mean)
        rstd = np.empty_like(mean)
        cpu.forward(
            _rows(xc, c), _rows(yc, c), prep.shape, prep.gs, mean, var, rstd,
            prep.w, prep.b, *prep.tables, prep.mode, float(eps), bool(center),
            prep.tasks, prep.chunks, prep.fused,
        )  # fmt: skip
        y = yc if yc.dtype == x.dtype else yc.to(x.dtype)
        # numpy casts: O(#sets) work that should not wake torch's thread pool
        np_dtype = np.float64 if x.dtype == torch.float64 else np.float32
        mean, var, rstd = (torch.from_numpy(t.astype(np_dtype)) for t in (mean, var, rstd))
        return y, (mean, rstd), stats_to_plan(mean, self.p, c), stats_to_plan(var, self.p, c)

    def apply(
        self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """y with given statistics (plan's stats shape): ``(y, saved for backward)``."""
        from normlab.kernels import cpu

        prep, c = self.prep, self.prep.canon
        xc = _kernel_input(x)
        yc = torch.empty_like(xc)
        m = stats_from_plan(mean.detach().to(torch.float64), self.p, c)
        r = torch.rsqrt(stats_from_plan(var.detach().to(torch.float64), self.p, c) + eps)
        m, r = (t.to(stats_dtype(xc.dtype)) for t in (m, r))
        cpu.apply(
            _rows(xc, c), _rows(yc, c), prep.shape, self._columns(m), self._columns(r),
            prep.w, prep.b, *prep.tables, prep.mode, prep.tasks, prep.chunks,
        )  # fmt: skip
        return (yc if yc.dtype == x.dtype else yc.to(x.dtype)), (m, r)

    def backward(
        self,
        x: torch.Tensor,
        gy: torch.Tensor,
        saved: tuple[torch.Tensor, ...],
        batch: bool,
        center: bool,
        needs: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """gx and the flat weight and bias gradients (float64) from the saved statistics."""
        from normlab.kernels import cpu

        prep, c = self.prep, self.prep.canon
        xc = _kernel_input(x)
        gyc = _like(gy, xc)
        gxc = torch.empty_like(xc)
        mean, rstd = (self._columns(t.to(stats_dtype(xc.dtype))) for t in saved)
        dw, db = _affine_rows(prep)
        cpu.backward(
            _rows(xc, c), _rows(gyc, c), _rows(gxc, c), prep.shape, prep.gs, mean, rstd,
            prep.w, *prep.tables, prep.mode, batch, center, prep.tasks, prep.chunks,
            prep.fused, dw, db,
        )  # fmt: skip
        gx = gxc if gxc.dtype == x.dtype else gxc.to(x.dtype)
        return (
            gx if needs[0] else None,
            _summed(dw, prep) if needs[1] else None,
            _summed(db, prep) if needs[2] else None,
        )

    def _columns(self, t: torch.Tensor) -> np.ndarray:
        # per set (A, C) → per kernel column (a set spans gs columns when folded)
        if self.prep.gs == 1:
            return t.contiguous().numpy()
        return t.repeat_interleave(self.prep.gs, 1).contiguous().numpy()

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from normlab.kernels import cpu

        prep, xc = self.prep, _kernel_input(x)
        rows = _rows(xc, prep.canon)
        A, C = prep.canon.shape[0], prep.canon.shape[2]
        mean, var, rstd = np.empty((A, C)), np.empty((A, C)), np.empty((A, C))
        if prep.fused:
            cpu.forward(
                rows,
                rows,
                prep.shape,
                prep.gs,
                mean,
                var,
                rstd,
                prep.w,
                prep.b,
                *prep.tables,
                prep.mode,
                0.0,
                True,
                prep.tasks,
                prep.chunks,
                True,
                cpu.STATS,
            )  # fmt: skip  (STATS writes no output: rows stand in for y)
        else:
            cdtype = np.float64 if xc.dtype == torch.float64 else np.float32
            mcol = np.empty((A, prep.shape[2]), cdtype)
            cpu.stats(rows, prep.shape, prep.gs, prep.tasks, prep.chunks, mean, var, rstd, 0.0, mcol, np.empty_like(mcol))  # fmt: skip
        return torch.from_numpy(mean), torch.from_numpy(var)

    def normalize(self, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        from normlab.kernels import cpu

        prep, xc = self.prep, _kernel_input(x)
        yc = torch.empty_like(xc)
        rows, out = _rows(xc, prep.canon), _rows(yc, prep.canon)
        if prep.fused:
            m, r = (t.double().contiguous().numpy() for t in (mean, rstd))
            cpu.forward(
                rows, out, prep.shape, prep.gs, m, np.empty_like(m), r, prep.w, prep.b,
                *prep.tables, prep.mode, 0.0, True, prep.tasks, prep.chunks, True, cpu.OUTPUT,
            )  # fmt: skip
        else:
            cpu.apply(
                rows, out, prep.shape, self._columns(mean), self._columns(rstd), prep.w,
                prep.b, *prep.tables, prep.mode, prep.tasks, prep.chunks,
            )  # fmt: skip
        return yc if yc.dtype == x.dtype else yc.to(x.dtype)

    def grad_sums(
        self, x: torch.Tensor, gy: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from normlab.kernels import cpu

        prep, xc = self.prep, _kernel_input(x)
        rows, grows = _rows(xc, prep.canon), _rows(_like(gy, xc), prep.canon)
        dw, db = _affine_rows(prep)
        args = (self._columns(mean), self._columns(rstd), prep.w, *prep.tables, prep.mode)
        if prep.fused:
            s1, s2 = (np.zeros(tuple(mean.shape)) for _ in range(2))
            cpu.backward(
                rows,
                grows,
                grows,
                prep.shape,
                prep.gs,
                *args,
                True,
                True,
                prep.tasks,
                prep.chunks,
                True,
                dw,
                db,
                cpu.SUMS,
                s1,
                s2,
            )  # fmt: skip  (SUMS writes no gx: grows stands in)
        else:
            s1, s2 = cpu.grad_sums(rows, grows, prep.shape, prep.gs, *args, prep.tasks, prep.chunks, dw, db)  # fmt: skip
            s1, s2 = s1[:, :: prep.gs], s2[:, :: prep.gs]  # every column of a set holds its sums
        dw, db = (_summed(t, prep) for t in (dw, db))
        return torch.from_numpy(s1), torch.from_numpy(s2), dw, db

    def grad_input(
        self,
        x: torch.Tensor,
        gy: torch.Tensor,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        k1: torch.Tensor,
        k2: torch.Tensor,
    ) -> torch.Tensor:
        from normlab.kernels import cpu

        prep, xc = self.prep, _kernel_input(x)
        gxc = torch.empty_like(xc)
        rows, grows, out = (_rows(t, prep.canon) for t in (xc, _like(gy, xc), gxc))
        args = (self._columns(mean), self._columns(rstd))
        if prep.fused:
            s1, s2 = (t.double().contiguous().numpy() for t in (k1, k2))
            dw, db = _affine_rows(prep)  # not touched by INPUT
            cpu.backward(
                rows, grows, out, prep.shape, prep.gs, *args, prep.w, *prep.tables, prep.mode,
                True, True, prep.tasks, prep.chunks, True, dw, db, cpu.INPUT, s1, s2,
            )  # fmt: skip
        else:
            cpu.grad_input(
                rows, grows, out, prep.shape, *args, self._columns(k1), self._columns(k2),
                prep.w, *prep.tables, prep.mode, prep.tasks, prep.chunks,
            )  # fmt: skip
        return gxc if gxc.dtype == x.dtype else gxc.to(x.dtype)
