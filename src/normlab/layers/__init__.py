"""Normalization layers, one module per family, all configurations of the one engine."""

from normlab.layers.batch_free import EvoNormB0, EvoNormS0, FilterResponseNorm
from normlab.layers.batch_instance import BatchInstanceNorm
from normlab.layers.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.layers.ghost import GhostBatchNorm
from normlab.layers.groupnorm import GroupNorm
from normlab.layers.ibn import IBN, IBNb
from normlab.layers.instancenorm import InstanceNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.layers.layernorm import LayerNorm, LayerNorm2d, RMSNorm
from normlab.layers.mean_only import MeanOnlyBatchNorm
from normlab.layers.norm_act import NormAct, norm_act
from normlab.layers.renorm import BatchRenorm
from normlab.layers.switchable import SwitchableNorm
from normlab.layers.syncbatchnorm import SyncBatchNorm
from normlab.layers.weight_norm import remove_weight_norm, weight_norm

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
    "BatchInstanceNorm",
    "IBN",
    "IBNb",
    "SwitchableNorm",
    "SyncBatchNorm",
    "BatchRenorm",
    "remove_weight_norm",
    "weight_norm",
    "GhostBatchNorm",
    "MeanOnlyBatchNorm",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "NormAct",
    "norm_act",
]
