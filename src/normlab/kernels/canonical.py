"""Canonical form: any pattern on a dense tensor as a 4-D block ``(A, B, C, D)``.

The fast kernels see the input in its *memory order* with adjacent axes of the same
kind merged: kept (K) and reduced (R) blocks alternate. Every family fits the shape
``K R K R`` once size-1 blocks are added: sets are indexed by ``(a, c)``, the elements
of one set by ``(b, d)``, and ``d`` is the innermost (contiguous) index.

====================  ==================  =======================================
family                example             (A, B, C, D)
====================  ==================  =======================================
KR (rows)             LN, IN/GN NCHW      (N·C, 1, 1, H·W) for IN
RK (columns)          BN channels_last    (1, N·H·W, C, 1)
RKR                   BN NCHW             (1, N, C, H·W)
KRK                   IN channels_last    (N, H·W, C, 1)
KRKR                  GN channels_last    (N, H·W, G, C/G)
====================  ==================  =======================================

A weight or bias (any tensor that broadcasts against the input) becomes four offset
tables, one per block: the affine value of element ``(a, b, c, d)`` sits at
``oa[a] + ob[b] + oc[c] + od[d]`` of the flat parameter.

Example:
    >>> p = plan("n c h w -> c", (8, 3, 5, 5))
    >>> canonicalize(torch.empty(8, 3, 5, 5), p).shape
    (1, 8, 3, 25)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from normlab.pattern import Plan

KEPT, REDUCED = "K", "R"


@dataclass(frozen=True)
class Canonical:
    """How a dense tensor maps onto ``(A, B, C, D)``: memory order and each block's axes."""

    order: tuple[int, ...]  # input dims, outermost first in memory
    shape: tuple[int, int, int, int]
    blocks: tuple[tuple[int, ...], ...]  # expanded-axis indices of each of the 4 blocks
    family: str  # the blocks that are not of size 1, e.g. "KR", "RKR"
    axis_strides: tuple[int, ...]  # element stride of every expanded axis

    @property
    def num_sets(self) -> int:
        return self.shape[0] * self.shape[2]

    @property
    def set_size(self) -> int:
        return self.shape[1] * self.shape[3]


def expanded_strides(p: Plan, strides: tuple[int, ...]) -> list[int]:
    """Element stride of every expanded axis (a split group shares its input dim's stride)."""
    out = [0] * len(p.axes)
    for d, members in enumerate(p.input_dims):
        step = strides[d]
        for i in reversed(members):
            out[i] = step
            step *= p.expanded_shape[i]
    return out


def memory_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """Input dims from outermost to innermost in memory, or None if `x` is not dense."""
    return _memory_order(tuple(x.shape), x.stride())


@lru_cache(maxsize=1024)
def _memory_order(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...] | None:
    # cached: every kernel call asks (twice), and sorting in Python costs microseconds
    dims = sorted(range(len(shape)), key=lambda d: (-strides[d], -d))
    expected = 1
    for d in reversed(dims):
        if shape[d] != 1 and strides[d] != expected:
            return None
        expected *= shape[d]
    return tuple(dims)


def canonicalize(x: torch.Tensor, p: Plan, weight: torch.Tensor | None = None) -> Canonical | None:
    """The canonical form of dense `x` under `p`, or None when the pattern does not fit.

    `weight` (broadcast against `x`) only steers one choice: a trailing reduced block
    whose outer axes carry a varying weight is split, so that the innermost run has
    one weight value (group norm over NCHW).
    """
    order = memory_order(x)
    if order is None:
        return None
    strides = expanded_strides(p, tuple(x.stride()))
    kept = set(p.kept)
    axes = [i for d in order for i in p.input_dims[d] if p.expanded_shape[i] != 1]
    runs: list[tuple[str, list[int]]] = []
    for i in axes:
        kind = KEPT if i in kept else REDUCED
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(i)
        else:
            runs.append((kind, [i]))
    if not any(kind == REDUCED for kind, _ in runs):
        return None
    if runs and runs[0][0] == REDUCED:
        runs.insert(0, (KEPT, []))
    family = "".join(kind for kind, members in runs if members)
    blocks = [members for _, members in runs]
    if len(blocks) == 2:  # K R: the reduced block is innermost (d); maybe split it for the weight
        inner = blocks[1]
        split = 0
        if weight is not None:
            split = len(inner)
            wstrides = expanded_strides(p, tuple(weight.expand(x.shape).stride()))
            while split > 0 and wstrides[inner[split - 1]] == 0:
                split -= 1
            if split == len(inner):  # the weight varies along the innermost axis: keep it whole
                split = 0
        blocks = [blocks[0], inner[:split], [], inner[split:]]
    elif len(blocks) == 3:  # K R K
        blocks.append([])
    elif len(blocks) != 4:
        return None
    size = tuple(math.prod(p.expanded_shape[i] for i in b) for b in blocks)
    return Canonical(order, size, tuple(tuple(b) for b in blocks), family, tuple(strides))


def flat_view(t: torch.Tensor, c: Canonical) -> torch.Tensor:
    """`t` (same shape and strides as the canonicalized input) as a 4-D contiguous view."""
    return t.permute(c.order).reshape(c.shape)


def affine_offsets(
    param: torch.Tensor, x: torch.Tensor, p: Plan, c: Canonical
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The flat parameter and, per block, the offset of each block index into it."""
    flat = param.contiguous()
    strides = expanded_strides(p, tuple(flat.expand(x.shape).stride()))
    tables = []
    for members in c.blocks:
        table = np.zeros(1, dtype=np.int64)
        for i in members:  # outer axes first: table[outer, inner] = outer + inner
            step = np.arange(p.expanded_shape[i], dtype=np.int64) * strides[i]
            table = (table[:, None] + step[None, :]).reshape(-1)
        tables.append(table)
    return flat.reshape(-1), tables


def stats_to_plan(stats: torch.Tensor, p: Plan, c: Canonical) -> torch.Tensor:
    """An ``(A, C)`` statistics array as a tensor of `p.stats_shape`."""
    shape, perm = _to_plan_steps(p, c)
    if perm is None:  # kept axes already in the plan's order: one reshape
        return stats.reshape(p.stats_shape)
    return stats.reshape(shape).permute(perm).reshape(p.stats_shape)


@lru_cache(maxsize=512)
def _to_plan_steps(p: Plan, c: Canonical) -> tuple[list[int], list[int] | None]:
    kept = list(c.blocks[0]) + list(c.blocks[2])
    perm = sorted(range(len(kept)), key=lambda j: kept[j])
    shape = [p.expanded_shape[i] for i in kept] or [1]
    return shape, (perm if perm != sorted(perm) else None)


def stats_from_plan(stats: torch.Tensor, p: Plan, c: Canonical) -> torch.Tensor:
    """The inverse of :func:`stats_to_plan`: `p.stats_shape` → contiguous ``(A, C)``."""
    kept = list(c.blocks[0]) + list(c.blocks[2])
    ordered = sorted(kept)
    t = stats.reshape([p.expanded_shape[i] for i in ordered] or [1])
    if kept:
        t = t.permute([ordered.index(i) for i in kept])
    return t.reshape(c.shape[0], c.shape[2]).contiguous()
