"""Switching a model's batch norms to synchronized batch norm and back.

Every batch norm becomes the synchronized layer (and back, a plain batch norm), state
carried as :func:`~normlab.convert` carries it. Layers that have ``sync`` as an option
(Batch Renorm, Batch-Instance norm, Switchable norm with a BN term) keep their
behaviour, which a plain (Sync)BatchNorm would lose: they are switched, not replaced.
A layer has the option when ``sync`` and ``process_group`` are attributes of the
instance (not a property or a class constant), and ``using_bn`` is not False.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from normlab.conversion.recognize import is_batch_norm
from normlab.conversion.traverse import replace_with
from normlab.layers.batchnorm import BatchNorm


def has_sync_option(module: nn.Module) -> bool:
    """Whether `module` synchronizes its batch part through its own ``sync`` option.

    Example:
        >>> has_sync_option(nn.BatchNorm2d(4))
        False
    """
    own = vars(module)
    return (
        "sync" in own
        and "process_group" in own
        and isinstance(own["sync"], bool)
        and getattr(module, "using_bn", True) is not False
    )


def switch_sync(module: nn.Module, sync: bool, group: object) -> set[int]:
    """Set ``sync``/``process_group`` on the layers that have them as options; returns
    the ids of the layers switched.

    Example:
        >>> switch_sync(nn.Sequential(nn.BatchNorm2d(4)), True, None)
        set()
    """
    if not isinstance(module, nn.Module):
        return set()  # replace_with says what was expected
    switched = [m for m in module.modules() if has_sync_option(m)]
    for m in switched:
        m.sync, m.process_group = sync, group
    return {id(m) for m in switched}


def to_sync(
    module: nn.Module, layer: Callable[..., nn.Module], process_group: object = None
) -> nn.Module:
    """Every batch norm of `module` becomes ``layer(num_features, process_group=...)``;
    the layers with a ``sync`` option are switched on instead. In place.

    Example:
        >>> net = to_sync(nn.Sequential(nn.BatchNorm2d(4)), SyncBatchNorm)  # doctest: +SKIP
    """
    switched = switch_sync(module, True, process_group)
    return replace_with(
        module,
        layer,
        lambda name, m: is_batch_norm(m) and id(m) not in switched,
        process_group=process_group,
    )


def from_sync(module: nn.Module, sync_layers: tuple[type, ...]) -> nn.Module:
    """Every instance of `sync_layers` becomes a plain batch norm; the layers with a
    ``sync`` option are switched off. In place.

    Example:
        >>> net = from_sync(net, (nn.SyncBatchNorm, SyncBatchNorm))  # doctest: +SKIP
    """
    switch_sync(module, False, None)
    return replace_with(module, BatchNorm, lambda name, m: isinstance(m, sync_layers))
