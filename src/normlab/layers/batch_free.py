"""Normalizations that do not (or barely) depend on the batch: FRN with TLU, EvoNorm-B0/S0.

- Filter response norm (Singh & Krishnan 2020): ν² = mean of x² per (n, c) over the
  positions, the engine's ``n c ... -> n c`` without centering;
  y = max(γ·x·rsqrt(ν² + |ε|) + β, τ) (TLU). The same in training and eval.
- EvoNorm-B0 (Liu et al. 2020): y = x / max(√(var_B + ε), v·x + √(var_I + ε))·γ + β,
  var_B over (n, positions) per channel (running estimate in eval), var_I per (n, c).
  One pass: the batch moments derive from the instance moments (``Moments.reduce``).
- EvoNorm-S0: y = x·sigmoid(v·x)/√(var_G + ε)·γ + β with var_G the group-norm variance
  (``n (g k) ... -> n g``): the engine's normalize of x·sigmoid(v·x) with mean 0 and
  the variance of x.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.kernels.transforms import fx_leaf
from normlab.layers.checks import (
    channel_view,
    check_channel_axis,
    check_eps_momentum,
    check_groups,
    check_input,
    check_positive_int,
    check_training_batch,
    describe,
)
from normlab.layers.running import add_missing_counter, empty_batch
from normlab.moments import batch_stats, from_stats
from normlab.normalize import normalize_plan, normalize_with
from normlab.pattern import plan


def _affine(module: nn.Module, num_features: int, factory: dict, *extra: str) -> None:
    for name in ("weight", "bias", *extra):
        setattr(module, name, nn.Parameter(torch.empty(num_features, **factory)))
    _reset_affine(module)


def _reset_affine(module: nn.Module) -> None:
    """γ = 1, β = 0, v (EvoNorm) = 1, τ (TLU) = 0."""
    nn.init.ones_(module.weight)
    nn.init.zeros_(module.bias)
    if getattr(module, "v", None) is not None:
        nn.init.ones_(module.v)
    if getattr(module, "tau", None) is not None:
        nn.init.zeros_(module.tau)


def _instance_pattern(channel_axis: int) -> str:
    return "n c ... -> n c" if channel_axis == 1 else "n ... c -> n c"


class FilterResponseNorm(nn.Module):
    """FRN with a thresholded linear unit, any rank ≥ 2 (N, C, ...).

    ``learnable_eps=True`` makes ε a parameter (used as |ε|), which the paper recommends
    for 1×1 feature maps; ``tlu=False`` leaves out max(·, τ).

    Example:
        >>> FilterResponseNorm(16)(torch.randn(2, 16, 5, 5)).shape
        torch.Size([2, 16, 5, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        learnable_eps: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        tlu: bool = True,
        channel_axis: int = 1,
    ) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "FilterResponseNorm")
        check_eps_momentum(eps, None, "FilterResponseNorm")
        self.channel_axis = check_channel_axis(channel_axis)
        self.learnable_eps, self.tlu = bool(learnable_eps), bool(tlu)
        factory = {"device": device, "dtype": dtype}
        _affine(self, num_features, factory, *(("tau",) if self.tlu else ()))
        self._initial_eps = float(eps)
        if self.learnable_eps:
            self.eps = nn.Parameter(torch.tensor(float(eps), **factory))
        else:
            self.eps = float(eps)

    def reset_parameters(self) -> None:
        """γ = 1, β = 0, τ = 0 and a learnable ε back to its initial value."""
        _reset_affine(self)
        if self.learnable_eps:
            with torch.no_grad():
                self.eps.fill_(self._initial_eps)

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.channel_axis % max(x.dim(), 1)
        check_input(self, x, None, self.num_features, axis)
        p = plan(_instance_pattern(self.channel_axis), x.shape)
        weight = channel_view(self.weight, x.dim(), axis)
        bias = channel_view(self.bias, x.dim(), axis)
        if self.learnable_eps:
            _, square = batch_stats(x, p, center=False)
            nu2 = p.to_kept(square) + self.eps.abs()
            y = normalize_with(x, p, torch.zeros_like(nu2), nu2, weight, bias, 0.0)
        else:
            y = normalize_plan(x, p, weight, bias, abs(self.eps), center=False)
        if not self.tlu:
            return y
        return torch.maximum(y, channel_view(self.tau, x.dim(), axis).to(y.dtype))

    def extra_repr(self) -> str:
        eps = float(self.eps.detach()) if self.learnable_eps else self.eps
        text = f"{self.num_features}, eps={eps:g}, learnable_eps={self.learnable_eps}"
        text += "" if self.tlu else ", tlu=False"
        return text + (f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else "")


