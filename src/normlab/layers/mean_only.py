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

from normlab.layers.checks import channel_view, check_channel_axis, check_input, describe
from normlab.layers.tracked import check_eps_momentum, check_positive_int
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

    def pattern(self) -> str:
        """The statistics pattern of this layer (any input rank)."""
        return "n c ... -> c" if self.channel_axis == 1 else "n ... c -> c"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = check_input(self, x, None, self.num_features, self.channel_axis)
        if self.training or self.running_mean is None:
            p = plan(self.pattern(), x.shape)
            if self.training and p.set_size <= 1:
                raise ValueError(
                    f"{describe(self)}: expected more than 1 value per channel when training, "
                    f"got input of shape {tuple(x.shape)}"
                )
            mean = p.to_kept(batch_stats(x, p)[0])
            if self.training and self.track_running_stats:
                self._update_running(mean.detach())
        else:
            mean = self.running_mean
        y = x - channel_view(mean.to(x.dtype), x.dim(), axis)
        if self.bias is not None:
            y = y + channel_view(self.bias, x.dim(), axis)
        return y

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
