"""Recognising a normalization layer by what it normalizes over, not by its name.

A layer is a norm when it is one of torch.nn's normalization classes (or a subclass),
one of normlab's, or a module whose *behaviour* a probe on a small input shows to be a
per-position layer or RMS norm over one channel axis with a per-channel ``weight``
(and ``bias``) and an ``eps`` (Llama-style ``LlamaRMSNorm`` with ``variance_epsilon``,
T5's layer norm, ConvNeXt's channels-first LayerNorm). A subclass of a torch norm that
overrides ``forward`` is probed too: it is treated as its base when it computes what
the base computes, as a per-position norm over the channels when it computes that
(timm's ``LayerNorm2d``: a LayerNorm over C applied to NCHW data by permuting), and it
is refused otherwise.

:func:`norm_spec` says what a norm normalizes over (:class:`NormSpec`): its channel
count and axis, whether its statistics are kept per position (over the channels only:
transformer LayerNorm, LayerNorm2d, RMS norms) or also reduce positions (batch,
instance, group norms), its ``eps``, and an activation to keep after it.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab.layers.norm_act import NormAct

# torch's normalization bases; their subclasses (timm's, normlab's) are norms too.
TORCH_NORMS = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# Where an unknown module may keep its epsilon (torch/timm, Hugging Face, Keras ports).
EPS_NAMES = ("eps", "variance_epsilon", "epsilon")
# normlab's own norms: the layers package and the modules beside it that hold a layer.
_NORMLAB_NORM_MODULES = ("normlab.layers",)


@dataclass(frozen=True)
class NormSpec:
    """What a norm layer normalizes over, as far as conversion needs to know.

    ``per_position``: statistics are kept per position and reduce the channel axis only
    (a transformer's LayerNorm, LayerNorm2d, RMS norms); False when they also reduce
    positions or the batch (batch, instance, group norms). ``act``/``drop``: modules
    applied after the norm that a replacement must keep (timm's norm-activation layers).
    """

    channels: int
    channel_axis: int
    per_position: bool
    centered: bool = True
    eps: float | None = None
    drop: nn.Module | None = None
    act: nn.Module | None = None


def trusted(cls: type) -> bool:
    """Classes whose forward is known: torch.nn's own and normlab's.

    Example:
        >>> trusted(nn.BatchNorm2d)
        True
    """
    return cls.__module__.startswith("torch.nn.") or cls.__module__.startswith("normlab.")


def known_base(cls: type) -> type:
    """The nearest trusted nn.Module class in `cls`'s MRO (torch's base of a timm subclass)."""
    return next(c for c in cls.__mro__ if trusted(c) and issubclass(c, nn.Module))


def _is_normlab_norm(module: nn.Module) -> bool:
    """One of normlab's activation norms: it has a channel count (a weight
    parametrization such as ``WeightNorm`` lives beside them but normalizes weights)."""
    if not type(module).__module__.startswith(_NORMLAB_NORM_MODULES):
        return False
    counts = (getattr(module, a, None) for a in ("num_features", "num_channels", "planes"))
    return any(isinstance(c, int) and not isinstance(c, bool) for c in counts)


def is_norm(module: object) -> bool:
    """A normalization layer: torch.nn's (and their subclasses), normlab's, or a module
    that behaves as a per-position layer/RMS norm (see the module docstring).

    A :class:`~normlab.NormAct` is not one: tools look inside it, at its ``norm``.

    Example:
        >>> is_norm(nn.LayerNorm(8)), is_norm(nn.Linear(8, 8))
        (True, False)
    """
    if not isinstance(module, nn.Module) or isinstance(module, NormAct):
        return False
    if isinstance(module, TORCH_NORMS) or _is_normlab_norm(module):
        return True
    return _probed(module) is not None


def is_batch_norm(module: object) -> bool:
    """Any batch norm with batch statistics: torch's, SyncBatchNorm, normlab's, subclasses.

    Example:
        >>> is_batch_norm(nn.BatchNorm2d(4)), is_batch_norm(nn.GroupNorm(2, 4))
        (True, False)
    """
    return isinstance(module, _BatchNorm)


# --------------------------------------------------------------------------- probing


def _eps(module: nn.Module) -> float | None:
    for name in EPS_NAMES:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            return float(value)
    return None


def _vector(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.is_floating_point():
        return value
    return None


def _per_position_reference(
    x: torch.Tensor,
    axis: int,
    centered: bool,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Float64 oracle: normalize over `axis` alone at every position, then the affine."""
    h = x.double().movedim(axis, -1)
    if centered:
        h = h - h.mean(-1, keepdim=True)
    y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps) * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y.movedim(-1, axis)


