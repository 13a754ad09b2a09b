"""Batch normalization: statistics per channel over the batch and every position.

Pattern ``n c ... -> c`` (``n ... c -> c`` channels-last); with ``per_activation=True``,
``n ... -> ...`` (the BN paper's Alg. 1: one mean, variance, γ and β per activation).
The rank-specific classes subclass their torch.nn counterparts, so they load the same
state_dicts and pass ``isinstance`` checks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.kernels.aten import BatchNormPasses
from normlab.kernels.dispatch import eager_kernel
from normlab.kernels.transforms import fx_leaf
from normlab.layers import routes
from normlab.layers.checks import (
    channel_view,
    check_channel_axis,
    check_eps_momentum,
    check_input,
    check_positive_int,
    describe,
    drop_bias,
)
from normlab.layers.running import RunningStatsMixin
from normlab.pattern import plan


class _BatchNormForward(routes.Routed, RunningStatsMixin):
    _ranks: tuple[int, ...] | None = None

    def _setup(self, channel_axis: int, per_activation: bool = False) -> None:
        # torch refuses eps <= 0 only when a training batch comes (eps = 0 gives NaN for a
        # set of equal values, eps < 0 NaN anywhere): refused here, at construction
        check_eps_momentum(self.eps, self.momentum, type(self).__name__, positive=True)
        self.channel_axis = check_channel_axis(channel_axis)
        self.per_activation = bool(per_activation)

    def pattern(self) -> str:
        """The statistics pattern of this layer (any input rank)."""
        if self.per_activation:
            return "n ... -> ..."
        return "n c ... -> c" if self.channel_axis == 1 else "n ... c -> c"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routes.forward(self, x, _BatchNormForward._full_forward, self._route)

    @fx_leaf
    def _full_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_activation:
            check_input(self, x, self._ranks)
            if tuple(x.shape[1:]) != tuple(
                self.weight.shape if self.affine else self.running_mean.shape
            ):
                raise ValueError(
                    f"{describe(self)}: expected input of shape (N, {', '.join(map(str, self.num_features))}), "
                    f"got {tuple(x.shape)}"
                )
            weight, bias = self.weight, self.bias
        else:
            axis = check_input(self, x, self._ranks, self.num_features, self.channel_axis)
            weight = channel_view(self.weight, x.dim(), axis)
            bias = channel_view(self.bias, x.dim(), axis)
        p = plan(self.pattern(), x.shape)
        return self._forward_tracked(x, p, p, weight, bias)

    def _route(self, x: torch.Tensor) -> routes.Route | None:
        """ATen's batch norm with this layer's buffers, where the full path takes it."""
        if self.per_activation:
            return None
        axis = self.channel_axis % x.dim()
        weight = channel_view(self.weight, x.dim(), axis)
        bias = channel_view(self.bias, x.dim(), axis)
        batch = self._uses_batch_stats()
        p = plan(self.pattern(), x.shape)
        passes = eager_kernel(x, p, weight, bias, self.eps, True, "batch" if batch else "given")
        if not isinstance(passes, BatchNormPasses):
            return None
        if not batch:
            return _moved(_bn_given, axis)
        if not (self.training and self.track_running_stats):
            return _moved(_bn_batch, axis)
        running = (self.running_mean, self.running_var, 0.0)
        return _moved(_bn_tracked, axis) if passes.fuses_running(x, running) else None

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.channel_axis != 1:
            extra += f", channel_axis={self.channel_axis}"
        return extra + (", per_activation=True" if self.per_activation else "")


def _bn_tracked(m: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    # training: ATen updates the running buffers (unbiased variance), as torch.nn's layer
    m.num_batches_tracked.add_(1)
    factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
    return torch.batch_norm(
        x, m.weight, m.bias, m.running_mean, m.running_var, True, factor, m.eps, False
    )


def _bn_batch(m: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    return torch.batch_norm(x, m.weight, m.bias, None, None, True, 0.0, m.eps, False)


def _bn_given(m: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    return torch.batch_norm(
        x, m.weight, m.bias, m.running_mean, m.running_var, False, 0.0, m.eps, False
    )


def _moved(route: routes.Route, axis: int) -> routes.Route:
    """`route` for channels at dim `axis` (ATen takes them at dim 1)."""
    if axis == 1:
        return route
    return lambda m, x: route(m, x.movedim(axis, 1)).movedim(1, axis)


def _init(
    self: _BatchNorm,
    num_features: int,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = True,
    track_running_stats: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    bias: bool = True,
    channel_axis: int = 1,
) -> None:
    _BatchNorm.__init__(
        self, num_features, eps, momentum, affine, track_running_stats, device, dtype
    )
    drop_bias(self, bias)
    self._setup(channel_axis)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """Drop-in ``torch.nn.BatchNorm1d`` on (N, C) or (N, C, L) input.

    Example:
        >>> BatchNorm1d(16)(torch.randn(8, 16, 10)).shape
        torch.Size([8, 16, 10])
    """

    _ranks = (2, 3)
    __init__ = _init


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """Drop-in ``torch.nn.BatchNorm2d`` on (N, C, H, W) input (or (N, H, W, C) with channel_axis=-1).

    Example:
        >>> BatchNorm2d(16)(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    _ranks = (4,)
    __init__ = _init


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """Drop-in ``torch.nn.BatchNorm3d`` on (N, C, D, H, W) input.

    Example:
        >>> BatchNorm3d(4)(torch.randn(2, 4, 3, 3, 3)).shape
        torch.Size([2, 4, 3, 3, 3])
    """

    _ranks = (5,)
    __init__ = _init


class BatchNorm(_BatchNormForward, _BatchNorm):
    """Batch norm of any rank; ``per_activation=True`` keeps statistics per activation.

    With ``per_activation=True``, `num_features` is the shape of one sample, e.g.
    ``(C, H, W)``, and γ, β, the running mean and variance all have that shape.

    Example:
        >>> BatchNorm((3, 4, 4), per_activation=True)(torch.randn(8, 3, 4, 4)).shape
        torch.Size([8, 3, 4, 4])
    """

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        per_activation: bool = False,
        channel_axis: int = 1,
    ) -> None:
        if per_activation:
            shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
            if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
                raise ValueError(
                    f"BatchNorm(per_activation=True): expected num_features as the shape of one "
                    f"sample, e.g. (C, H, W), got {num_features!r}"
                )
            num_features = shape
        else:
            check_positive_int(num_features, "BatchNorm")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        drop_bias(self, bias)
        self._setup(channel_axis, per_activation)

    def _check_input_dim(self, x: torch.Tensor) -> None:  # torch's hook; checks live in forward
        pass
