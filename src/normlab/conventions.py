"""Momentum and running-variance conventions: PyTorch vs Keras/Flax; loading Keras weights.

PyTorch: running = (1 − momentum)·running + momentum·batch, momentum = weight of the NEW
value (default 0.1), and ``running_var`` keeps the *unbiased* batch variance.
Keras/Flax: moving = momentum·moving + (1 − momentum)·batch, momentum = weight of the OLD
value (default 0.99), and the moving variance averages the *biased* batch variance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Array = Any  # a tensor, numpy array or sequence of numbers


def _momentum(value: object, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{who}: expected a momentum in [0, 1], got {value!r}")
    return float(value)


def momentum_from_keras(momentum: float) -> float:
    """PyTorch's momentum (weight of the new value) for a Keras/Flax one (weight of the old).

    Example:
        >>> round(momentum_from_keras(0.99), 6)
        0.01
    """
    return 1.0 - _momentum(momentum, "momentum_from_keras")


def momentum_to_keras(momentum: float | None) -> float:
    """Keras/Flax's momentum (weight of the old value) for a PyTorch one (weight of the new).

    PyTorch's ``momentum=None`` (a cumulative average) has no fixed Keras equivalent.

    Example:
        >>> momentum_to_keras(0.1)
        0.9
    """
    if momentum is None:
        raise ValueError(
            "momentum_to_keras: expected a float momentum, got None (PyTorch's cumulative "
            "average weighs batch k by 1/k, which no fixed Keras momentum does)"
        )
    return 1.0 - _momentum(momentum, "momentum_to_keras")


def _count(n: object, who: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(
            f"{who}: expected n, the number of values per channel in a batch (e.g. N·H·W), "
            f"an int >= 2, got {n!r}"
        )
    return n


def unbiased_var(biased: torch.Tensor | float, n: int) -> torch.Tensor | float:
    """Keras/Flax (biased) variance -> PyTorch's unbiased one: ·n/(n−1), n values per set.

    Example:
        >>> unbiased_var(0.9, 10)
        1.0
    """
    n = _count(n, "unbiased_var")
    return biased * (n / (n - 1))


def biased_var(unbiased: torch.Tensor | float, n: int) -> torch.Tensor | float:
    """PyTorch's unbiased variance -> the biased one Keras/Flax keep: ·(n−1)/n.

    Example:
        >>> biased_var(1.0, 10)
        0.9
    """
    n = _count(n, "biased_var")
    return unbiased * ((n - 1) / n)


def _vector(value: Array, like: torch.Tensor, name: str, who: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"{who}: expected {name} as an array of numbers, got {type(value).__name__}"
        ) from error
    if tensor.shape != like.shape:
        raise ValueError(
            f"{who}: expected {name} of shape {tuple(like.shape)} (the layer's), "
            f"got {tuple(tensor.shape)}"
        )
    return tensor


@torch.no_grad()
def load_keras_batchnorm(
    layer: nn.Module,
    gamma: Array | None,
    beta: Array | None,
    moving_mean: Array,
    moving_variance: Array,
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    n: int | None = None,
) -> nn.Module:
    """Load a Keras ``BatchNormalization``'s weights into a batch norm (normlab's or torch's,
    or a FrozenBatchNorm), with its epsilon (Keras' default 1e-3, not 1e-5) and momentum.

    ``gamma``/``beta`` are None for ``scale=False``/``center=False``. The moving variance is
    copied as it is, so that inference gives what Keras gives; pass `n` (values per channel
    in a training batch) to store the unbiased variance PyTorch would have kept instead.

    Example:
        >>> bn = load_keras_batchnorm(BatchNorm2d(3), [1, 1, 1], [0, 0, 0], [0.5] * 3, [2.0] * 3)
        >>> bn.eps, round(bn.momentum, 6)
        (0.001, 0.01)
    """
    who = "load_keras_batchnorm"
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{who}: expected a batch norm module, got {type(layer).__name__}")
    mean, var = getattr(layer, "running_mean", None), getattr(layer, "running_var", None)
    if mean is None or var is None:
        raise ValueError(
            f"{who}: expected a layer with running statistics (track_running_stats=True), "
            f"got {type(layer).__name__} without them"
        )
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or epsilon < 0:
        raise ValueError(f"{who}: expected epsilon >= 0, got {epsilon!r}")
    new_momentum = momentum_from_keras(momentum)
    values = {
        "running_mean": _vector(moving_mean, mean, "moving_mean", who),
        "running_var": _vector(moving_variance, var, "moving_variance", who),
    }
    if n is not None:
        values["running_var"] = unbiased_var(values["running_var"], n)
    for name, given, fill in (("weight", gamma, 1.0), ("bias", beta, 0.0)):
        target = getattr(layer, name, None)
        if target is None and given is not None:
            raise ValueError(
                f"{who}: got {'gamma' if name == 'weight' else 'beta'} but the layer has no "
                f"{name} (affine=False or bias=False); expected None"
            )
        if target is not None:
            values[name] = (
                torch.full_like(target, fill)
                if given is None
                else _vector(given, target, name, who)
            )
    for name, value in values.items():
        getattr(layer, name).copy_(value)
    layer.eps = float(epsilon)
    if hasattr(layer, "momentum"):
        layer.momentum = new_momentum
    return layer


def load_flax_batchnorm(
    layer: nn.Module,
    params: dict,
    batch_stats: dict,
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    n: int | None = None,
) -> nn.Module:
    """Load a Flax ``nn.BatchNorm``'s ``params`` ({scale, bias}) and ``batch_stats``
    ({mean, var}) into a batch norm; as :func:`load_keras_batchnorm` otherwise.

    Example:
        >>> bn = load_flax_batchnorm(BatchNorm1d(2), {"scale": [1, 2], "bias": [0, 0]},
        ...                          {"mean": [0, 0], "var": [1, 1]})
    """
    if not isinstance(params, dict) or not isinstance(batch_stats, dict):
        raise TypeError(
            f"load_flax_batchnorm: expected dicts params {{scale, bias}} and batch_stats "
            f"{{mean, var}}, got {type(params).__name__} and {type(batch_stats).__name__}"
        )
    for key in ("mean", "var"):
        if key not in batch_stats:
            raise ValueError(
                f"load_flax_batchnorm: expected batch_stats[{key!r}], got keys {sorted(batch_stats)}"
            )
    return load_keras_batchnorm(
        layer,
        params.get("scale"),
        params.get("bias"),
        batch_stats["mean"],
        batch_stats["var"],
        momentum=momentum,
        epsilon=epsilon,
        n=n,
    )