def _probe_inputs(channels: int, axis: int, like: torch.Tensor, eps: float) -> list[torch.Tensor]:
    """Data off zero (so centering shows) at two scales: ~1, and ~√eps (so eps shows)."""
    g = torch.Generator().manual_seed(0)
    shape = (2, channels, channels + 1, channels + 2) if axis == 1 else (2, channels + 1, channels)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + 1.5
    scales = [1.0] + ([eps**0.5] if eps > 0 else [])
    return [(x * s).to(device=like.device, dtype=like.dtype) for s in scales]


def _matches(module: nn.Module, x: torch.Tensor, expected: torch.Tensor) -> bool:
    try:
        y = module(x)
    except Exception:  # a probe that the module cannot take is an interpretation that fails
        return False
    if not isinstance(y, torch.Tensor) or y.shape != expected.shape:
        return False
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 3e-2
    return torch.allclose(y.double(), expected, rtol=tol, atol=tol)


@torch.no_grad()
def _randomized(module: nn.Module) -> nn.Module:
    """A copy with a non-trivial weight and bias, so that the probe sees them applied."""
    probe = copy.deepcopy(module)
    g = torch.Generator().manual_seed(1)
    for name in ("weight", "bias"):
        t = _vector(probe, name)
        if t is not None:
            t.copy_((torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5).to(t))
    return probe


def _probe_per_position(module: nn.Module) -> NormSpec | None:
    """The per-position norm `module` computes, found on small inputs, or None."""
    weight, eps = _vector(module, "weight"), _eps(module)
    if weight is None or eps is None or weight.device.type == "meta" or weight.numel() < 2:
        return None
    bias = _vector(module, "bias")
    if bias is not None and bias.shape != weight.shape:
        return None
    probe = _randomized(module)
    w, b = _vector(probe, "weight"), _vector(probe, "bias")
    channels = weight.numel()
    for centered in (True, False):
        for axis in (-1, 1):
            inputs = _probe_inputs(channels, axis, weight, eps)
            if all(
                _matches(probe, x, _per_position_reference(x, axis, centered, w, b, eps))
                for x in inputs
            ):
                return NormSpec(channels, axis, True, centered, eps)
    return None


_PROBED: weakref.WeakKeyDictionary[nn.Module, NormSpec | None] = weakref.WeakKeyDictionary()


def _probed(module: nn.Module) -> NormSpec | None:
    """A module that torch and normlab do not know, recognised by behaviour (cached)."""
    if trusted(type(module)) or module._modules or _vector(module, "weight") is None:
        return None
    if module not in _PROBED:
        _PROBED[module] = _probe_per_position(module)
    return _PROBED[module]


