"""Fusing conv/linear + normlab batch norm (+ ReLU) with torch.ao.quantization.

``torch.ao.quantization.fuse_modules`` looks fusers up by the exact types of the
modules, so it knows torch's ``BatchNorm2d`` but not normlab's. :data:`FUSER_METHODS`
maps the normlab combinations to fusers::

    fused = torch.ao.quantization.fuse_modules(
        model.eval(), [["conv", "bn", "relu"]],
        fuse_custom_config_dict={"additional_fuser_method_mapping": normlab.FUSER_METHODS},
    )

Each fuser hands torch's own fuser a ``torch.nn`` batch norm of the same rank holding the
normlab layer's state (a normlab batch norm computes what torch's does), so the result
is what torch builds for its own layers: in eval a Conv/Linear with the batch norm
folded in (``ConvReLU2d`` with the ReLU), for quantization-aware training
(``fuse_modules_qat`` on a model in training mode) ``ConvBn2d``/``ConvBnReLU2d``/
``LinearBn1d``. A channels-last (``channel_axis=-1``) or per-activation batch norm does
not sit on a conv's output channels and is refused with a ValueError.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.ao.quantization.fuser_method_mappings import (
    fuse_conv_bn,
    fuse_conv_bn_relu,
    fuse_linear_bn,
)
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.layers.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@torch.no_grad()
def as_torch_batch_norm(bn: _BatchNorm, rank: int) -> _BatchNorm:
    """torch.nn's BatchNorm{rank}d with `bn`'s state, mode, device and dtype.

    Example:
        >>> type(as_torch_batch_norm(BatchNorm2d(4), 2)).__name__
        'BatchNorm2d'
    """
    if getattr(bn, "channel_axis", 1) != 1 or getattr(bn, "per_activation", False):
        raise ValueError(
            f"fuse: expected a batch norm over the channels at dim 1 (the conv's output "
            f"channels), got {bn!r}"
        )
    like = next(iter(bn.buffers()), None)
    kind = {} if like is None else {"device": like.device, "dtype": like.dtype}
    new = _TORCH_BN[rank](
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **kind
    )
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(bn, name, None) is not None:
            getattr(new, name).copy_(getattr(bn, name))
    if bn.affine:
        new.weight.copy_(bn.weight)
        new.weight.requires_grad_(bn.weight.requires_grad)
        if bn.bias is not None:
            new.bias.copy_(bn.bias)
            new.bias.requires_grad_(bn.bias.requires_grad)
        else:  # bias=False: a β fixed at zero
            new.bias.zero_()
            new.bias.requires_grad_(False)
    return new.train(bn.training)


def _conv_bn(rank: int) -> Callable[..., nn.Module]:
    def fuse(is_qat: bool, conv: nn.Module, bn: _BatchNorm) -> nn.Module:
        return fuse_conv_bn(is_qat, conv, as_torch_batch_norm(bn, rank))

    return fuse


def _conv_bn_relu(rank: int) -> Callable[..., nn.Module]:
    def fuse(is_qat: bool, conv: nn.Module, bn: _BatchNorm, relu: nn.Module) -> nn.Module:
        return fuse_conv_bn_relu(is_qat, conv, as_torch_batch_norm(bn, rank), relu)

    return fuse


def _linear_bn(is_qat: bool, linear: nn.Linear, bn: _BatchNorm) -> nn.Module:
    return fuse_linear_bn(is_qat, linear, as_torch_batch_norm(bn, 1))


def _mapping() -> dict[tuple[type, ...], Callable[..., nn.Module]]:
    mapping: dict[tuple[type, ...], Callable[..., nn.Module]] = {}
    for rank, ranked in ((1, BatchNorm1d), (2, BatchNorm2d), (3, BatchNorm3d)):
        for bn in (ranked, BatchNorm):  # BatchNorm: any rank, taken from the conv
            mapping[(_CONVS[rank], bn)] = _conv_bn(rank)
            mapping[(_CONVS[rank], bn, nn.ReLU)] = _conv_bn_relu(rank)
    for bn in (BatchNorm1d, BatchNorm):
        mapping[(nn.Linear, bn)] = _linear_bn
    return mapping


# (module types, in order) -> fuser(is_qat, *modules), for
# fuse_custom_config_dict={"additional_fuser_method_mapping": FUSER_METHODS}.
FUSER_METHODS: dict[tuple[type, ...], Callable[..., nn.Module]] = _mapping()
