"""A per-channel affine and optional running statistics: the state hybrid layers share.

Batch-Instance and Switchable norm keep the same state as batch norm (``weight``,
``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``) without being
batch norms, so they do not subclass ``_BatchNorm`` (tools that fold or freeze batch
norm must not mistake them for one). Updates follow :class:`RunningStatsMixin`; with
``sync=True`` their batch part is synchronized over ``process_group`` (:mod:`normlab.distributed`).
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.distributed import check_sync
from normlab.layers.checks import check_channel_axis, check_eps_momentum, check_positive_int
from normlab.layers.running import RunningStatsMixin


class TrackedNorm(RunningStatsMixin, nn.Module):
    """Base of layers with a per-channel affine and batch-norm-style running statistics."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channel_axis: int = 1,
        sync: bool = False,
        process_group: object = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.num_features = check_positive_int(num_features, who)
        self.sync, self.process_group = check_sync(sync, process_group, who), process_group
        check_eps_momentum(eps, momentum, who, positive=True)  # batch statistics
        self.eps, self.momentum = float(eps), momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        self.channel_axis = check_channel_axis(channel_axis)
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        """Running mean 0, variance 1, no batch counted (as torch's batch norm)."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Every parameter and buffer to its initial value (after ``to_empty``, say)."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )
        text += f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else ""
        return text + (", sync=True" if self.sync else "")
