"""Float64 reference formulas written from the papers, independent of normlab's engine."""

from __future__ import annotations

import torch


def standardize(x, dims, eps, unbiased=False):
    """(x − mean)/sqrt(var + eps) over `dims`, float64."""
    x = x.double()
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).sum(dim=dims, keepdim=True) / (_count(x, dims) - (1 if unbiased else 0))
    return (x - mean) / torch.sqrt(var + eps)


def _count(x, dims):
    n = 1
    for d in dims:
        n *= x.shape[d]
    return n


def per_channel(p, ndim, axis=1):
    shape = [1] * ndim
    shape[axis] = -1
    return p.double().reshape(shape)


def spatial_dims(x, axis=1):
    return tuple(d for d in range(2, x.dim())) if axis == 1 else tuple(range(1, x.dim() - 1))


def batch_dims(x, axis=1):
    return (0, *spatial_dims(x, axis))
