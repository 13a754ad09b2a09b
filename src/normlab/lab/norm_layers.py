"""Which modules of a model are its normalization layers, in the order a forward pass uses them.

Example:
    >>> names = [n for n, _ in norm_layers_in_forward_order(model, torch.zeros(2, 1, 16, 16))]  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.layers.weight_norm import WeightNorm

_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """A torch.nn normalization layer or any layer from normlab.layers (and its tools);
    not weight norm's parametrization (it normalizes weights, not activations)."""
    kind = type(module)
    if isinstance(module, WeightNorm):
        return False
    return isinstance(module, _TORCH_NORMS) or (
        kind.__module__.startswith("normlab.") and not kind.__module__.startswith("normlab.lab")
    )


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost norm layers of `model` by name (an IBN's own IN and BN halves are not
    listed apart from the IBN), in registration order."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name and is_norm_layer(module) and not any(name.startswith(f + ".") for f in found):
            found[name] = module
    return found


@torch.no_grad()
def norm_layers_in_forward_order(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """`norm_layers(model)` in the order a forward pass on `x` (eval mode) first calls them;
    layers the pass never calls come last, in registration order."""
    layers = norm_layers(model)
    order: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda m, args, _n=name: order.append(_n))
        for name, module in layers.items()
    ]
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    first = list(dict.fromkeys(order))
    return [(n, layers[n]) for n in first + [n for n in layers if n not in first]]
