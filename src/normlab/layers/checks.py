"""Input checks shared by the layers: one place for the wording of every error."""

from __future__ import annotations

import torch
from torch import nn

from normlab.errors import check_floating


def describe(module: nn.Module) -> str:
    return f"{type(module).__name__}({module.extra_repr()})"


def check_channel_axis(channel_axis: object, allowed: tuple[int, ...] = (1, -1)) -> int:
    """`channel_axis` must be one of `allowed` (1 for channels-first, -1 for channels-last)."""
    if isinstance(channel_axis, bool) or channel_axis not in allowed:
        raise ValueError(f"expected channel_axis in {allowed}, got {channel_axis!r}")
    return int(channel_axis)


def check_input(
    module: nn.Module,
    x: torch.Tensor,
    ranks: tuple[int, ...] | None = None,
    channels: int | None = None,
    channel_axis: int = 1,
    min_rank: int = 2,
) -> int:
    """Check type, rank and channel count of a layer's input; return the channel dim's index."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        check_floating(x, describe(module))  # the description only when it is needed
    if ranks is not None and x.dim() not in ranks:
        wanted = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{describe(module)}: expected {wanted} input, got shape {tuple(x.shape)}")
    if ranks is None and x.dim() < min_rank:
        raise ValueError(
            f"{describe(module)}: expected input of at least {min_rank} dims, got shape {tuple(x.shape)}"
        )
    axis = channel_axis % x.dim()
    if channels is not None and x.shape[axis] != channels:
        raise ValueError(
            f"{describe(module)}: expected {channels} channels at dim {axis}, "
            f"got {x.shape[axis]} (input shape {tuple(x.shape)})"
        )
    return axis


def channel_view(param: torch.Tensor | None, ndim: int, channel_axis: int) -> torch.Tensor | None:
    """A per-channel parameter shaped to broadcast against an `ndim`-D input."""
    if param is None or channel_axis == -1 or channel_axis == ndim - 1:
        return param
    return param.reshape([-1 if d == channel_axis else 1 for d in range(ndim)])


def drop_bias(module: nn.Module, bias: bool) -> None:
    """torch ≥ 2.6's ``bias=False`` (an affine layer without β), on any torch ≥ 2.4."""
    if getattr(module, "affine", False) and not bias:
        module.register_parameter("bias", None)
