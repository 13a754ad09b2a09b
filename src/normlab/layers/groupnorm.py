"""Group normalization: statistics per sample and group of channels over the positions.

Pattern ``n (g k) ... -> n g`` with ``g`` groups (``n ... (g k) -> n g`` channels-last).
G = 1 is layer norm over C and every position; G = C is instance norm.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.kernels.dispatch import eager_kernel
from normlab.kernels.transforms import fx_leaf
from normlab.layers import routes
from normlab.layers.checks import (
    channel_view,
    check_channel_axis,
    check_groups,
    check_input,
    drop_bias,
)
from normlab.normalize import normalize_plan
from normlab.pattern import plan


def resolve_groups(num_groups: int | None, num_channels: int, group_size: int | None) -> int:
    """The number of groups from exactly one of `num_groups` and `group_size`."""
    return check_groups(num_channels, num_groups, group_size, "GroupNorm")


class GroupNorm(routes.Routed, nn.GroupNorm):
    """Drop-in ``torch.nn.GroupNorm``, also by ``group_size=`` and on channels-last data.

    Example:
        >>> GroupNorm(32, 64)(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64, 7, 7])
        >>> GroupNorm(num_channels=64, group_size=16).num_groups
        4
    """

    def __init__(
        self,
        num_groups: int | None = None,
        num_channels: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        group_size: int | None = None,
        channel_axis: int = 1,
    ) -> None:
        groups = resolve_groups(num_groups, num_channels, group_size)
        super().__init__(groups, num_channels, eps, affine, device, dtype)
        drop_bias(self, bias)
        self.channel_axis = check_channel_axis(channel_axis)

    def pattern(self) -> str:
        """The statistics pattern of this layer (any input rank); size ``g`` is `num_groups`."""
        return "n (g k) ... -> n g" if self.channel_axis == 1 else "n ... (g k) -> n g"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routes.forward(self, x, GroupNorm._full_forward, self._route)

    @fx_leaf
    def _full_forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_plan(x, *self._resolve(x), self.eps)

    def _resolve(self, x: torch.Tensor) -> tuple:
        axis = check_input(self, x, None, self.num_channels, self.channel_axis)
        p = plan(self.pattern(), x.shape, g=self.num_groups)
        weight = channel_view(self.weight, x.dim(), axis)
        return p, weight, channel_view(self.bias, x.dim(), axis)

    def _route(self, x: torch.Tensor) -> routes.Route | None:
        return routes.kernel_route(eager_kernel(x, *self._resolve(x), self.eps, True))

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra + (f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else "")
