"""Weight normalization (Salimans & Kingma 2016): w = g·v/‖v‖, as a torch parametrization.

The norm is taken over every dim of v except `dim` (one g per output unit by default;
``dim=None``: one g for the whole tensor). The default ``dim="output"`` picks the
output-unit dim of the weight: 0 for Linear and ConvNd, 1 for ConvTransposeNd (whose
weight is (in, out, k...); torch's default dim=0 normalizes per *input* channel there).

Parameters live where torch's own ``parametrizations.weight_norm`` keeps them
(``parametrizations.weight.original0`` = g, ``original1`` = v), so state_dicts move
between the two; torch's older ``weight_g``/``weight_v`` keys and a plain ``weight``
also load. Unlike torch's, a weight-normed module survives ``pickle``/``torch.save``
of the whole module, and ``data=`` gives the paper's data-dependent initialization.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from normlab.moments import moments


def _norm_except(v: torch.Tensor, dim: int | None) -> torch.Tensor:
    if dim is None:
        return torch.linalg.vector_norm(v)
    others = [d for d in range(v.dim()) if d != dim]
    if not others:
        return v.abs()
    return torch.linalg.vector_norm(v, dim=others, keepdim=True)


class WeightNorm(nn.Module):
    """The parametrization: ``forward(g, v) = g·v/‖v‖``; ``right_inverse(w) = (‖w‖, w)``."""

    def __init__(self, dim: int | None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return g * (v / _norm_except(v, self.dim))

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _norm_except(weight, self.dim), weight

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def output_dim(module: nn.Module) -> int:
    """The weight dim that indexes output units: 1 for transposed convs, else 0."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise ValueError(
                f"weight_norm: a grouped {type(module).__name__} (groups={module.groups}) has no "
                f"single output-unit dim in its weight; expected an explicit dim="
            )
        return 1
    return 0


def _resolve_dim(module: nn.Module, weight: torch.Tensor, dim: object) -> int | None:
    if isinstance(dim, str) and dim == "output":
        return output_dim(module)
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int) or not -weight.dim() <= dim < weight.dim():
        raise ValueError(
            f"weight_norm: expected dim an int in [{-weight.dim()}, {weight.dim()}), None or "
            f"'output' for a weight of shape {tuple(weight.shape)}, got {dim!r}"
        )
    return dim % weight.dim()


