"""The IBN-Net recipes (Pan et al., 2018) for ResNets with torchvision module names.

``"ibn-a"``: every block's ``bn1`` in layer1–layer3 becomes ``IBN(planes)``. ``"ibn-b"``:
the stem's ``bn1`` becomes an affine InstanceNorm, and the last block of layer1 and
layer2 gets an InstanceNorm after the residual addition, before the final ReLU — graph
surgery on the block, traced with torch.fx.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from normlab.conversion.build import build, first_tensor
from normlab.conversion.recognize import is_norm, norm_spec
from normlab.conversion.report import ConversionReport, Replacement
from normlab.conversion.target import resolve
from normlab.conversion.traverse import Where, predicate, replace
from normlab.layers.ibn import IBNb
from normlab.tracing import trace


def _swap(
    model: nn.Module, to: str, targets: set[str], where: Where, options: dict
) -> tuple[nn.Module, ConversionReport]:
    select = predicate(where)
    choose = resolve(to)
    return replace(
        model,
        lambda n, m: build(n, m, choose, options),
        lambda n, m: n in targets and select(n, m),
    )


def _stages(model: nn.Module, names: tuple[str, ...], recipe: str) -> list[nn.Module]:
    stages = [getattr(model, n, None) for n in names]
    if not all(isinstance(s, nn.Sequential) and len(s) for s in stages):
        raise ValueError(
            f"convert(to={recipe!r}): expected a ResNet with torchvision module names "
            f"({', '.join(names)} as nn.Sequential of blocks), got {type(model).__name__} "
            f"with children {[n for n, _ in model.named_children()]}"
        )
    return stages


def ibn_a(model: nn.Module, where: Where, options: dict) -> tuple[nn.Module, ConversionReport]:
    """Every block's bn1 in layer1–layer3 becomes IBN(planes); stem, layer4, downsample stay.

    Example:
        >>> model, report = ibn_a(resnet50, None, {})  # doctest: +SKIP
    """
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
    return _swap(model, "ibn", targets, where, options)


def ibn_b(model: nn.Module, where: Where, options: dict) -> tuple[nn.Module, ConversionReport]:
    """Stem bn1 becomes InstanceNorm(64, affine=True); the last block of layer1 and layer2
    gets an InstanceNorm (affine) after the residual addition, before the final ReLU.

    Example:
        >>> model, report = ibn_b(resnet50, None, {})  # doctest: +SKIP
    """
    stages = _stages(model, ("layer1", "layer2"), "ibn-b")
    if not is_norm(getattr(model, "bn1", None)):
        raise ValueError(
            f"convert(to='ibn-b'): expected the stem norm at 'bn1', got "
            f"{type(getattr(model, 'bn1', None)).__name__}"
        )
    select = predicate(where)
    report = ConversionReport()
    if select("bn1", model.bn1):
        model, stem = _swap(model, "in", {"bn1"}, None, options)
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
    norm = IBNb(norm_spec(name, last).channels, **options)
    like = first_tensor(last)
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
