"""convert(): swap every normalization layer of a model, carrying over what carries.

``model, report = convert(model, "gn")`` replaces, in place, every normalization layer
(torch.nn's batch/instance/layer/group/RMS norms, SyncBatchNorm, subclasses of them
such as timm's, and normlab's own) by the registry's layer for the target, and says
in `report` what was carried over (affine γ/β, running statistics, eps, momentum) and
what could not be. The model's dtype, device, train/eval mode and ``requires_grad``
flags are kept.

Subclasses are never cut down silently: one that only changes ``__init__`` is treated
as its torch base; one with an activation inside (timm's norm-activation layers, whose
children ``drop`` and ``act`` run after the norm) becomes :class:`~normlab.NormAct` of
the new norm with the same ``drop`` and ``act`` (and the same state_dict keys); any
other overridden ``forward`` or extra submodule raises, naming the layer (exclude it
with ``where=``). A :class:`~normlab.NormAct` is a container: its ``norm`` is converted.

Recipes: ``to="ibn-a"`` and ``to="ibn-b"`` turn a ResNet (torchvision module names) into
the IBN-Net variants of Pan et al. (2018).
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab.layers.ibn import IBNb
from normlab.layers.norm_act import NormAct
from normlab.layers.running import RunningStatsMixin
from normlab.registry import create_norm
from normlab.tracing import trace

Where = Callable[[str, nn.Module], bool] | str | None

# torch's normalization bases; their subclasses (timm's, normlab's) are norms too.
_TORCH_NORMS = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# What convert copies from the old layer to the new one when both have it, same shape.
_CARRIED = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
RECIPES = ("ibn-a", "ibn-b")


@dataclass
class Replacement:
    """One replaced layer: what it was, what it became, what carried over and what did not."""

    name: str
    source: str
    target: str
    carried: list[str] = field(default_factory=list)
    not_carried: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.name or '<root>'}: {self.source} -> {self.target}"
        if self.carried:
            text += f"; carried {', '.join(self.carried)}"
        if self.not_carried:
            text += f"; NOT carried {', '.join(self.not_carried)}"
        return text + "".join(f"; {note}" for note in self.notes)


@dataclass
class ConversionReport:
    """Every replacement :func:`convert` made, in module order; ``print(report)`` lists them."""

    replaced: list[Replacement] = field(default_factory=list)

    @property
    def not_carried(self) -> dict[str, list[str]]:
        """Layer name -> what its replacement could not take over (empty when all carried)."""
        return {r.name: r.not_carried for r in self.replaced if r.not_carried}

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"converted {len(self.replaced)} layer(s)"]
        return "\n".join(lines + [f"  {r}" for r in self.replaced])


# --------------------------------------------------------------------------- recognition


def is_norm(module: nn.Module) -> bool:
    """A normalization layer: torch.nn's (and their subclasses) or one of normlab's.

    A :class:`~normlab.NormAct` is not one: tools look inside it, at its ``norm``.
    """
    if isinstance(module, NormAct):
        return False
    return isinstance(module, _TORCH_NORMS) or _is_normlab_norm(type(module))


def is_batch_norm(module: nn.Module) -> bool:
    """Any batch norm with batch statistics: torch's, SyncBatchNorm, normlab's, subclasses."""
    return isinstance(module, _BatchNorm)


def _is_normlab_norm(cls: type) -> bool:
    # normlab's layers live in normlab.layers; SyncBatchNorm and FrozenBatchNorm beside it.
    module = cls.__module__
    return module.startswith("normlab.layers") or module in ("normlab.sync", "normlab.freeze")


def _trusted(cls: type) -> bool:
    """Classes whose forward convert knows: torch.nn's own and normlab's."""
    return cls.__module__.startswith("torch.nn.") or cls.__module__.startswith("normlab.")


def _known_base(cls: type) -> type:
    return next(c for c in cls.__mro__ if _trusted(c) and issubclass(c, nn.Module))


# --------------------------------------------------------------------------- norm + activation


def _behaviour(name: str, module: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The (drop, act) to keep after the new norm, or (None, None); raise if the module's
    behaviour can neither be kept nor safely replaced."""
    cls = type(module)
    if _trusted(cls):
        return None, None
    base = _known_base(cls)
    children = set(module._modules)
    overridden = cls.forward is not base.forward
    if overridden and children and children <= {"drop", "act"}:
        return module._modules.get("drop", nn.Identity()), module._modules.get("act", nn.Identity())
    if overridden or children:
        what = "overrides forward" if overridden else ""
        if children:
            what += (" and " if what else "") + f"has submodules {sorted(children)}"
        raise TypeError(
            f"convert: cannot replace {name or '<root>'} ({cls.__name__}, a subclass of "
            f"{base.__name__}) without losing behaviour: it {what}. Expected a plain norm or "
            f"a norm-activation layer (children 'drop'/'act' applied after the norm); "
            f"exclude it with where=, or replace it yourself"
        )
    return None, None