class _LegacyKeys:
    """Load-time renaming: torch's old ``name_g``/``name_v`` keys, or a plain ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self,
        module: nn.Module,
        state_dict: dict,
        prefix: str,
        *args: object,
    ) -> None:
        plist = module.parametrizations[self.name]
        g_key = f"{prefix}parametrizations.{self.name}.original0"
        v_key = f"{prefix}parametrizations.{self.name}.original1"
        old_g, old_v, plain = (prefix + self.name + s for s in ("_g", "_v", ""))
        if old_g in state_dict and old_v in state_dict:
            state_dict[g_key] = state_dict.pop(old_g).reshape(plist.original0.shape)
            state_dict[v_key] = state_dict.pop(old_v)
        elif plain in state_dict and g_key not in state_dict and v_key not in state_dict:
            g, v = plist[0].right_inverse(state_dict.pop(plain))
            state_dict[g_key], state_dict[v_key] = g, v


def _weight_norms(module: nn.Module) -> dict[str, WeightNorm]:
    if not parametrize.is_parametrized(module):
        return {}
    return {
        name: plist[0]
        for name, plist in module.parametrizations.items()
        if len(plist) == 1 and isinstance(plist[0], WeightNorm)
    }


def _drop_legacy_hooks(module: nn.Module, name: str | None = None) -> None:
    hooks = module._load_state_dict_pre_hooks
    for key, hook in list(hooks.items()):
        inner = getattr(hook, "hook", hook)
        if isinstance(inner, _LegacyKeys) and name in (None, inner.name):
            del hooks[key]


def _rebuild(cls: type, state: dict, specs: list) -> nn.Module:
    module = cls.__new__(cls)
    module.__dict__.update(state)
    for name, dim, g, v in specs:
        weight_norm(module, name, dim)
        plist = module.parametrizations[name]
        with torch.no_grad():
            plist.original0.copy_(g)
            plist.original1.copy_(v)
    return module


def _reduce_ex(self: nn.Module, protocol: int) -> tuple:
    # torch refuses to pickle parametrized modules; for weight norm alone the state is
    # simple: the module's plain class and attributes, plus (name, dim, g, v) per tensor.
    norms = _weight_norms(self)
    if set(norms) != set(self.parametrizations):
        raise RuntimeError(
            "weight_norm: cannot pickle a module that has parametrizations other than "
            "weight norm; save its state_dict() instead"
        )
    state = dict(self.__dict__)
    # Same container types as the module's own (hook dicts must stay weak-referenceable).
    state["_modules"] = type(self._modules)(
        (k, m) for k, m in self._modules.items() if k != "parametrizations"
    )
    state["_parameters"] = type(self._parameters)(self._parameters)
    hooks = self._load_state_dict_pre_hooks
    state["_load_state_dict_pre_hooks"] = type(hooks)(
        (k, h) for k, h in hooks.items() if not isinstance(getattr(h, "hook", h), _LegacyKeys)
    )
    specs = []
    for name, wn in norms.items():
        g, v = self.parametrizations[name].original0, self.parametrizations[name].original1
        state["_parameters"][name] = nn.Parameter(v.detach(), requires_grad=v.requires_grad)
        specs.append((name, wn.dim, g.detach(), v.detach()))
    # torch's parametrized class derives from the module's own class alone.
    return _rebuild, (type(self).__bases__[0], state, specs)


def weight_norm(
    module: nn.Module,
    name: str = "weight",
    dim: int | None | str = "output",
    data: torch.Tensor | None = None,
) -> nn.Module:
    """Reparametrize ``module.<name>`` as g·v/‖v‖; with `data`, the paper's init.

    Without `data` the function is unchanged (g = ‖w‖, v = w). With a batch `data`,
    g is set so that on that batch each output unit's pre-activation has mean 0 and
    standard deviation 1: t = module(data) with g = 1 and no bias, then g ← 1/σ[t],
    b ← −μ[t]/σ[t] (a module without bias is only scaled).

    Example:
        >>> layer = weight_norm(nn.Linear(20, 8), data=torch.randn(64, 20))
        >>> y = layer(torch.randn(64, 20))
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"weight_norm: expected an nn.Module, got {type(module).__name__}")
    if name in _weight_norms(module):
        raise ValueError(f"weight_norm: {type(module).__name__}.{name} is already weight-normed")
    if not isinstance(name, str) or not isinstance(getattr(module, name, None), nn.Parameter):
        raise ValueError(
            f"weight_norm: expected the name of a parameter of {type(module).__name__}, got {name!r}"
        )
    weight = getattr(module, name)
    resolved = _resolve_dim(module, weight, dim)
    if data is not None:
        _check_data_init(module, name, resolved, data)
    parametrize.register_parametrization(module, name, WeightNorm(resolved), unsafe=True)
    module.register_load_state_dict_pre_hook(_LegacyKeys(name))
    type(module).__reduce_ex__ = _reduce_ex  # the class is this module's own (see parametrize)
    if data is not None:
        init_from_data(module, data, name)
    return module


def _check_data_init(module: nn.Module, name: str, dim: int | None, data: object) -> None:
    supported = (nn.Linear, nn.modules.conv._ConvNd)
    if not isinstance(module, supported) or name != "weight":
        raise ValueError(
            f"weight_norm: data-dependent init expects the weight of a Linear, ConvNd or "
            f"ConvTransposeNd, got {type(module).__name__}.{name}"
        )
    if dim != output_dim(module):
        raise ValueError(
            f"weight_norm: data-dependent init needs one g per output unit "
            f"(dim={output_dim(module)} for {type(module).__name__}), got dim={dim}"
        )
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        raise TypeError(
            f"weight_norm: expected data a floating-point tensor batch, got {type(data).__name__}"
        )


@torch.no_grad()
def init_from_data(module: nn.Module, data: torch.Tensor, name: str = "weight") -> nn.Module:
    """The paper's data-dependent init of a weight-normed Linear/Conv on one batch."""
    norms = _weight_norms(module)
    if name not in norms:
        raise ValueError(
            f"init_from_data: expected a weight-normed module, got {type(module).__name__}"
        )
    _check_data_init(module, name, norms[name].dim, data)
    g = module.parametrizations[name].original0
    g.fill_(1.0)
    bias = module.bias
    if bias is not None:
        bias.zero_()
    t = module(data)
    pattern = "... c -> c" if isinstance(module, nn.Linear) else "n c ... -> c"
    stats = moments(t, pattern)
    scale = torch.rsqrt(stats.var + 1e-12)
    g.copy_(scale.reshape(g.shape).to(g.dtype))
    if bias is not None:
        bias.copy_((-stats.mean * scale).to(bias.dtype))
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Undo :func:`weight_norm`: ``module.<name>`` becomes a plain parameter holding g·v/‖v‖.

    Example:
        >>> remove_weight_norm(weight_norm(nn.Linear(3, 2))).weight.shape
        torch.Size([2, 3])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"remove_weight_norm: expected an nn.Module, got {type(module).__name__}")
    if name not in _weight_norms(module):
        raise ValueError(
            f"remove_weight_norm: {type(module).__name__}.{name!s} is not weight-normed"
        )
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    _drop_legacy_hooks(module, name)
    return module
