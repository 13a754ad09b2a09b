"""The lab's weight-normalization candidates: every conv and linear weight as g·v/‖v‖.

``wn``: no activation normalization; convs that had no bias (their norm layer's β did
that job) get one. ``wn-mobn``: the weight-normalization paper's CIFAR recipe, weight
norm with mean-only batch norm (which brings its own β) in the norm layers' places.
Both start with the paper's data-dependent initialization (:func:`init_weight_norm`) on
the first training batch, topped up to `INIT_IMAGES` images from the first epoch's order
when the batch is smaller: a variance over 2 samples is no estimate (g = 1/σ of two
logits can be 100), and the init would then decide a small-batch run's fate, not the
training.

Example:
    >>> model = apply_weight_norm(build_model("cnn", "none", image_shape=(1, 16, 16), num_classes=10), conv_bias=True)  # doctest: +SKIP
    >>> init_weight_norm(model, first_batch)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from normlab.layers.weight_norm import WeightNorm, init_from_data, weight_norm
from normlab.moments import moments

# lab norm name -> the registry layer that takes the norm layers' places
WEIGHT_NORMS = {"wn": "none", "wn-mobn": "mobn"}
INIT_IMAGES = 64  # the data-dependent init sees at least this many images
_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


def apply_weight_norm(model: nn.Module, *, conv_bias: bool) -> nn.Module:
    """Weight-normalize every Linear and ConvNd of `model` in place (one g per output unit);
    with `conv_bias`, convs without a bias get a zero-initialized one first."""
    for module in list(model.modules()):
        if isinstance(module, _WEIGHTED):
            if conv_bias and isinstance(module, nn.modules.conv._ConvNd) and module.bias is None:
                weight = module.weight
                module.bias = nn.Parameter(
                    torch.zeros(module.out_channels, dtype=weight.dtype, device=weight.device)
                )
            weight_norm(module)
    return model


def weight_normed(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of `model` whose ``weight`` is weight-normed, by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m, "weight")
        and isinstance(m.parametrizations["weight"][0], WeightNorm)
    }


def _constant(module: nn.Module, x: torch.Tensor) -> bool:
    """True when every input feature takes one value over the batch (and positions)."""
    pattern = "... c -> c" if isinstance(module, nn.Linear) else "n c ... -> c"
    m = moments(x.detach(), pattern)
    scale = 1.0 + float(m.mean.abs().max()) ** 2
    return float(m.var.max()) <= 1e-10 * scale


@torch.no_grad()
def init_weight_norm(model: nn.Module, batch: torch.Tensor) -> list[str]:
    """The paper's data-dependent init of every weight-normed layer, in forward order.

    One forward pass on `batch` (training mode; running buffers restored afterwards):
    each layer, on its first call, sets g and b so that its pre-activations on this
    batch have mean 0 (where it has a bias) and variance 1, given the already
    initialized layers before it. A layer whose input is constant on the batch (an
    RNN's zero initial state) is left at unit scale (g = 1, b = 0). Returns the names
    of those layers.
    """
    pending = weight_normed(model)
    names = {id(m): n for n, m in pending.items()}
    left: list[str] = []

    def first_call(module: nn.Module, args: tuple) -> None:
        name = names.get(id(module))
        if name not in pending:
            return
        del pending[name]
        x = args[0]
        if _constant(module, x):
            module.parametrizations["weight"].original0.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()
            left.append(name)
        else:
            init_from_data(module, x)

    hooks = [m.register_forward_pre_hook(first_call) for m in pending.values()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    was_training = model.training
    try:
        model.train()
        model(batch)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return left
