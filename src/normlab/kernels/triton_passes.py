"""The Triton kernels' passes (CUDA tensors; float32, bfloat16, float16).

Checked under Triton's interpreter on the CPU (see ``gpu.py``). Same contract as the
Numba passes: saved for backward are the input and (mean, 1/std) per set; the autograd
formula over them is :mod:`normlab.kernels.function`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normlab.kernels.canonical import (
    Canonical,
    affine_offsets,
    canonicalize,
    flat_view,
    stats_from_plan,
    stats_to_plan,
)
from normlab.moments import stats_dtype
from normlab.pattern import Plan

BLOCK = 1024


@dataclass(frozen=True)
class GpuPrepared:
    """The canonical form, the float32 affine and its four offset tables, on the device."""

    canon: Canonical
    w: torch.Tensor
    b: torch.Tensor
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def prepare_gpu(
    x: torch.Tensor, p: Plan, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> GpuPrepared | str:
    """The kernels' view of one call, or the reason they cannot take it."""
    if x.dtype == torch.float64:
        return "float64 on the GPU (the kernels accumulate in float32)"
    c = canonicalize(x, p, weight if weight is not None else bias)
    if c is None:
        return f"pattern '{p.pattern.text}' does not fit K R K R in memory order"
    if weight is not None and bias is not None and weight.shape != bias.shape:
        return "weight and bias broadcast differently"
    param = weight if weight is not None else bias
    if param is None:
        tables = [torch.zeros(size, dtype=torch.int64) for size in c.shape]
        w, b = x.new_ones(1, dtype=torch.float32), x.new_zeros(1, dtype=torch.float32)
    else:
        flat, arrays = affine_offsets(param.detach(), x, p, c)
        tables = [torch.from_numpy(t) for t in arrays]
        w = (
            _flat(weight)
            if weight is not None
            else flat.new_ones(flat.numel(), dtype=torch.float32)
        )
        b = _flat(bias) if bias is not None else torch.zeros_like(w)
    return GpuPrepared(c, w, b, tuple(t.to(x.device) for t in tables))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).to(torch.float32)


def _grid(c: Canonical) -> tuple[int]:
    return (c.shape[0] * c.shape[2],)


