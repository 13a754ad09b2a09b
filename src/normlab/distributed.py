"""Moments over every process of a torch.distributed group: the all-gather and its backward.

Each process computes the moments (count, mean, biased variance) of its own part of the
batch; :func:`synchronized_moments` gathers them and combines them exactly with Chan's
formula (never through raw E[x²] − E[x]²), so uneven per-process batches and processes
with an empty batch give the statistics of the whole concatenated batch. The backward
all-reduces the gradients of the global mean and variance (Σ dy and Σ dy·x̂ in the usual
derivation) and hands each process its count-weighted share.

Any layer that computes :class:`~normlab.moments.Moments` can be synchronized this way:
compute local moments with autograd (:func:`local_moments`), pass them through
``synchronized_moments(m, process_group)``, then normalize with the result
(``normalize_with``). :class:`~normlab.SyncBatchNorm` does only that; the hybrid layers
(BatchInstanceNorm, SwitchableNorm, BatchRenorm) use the helpers at the end of this
module: :func:`check_sync`, :func:`synchronizing`, :func:`group_moments` and
:func:`normalize_synchronized`.

This module sits below the layers: it knows moments, plans and ``normalize_with``, and
treats a layer as anything with ``sync``, ``process_group``, ``training``, ``eps``,
``track_running_stats`` and ``_update_running``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from normlab.moments import Moments, batch_stats, combine, from_stats
from normlab.normalize import normalize_with
from normlab.pattern import Plan

# Statistics shapes are compared across processes as fixed-size integer vectors:
# (rank of the shape, number of elements, the first _DIMS sizes padded with -1).
_DIMS = 6


def world_size(group: object = None) -> int:
    """Processes in `group` (the default group when None); 1 when torch.distributed is off.

    Example:
        >>> world_size()  # torch.distributed not initialized
        1
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _shape_code(shape: torch.Size, device: torch.device) -> torch.Tensor:
    sizes = list(shape)[:_DIMS]
    code = [len(shape), int(torch.Size(shape).numel()), *sizes, *[-1] * (_DIMS - len(sizes))]
    return torch.tensor(code, dtype=torch.int64, device=device)


def _decode(code: torch.Tensor) -> str:
    rank, numel, *sizes = (int(v) for v in code)
    if rank > _DIMS:
        return f"rank-{rank} shape of {numel} elements"
    return str(tuple(sizes[:rank]))


def check_same_shape(shape: torch.Size, device: torch.device, group: object = None) -> None:
    """Raise ValueError on every process unless all processes of `group` hold statistics
    of `shape` (a different channel count on one process would otherwise abort the
    collective that follows, killing the process).

    Example:
        >>> check_same_shape(torch.Size([3]), torch.device("cpu"))  # one process: nothing to do
    """
    if world_size(group) == 1:
        return
    mine = _shape_code(shape, device)
    codes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(codes, mine, group=group)
    if all(torch.equal(code, codes[0]) for code in codes):
        return
    found = ", ".join(f"{_decode(code)} on rank {rank}" for rank, code in enumerate(codes))
    raise ValueError(
        f"synchronized_moments: expected statistics of shape {tuple(shape)} (one channel "
        f"count) on every rank of the process group, got {found}"
    )


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
    axes and shape (checked: a mismatch raises ValueError on every process); an empty
    local batch has count 0. Without torch.distributed, or with one process, `m` comes
    back unchanged.

    Example:
        >>> local = local_moments(x, plan("n c ... -> c", x.shape))  # doctest: +SKIP
        >>> whole = synchronized_moments(local, group)  # doctest: +SKIP
    """
    if not isinstance(m, Moments):
        raise TypeError(f"synchronized_moments: expected a normlab Moments, got {type(m).__name__}")
    if world_size(group) == 1:
        return m
    check_same_shape(m.mean.shape, m.mean.device, group)
    mean, var, count = _SyncMoments.apply(m.mean, m.var, m.count, group)
    return Moments(mean, var, count, m.axes)


def local_moments(x: torch.Tensor, p: Plan) -> Moments:
    """This process's moments of `x` over `p`'s sets, differentiable, ready to synchronize.

    An empty batch gives count 0, still attached to `x`'s graph: the backward's
    collective must run on every process, including those that saw no data.

    Example:
        >>> local_moments(torch.randn(4, 3), plan("n c -> c", (4, 3))).count
        tensor([4., 4., 4.])
    """
    mean, var = batch_stats(x, p)
    if x.requires_grad and not mean.requires_grad:
        tie = x.sum().to(mean.dtype) * 0
        mean, var = mean + tie, var + tie
    return from_stats(mean, var, p)


# --------------------------------------------------------------------------- layers


def check_sync(sync: object, process_group: object, who: str) -> bool:
    """A layer's ``sync`` option: a bool, and True whenever a `process_group` is given.

    Example:
        >>> check_sync(True, None, "BatchRenorm")
        True
    """
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
        >>> synchronizing(SyncBatchNorm(4))  # doctest: +SKIP
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
            f"{type(layer).__name__}({layer.extra_repr()}): expected more than 1 value per "
            f"channel over all processes when training, got {count} (local input shape "
            f"{tuple(x.shape)})"
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