class EvoNormB0(nn.Module):
    """EvoNorm-B0, any rank ≥ 3; keeps a running batch variance (torch's convention).

    Keys: ``weight``, ``bias``, ``v``, ``running_var``, ``num_batches_tracked``.

    Example:
        >>> EvoNormB0(16)(torch.randn(4, 16, 5, 5)).shape
        torch.Size([4, 16, 5, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channel_axis: int = 1,
    ) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "EvoNormB0")
        check_eps_momentum(eps, momentum, "EvoNormB0", positive=True)
        self.eps, self.momentum = float(eps), momentum
        self.channel_axis = check_channel_axis(channel_axis)
        factory = {"device": device, "dtype": dtype}
        _affine(self, num_features, factory, "v")
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        """Running variance 1, no batch counted."""
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """γ = 1, β = 0, v = 1, fresh running statistics."""
        _reset_affine(self)
        self.reset_running_stats()

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.channel_axis % max(x.dim(), 1)
        check_input(self, x, None, self.num_features, axis)
        if x.dim() < 3:
            raise ValueError(
                f"{describe(self)}: expected input of at least 3 dims (N, C, positions...), "
                f"got shape {tuple(x.shape)}"
            )
        p = plan(_instance_pattern(self.channel_axis), x.shape)
        if x.numel() == 0:
            weight, bias = (channel_view(t, x.dim(), axis) for t in (self.weight, self.bias))
            return empty_batch(self, x, weight, bias)
        check_training_batch(self, x, p.set_size * x.shape[0], "value per channel")
        inst = from_stats(*batch_stats(x, p), p)
        if self.training:
            batch = inst.reduce("n")
            self._update_running(batch.unbiased_var().detach())
            var_b = batch.var
        else:
            var_b = self.running_var
        std_b = channel_view(torch.sqrt(var_b + self.eps), x.dim(), axis)
        std_i = torch.sqrt(p.to_stats(inst.var) + self.eps)  # broadcasts: no groups here
        v = channel_view(self.v, x.dim(), axis)
        xs = x.to(std_i.dtype)  # float32 at least, as the statistics
        y = xs / torch.maximum(std_b, v * xs + std_i)
        y = y * channel_view(self.weight, x.dim(), axis) + channel_view(self.bias, x.dim(), axis)
        return y.to(x.dtype)

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
        add_missing_counter(self, state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @torch.no_grad()
    def _update_running(self, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = (
            1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)
        )
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
        return text + (f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else "")


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (batch-free), any rank ≥ 2; groups as group norm (32 by default).

    Example:
        >>> EvoNormS0(64)(torch.randn(2, 64, 5, 5)).shape
        torch.Size([2, 64, 5, 5])
        >>> EvoNormS0(24, group_size=8).num_groups
        3
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        group_size: int | None = None,
        channel_axis: int = 1,
    ) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "EvoNormS0")
        check_eps_momentum(eps, None, "EvoNormS0")
        self.num_groups = check_groups(
            num_features, num_groups, group_size, "EvoNormS0", exactly_one=False
        )
        self.eps = float(eps)
        self.channel_axis = check_channel_axis(channel_axis)
        _affine(self, num_features, {"device": device, "dtype": dtype}, "v")

    def reset_parameters(self) -> None:
        """γ = 1, β = 0, v = 1."""
        _reset_affine(self)

    def pattern(self) -> str:
        """The variance's pattern; size ``g`` is `num_groups`."""
        return "n (g k) ... -> n g" if self.channel_axis == 1 else "n ... (g k) -> n g"

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.channel_axis % max(x.dim(), 1)
        check_input(self, x, None, self.num_features, axis)
        p = plan(self.pattern(), x.shape, g=self.num_groups)
        _, var = batch_stats(x, p)
        var = p.to_kept(var)
        gated = x * torch.sigmoid(channel_view(self.v, x.dim(), axis) * x)
        weight = channel_view(self.weight, x.dim(), axis)
        bias = channel_view(self.bias, x.dim(), axis)
        y = normalize_with(gated, p, torch.zeros_like(var), var, weight, bias, self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}"
        return text + (f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else "")
