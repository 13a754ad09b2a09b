"""Frozen batch norm, freeze/unfreeze, and recomputing running statistics.

A frozen batch norm is batch norm in eval mode made permanent: its γ, β and running
statistics are buffers, so neither training mode nor an optimizer changes them (the
usual choice for detection backbones trained with small batches). It has batch norm's
state_dict keys (``num_batches_tracked`` is accepted and ignored), so checkpoints load
both ways.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

from normlab.convert import Where, _predicate, convert_all, is_batch_norm
from normlab.layers.checks import channel_view, check_channel_axis, check_input, describe
from normlab.normalize import normalize_with
from normlab.pattern import plan


class FrozenBatchNorm(nn.Module):
    """Batch norm of any rank (N, C, ...) with fixed statistics and affine, even in train mode.

    y = (x − running_mean)·rsqrt(running_var + eps)·weight + bias: a per-channel scale and
    shift, computed by the same engine as batch norm's eval mode (so a frozen layer gives
    exactly what the batch norm gave in eval).

    Example:
        >>> FrozenBatchNorm(16)(torch.randn(2, 16, 5, 5)).shape
        torch.Size([2, 16, 5, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channel_axis: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"FrozenBatchNorm: expected num_features a positive int, got {num_features!r}"
            )
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise ValueError(f"FrozenBatchNorm: expected eps >= 0, got {eps!r}")
        self.num_features, self.eps = num_features, float(eps)
        self.channel_axis = check_channel_axis(channel_axis)
        kind = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **kind))
        self.register_buffer("bias", torch.zeros(num_features, **kind))
        self.register_buffer("running_mean", torch.zeros(num_features, **kind))
        self.register_buffer("running_var", torch.ones(num_features, **kind))

    def reset_parameters(self) -> None:
        """The identity: weight 1, bias 0, running mean 0, running variance 1."""
        self.weight.fill_(1)
        self.bias.zero_()
        self.running_mean.zero_()
        self.running_var.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.channel_axis % max(x.dim(), 1)
        check_input(self, x, None, self.num_features, axis)
        p = plan("n c ... -> c" if self.channel_axis == 1 else "n ... c -> c", x.shape)
        weight = channel_view(self.weight, x.dim(), axis)
        bias = channel_view(self.bias, x.dim(), axis)
        return normalize_with(x, p, self.running_mean, self.running_var, weight, bias, self.eps)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        # A batch norm's checkpoint has a step counter; frozen statistics need none.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        extra = f"{self.num_features}, eps={self.eps}"
        return extra + (f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else "")


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
    select = _predicate(where)
    for name, m in model.named_modules():
        if is_batch_norm(m) and select(name, m) and m.running_mean is None:
            raise ValueError(
                f"freeze: {name or '<root>'} ({describe(m)}) keeps no running statistics, so "
                f"there is nothing to freeze; expected track_running_stats=True (or exclude it "
                f"with where=)"
            )
    return convert_all(model, FrozenBatchNorm, where=lambda n, m: is_batch_norm(m) and select(n, m))


def unfreeze(model: nn.Module, *, where: Where = None, **options: Any) -> nn.Module:
    """Every :class:`FrozenBatchNorm` becomes a trainable batch norm (registry ``"bn"``,
    `options` passed on) with its statistics and affine; in place, returns the model.

    Example:
        >>> type(unfreeze(freeze(nn.BatchNorm2d(8)))).__name__
        'BatchNorm'
    """
    _model(model, "unfreeze")
    select = _predicate(where)
    return convert_all(
        model, "bn", where=lambda n, m: isinstance(m, FrozenBatchNorm) and select(n, m), **options
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
