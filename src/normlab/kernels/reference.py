"""The reference path: plain PyTorch operations, autograd (and double backward) through them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from normlab.moments import batch_stats, stats_dtype
from normlab.pattern import Plan

#: Statistics to normalize with, derived from the sets' own: ``(mean, var, *inputs) ->
#: (mean, rstd)``, all in the plan's `stats_shape` (a pure, differentiable function).
Derive = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def normalize_with(
    x: torch.Tensor,
    p: Plan,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """(x − mean)·rsqrt(var + eps)·weight + bias; statistics in `p.stats_shape`."""
    rstd = torch.rsqrt(var.to(stats_dtype(x.dtype)) + eps)
    return normalize_scaled(x, p, mean, rstd, weight, bias)


def normalize_scaled(
    x: torch.Tensor,
    p: Plan,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """(x − mean)·rstd·weight + bias; `mean` and `rstd` in `p.stats_shape`."""
    compute = stats_dtype(x.dtype)
    xe = x.reshape(p.expanded_shape).to(compute)
    y = ((xe - mean.to(compute)) * rstd.to(compute)).reshape(x.shape)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    # Elementwise ops keep the input's strides, so channels_last stays channels_last.
    return y.to(x.dtype)


def normalize_batch(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics and the normalized output: ``(y, mean, var)``."""
    mean, var = batch_stats(x, p, center)
    return normalize_with(x, p, mean, var, weight, bias, eps), mean, var


def normalize_derived(
    x: torch.Tensor,
    p: Plan,
    derive: Derive,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    inputs: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize with ``(mean, rstd) = derive(set mean, set var, *inputs)``: ``(y, mean, var)``."""
    mean, var = batch_stats(x, p)
    m, r = derive(mean, var, *inputs)
    return normalize_scaled(x, p, m, r, weight, bias), mean, var
