"""Carrying state from a replaced norm layer to its replacement.

Tensors (γ, β, running statistics, the step counter) carry by name when the shapes
agree; ``eps`` always, ``momentum`` only between layers with torch's convention (weight
of the new value). A composite target whose child norms split the channels in order
(IBN-a: ``IN`` on the first channels, ``BN`` on the rest) takes each part's slice; a
composite source gives a plain target the concatenation of its parts.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from normlab.conversion.recognize import NormSpec, is_norm, norm_spec
from normlab.conversion.report import Replacement
from normlab.layers.norm_act import NormAct
from normlab.layers.running import RunningStatsMixin

# What convert copies from the old layer to the new one when both have it, same shape.
CARRIED = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters and buffers (not its children's), by name."""
    found = dict(module.named_parameters(recurse=False))
    found.update(module.named_buffers(recurse=False))
    return {k: v for k, v in found.items() if v is not None}


@torch.no_grad()
def _copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    dst.copy_(src)
    if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
        dst.requires_grad_(src.requires_grad)


def carry(
    old: nn.Module, new: nn.Module, spec: NormSpec, options: dict, report: Replacement
) -> None:
    """Copy into `new` what it can take from `old` (described by `spec`); record in `report`
    what was carried and what was not. `options` the caller passed win over carried values.

    Example:
        >>> carry(old, new, norm_spec("bn", old), {}, report)  # doctest: +SKIP
    """
    new = new.norm if isinstance(new, NormAct) else new  # "bn-relu" and the like
    torch_style = (_NormBase, RunningStatsMixin)
    # momentum has one meaning only between torch-convention layers (weight of the new value)
    values = {"eps": spec.eps, "momentum": getattr(old, "momentum", None)}
    for attr, value in values.items():
        same_meaning = attr == "eps" or (
            isinstance(old, torch_style) and isinstance(new, torch_style)
        )
        if attr not in options and hasattr(new, attr) and same_meaning and value is not None:
            setattr(new, attr, value)
            report.carried.append(attr)
    mine, theirs = own_tensors(old), own_tensors(new)
    left = []
    for key, value in mine.items():
        target = theirs.get(key)
        if target is not None and target.shape == value.shape:
            _copy(value, target)
            report.carried.append(key)
        else:
            left.append(key)
    if left and not any(k in theirs for k in CARRIED):
        left = _carry_split(old, new, spec.channels, left, report)
    if not any(k in mine for k in CARRIED):
        _carry_join(old, new, spec.channels, report)
    for key in left:
        target = theirs.get(key)
        why = (
            f"shape {tuple(mine[key].shape)} vs {tuple(target.shape)}"
            if target is not None
            else f"{type(new).__name__} has none"
        )
        report.not_carried.append(f"{key} ({why})")


def _parts(module: nn.Module, total: int) -> list[tuple[str, nn.Module, int]] | None:
    """The child norms of a composite layer that split its `total` channels in order
    (IBN-a: IN on the first channels, BN on the rest), with their sizes; else None."""
    parts = []
    for child_name, child in module.named_children():
        if not is_norm(child):
            return None
        try:
            parts.append((child_name, child, norm_spec(child_name, child).channels))
        except (ValueError, TypeError):
            return None
    return parts if parts and sum(size for *_, size in parts) == total else None


def _carry_join(old: nn.Module, new: nn.Module, total: int, report: Replacement) -> None:
    """A composite source (IBN-a) gives a plain target the concatenation of its parts."""
    theirs = own_tensors(new)
    parts = _parts(old, total)
    if parts is None:
        return
    for key in CARRIED:
        pieces = [own_tensors(child).get(key) for _, child, _ in parts]
        target = theirs.get(key)
        lacking = [
            n
            for (n, _, size), p in zip(parts, pieces, strict=True)
            if p is None or p.shape != (size,)
        ]
        if target is not None and target.dim() == 0:  # a counter: the part that keeps one
            source = next(
                ((n, p) for (n, *_), p in zip(parts, pieces, strict=True) if p is not None), None
            )
            if source is not None:
                _copy(source[1], target)
                report.carried.append(f"{source[0]}.{key}->{key}")
            continue
        if target is None or target.shape != (total,):
            continue
        if lacking:
            report.not_carried.append(f"{key} ({', '.join(lacking)} has none)")
            continue
        _copy(torch.cat(pieces), target)
        report.carried.append(f"{'+'.join(f'{n}.{key}' for n, *_ in parts)}->{key}")


def _carry_split(
    old: nn.Module, new: nn.Module, total: int, keys: list[str], report: Replacement
) -> list[str]:
    """A composite target whose child norms split the channels takes each part's slice."""
    parts = _parts(new, total)
    if parts is None:
        return keys
    mine, left = own_tensors(old), []
    for key in keys:
        if mine[key].dim() != 1 or mine[key].numel() != total:
            left.append(key)
            continue
        start = 0
        for child_name, child, size in parts:
            target = own_tensors(child).get(key)
            piece = f"{key}[{start}:{start + size}]"
            if target is not None and target.shape == (size,):
                _copy(mine[key][start : start + size], target)
                report.carried.append(f"{piece}->{child_name}.{key}")
            else:
                report.not_carried.append(f"{piece} ({child_name} has no {key})")
            start += size
    return left
