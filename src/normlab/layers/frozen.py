"""Frozen batch norm: batch norm in eval mode made permanent.

Its γ, β and running statistics are buffers, so neither training mode nor an optimizer
changes them (the usual choice for detection backbones trained with small batches). It
has batch norm's state_dict keys (``num_batches_tracked`` is accepted and ignored), so
checkpoints load both ways.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.layers.checks import channel_view, check_channel_axis, check_input
from normlab.normalize import normalize_with
from normlab.pattern import plan


class FrozenBatchNorm(nn.Module):
    """Batch norm of any rank (N, C, ...) with fixed statistics and affine, even in train mode.

    y = (x − running_mean)·rsqrt(running_var + eps)·weight + bias: a per-channel scale and
    shift, computed by the same engine as batch norm's eval mode (so a frozen layer gives
    exactly what the batch norm gave in eval).

    Example:
        >>> FrozenBatchNorm(16)(torch.randn(2, 16, 5, 5)).shape
        torch.Size([2, 16, 5, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channel_axis: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"FrozenBatchNorm: expected num_features a positive int, got {num_features!r}"
            )
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise ValueError(f"FrozenBatchNorm: expected eps >= 0, got {eps!r}")
        self.num_features, self.eps = num_features, float(eps)
        self.channel_axis = check_channel_axis(channel_axis)
        kind = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **kind))
        self.register_buffer("bias", torch.zeros(num_features, **kind))
        self.register_buffer("running_mean", torch.zeros(num_features, **kind))
        self.register_buffer("running_var", torch.ones(num_features, **kind))

    def reset_parameters(self) -> None:
        """The identity: weight 1, bias 0, running mean 0, running variance 1."""
        self.weight.fill_(1)
        self.bias.zero_()
        self.running_mean.zero_()
        self.running_var.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.channel_axis % max(x.dim(), 1)
        check_input(self, x, None, self.num_features, axis)
        p = plan("n c ... -> c" if self.channel_axis == 1 else "n ... c -> c", x.shape)
        weight = channel_view(self.weight, x.dim(), axis)
        bias = channel_view(self.bias, x.dim(), axis)
        return normalize_with(x, p, self.running_mean, self.running_var, weight, bias, self.eps)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        # A batch norm's checkpoint has a step counter; frozen statistics need none.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        extra = f"{self.num_features}, eps={self.eps}"
        return extra + (f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else "")
