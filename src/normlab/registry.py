"""Names for normalization layers: ``create_norm("gn", 64)`` builds a GroupNorm over 64 channels.

The channel count comes first, as in timm; options go to the layer. Every factory takes
NCHW-style data (channels at dim 1) unless given ``channel_axis=-1``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

import normlab.layers as layers
from normlab.layers.frozen import FrozenBatchNorm
from normlab.sync import SyncBatchNorm

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class Entry:
    factory: Factory
    summary: str


_REGISTRY: dict[str, Entry] = {}


def register(name: str, factory: Factory, summary: str) -> None:
    """Add `factory(num_features, **options)` under `name` (lower case, unique).

    Example:
        >>> register("bn-noaffine", lambda c, **o: layers.BatchNorm(c, affine=False, **o), "BN, no affine")
    """
    if not isinstance(name, str) or name != name.lower() or not name:
        raise ValueError(f"register: expected a non-empty lower-case name, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"register: name {name!r} is already taken by {_REGISTRY[name].summary!r}")
    _REGISTRY[name] = Entry(factory, summary)


def available_norms() -> dict[str, str]:
    """Every registered name with a one-line summary.

    Example:
        >>> "gn" in available_norms()
        True
    """
    return {name: entry.summary for name, entry in sorted(_REGISTRY.items())}


def create_norm(name: str, num_features: int, **options: object) -> nn.Module:
    """Build the layer registered as `name` for `num_features` channels.

    Example:
        >>> create_norm("gn", 64, num_groups=8)
        GroupNorm(8, 64, eps=1e-05, affine=True, bias=True)
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown normalization {name!r}: expected one of {', '.join(sorted(_REGISTRY))}{hint}"
        )
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(
            f"create_norm({name!r}): expected num_features a positive int, got {num_features!r}"
        )
    return _REGISTRY[key].factory(num_features, **options)


def default_groups(channels: int, preferred: int = 32) -> int:
    """32 groups when they divide C (the GN paper's default), else the largest divisor of C
    below both 32 and C (so that small layers get groups of at least 2 channels)."""
    if channels % preferred == 0:
        return preferred
    limit = min(preferred, max(channels // 2, 1))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def _group_norm(channels: int, **options: object) -> nn.Module:
    if "num_groups" not in options and "group_size" not in options:
        options["num_groups"] = default_groups(channels)
    return layers.GroupNorm(num_channels=channels, **options)


def _identity(channels: int, **options: object) -> nn.Module:
    return nn.Identity()


register("bn", layers.BatchNorm, "batch norm: per channel over batch and positions (n c ... -> c)")
register(
    "in",
    lambda c, **o: layers.InstanceNorm(c, **{"affine": True, **o}),
    "instance norm: per sample and channel over positions (n c ... -> n c), affine",
)
register(
    "ln",
    lambda c, **o: layers.GroupNorm(1, c, **o),
    "layer norm for conv nets: per sample over channels and positions (n c ... -> n)",
)
register(
    "ln2d", layers.LayerNorm2d, "LayerNorm2d (ConvNeXt): per sample and position over channels"
)
register("gn", _group_norm, "group norm: per sample and channel group (n (g k) ... -> n g)")
register(
    "rms",
    lambda c, **o: layers.RMSNorm(c, **{"channel_axis": 1, **o}),
    "RMS norm over channels per position, no centering",
)
register("none", _identity, "no normalization (identity)")

# Hybrid, batch-renorm, batch-free and fused norm + activation layers.
register("ibn", layers.IBN, "IBN-a: instance norm on the first channels, batch norm on the rest")
register(
    "bin", layers.BatchInstanceNorm, "batch-instance norm: learned per-channel mix of BN and IN"
)
register("sn", layers.SwitchableNorm, "switchable norm: learned mix of IN, LN and BN moments")
register("brn", layers.BatchRenorm, "batch renormalization: BN corrected toward running estimates")
register(
    "gbn",
    layers.GhostBatchNorm,
    "ghost batch norm: BN statistics per ghost batch ((g m) c ... -> g c), ghost_size=4",
)
register(
    "mobn",
    layers.MeanOnlyBatchNorm,
    "mean-only batch norm: subtract the batch mean per channel, no division (pair with wn)",
)


def _evonorm_s0(channels: int, **options: object) -> nn.Module:
    if "num_groups" not in options and "group_size" not in options:
        options["num_groups"] = default_groups(channels)
    return layers.EvoNormS0(channels, **options)


register("frn", layers.FilterResponseNorm, "filter response norm with TLU (no centering, no batch)")
register("evonorm-b0", layers.EvoNormB0, "EvoNorm-B0: batch variance vs instance variance + v·x")
register("evonorm-s0", _evonorm_s0, "EvoNorm-S0: x·sigmoid(v·x) over the group-norm std")
for _norm in ("bn", "gn"):
    for _act in ("relu", "silu"):
        register(
            f"{_norm}-{_act}",
            lambda c, _n=_norm, _a=_act, **o: layers.norm_act(_n, c, act=_a, **o),
            f"{_REGISTRY[_norm].summary}, then {_act} (state_dict as the plain norm's)",
        )
del _norm, _act


register(
    "syncbn", SyncBatchNorm, "batch norm synchronized over the processes of a distributed group"
)
register("frozenbn", FrozenBatchNorm, "frozen batch norm: fixed statistics and affine (buffers)")
