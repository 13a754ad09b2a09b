"""The reference path: plain PyTorch operations, autograd (and double backward) through them."""

from __future__ import annotations

import torch

from normlab.moments import batch_stats, stats_dtype
from normlab.pattern import Plan


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
    compute = stats_dtype(x.dtype)
    xe = x.reshape(p.expanded_shape).to(compute)
    y = ((xe - mean.to(compute)) * torch.rsqrt(var.to(compute) + eps)).reshape(x.shape)
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
