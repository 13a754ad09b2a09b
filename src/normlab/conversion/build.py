"""Building the replacement of one norm layer: the new layer for the old one's channels
and axis, on its device and dtype, in its mode, with its state carried and its
activation (timm's norm-activation layers) kept after it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from normlab.conversion.carry import carry
from normlab.conversion.recognize import NormSpec, norm_spec
from normlab.conversion.report import Replacement
from normlab.layers.norm_act import NormAct

Factory = Callable[..., nn.Module]
# For a layer's spec: the factory `factory(num_features, **options)` and its name.
Choose = Callable[[NormSpec], tuple[Factory, str]]


def first_tensor(module: nn.Module) -> torch.Tensor | None:
    """The module's first own floating-point parameter or buffer (its device and dtype)."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return next((t for t in tensors if t.is_floating_point()), None)


def build(
    name: str, old: nn.Module, choose: Choose, options: dict
) -> tuple[nn.Module, Replacement]:
    """The replacement for the norm `old` (called `name`) and the report of what carried.

    Example:
        >>> new, entry = build("bn1", nn.BatchNorm2d(8), lambda s: (GroupNorm, "gn"), {})  # doctest: +SKIP
    """
    spec = norm_spec(name, old)
    factory, label = choose(spec)
    opts = dict(options)
    if spec.channel_axis == -1 and "channel_axis" not in opts:
        opts["channel_axis"] = -1  # channels-last data stays channels-last
    # What the old layer switched off stays off where the new one has the switch: no new
    # trainable γ/β, no running statistics the old layer did not keep.
    switches = ("affine", "elementwise_affine", "track_running_stats")
    off = {k: False for k in switches if getattr(old, k, True) is False}
    affine = getattr(old, "affine", False) or getattr(old, "elementwise_affine", False)
    if affine and getattr(old, "bias", 0) is None:
        off["bias"] = False
    off = {k: v for k, v in off.items() if k not in opts}
    try:
        try:
            new = factory(spec.channels, **opts, **off)
        except TypeError:
            if not off:
                raise
            new = factory(spec.channels, **opts)
            off = {"not passed": off}
    except TypeError as error:
        raise TypeError(
            f"convert: building {label} for {name or '<root>'} ({spec.channels} channels, "
            f"options {opts}) failed: {error}"
        ) from error
    if not isinstance(new, nn.Module):
        raise TypeError(
            f"convert: expected {label} to build an nn.Module, got {type(new).__name__}"
        )
    like = first_tensor(old)
    if like is not None:
        new.to(device=like.device, dtype=like.dtype)
    report = Replacement(name, type(old).__name__, type(new).__name__)
    if off:
        report.notes.append(
            f"kept off: {off}"
            if "not passed" not in off
            else f"{label} does not take {off['not passed']}"
        )
    carry(old, new, spec, options, report)
    new.train(old.training)
    if spec.act is not None:
        new = NormAct(new, act=spec.act)
        new.drop = spec.drop
        new.train(old.training)
        report.target = f"NormAct({report.target})"
        report.notes.append("kept drop/act after the norm")
    return new, report
