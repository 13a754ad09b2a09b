"""Mean, biased variance and count over the sets a pattern defines, and how they combine.

Moments combine exactly (Chan et al.'s parallel formula): the moments of a coarser
pattern follow from a finer one's (batch-norm statistics from instance-norm
statistics), and moments of several partial batches combine into the moments of the
whole batch (synchronized batch norm, uneven or empty parts included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from normlab.errors import check_floating
from normlab.pattern import ELLIPSIS, Plan, plan


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in float32 at least (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Moments:
    """Per-set mean, biased variance and element count; `axes` name the tensors' dims.

    Example:
        >>> m = moments(torch.randn(8, 3, 4, 4), "n c h w -> n c")
        >>> m.reduce("n").mean.shape  # batch-norm statistics from instance-norm ones
        torch.Size([3])
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor
    axes: tuple[str, ...]

    def unbiased_var(self) -> torch.Tensor:
        """var·n/(n−1), the estimate torch keeps in `running_var` (n = 1 gives var)."""
        n = self.count
        return self.var * (n / (n - 1).clamp(min=1))

    def reduce(self, *axes: str) -> Moments:
        """Combine the sets along the named axes into one set each.

        Example:
            >>> m.reduce("n", "c").mean.shape  # every element in one set
            torch.Size([])
        """
        for axis in axes:
            if axis not in self.axes:
                raise ValueError(f"cannot reduce over '{axis}': expected one of {self.axes}")
        dims = tuple(self.axes.index(a) for a in axes)
        kept = tuple(a for a in self.axes if a not in axes)
        return _chan(self.mean, self.var, self.count, dims, kept)

    def keep(self, *axes: str) -> Moments:
        """Reduce every axis but `axes`, returned in the order given."""
        reduced = self.reduce(*(a for a in self.axes if a not in axes))
        order = [reduced.axes.index(a) for a in axes]
        return Moments(
            reduced.mean.permute(order),
            reduced.var.permute(order),
            reduced.count.permute(order),
            tuple(axes),
        )


def _chan(
    mean: torch.Tensor,
    var: torch.Tensor,
    count: torch.Tensor,
    dims: tuple[int, ...],
    axes: tuple[str, ...],
) -> Moments:
    # Combine around the combined mean, never through raw E[x²] − E[x]²: stable for
    # large offsets. Empty parts (count 0) contribute nothing; an all-empty set gets 0.
    count = count.to(mean.dtype).expand_as(mean)
    total = count.sum(dims, keepdim=True)
    weight = count / total.clamp(min=1)
    combined = (weight * mean).sum(dims, keepdim=True)
    spread = (weight * (var + (mean - combined).square())).sum(dims, keepdim=True)
    return Moments(
        combined.squeeze(dims), spread.squeeze(dims).clamp(min=0), total.squeeze(dims), axes
    )


def combine(parts: Sequence[Moments]) -> Moments:
    """Moments of the union of disjoint batches, from each batch's moments.

    Example:
        >>> a, b = torch.randn(3, 5), torch.randn(7, 5)
        >>> whole = combine([moments(a, "n c -> c"), moments(b, "n c -> c")])
        >>> torch.allclose(whole.mean, torch.cat([a, b]).mean(0))
        True
    """
    if not parts:
        raise ValueError("combine: expected at least one Moments, got none")
    axes = parts[0].axes
    if any(p.axes != axes or p.mean.shape != parts[0].mean.shape for p in parts):
        raise ValueError(
            f"combine: expected moments over the same axes and shape, got "
            f"{[(p.axes, tuple(p.mean.shape)) for p in parts]}"
        )
    stack = [torch.stack([p.mean for p in parts]), torch.stack([p.var for p in parts])]
    count = torch.stack([p.count.to(parts[0].mean.dtype).expand_as(p.mean) for p in parts])
    return _chan(stack[0], stack[1], count, (0,), axes)


def batch_stats(x: torch.Tensor, p: Plan, center: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of `x` over `p`'s sets, in `p.stats_shape`, in float32+.

    With ``center=False`` the mean is 0 and the "variance" is the mean square (RMS norm).
    """
    xe = x.reshape(p.expanded_shape).to(stats_dtype(x.dtype))
    if p.set_size == 0:  # an empty batch (one process of several, say): zero moments, count 0
        zero = xe.new_zeros(p.stats_shape)
        return zero, zero
    if not p.reduced:  # every set holds one element
        return (xe, torch.zeros_like(xe)) if center else (torch.zeros_like(xe), xe.square())
    if center:
        var, mean = torch.var_mean(xe, dim=p.reduced, correction=0, keepdim=True)
        return mean, var
    square = xe.square().mean(dim=p.reduced, keepdim=True)
    return torch.zeros_like(square), square


def kept_names(p: Plan) -> tuple[str, ...]:
    return tuple(ELLIPSIS if a.startswith(ELLIPSIS) else a for a in p.kept_axes)


def from_stats(mean: torch.Tensor, var: torch.Tensor, p: Plan) -> Moments:
    """Wrap `p.stats_shape` statistics as Moments over `p`'s kept axes."""
    # set_size may be symbolic under torch.compile: no float() that would specialize it
    count = torch.full(p.kept_shape, p.set_size, dtype=mean.dtype, device=mean.device)
    return Moments(p.to_kept(mean), p.to_kept(var).clamp(min=0), count, p.kept_axes)


def moments(x: torch.Tensor, pattern: str, **sizes: int) -> Moments:
    """Mean, biased variance and count of every set S the pattern defines.

    Example:
        >>> m = moments(torch.randn(8, 64, 4, 4), "n (g k) h w -> n g", g=32)
        >>> m.mean.shape, int(m.count[0, 0])
        (torch.Size([8, 32]), 32)
    """
    check_floating(x, "moments")
    p = plan(pattern, x.shape, **sizes)
    return from_stats(*batch_stats(x, p), p)
