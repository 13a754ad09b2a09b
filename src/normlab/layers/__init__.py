"""Normalization layers, one module per family, all configurations of the one engine."""

from normlab.layers.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.layers.groupnorm import GroupNorm
from normlab.layers.instancenorm import InstanceNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.layers.layernorm import LayerNorm, LayerNorm2d, RMSNorm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
]
