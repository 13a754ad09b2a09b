"""Synchronized batch norm: statistics over every process of a torch.distributed group.

Each process computes the moments (count, mean, biased variance) of its own part of the
batch; :func:`synchronized_moments` gathers them and combines them exactly with Chan's
formula (never through raw E[x²] − E[x]²), so uneven per-process batches and processes
with an empty batch give the statistics of the whole concatenated batch. The backward
all-reduces the gradients of the global mean and variance (Σ dy and Σ dy·x̂ in the usual
derivation) and hands each process its count-weighted share.

Any layer that computes :class:`~normlab.moments.Moments` can be synchronized the same
way: compute local moments with autograd (:func:`local_moments`),
pass them through ``synchronized_moments(m, process_group)``, then normalize with the
result (``normalize_with``). That is all :class:`SyncBatchNorm` does.

The hybrid layers (BatchInstanceNorm, SwitchableNorm, BatchRenorm; IBN through its BN
half) take ``sync=True, process_group=None`` and synchronize their batch part with the
helpers at the end of this module: :func:`synchronizing` (sync asked, training, more
than one process), :func:`group_moments` and :func:`normalize_synchronized`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.kernels.transforms import fx_leaf
from normlab.layers.batchnorm import _BatchNormForward, _init
from normlab.layers.checks import channel_view, check_input, describe
from normlab.moments import Moments, batch_stats, combine, from_stats
from normlab.normalize import normalize_with
from normlab.pattern import Plan, plan


def world_size(group: object = None) -> int:
    """Processes in `group` (the default group when None); 1 when torch.distributed is off."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _SyncMoments(torch.autograd.Function):
    """Forward: all-gather (count, mean, var) and combine. Backward: all-reduce the global
    gradients and return this process's share (its count over the global count)."""

    @staticmethod
    def forward(
        ctx: Any, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, group: object
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Gather in float64: counts stay exact past 2**24 elements per channel and the
        # combination loses nothing; these are per-channel vectors, so the cost is small.
        packed = torch.stack([count.to(mean.dtype).expand_as(mean), mean, var]).double()
        parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, packed.contiguous(), group=group)
        whole = combine([Moments(p[1], p[2], p[0], ()) for p in parts])
        share = packed[0] / whole.count.clamp(min=1)
        ctx.save_for_backward(share, packed[1] - whole.mean)
        ctx.group = group
        out = whole.mean.to(mean.dtype), whole.var.to(mean.dtype), whole.count.to(mean.dtype)
        ctx.mark_non_differentiable(out[2])
        return out

    @staticmethod
    def backward(
        ctx: Any, grad_mean: torch.Tensor, grad_var: torch.Tensor, _grad_count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        share, offset = ctx.saved_tensors
        # Each process's loss depends on the global statistics: sum their gradients.
        grads = torch.stack([grad_mean, grad_var]).double().contiguous()
        dist.all_reduce(grads, group=ctx.group)
        total_mean, total_var = grads[0], grads[1]
        # mean = Σ nᵢμᵢ/N, var = Σ nᵢ(vᵢ + (μᵢ − mean)²)/N; the term through `mean` in var
        # vanishes because Σ nᵢ(μᵢ − mean) = 0.
        d_mean = share * (total_mean + 2 * offset * total_var)
        d_var = share * total_var
        return d_mean.to(grad_mean.dtype), d_var.to(grad_var.dtype), None, None


def synchronized_moments(m: Moments, group: object = None) -> Moments:
    """The moments of the union of every process's batch, differentiable (autograd).

    Every process of `group` must call it (and later backward) with moments of the same
    axes and shape; an empty local batch has count 0. Without torch.distributed, or
    with one process, `m` comes back unchanged.

    Example:
        >>> local = local_moments(x, plan("n c ... -> c", x.shape))  # doctest: +SKIP
        >>> whole = synchronized_moments(local, group)  # doctest: +SKIP
    """
    if not isinstance(m, Moments):
        raise TypeError(f"synchronized_moments: expected a normlab Moments, got {type(m).__name__}")
    if world_size(group) == 1:
        return m
    mean, var, count = _SyncMoments.apply(m.mean, m.var, m.count, group)
    return Moments(mean, var, count, m.axes)


def local_moments(x: torch.Tensor, p: Plan) -> Moments:
    """This process's moments of `x` over `p`'s sets, differentiable, ready to synchronize.

    An empty batch gives count 0, still attached to `x`'s graph: the backward's
    collective must run on every process, including those that saw no data.
    """
    mean, var = batch_stats(x, p)
    if x.requires_grad and not mean.requires_grad:
        tie = x.sum().to(mean.dtype) * 0
        mean, var = mean + tie, var + tie
    return from_stats(mean, var, p)


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
        from normlab.convert import convert_all, is_batch_norm

        switched = _switch_sync(module, True, process_group)
        return convert_all(
            module,
            cls,
            where=lambda name, m: is_batch_norm(m) and id(m) not in switched,
            process_group=process_group,
        )


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every SyncBatchNorm (torch's or normlab's) of `module` becomes a plain batch norm.

    Example:
        >>> net = revert_sync_batchnorm(SyncBatchNorm.convert_sync_batchnorm(net))  # doctest: +SKIP
    """
    from normlab.convert import convert_all

    _switch_sync(module, False, None)
    return convert_all(module, "bn", where=lambda name, m: isinstance(m, SYNC_BATCH_NORMS))


SYNC_BATCH_NORMS = (nn.SyncBatchNorm, SyncBatchNorm)


def _switch_sync(module: nn.Module, sync: bool, group: object) -> set[int]:
    """Set ``sync``/``process_group`` on the layers that have them as options (the
    hybrids): they keep their behaviour, which a plain (Sync)BatchNorm would lose."""
    from normlab.layers import BatchInstanceNorm, BatchRenorm, SwitchableNorm

    if not isinstance(module, nn.Module):
        return set()  # convert_all says what was expected
    hybrids = [
        m
        for m in module.modules()
        if isinstance(m, BatchInstanceNorm | BatchRenorm)
        or (isinstance(m, SwitchableNorm) and m.using_bn)
    ]
    for m in hybrids:
        m.sync, m.process_group = sync, group
    return {id(m) for m in hybrids}


# --------------------------------------------------------------------------- hybrid layers


def check_sync(sync: object, process_group: object, who: str) -> bool:
    """A layer's ``sync`` option: a bool, and True whenever a `process_group` is given."""
    if not isinstance(sync, bool):
        raise TypeError(f"{who}: expected sync a bool, got {sync!r}")
    if process_group is not None and not sync:
        raise ValueError(
            f"{who}: expected sync=True with a process_group (it is only used to "
            f"synchronize), got sync=False and process_group={process_group!r}"
        )
    return sync


def synchronizing(layer: nn.Module) -> bool:
    """Whether `layer` takes its batch statistics over every process of its group now:
    it is asked to (``layer.sync``), it is training, and the group has several processes.

    Example:
        >>> synchronizing(SyncBatchNorm(4))  # torch.distributed not initialized
        False
    """
    return layer.sync and layer.training and world_size(layer.process_group) > 1


def group_moments(layer: nn.Module, local: Moments, x: torch.Tensor) -> Moments:
    """`local` (this process's batch moments, with autograd) combined over the processes
    of ``layer.process_group``; every set must hold more than one value in all.

    Example:
        >>> whole = group_moments(self, local_moments(x, p), x)  # doctest: +SKIP
    """
    whole = synchronized_moments(local, layer.process_group)
    count = int(whole.count.flatten()[0])
    if count <= 1:  # the same on every process: all raise
        raise ValueError(
            f"{describe(layer)}: expected more than 1 value per channel over all processes "
            f"when training, got {count} (local input shape {tuple(x.shape)})"
        )
    return whole


def normalize_synchronized(
    layer: nn.Module,
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Batch norm of `x` over `p`'s sets with the statistics of every process of the
    layer's group; the layer's running buffers follow them (unbiased with the global count).

    `weight`/`bias` already broadcast against `x`.

    Example:
        >>> y = normalize_synchronized(self, x, p, None, None)  # doctest: +SKIP
    """
    whole = group_moments(layer, local_moments(x, p), x)
    y = normalize_with(x, p, whole.mean, whole.var, weight, bias, layer.eps)
    if layer.track_running_stats:
        layer._update_running(whole.mean.detach(), whole.unbiased_var().detach())
    return y
