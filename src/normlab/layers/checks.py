"""Argument and input checks shared by the layers: one place for the wording of every error.

Every message reads ``"<who>: expected …, got …"``. Constructor arguments are checked
here, once, at construction; ``forward`` only checks what depends on the input
(:func:`check_input`), so that it stays cheap and traceable.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.errors import check_floating


def describe(module: nn.Module) -> str:
    return f"{type(module).__name__}({module.extra_repr()})"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(value: object, who: str, name: str = "num_features") -> int:
    """`value` must be an int >= 1 (a channel or group count).

    Example:
        >>> check_positive_int(0, "GroupNorm", "num_channels")
        Traceback (most recent call last):
        ValueError: GroupNorm: expected num_channels a positive int, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: expected {name} a positive int, got {value!r}")
    return value


def check_eps(eps: object, who: str, *, positive: bool = False) -> float:
    """`eps` must be a finite float >= 0, or > 0 with `positive` (layers that divide by
    the root of a batch variance, which is 0 for a set of equal values: torch's batch
    norm refuses eps = 0 in training; normlab refuses it at construction)."""
    bound = "> 0" if positive else ">= 0"
    if (
        not _is_number(eps)
        or eps != eps
        or eps in (float("inf"), float("-inf"))
        or eps < 0
        or (positive and eps == 0)
    ):
        raise ValueError(f"{who}: expected eps a finite float {bound}, got {eps!r}")
    return float(eps)


def check_momentum(momentum: object, who: str) -> float | None:
    """`momentum` must be in [0, 1] (the weight of a new batch) or None (cumulative average)."""
    if momentum is not None and (not _is_number(momentum) or not 0 <= momentum <= 1):
        raise ValueError(f"{who}: expected momentum in [0, 1] or None, got {momentum!r}")
    return momentum


def check_eps_momentum(eps: object, momentum: object, who: str, *, positive: bool = False) -> None:
    """:func:`check_eps` and :func:`check_momentum` together."""
    check_eps(eps, who, positive=positive)
    check_momentum(momentum, who)


def check_unit_interval(value: object, who: str, name: str, *, closed: str = "") -> float:
    """`value` must lie in (0, 1); `closed` names the ends that may be reached ("left": [0, 1))."""
    low_ok = "left" in closed or "both" in closed
    high_ok = "right" in closed or "both" in closed
    bounds = ("[" if low_ok else "(") + "0, 1" + ("]" if high_ok else ")")
    if (
        not _is_number(value)
        or not (value >= 0 if low_ok else value > 0)
        or not (value <= 1 if high_ok else value < 1)
    ):
        raise ValueError(f"{who}: expected {name} in {bounds}, got {value!r}")
    return float(value)


def check_choice(value: object, choices: tuple, who: str, name: str) -> object:
    """`value` must be one of `choices`."""
    if value not in choices:
        raise ValueError(f"{who}: expected {name} in {choices}, got {value!r}")
    return value


def check_groups(
    num_channels: int, num_groups: object, group_size: object, who: str, *, exactly_one: bool = True
) -> int:
    """The number of groups from `num_groups` or `group_size` (each a divisor of the
    channel count); `exactly_one` requires one of them, else neither means 32 groups."""
    check_positive_int(num_channels, who, "num_channels")
    if (
        num_groups is not None
        and group_size is not None
        or (exactly_one and num_groups is None and group_size is None)
    ):
        wanted = "exactly one" if exactly_one else "at most one"
        raise ValueError(
            f"{who}: expected {wanted} of num_groups and group_size, "
            f"got num_groups={num_groups!r}, group_size={group_size!r}"
        )
    given, name = (
        (group_size, "group_size") if group_size is not None else (num_groups, "num_groups")
    )
    given = 32 if given is None else given
    if isinstance(given, bool) or not isinstance(given, int) or given < 1 or num_channels % given:
        raise ValueError(
            f"{who}: expected {name} a positive divisor of num_channels={num_channels}, "
            f"got {given!r}"
        )
    return given if name == "num_groups" else num_channels // given


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


def check_training_batch(module: nn.Module, x: torch.Tensor, values: int, what: str) -> None:
    """In training, a set of exactly one value has no variance to normalize by (torch's
    rule: one value per channel is an error; an empty batch is not, see ``empty_batch``)."""
    if module.training and values == 1:
        raise ValueError(
            f"{describe(module)}: expected more than 1 {what} when training, "
            f"got input of shape {tuple(x.shape)}"
        )


def channel_view(param: torch.Tensor | None, ndim: int, channel_axis: int) -> torch.Tensor | None:
    """A per-channel parameter shaped to broadcast against an `ndim`-D input."""
    if param is None or channel_axis == -1 or channel_axis == ndim - 1:
        return param
    return param.reshape([-1 if d == channel_axis else 1 for d in range(ndim)])


def drop_bias(module: nn.Module, bias: bool) -> None:
    """torch ≥ 2.6's ``bias=False`` (an affine layer without β), on any torch ≥ 2.4."""
    if getattr(module, "affine", False) and not bias:
        module.register_parameter("bias", None)
