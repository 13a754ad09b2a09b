"""Mean-only batch normalization (Salimans & Kingma 2016): y = x − μ_B + β, no division.

The weight-normalization paper's CIFAR recipe pairs it with weight norm: weight norm
fixes the scale of every unit's pre-activation, mean-only batch norm removes its
shift, and the noise it adds is only in the mean (a sum over the batch), which the
paper argues is gentler than full batch norm's. Statistics per channel over the batch
and every position (pattern ``n c ... -> c``; ``n ... c -> c`` channels-last). In eval
mode it subtracts the running mean. State: ``bias`` (β), ``running_mean``,
``num_batches_tracked``.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.layers.checks import (
    channel_view,
    check_channel_axis,
    check_eps_momentum,
    check_input,
    check_positive_int,
    check_training_batch,
)
from normlab.layers.running import empty_batch
from normlab.moments import batch_stats
from normlab.pattern import plan


class MeanOnlyBatchNorm(nn.Module):
    """Subtract the per-channel batch mean (running mean in eval), then add β.

    Example:
        >>> y = MeanOnlyBatchNorm(16)(torch.randn(8, 16, 5, 5) + 3)
        >>> bool(y.mean((0, 2, 3)).abs().max() < 1e-5)
        True
    """

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        channel_axis: int = 1,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.num_features = check_positive_int(num_features, who)
        check_eps_momentum(0.0, momentum, who)
        self.momentum = momentum
        self.track_running_stats = bool(track_running_stats)
        self.channel_axis = check_channel_axis(channel_axis)
        factory = {"device": device, "dtype": dtype}
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        """Running mean 0, no batch counted."""
        if self.running_mean is not None:
            self.running_mean.zero_()
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """β = 0 and fresh running statistics."""
        self.reset_running_stats()
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def pattern(self) -> str:
        """The statistics pattern of this layer (any input rank)."""
        return "n c ... -> c" if self.channel_axis == 1 else "n ... c -> c"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = check_input(self, x, None, self.num_features, self.channel_axis)
        bias = channel_view(self.bias, x.dim(), axis)
        if x.numel() == 0:
            return empty_batch(self, x, None, bias)
        if self.training or self.running_mean is None:
            p = plan(self.pattern(), x.shape)
            if self.training:
                check_training_batch(self, x, p.set_size, "value per channel")
            mean = p.to_kept(batch_stats(x, p)[0])
            if self.training and self.track_running_stats:
                self._update_running(mean.detach())
        else:
            mean = self.running_mean
        # in float32 at least: half-precision data far from zero loses its deviations
        # when the mean is subtracted in its own dtype
        wide = torch.promote_types(x.dtype, torch.float32)
        y = x.to(wide) - channel_view(mean.to(wide), x.dim(), axis)
        if bias is not None:
            y = y + bias.to(wide)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = (
            1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)
        )
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, momentum={self.momentum}"
        text += f", track_running_stats={self.track_running_stats}"
        text += "" if self.bias is not None else ", bias=False"
        return text + (f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else "")