@dataclass(slots=True)
class TritonPasses:
    """The Triton kernels' passes for statistics derived between them (``derived.Passes``)."""

    prep: GpuPrepared
    p: Plan

    name = "triton"

    def rebind(
        self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> TritonPasses:
        """The same passes for another call of the same geometry (cached choice)."""
        prep = prepare_gpu(x, self.p, weight, bias)
        assert not isinstance(prep, str), prep  # the same geometry was accepted
        return TritonPasses(prep, self.p)

    @property
    def canon(self) -> Canonical:
        return self.prep.canon

    def describe(self) -> str:
        c = self.prep.canon
        return f"gpu (triton): family {c.family}, canonical (A, B, C, D) = {c.shape}"

    def forward(
        self, x: torch.Tensor, eps: float, center: bool, stats: bool = True, running: object = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None, torch.Tensor | None]:
        """Batch statistics and y: ``(y, saved for backward, mean, var)`` (plan's stats shape)."""
        from normlab.kernels import gpu

        c, prep = self.canon, self.prep
        y = torch.empty_like(x)
        sets = torch.empty(3, c.shape[0], c.shape[2], device=x.device, dtype=torch.float32)
        gpu.forward_kernel[_grid(c)](
            flat_view(x.detach(), c), flat_view(y, c), sets[0], sets[1], sets[2],
            prep.w, prep.b, *prep.tables, c.shape[1], c.shape[2], c.shape[3], float(eps),
            CENTER=bool(center), BLOCK=BLOCK,
        )  # fmt: skip
        dtype = stats_dtype(x.dtype)
        mean, var = (stats_to_plan(sets[i].to(dtype), self.p, c) for i in (0, 1))
        return y, (sets[0], sets[2]), mean, var

    def apply(
        self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """y with given statistics (plan's stats shape): ``(y, saved for backward)``."""
        from normlab.kernels import gpu

        c, prep = self.canon, self.prep
        m = stats_from_plan(mean.detach().to(torch.float32), self.p, c)
        r = torch.rsqrt(stats_from_plan(var.detach().to(torch.float32), self.p, c) + eps)
        y = torch.empty_like(x)
        gpu.apply_kernel[_grid(c)](
            flat_view(x.detach(), c), flat_view(y, c), m, r, prep.w, prep.b, *prep.tables,
            c.shape[1], c.shape[2], c.shape[3], BLOCK=BLOCK,
        )  # fmt: skip
        return y, (m, r)

    def backward(
        self,
        x: torch.Tensor,
        gy: torch.Tensor,
        saved: tuple[torch.Tensor, ...],
        batch: bool,
        center: bool,
        needs: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """gx and the flat weight and bias gradients (float32) from the saved statistics."""
        from normlab.kernels import gpu

        c, prep = self.canon, self.prep
        mean, rstd = _f32(*saved)
        gx = torch.empty_like(x)
        dw, db = torch.zeros_like(prep.w), torch.zeros_like(prep.w)
        gpu.backward_kernel[_grid(c)](
            flat_view(x.detach(), c), flat_view(_like(gy, x), c), flat_view(gx, c), mean, rstd,
            prep.w, dw, db, *prep.tables, c.shape[1], c.shape[2], c.shape[3],
            BATCH=bool(batch), CENTER=bool(center), BLOCK=BLOCK,
        )  # fmt: skip
        return (gx if needs[0] else None), (dw if needs[1] else None), (db if needs[2] else None)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from normlab.kernels import gpu

        c = self.canon
        sets = torch.empty(2, c.shape[0], c.shape[2], device=x.device, dtype=torch.float32)
        gpu.moments_kernel[_grid(c)](
            flat_view(x.detach(), c), sets[0], sets[1], *c.shape[1:], BLOCK=BLOCK
        )
        return sets[0], sets[1]

    def normalize(self, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        from normlab.kernels import gpu

        c, prep = self.canon, self.prep
        y = torch.empty_like(x)
        gpu.apply_kernel[_grid(c)](
            flat_view(x.detach(), c), flat_view(y, c), *_f32(mean, rstd), prep.w, prep.b,
            *prep.tables, *c.shape[1:], BLOCK=BLOCK,
        )  # fmt: skip
        return y

    def grad_sums(
        self, x: torch.Tensor, gy: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from normlab.kernels import gpu

        c, prep = self.canon, self.prep
        sums = torch.empty(2, c.shape[0], c.shape[2], device=x.device, dtype=torch.float32)
        dw, db = torch.zeros_like(prep.w), torch.zeros_like(prep.w)
        gpu.grad_sums_kernel[_grid(c)](
            flat_view(x.detach(), c), flat_view(_like(gy, x), c), *_f32(mean, rstd), prep.w,
            dw, db, sums[0], sums[1], *prep.tables, *c.shape[1:], BLOCK=BLOCK,
        )  # fmt: skip
        return sums[0], sums[1], dw.double(), db.double()

    def grad_input(
        self,
        x: torch.Tensor,
        gy: torch.Tensor,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        k1: torch.Tensor,
        k2: torch.Tensor,
    ) -> torch.Tensor:
        from normlab.kernels import gpu

        c, prep = self.canon, self.prep
        gx = torch.empty_like(x)
        gpu.grad_input_kernel[_grid(c)](
            flat_view(x.detach(), c), flat_view(_like(gy, x), c), flat_view(gx, c),
            *_f32(mean, rstd, k1, k2), prep.w, *prep.tables, *c.shape[1:], BLOCK=BLOCK,
        )  # fmt: skip
        return gx


def _f32(*stats: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(torch.float32).contiguous() for t in stats]


def _like(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """gy in x's memory order (the kernels index both alike)."""
    gy = gy.detach()
    return gy if gy.stride() == x.stride() else torch.empty_like(x).copy_(gy)
