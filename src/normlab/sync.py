"""Synchronized batch norm's public home: the layer and the helpers the hybrids use.

:class:`SyncBatchNorm` and :func:`revert_sync_batchnorm` live in
:mod:`normlab.layers.syncbatchnorm` (a layer among the layers); the all-gather of moments
and the hybrids' helpers in :mod:`normlab.distributed`. Both are importable from here.

Example:
    >>> from normlab.sync import SyncBatchNorm, synchronized_moments
"""

from __future__ import annotations

from normlab.distributed import (
    check_sync,
    group_moments,
    local_moments,
    normalize_synchronized,
    synchronized_moments,
    synchronizing,
    world_size,
)
from normlab.layers.syncbatchnorm import SYNC_BATCH_NORMS, SyncBatchNorm, revert_sync_batchnorm

__all__ = [
    "SYNC_BATCH_NORMS",
    "SyncBatchNorm",
    "check_sync",
    "group_moments",
    "local_moments",
    "normalize_synchronized",
    "revert_sync_batchnorm",
    "synchronized_moments",
    "synchronizing",
    "world_size",
]