def _base_input(module: nn.Module, like: torch.Tensor) -> torch.Tensor | None:
    """A small input the module's torch base accepts, with sizes distinct from its channels."""
    shape = getattr(module, "normalized_shape", None)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and shape is not None:
        dims = (2, 3, *shape)
    else:
        c = next(
            (getattr(module, a) for a in ("num_features", "num_channels") if hasattr(module, a)),
            None,
        )
        if not isinstance(c, int):
            return None
        rank = {nn.BatchNorm1d: 3, nn.InstanceNorm1d: 3, nn.BatchNorm3d: 5, nn.InstanceNorm3d: 5}
        r = next((v for k, v in rank.items() if isinstance(module, k)), 4)
        dims = (3, c, *range(c + 1, c + r - 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(dims, generator=g, dtype=torch.float64) + 1.5
    return x.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def _acts_as_base(module: nn.Module, base: type) -> bool:
    """Whether `module` (a subclass overriding forward) computes what `base` computes."""
    weight = next((t for t in module.parameters(recurse=False) if t.is_floating_point()), None)
    weight = weight if weight is not None else _vector(module, "running_mean")
    if weight is None or weight.device.type == "meta":
        return False
    x = _base_input(module, weight)
    if x is None:
        return False
    probe = _randomized(module)
    try:
        expected = base.forward(copy.deepcopy(probe), x)
    except Exception:  # the base refuses its own probe: nothing to compare
        return False
    return _matches(probe, x, expected.double())


# --------------------------------------------------------------------------- what it does


def _axis_and_shape(name: str, module: nn.Module) -> tuple[int, bool]:
    """(channel axis, per position) of a norm that torch or normlab knows."""
    if getattr(module, "per_activation", False):
        raise ValueError(
            f"convert: {name or '<root>'} is a per-activation batch norm (statistics of shape "
            f"{tuple(module.num_features)}); expected a per-channel norm. Exclude it with where="
        )
    per_position = isinstance(module, (nn.LayerNorm, nn.RMSNorm))
    axis = getattr(module, "channel_axis", -1 if per_position else 1)
    shape = getattr(module, "normalized_shape", None)
    if per_position and shape is not None and len(shape) != 1 and axis == -1:
        raise ValueError(
            f"convert: {name or '<root>'} ({type(module).__name__}) normalizes over the "
            f"trailing dims {tuple(shape)}; expected one channel axis. Exclude it with where="
        )
    return axis, per_position


def _channels(name: str, module: nn.Module) -> int:
    for attr in ("num_features", "num_channels", "planes"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        return int(shape[0])
    raise ValueError(
        f"convert: cannot tell the channel count of {name or '<root>'} ({type(module).__name__}): "
        f"expected an attribute num_features, num_channels or normalized_shape"
    )


def _refuse(name: str, module: nn.Module, base: type, children: set[str], overridden: bool):
    what = "overrides forward" if overridden else ""
    if children:
        what += (" and " if what else "") + f"has submodules {sorted(children)}"
    if overridden and not children:
        what += " with a computation that is neither its base's nor a per-position norm's"
    return TypeError(
        f"convert: cannot replace {name or '<root>'} ({type(module).__name__}, a subclass of "
        f"{base.__name__}) without losing behaviour: it {what}. Expected a plain norm or "
        f"a norm-activation layer (children 'drop'/'act' applied after the norm); "
        f"exclude it with where=, or replace it yourself"
    )


def norm_spec(name: str, module: nn.Module) -> NormSpec:
    """What the norm `module` (called `name` in its model) normalizes over.

    Raises TypeError for a subclass whose behaviour a replacement would lose, ValueError
    for a norm with no single channel axis (per-activation BN, LayerNorm over (H, W)).

    Example:
        >>> norm_spec("ln", nn.LayerNorm(8))
        NormSpec(channels=8, channel_axis=-1, per_position=True, centered=True, eps=1e-05, drop=None, act=None)
    """
    cls = type(module)
    if not isinstance(module, TORCH_NORMS) and not _is_normlab_norm(module):
        probed = _probed(module)
        if probed is None:
            raise TypeError(
                f"convert: {name or '<root>'} ({cls.__name__}) is not a normalization layer "
                f"convert recognises"
            )
        return probed
    eps = _eps(module)
    centered = not isinstance(module, nn.RMSNorm)
    if trusted(cls):
        axis, per_position = _axis_and_shape(name, module)
        return NormSpec(_channels(name, module), axis, per_position, centered, eps)
    base = known_base(cls)
    children = set(module._modules)
    overridden = cls.forward is not base.forward
    if overridden and children and children <= {"drop", "act"}:
        axis, per_position = _axis_and_shape(name, module)
        drop, act = (module._modules.get(k) for k in ("drop", "act"))
        drop, act = (m if m is not None else nn.Identity() for m in (drop, act))
        return NormSpec(_channels(name, module), axis, per_position, centered, eps, drop, act)
    if children:
        raise _refuse(name, module, base, children, overridden)
    if overridden and not _acts_as_base(module, base):
        probed = _probe_per_position(module)
        if probed is None:
            raise _refuse(name, module, base, children, overridden)
        return probed
    axis, per_position = _axis_and_shape(name, module)
    return NormSpec(_channels(name, module), axis, per_position, centered, eps)
