"""Walking a model: which norm layers to replace (``where=``) and swapping them in place.

A norm is one unit: the walk never looks inside it, except a composite norm (IBN-a) that
`where` does not select as a whole, whose parts may be selected. A layer used twice is
replaced once and stays shared.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

from normlab.conversion.build import Choose, build
from normlab.conversion.recognize import is_norm
from normlab.conversion.report import ConversionReport, Replacement

Where = Callable[[str, nn.Module], bool] | str | None
Build = Callable[[str, nn.Module], tuple[nn.Module, Replacement]]


def predicate(where: Where) -> Callable[[str, nn.Module], bool]:
    """`where` as a predicate ``(name, module) -> bool``: None selects all, a string is a
    glob on module names.

    Example:
        >>> predicate("layer4.*")("layer4.0.bn1", nn.BatchNorm2d(4))
        True
    """
    if where is None:
        return lambda name, module: True
    if isinstance(where, str):
        return lambda name, module: fnmatch.fnmatchcase(name, where)
    if callable(where):
        return where
    raise TypeError(
        f"convert: expected where= a predicate (name, module) -> bool or a module-name glob, "
        f"got {type(where).__name__}"
    )


def replace(model: nn.Module, make: Build, where: Where) -> tuple[nn.Module, ConversionReport]:
    """Swap every selected norm of `model` (in place) for ``make(name, norm)``; returns
    the model (new only when `model` itself is a selected norm) and the report.

    Example:
        >>> model, report = replace(model, lambda n, m: (nn.Identity(), entry), None)  # doctest: +SKIP
    """
    select = predicate(where)
    report = ConversionReport()
    done: dict[int, nn.Module] = {}  # shared layers stay shared

    def visit(name: str, module: nn.Module) -> nn.Module:
        if is_norm(module):
            if select(name, module):
                if id(module) not in done:
                    new, entry = make(name, module)
                    done[id(module)] = new
                    report.replaced.append(entry)
                return done[id(module)]
            if not any(is_norm(child) for child in module.children()):
                return module  # a norm is one unit: never look inside it
            # a composite norm (IBN-a) not chosen whole: its parts may be (its BN half)
        # _modules, not named_children(): a layer used twice is visited (and swapped) twice
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new = visit(f"{name}.{child_name}" if name else child_name, child)
            if new is not child:
                setattr(module, child_name, new)
        return module

    return visit("", model), report


def replace_with(
    model: nn.Module, factory: Callable[..., nn.Module], where: Where, **options: object
) -> nn.Module:
    """Every selected norm becomes ``factory(num_features, **options)``, state carried;
    in place, returns the model (the tools' common step: freeze, unfreeze, sync).

    Example:
        >>> replace_with(model, FrozenBatchNorm, lambda n, m: is_batch_norm(m))  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    label = getattr(factory, "__name__", repr(factory))
    choose: Choose = lambda spec: (factory, label)  # noqa: E731
    return replace(model, lambda n, m: build(n, m, choose, options), where)[0]


def norm_names(model: nn.Module) -> list[str]:
    """The names of the norm layers of `model` (``<root>`` for the model itself)."""
    return [name or "<root>" for name, m in model.named_modules() if is_norm(m)]
