"""normlab: activation normalization as one pattern engine.

Every method is a pattern such as ``n c h w -> c`` (batch norm): the axes on the right
keep their own statistics, every other axis is reduced.

Example:
    >>> import torch, normlab
    >>> y = normlab.normalize(torch.randn(8, 64, 4, 4), "n (g k) h w -> n g", g=32)
"""

from normlab import conventions
from normlab.convert import ConversionReport, convert
from normlab.errors import PatternError
from normlab.explain import Explanation, explain
from normlab.fold import fold
from normlab.freeze import FrozenBatchNorm, freeze, unfreeze, update_stats
from normlab.kernels import explain_dispatch, set_native, set_reference, use_reference
from normlab.layers import (
    IBN,
    BatchInstanceNorm,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    GhostBatchNorm,
    GroupNorm,
    IBNb,
    InstanceNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LayerNorm2d,
    MeanOnlyBatchNorm,
    NormAct,
    RMSNorm,
    SwitchableNorm,
    norm_act,
    remove_weight_norm,
    weight_norm,
)
from normlab.moments import Moments, combine, moments
from normlab.normalize import normalize
from normlab.pattern import parse_pattern, plan
from normlab.quantization import FUSER_METHODS
from normlab.registry import available_norms, create_norm, register
from normlab.sync import SyncBatchNorm, revert_sync_batchnorm, synchronized_moments

__version__ = "0.1.0"

__all__ = [
    "FUSER_METHODS",
    "BatchNorm",
    "Explanation",
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
    "SyncBatchNorm",
    "FrozenBatchNorm",
    "ConversionReport",
    "conventions",
    "convert",
    "fold",
    "freeze",
    "unfreeze",
    "update_stats",
    "revert_sync_batchnorm",
    "synchronized_moments",
    "Moments",
    "PatternError",
    "available_norms",
    "create_norm",
    "explain",
    "explain_dispatch",
    "register",
    "set_native",
    "set_reference",
    "use_reference",
    "combine",
    "moments",
    "normalize",
    "parse_pattern",
    "plan",
]
