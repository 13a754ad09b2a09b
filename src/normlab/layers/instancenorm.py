"""Instance normalization: statistics per sample and channel over the positions.

Pattern ``n c ... -> n c`` (``n ... c -> n c`` channels-last), the same at train and
test time unless ``track_running_stats=True``: then, as in torch, eval normalizes with
running estimates, which training updates with the mean over the batch of each
instance's mean and unbiased variance. Unlike torch, ``momentum=None`` is a true
cumulative average here (torch silently uses 0).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab.kernels.dispatch import eager_kernel
from normlab.kernels.transforms import fx_leaf
from normlab.layers import routes
from normlab.layers.checks import channel_view, check_channel_axis, check_input, drop_bias
from normlab.layers.running import RunningStatsMixin
from normlab.moments import Moments
from normlab.pattern import plan


def instance_to_running(m: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's update: the batch mean of the per-instance means and unbiased variances."""
    return m.mean.mean(0), m.unbiased_var().mean(0)


class _InstanceNormForward(routes.Routed, RunningStatsMixin):
    _ranks: tuple[int, ...] | None = None
    _one_value = "spatial element"

    def _setup(self, channel_axis: int) -> None:
        self.channel_axis = check_channel_axis(channel_axis)

    def pattern(self) -> str:
        """The statistics pattern of this layer (any input rank)."""
        return "n c ... -> n c" if self.channel_axis == 1 else "n ... c -> n c"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routes.forward(self, x, _InstanceNormForward._full_forward, self._route)

    def _route(self, x: torch.Tensor) -> routes.Route | None:
        """ATen's group norm (G = C) where the full path takes it; not with running
        statistics, which the full path updates."""
        if self.track_running_stats or x.dim() < 3 or self.channel_axis != 1:
            return None
        p = plan(self.pattern(), x.shape)
        weight, bias = channel_view(self.weight, x.dim(), 1), channel_view(self.bias, x.dim(), 1)
        return routes.kernel_route(eager_kernel(x, p, weight, bias, self.eps, True))

    @fx_leaf
    def _full_forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = isinstance(x, torch.Tensor) and self._ranks and x.dim() == self._ranks[0] - 1
        if unbatched and x.dim() >= 2:
            return self.forward(x.unsqueeze(0)).squeeze(0)  # unbatched (C, ...) input, as torch
        tracked = self.affine or self.track_running_stats
        axis = check_input(
            self, x, self._ranks, self.num_features if tracked else None, self.channel_axis
        )
        p = plan(self.pattern(), x.shape)
        running = plan("n c ... -> c" if self.channel_axis == 1 else "n ... c -> c", x.shape)
        weight = channel_view(self.weight, x.dim(), axis)
        bias = channel_view(self.bias, x.dim(), axis)
        return self._forward_tracked(x, p, running, weight, bias, instance_to_running)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra + (f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else "")


def _init(
    self: _InstanceNorm,
    num_features: int,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = False,
    track_running_stats: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    bias: bool = True,
    channel_axis: int = 1,
) -> None:
    _InstanceNorm.__init__(
        self, num_features, eps, momentum, affine, track_running_stats, device, dtype
    )
    drop_bias(self, bias)
    self._setup(channel_axis)


class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    """Drop-in ``torch.nn.InstanceNorm1d`` on (N, C, L) or unbatched (C, L) input.

    Example:
        >>> InstanceNorm1d(4)(torch.randn(2, 4, 10)).shape
        torch.Size([2, 4, 10])
    """

    _ranks = (3,)
    __init__ = _init


class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    """Drop-in ``torch.nn.InstanceNorm2d`` on (N, C, H, W) or unbatched (C, H, W) input.

    Example:
        >>> InstanceNorm2d(4, affine=True)(torch.randn(2, 4, 5, 5)).shape
        torch.Size([2, 4, 5, 5])
    """

    _ranks = (4,)
    __init__ = _init


class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    """Drop-in ``torch.nn.InstanceNorm3d`` on (N, C, D, H, W) or unbatched (C, D, H, W) input.

    Example:
        >>> InstanceNorm3d(4)(torch.randn(2, 4, 3, 3, 3)).shape
        torch.Size([2, 4, 3, 3, 3])
    """

    _ranks = (5,)
    __init__ = _init


class InstanceNorm(_InstanceNormForward, _InstanceNorm):
    """Instance norm of any rank ≥ 3, (N, C, ...).

    Example:
        >>> InstanceNorm(4, affine=True)(torch.randn(2, 4, 7)).shape
        torch.Size([2, 4, 7])
    """

    __init__ = _init

    def _check_input_dim(self, x: torch.Tensor) -> None:  # torch's hook; checks live in forward
        pass
