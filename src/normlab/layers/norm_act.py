"""Norm followed by dropout and an activation, whose state_dict is the plain norm's.

``NormAct(norm, act="relu")`` holds `norm` as a child but saves and loads its keys
without the ``norm.`` prefix (and with the norm's own version metadata), so a
``BatchNorm2d`` checkpoint loads into ``NormAct(BatchNorm2d(c))`` and back. Tools
that look for norm layers (convert, SyncBatchNorm) still find the norm as a child and
keep the activation. Attributes the wrapper lacks are read from the norm
(``m.running_mean``, ``m.num_features``). The order is timm's: norm, dropout, act.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from normlab.layers.checks import check_unit_interval

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def make_activation(act: str | nn.Module | None) -> nn.Module:
    """An activation module from a name in :data:`ACTIVATIONS`, a module, or None (identity)."""
    if act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        return act
    if isinstance(act, str) and act.lower() in ACTIVATIONS:
        return ACTIVATIONS[act.lower()]()
    raise ValueError(
        f"NormAct: expected act one of {', '.join(ACTIVATIONS)}, an nn.Module or None, got {act!r}"
    )


def _save_without_prefix(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict
) -> None:
    inner = prefix + "norm."
    keys = [k for k in state_dict if k.startswith(prefix)]
    for key in keys:  # re-insert in order so the norm's keys come first, unprefixed
        value = state_dict.pop(key)
        state_dict[prefix + key[len(inner) :] if key.startswith(inner) else key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None and inner[:-1] in metadata:
        metadata[prefix[:-1]] = metadata.pop(inner[:-1])


def _load_with_prefix(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *args: object
) -> None:
    own = tuple(prefix + name + "." for name in module._modules if name != "norm")
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if not key.startswith(prefix + "norm.") and not key.startswith(own):
            state_dict[prefix + "norm." + key[len(prefix) :]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None and prefix[:-1] in metadata:
        metadata[prefix + "norm"] = metadata[prefix[:-1]]


class NormAct(nn.Module):
    """``act(drop(norm(x)))`` with the state_dict of `norm` alone.

    Example:
        >>> m = NormAct(nn.BatchNorm2d(8), act="relu")
        >>> sorted(m.state_dict()) == sorted(nn.BatchNorm2d(8).state_dict())
        True
        >>> (m(torch.randn(2, 8, 4, 4)) >= 0).all()
        tensor(True)
    """

    def __init__(
        self, norm: nn.Module, act: str | nn.Module | None = "relu", drop: float = 0.0
    ) -> None:
        super().__init__()
        if not isinstance(norm, nn.Module):
            raise TypeError(f"NormAct: expected norm an nn.Module, got {type(norm).__name__}")
        check_unit_interval(drop, "NormAct", "drop", closed="left")
        self.norm = norm
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act = make_activation(act)
        register = (
            getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        )
        register(_save_without_prefix)
        self.register_load_state_dict_pre_hook(_load_with_prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "norm" in modules and not name.startswith("_"):
                return getattr(modules["norm"], name)
            raise


def norm_act(
    name: str,
    num_features: int,
    act: str | nn.Module | None = "relu",
    drop: float = 0.0,
    **options: object,
) -> NormAct:
    """The registered norm `name` followed by `act`: ``norm_act("bn", 64, act="relu")``.

    Example:
        >>> norm_act("gn", 64, act="silu", num_groups=8)(torch.randn(2, 64, 3, 3)).shape
        torch.Size([2, 64, 3, 3])
    """
    from normlab.registry import create_norm  # the registry imports the layers

    return NormAct(create_norm(name, num_features, **options), act, drop)
