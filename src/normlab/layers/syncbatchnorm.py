"""Synchronized batch norm: the layer whose batch statistics come from every process.

:class:`SyncBatchNorm` is torch's drop-in, computed by the engine: its moments are
gathered and combined exactly over the process group by
:func:`normlab.distributed.synchronized_moments` (uneven and empty per-process batches
included). Switching a model's batch norms to it and back is
``SyncBatchNorm.convert_sync_batchnorm`` / :func:`revert_sync_batchnorm`, whose work is
done by :mod:`normlab.conversion.sync`; torch's API puts the model-level conversion on
the layer class, so those two entry points import the tool (above the layers) when
called. Its public home is :mod:`normlab.sync`, which also re-exports the helpers of
:mod:`normlab.distributed`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.distributed import normalize_synchronized, synchronizing
from normlab.kernels.transforms import fx_leaf
from normlab.layers.batchnorm import _BatchNormForward, _init
from normlab.layers.checks import channel_view, check_input
from normlab.pattern import plan

__all__ = ["SYNC_BATCH_NORMS", "SyncBatchNorm", "revert_sync_batchnorm"]


class SyncBatchNorm(_BatchNormForward, _BatchNorm):
    """Drop-in ``torch.nn.SyncBatchNorm``: batch norm over every process of a group.

    Exact with uneven and empty per-process batches, on gloo (CPU) and NCCL; plain batch
    norm when torch.distributed is not initialized or the group has one process. It is
    deliberately not a subclass of ``torch.nn.SyncBatchNorm``: DistributedDataParallel
    refuses every such subclass on CPU, although this layer works there over gloo. Running
    variance is the unbiased variance of the whole batch. Any input rank (N, C, ...).

    Example:
        >>> SyncBatchNorm(16)(torch.randn(8, 16, 5, 5)).shape  # one process: plain BN
        torch.Size([8, 16, 5, 5])
    """

    sync = True  # always; the hybrid layers take it as an option (see `synchronizing`)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: object = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        channel_axis: int = 1,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"SyncBatchNorm: expected num_features a positive int, got {num_features!r}"
            )
        _init(
            self,
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            channel_axis=channel_axis,
        )
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:  # torch's hook; checks live in forward
        pass

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As torch: synchronize only in training with batch statistics; eval uses the
        # running estimates (or, without them, this process's batch).
        if not synchronizing(self):
            return super().forward(x)
        axis = self.channel_axis % max(x.dim(), 1)
        check_input(self, x, None, self.num_features, axis)
        weight = channel_view(self.weight, x.dim(), axis)
        bias = channel_view(self.bias, x.dim(), axis)
        return normalize_synchronized(self, x, plan(self.pattern(), x.shape), weight, bias)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: object = None) -> nn.Module:
        """Every batch norm of `module` becomes a SyncBatchNorm (see :func:`normlab.convert`).

        Unlike torch's, a subclass with an activation inside (timm's BatchNormAct2d) keeps
        it, and one whose behaviour cannot be kept raises instead of losing it silently.
        Layers with a ``sync`` option (Batch Renorm, Batch-Instance and Switchable norm)
        are switched to ``sync=True`` instead of replaced; IBN's ``BN`` half is converted.

        Example:
            >>> net = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))
        """
        from normlab.conversion.sync import to_sync  # a model tool, above the layers

        return to_sync(module, cls, process_group)


SYNC_BATCH_NORMS = (nn.SyncBatchNorm, SyncBatchNorm)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every SyncBatchNorm (torch's or normlab's) of `module` becomes a plain batch norm.

    Example:
        >>> net = revert_sync_batchnorm(SyncBatchNorm.convert_sync_batchnorm(net))  # doctest: +SKIP
    """
    from normlab.conversion.sync import from_sync  # a model tool, above the layers

    return from_sync(module, SYNC_BATCH_NORMS)
