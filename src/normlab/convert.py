"""convert(): swap every normalization layer of a model, carrying over what carries.

``model, report = convert(model, "gn")`` replaces, in place, every normalization layer
(torch.nn's batch/instance/layer/group/RMS norms, SyncBatchNorm, subclasses of them
such as timm's, normlab's own, and modules that behave as a per-position layer or RMS
norm, such as Hugging Face's ``LlamaRMSNorm``) by the registry's layer for the target,
and says in `report` what was carried over (affine γ/β, running statistics, eps,
momentum) and what could not be. The model's dtype, device, train/eval mode and
``requires_grad`` flags are kept.

A layer is recognised by what it normalizes over, not by its name
(:mod:`normlab.conversion.recognize`), and a target name means the same method over the
same axes (:mod:`normlab.conversion.target`): ``"ln"`` turns a transformer's
``LayerNorm(d)`` into a layer norm over the same last axis, and a CNN's batch norm into
a per-sample layer norm over channels and positions.

Subclasses are never cut down silently: one that only changes ``__init__`` is treated
as its torch base, and so is one whose overridden ``forward`` computes what the base
computes; one whose forward computes a per-position norm over the channels (timm's
``LayerNorm2d``) is that norm; one with an activation inside (timm's norm-activation
layers, whose children ``drop`` and ``act`` run after the norm) becomes
:class:`~normlab.NormAct` of the new norm with the same ``drop`` and ``act`` (and the
same state_dict keys); any other overridden ``forward`` or extra submodule raises,
naming the layer (exclude it with ``where=``). A :class:`~normlab.NormAct` is a
container: its ``norm`` is converted.

Recipes: ``to="ibn-a"`` and ``to="ibn-b"`` turn a ResNet (torchvision module names) into
the IBN-Net variants of Pan et al. (2018).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from normlab.conversion.build import build
from normlab.conversion.ibn import ibn_a, ibn_b
from normlab.conversion.recognize import NormSpec, is_batch_norm, is_norm, norm_spec
from normlab.conversion.report import ConversionReport, Replacement
from normlab.conversion.target import RECIPES, resolve
from normlab.conversion.traverse import Where, norm_names, replace

__all__ = [
    "RECIPES",
    "ConversionReport",
    "NormSpec",
    "Replacement",
    "Where",
    "convert",
    "convert_all",
    "is_batch_norm",
    "is_norm",
    "norm_spec",
]


def convert(
    model: nn.Module, to: str | Callable[..., nn.Module], *, where: Where = None, **options: Any
) -> tuple[nn.Module, ConversionReport]:
    """Replace every normalization layer of `model` (in place) by the layer for `to`.

    `to` is a registry name (``"gn"``, ``"in"``, ``"bn"``, ``"syncbn"``, ``"frozenbn"``,
    ``"ln2d"``, … see :func:`normlab.available_norms`), a class or factory called as
    ``to(num_features, **options)``, or a recipe: ``"ibn-a"``, ``"ibn-b"`` (ResNets).
    `where` selects layers: a predicate ``(name, module) -> bool`` or a glob on module
    names (``"layer4.*"``). Returns the model (a new object only when `model` itself is
    a norm layer) and a :class:`ConversionReport`. Raises when nothing matched.

    Example:
        >>> model, report = convert(model, "gn", num_groups=8)  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
        converted 3 layer(s)
          1: BatchNorm2d -> GroupNorm; carried eps, weight, bias; NOT carried running_mean ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if to == "ibn-b":
        return ibn_b(model, where, options)
    if to == "ibn-a":
        model, report = ibn_a(model, where, options)
    else:
        choose = resolve(to)
        model, report = replace(model, lambda n, m: build(n, m, choose, options), where)
    if not report.replaced:
        raise ValueError(
            f"convert: no normalization layer matched where={where!r} in {type(model).__name__}; "
            f"expected at least one (layers found: {norm_names(model)[:8]})"
        )
    return model, report


def convert_all(
    model: nn.Module, to: str | Callable[..., nn.Module], *, where: Where = None, **options: Any
) -> nn.Module:
    """:func:`convert` that accepts a model with no matching layer and drops the report.

    Example:
        >>> net = convert_all(nn.Sequential(nn.Linear(2, 2)), "gn")  # nothing to convert
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    choose = resolve(to)
    return replace(model, lambda n, m: build(n, m, choose, options), where)[0]
