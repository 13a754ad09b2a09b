"""Float64 references written from the papers' formulas, independent of normlab's engine."""

import torch


def standardize(x, dims, eps=1e-5, center=True):
    """(x − mean)/sqrt(var + eps) over `dims`, biased variance, in float64."""
    x = x.double()
    if center:
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps)
    return x / torch.sqrt((x**2).mean(dim=dims, keepdim=True) + eps)


def group_norm(x, groups, eps=1e-5):
    """Wu & He: x as [N, G, C/G, *], statistics over (C/G, *) per (n, g)."""
    n, c = x.shape[:2]
    xg = x.double().reshape(n, groups, c // groups, *x.shape[2:])
    return standardize(xg, tuple(range(2, xg.dim())), eps).reshape(x.shape)
