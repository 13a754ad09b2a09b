"""freeze/unfreeze batch norm in a model, and recomputing running statistics.

``freeze`` turns every batch norm into a :class:`~normlab.FrozenBatchNorm` (batch norm
in eval mode made permanent: γ, β and running statistics as buffers), ``unfreeze``
turns them back into trainable batch norms, and ``update_stats`` recomputes running
statistics from data, as ``torch.optim.swa_utils.update_bn`` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

from normlab.conversion.recognize import is_batch_norm
from normlab.conversion.traverse import Where, predicate, replace_with
from normlab.layers.batchnorm import BatchNorm
from normlab.layers.checks import describe
from normlab.layers.frozen import FrozenBatchNorm

__all__ = ["FrozenBatchNorm", "freeze", "unfreeze", "update_stats"]


def _model(model: object, who: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: expected an nn.Module, got {type(model).__name__}")
    return model


def freeze(model: nn.Module, *, where: Where = None) -> nn.Module:
    """Every batch norm (any rank, torch's or normlab's, SyncBatchNorm) becomes a
    :class:`FrozenBatchNorm` with its statistics and affine; in place, returns the model.

    Example:
        >>> net = freeze(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        >>> type(net[1]).__name__
        'FrozenBatchNorm'
    """
    _model(model, "freeze")
    select = predicate(where)
    for name, m in model.named_modules():
        if is_batch_norm(m) and select(name, m) and m.running_mean is None:
            raise ValueError(
                f"freeze: {name or '<root>'} ({describe(m)}) keeps no running statistics, so "
                f"there is nothing to freeze; expected track_running_stats=True (or exclude it "
                f"with where=)"
            )
    return replace_with(model, FrozenBatchNorm, lambda n, m: is_batch_norm(m) and select(n, m))


def unfreeze(model: nn.Module, *, where: Where = None, **options: Any) -> nn.Module:
    """Every :class:`FrozenBatchNorm` becomes a trainable batch norm (registry ``"bn"``,
    `options` passed on) with its statistics and affine; in place, returns the model.

    Example:
        >>> type(unfreeze(freeze(nn.BatchNorm2d(8)))).__name__
        'BatchNorm'
    """
    _model(model, "unfreeze")
    select = predicate(where)
    return replace_with(
        model, BatchNorm, lambda n, m: isinstance(m, FrozenBatchNorm) and select(n, m), **options
    )


def _tracks(module: nn.Module) -> bool:
    # own buffers only: a NormAct forwards attribute reads to its norm, which counts itself
    return (
        module._buffers.get("running_mean") is not None
        and hasattr(module, "momentum")
        and callable(getattr(module, "reset_running_stats", None))
    )


def _first_input(batch: object) -> object:
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("update_stats: expected a batch (input, ...), got an empty sequence")
        return batch[0]
    return batch


@torch.no_grad()
def update_stats(
    model: nn.Module, loader: Iterable, *, num_batches: int | None = None
) -> nn.Module:
    """Recompute the running statistics of every layer that tracks them, from `loader`.

    Like ``torch.optim.swa_utils.update_bn``: the statistics are reset and averaged with
    equal weight over the batches (momentum None, a cumulative average); each batch is
    the model's input, or a tuple/list whose first item is. Modes and momenta are
    restored afterwards. Returns the model.

    Example:
        >>> update_stats(model, [(torch.randn(16, 3, 8, 8), None)] * 4)  # doctest: +SKIP
    """
    _model(model, "update_stats")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"update_stats: expected num_batches a positive int, got {num_batches!r}")
    tracked = [m for m in model.modules() if _tracks(m)]
    if not tracked:
        raise ValueError(
            f"update_stats: expected a model with layers that track running statistics, "
            f"got {type(model).__name__} with none"
        )
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in tracked}
    like = next(iter(model.parameters()), None)
    like = like if like is not None else next(iter(model.buffers()))
    seen = 0
    try:
        for m in tracked:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for batch in islice(loader, num_batches):
            x = _first_input(batch)
            if isinstance(x, torch.Tensor):
                x = x.to(like.device)
            model(x)
            seen += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.train(mode)
    if seen == 0:
        raise ValueError("update_stats: expected a loader with at least one batch, got none")
    return model
