"""What a conversion target means for each layer: a registry name, a class or factory.

A registry name names a method; the layer it builds depends on what the old layer
normalized over. ``"ln"`` is layer norm: for a norm whose statistics reduce positions
(batch, instance, group norm in a CNN) it is the registry's per-sample layer norm over
channels and positions (``GroupNorm(1, C)``); for a norm whose statistics are kept per
position over the channel axis alone (a transformer's ``LayerNorm(d)``, an RMS norm,
LayerNorm2d) it is a :class:`~normlab.LayerNorm` over that same axis, so that a
transformer's layer norm stays a per-token layer norm.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from normlab.conversion.build import Choose, Factory
from normlab.conversion.recognize import NormSpec
from normlab.layers.layernorm import LayerNorm
from normlab.registry import create_norm

RECIPES = ("ibn-a", "ibn-b")


def _layer_norm_per_position(channels: int, channel_axis: int = 1, **options: object) -> nn.Module:
    return LayerNorm(channels, channel_axis=channel_axis, **options)


# Registry names whose layer, for a per-position source, is this one instead.
PER_POSITION: dict[str, Factory] = {"ln": _layer_norm_per_position}


def resolve(to: object) -> Choose:
    """`to` (a registry name, or a class/factory called as ``to(num_features, **options)``)
    as a function from a layer's :class:`NormSpec` to (factory, label).

    Example:
        >>> factory, label = resolve("ln")(norm_spec("ln", nn.LayerNorm(8)))  # doctest: +SKIP
    """
    if isinstance(to, str):
        name = to

        def choose(spec: NormSpec) -> tuple[Factory, str]:
            if spec.per_position and name.lower() in PER_POSITION:
                return PER_POSITION[name.lower()], f"{name!r} (per position)"
            return (lambda c, **o: create_norm(name, c, **o)), repr(name)

        return choose
    if callable(to):
        label = getattr(to, "__name__", repr(to))
        factory: Callable[..., nn.Module] = to
        return lambda spec: (factory, label)
    raise TypeError(
        f"convert: expected `to` a registry name (see normlab.available_norms()), one of "
        f"{RECIPES}, or a callable(num_features, **options), got {type(to).__name__}"
    )