# --------------------------------------------------------------------------- building


def _features(name: str, module: nn.Module) -> tuple[int, int]:
    """(channel count, channel axis) of a norm layer."""
    if getattr(module, "per_activation", False):
        raise ValueError(
            f"convert: {name or '<root>'} is a per-activation batch norm (statistics of shape "
            f"{tuple(module.num_features)}); expected a per-channel norm. Exclude it with where="
        )
    feature_last = isinstance(module, (nn.LayerNorm, nn.RMSNorm))
    axis = getattr(module, "channel_axis", -1 if feature_last else 1)
    shape = getattr(module, "normalized_shape", None)
    if feature_last and shape is not None and len(shape) != 1 and axis == -1:
        raise ValueError(
            f"convert: {name or '<root>'} ({type(module).__name__}) normalizes over the "
            f"trailing dims {tuple(shape)}; expected one channel axis. Exclude it with where="
        )
    for attr in ("num_features", "num_channels", "planes"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, axis
    if shape is not None:
        return int(shape[0]), axis
    raise ValueError(
        f"convert: cannot tell the channel count of {name or '<root>'} ({type(module).__name__}): "
        f"expected an attribute num_features, num_channels or normalized_shape"
    )


def _factory(to: object) -> tuple[Callable[..., nn.Module], str]:
    if isinstance(to, str):
        return (lambda c, **o: create_norm(to, c, **o)), repr(to)
    if callable(to):
        return to, getattr(to, "__name__", repr(to))
    raise TypeError(
        f"convert: expected `to` a registry name (see normlab.available_norms()), one of "
        f"{RECIPES}, or a callable(num_features, **options), got {type(to).__name__}"
    )


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return next((t for t in tensors if t.is_floating_point()), None)


def _build(
    name: str, old: nn.Module, factory: Callable[..., nn.Module], label: str, options: dict
) -> tuple[nn.Module, Replacement]:
    drop, act = _behaviour(name, old)
    channels, axis = _features(name, old)
    opts = dict(options)
    if axis == -1 and "channel_axis" not in opts:
        opts["channel_axis"] = -1  # channels-last data stays channels-last
    # What the old layer switched off stays off where the new one has the switch: no new
    # trainable γ/β, no running statistics the old layer did not keep.
    off = {k: False for k in ("affine", "track_running_stats") if getattr(old, k, True) is False}
    if getattr(old, "affine", False) and getattr(old, "bias", 0) is None:
        off["bias"] = False
    off = {k: v for k, v in off.items() if k not in opts}
    try:
        try:
            new = factory(channels, **opts, **off)
        except TypeError:
            if not off:
                raise
            new = factory(channels, **opts)
            off = {"not passed": off}
    except TypeError as error:
        raise TypeError(
            f"convert: building {label} for {name or '<root>'} ({channels} channels, options "
            f"{opts}) failed: {error}"
        ) from error
    if not isinstance(new, nn.Module):
        raise TypeError(
            f"convert: expected {label} to build an nn.Module, got {type(new).__name__}"
        )
    like = _first_tensor(old)
    if like is not None:
        new.to(device=like.device, dtype=like.dtype)
    report = Replacement(name, type(old).__name__, type(new).__name__)
    if off:
        report.notes.append(
            f"kept off: {off}"
            if "not passed" not in off
            else f"{label} does not take {off['not passed']}"
        )
    _carry(old, new, options, report)
    new.train(old.training)
    if act is not None:
        new = NormAct(new, act=act)
        new.drop = drop
        new.train(old.training)
        report.target = f"NormAct({report.target})"
        report.notes.append("kept drop/act after the norm")
    return new, report


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    found = dict(module.named_parameters(recurse=False))
    found.update(module.named_buffers(recurse=False))
    return {k: v for k, v in found.items() if v is not None}


@torch.no_grad()
def _copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    dst.copy_(src)
    if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
        dst.requires_grad_(src.requires_grad)


def _carry(old: nn.Module, new: nn.Module, options: dict, report: Replacement) -> None:
    new = new.norm if isinstance(new, NormAct) else new  # "bn-relu" and the like
    for attr in ("eps", "momentum"):
        value = getattr(old, attr, None)
        # momentum has one meaning only between torch-convention layers (weight of the new value)
        torch_style = (_NormBase, RunningStatsMixin)
        same_meaning = attr == "eps" or (
            isinstance(old, torch_style) and isinstance(new, torch_style)
        )
        if attr not in options and hasattr(new, attr) and same_meaning and value is not None:
            setattr(new, attr, value)
            report.carried.append(attr)
    mine, theirs = _tensors(old), _tensors(new)
    left = []
    for key, value in mine.items():
        target = theirs.get(key)
        if target is not None and target.shape == value.shape:
            _copy(value, target)
            report.carried.append(key)
        else:
            left.append(key)
    if left and not any(k in theirs for k in _CARRIED):
        left = _carry_split(old, new, left, report)
    if not any(k in mine for k in _CARRIED):
        _carry_join(old, new, report)
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
            parts.append((child_name, child, _features(child_name, child)[0]))
        except ValueError:
            return None
    return parts if parts and sum(size for *_, size in parts) == total else None


def _carry_join(old: nn.Module, new: nn.Module, report: Replacement) -> None:
    """A composite source (IBN-a) gives a plain target the concatenation of its parts."""
    theirs, total = _tensors(new), _features("", old)[0]  # the new layer has old's channels
    parts = _parts(old, total)
    if parts is None:
        return
    for key in _CARRIED:
        pieces = [_tensors(child).get(key) for _, child, _ in parts]
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


def _carry_split(old: nn.Module, new: nn.Module, keys: list[str], report: Replacement) -> list[str]:
    """A composite target whose child norms split the channels takes each part's slice."""
    total = _features("", old)[0]
    parts = _parts(new, total)
    if parts is None:
        return keys
    children = [(n, c) for n, c, _ in parts]
    sizes = [size for *_, size in parts]
    mine, left = _tensors(old), []
    for key in keys:
        if mine[key].dim() != 1 or mine[key].numel() != total:
            left.append(key)
            continue
        start = 0
        for (child_name, child), size in zip(children, sizes, strict=True):
            target = _tensors(child).get(key)
            piece = f"{key}[{start}:{start + size}]"
            if target is not None and target.shape == (size,):
                _copy(mine[key][start : start + size], target)
                report.carried.append(f"{piece}->{child_name}.{key}")
            else:
                report.not_carried.append(f"{piece} ({child_name} has no {key})")
            start += size
    return left


# --------------------------------------------------------------------------- traversal


def _predicate(where: Where) -> Callable[[str, nn.Module], bool]:
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


def _replace(
    model: nn.Module,
    build: Callable[[str, nn.Module], tuple[nn.Module, Replacement]],
    where: Where,
) -> tuple[nn.Module, ConversionReport]:
    select = _predicate(where)
    report = ConversionReport()
    done: dict[int, nn.Module] = {}  # shared layers stay shared

    def visit(name: str, module: nn.Module) -> nn.Module:
        if is_norm(module):
            if select(name, module):
                if id(module) not in done:
                    new, entry = build(name, module)
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
    if to == "ibn-a":
        return _ibn_a(model, where, options)
    if to == "ibn-b":
        return _ibn_b(model, where, options)
    factory, label = _factory(to)
    model, report = _replace(model, lambda n, m: _build(n, m, factory, label, options), where)
    if not report.replaced:
        raise ValueError(
            f"convert: no normalization layer matched where={where!r} in {type(model).__name__}; "
            f"expected at least one (layers found: {_norm_names(model)[:8]})"
        )
    return model, report


def convert_all(
    model: nn.Module, to: str | Callable[..., nn.Module], *, where: Where = None, **options: Any
) -> nn.Module:
    """:func:`convert` that accepts a model with no matching layer and drops the report."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    factory, label = _factory(to)
    return _replace(model, lambda n, m: _build(n, m, factory, label, options), where)[0]


def _norm_names(model: nn.Module) -> list[str]:
    return [name or "<root>" for name, m in model.named_modules() if is_norm(m)]


# --------------------------------------------------------------------------- IBN-Net recipes


def _stages(model: nn.Module, names: tuple[str, ...], recipe: str) -> list[nn.Module]:
    stages = [getattr(model, n, None) for n in names]
    if not all(isinstance(s, nn.Sequential) and len(s) for s in stages):
        raise ValueError(
            f"convert(to={recipe!r}): expected a ResNet with torchvision module names "
            f"({', '.join(names)} as nn.Sequential of blocks), got {type(model).__name__} "
            f"with children {[n for n, _ in model.named_children()]}"
        )
    return stages


def _ibn_a(model: nn.Module, where: Where, options: dict) -> tuple[nn.Module, ConversionReport]:
    """Every block's bn1 in layer1–layer3 becomes IBN(planes); stem, layer4, downsample stay."""
    layers = ("layer1", "layer2", "layer3")
    targets = set()
    for layer, stage in zip(layers, _stages(model, layers, "ibn-a"), strict=True):
        for index, block in enumerate(stage):
            if not is_norm(getattr(block, "bn1", None)):
                raise ValueError(
                    f"convert(to='ibn-a'): expected {layer}.{index} to be a block with a norm "
                    f"'bn1', got {type(block).__name__}"
                )
            targets.add(f"{layer}.{index}.bn1")
    select = _predicate(where)
    return convert(model, "ibn", where=lambda n, m: n in targets and select(n, m), **options)


def _ibn_b(model: nn.Module, where: Where, options: dict) -> tuple[nn.Module, ConversionReport]:
    """Stem bn1 becomes InstanceNorm(64, affine=True); the last block of layer1 and layer2
    gets an InstanceNorm (affine) after the residual addition, before the final ReLU."""
    stages = _stages(model, ("layer1", "layer2"), "ibn-b")
    if not is_norm(getattr(model, "bn1", None)):
        raise ValueError(
            f"convert(to='ibn-b'): expected the stem norm at 'bn1', got "
            f"{type(getattr(model, 'bn1', None)).__name__}"
        )
    select = _predicate(where)
    report = ConversionReport()
    if select("bn1", model.bn1):
        model, stem = convert(model, "in", where=lambda n, m: n == "bn1", **options)
        report.replaced += stem.replaced
    for layer, stage in zip(("layer1", "layer2"), stages, strict=True):
        name = f"{layer}.{len(stage) - 1}"
        if select(name, stage[-1]):
            stage[-1], entry = _instance_after_add(name, stage[-1], options)
            report.replaced.append(entry)
    return model, report


_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {torch.relu, torch.nn.functional.relu}


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELUS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _instance_after_add(
    name: str, block: nn.Module, options: dict
) -> tuple[nn.Module, Replacement]:
    """Trace the block and insert ``self.IN`` between the residual sum and the final ReLU."""
    where_wrong = (
        f"convert(to='ibn-b'): expected {name} to end with relu(out + identity) and to have "
        f"a last norm 'bn3' or 'bn2'"
    )
    if "forward" in vars(block):
        raise ValueError(
            f"{where_wrong}; its forward is patched on the instance, which tracing ignores"
        )
    last = getattr(block, "bn3", None) or getattr(block, "bn2", None)
    if not is_norm(last):
        raise ValueError(f"{where_wrong}; got {type(block).__name__} without one")
    try:
        gm = trace(block)
    except Exception as error:  # any tracing failure means the recipe cannot see the block
        raise ValueError(f"{where_wrong}; it could not be traced: {error}") from error
    output = next(n for n in gm.graph.nodes if n.op == "output")
    relu = output.args[0]
    if not (isinstance(relu, fx.Node) and _is_relu(relu, gm)):
        raise ValueError(f"{where_wrong}; its output is not a ReLU")
    added = relu.args[0]
    is_add = added.op == "call_function" and added.target in _ADDS
    is_add = is_add or (added.op == "call_method" and added.target in ("add", "add_"))
    if not is_add:
        raise ValueError(f"{where_wrong}; the final ReLU is not applied to a sum")
    channels = _features(name, last)[0]
    norm = IBNb(channels, **options)
    like = _first_tensor(last)
    if like is not None:
        norm.to(device=like.device, dtype=like.dtype)
    gm.add_submodule("IN", norm)
    with gm.graph.inserting_before(relu):
        normalized = gm.graph.call_module("IN", (added,))
    relu.replace_input_with(added, normalized)
    gm.recompile()
    gm.train(block.training)
    entry = Replacement(name, type(block).__name__, f"{type(block).__name__} (traced)")
    entry.notes.append(f"added IN = {norm!r} after the residual addition")
    return gm, entry
