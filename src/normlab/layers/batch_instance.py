"""Batch-Instance normalization (Nam & Kim 2018): a learned per-channel mix of BN and IN.

    y = (ρ·x̂_BN + (1 − ρ)·x̂_IN)·γ + β,   ρ ∈ [0, 1] per channel (``gate``, init 1)

x̂_BN uses the batch's statistics in training and the running estimates in eval
(``n c ... -> c``); x̂_IN always uses the instance's own (``n c ... -> n c``). The
mixture is linear in x, so one statistics pass (instance moments, batch moments
derived from them) and one normalizing pass compute it.
With ``sync=True`` the batch statistics in training are those of every process of
``process_group`` (None: the default group); x̂_IN stays per sample. ρ is
clamped inside forward, so a gate that an optimizer step pushed outside [0, 1] behaves
as the clamped value (its gradient is then zero; :func:`clamp_gates_` projects the
parameters back, as the official release does after every step). The release trains
ρ with 10× the learning rate and no weight decay: see :func:`param_groups`.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.distributed import group_moments, synchronizing
from normlab.kernels.aten import _mixed_ok
from normlab.kernels.dispatch import serves_derived
from normlab.kernels.transforms import fx_leaf, transform
from normlab.layers import routes
from normlab.layers.checks import channel_view, check_input, check_training_batch, describe
from normlab.layers.running import empty_batch
from normlab.layers.tracked import TrackedNorm
from normlab.moments import Moments, from_stats, stats_dtype
from normlab.normalize import normalize_derived
from normlab.pattern import plan


class BatchInstanceNorm(routes.Routed, TrackedNorm):
    """Batch-Instance norm of any rank ≥ 3; state_dict keys as the official release.

    Keys: ``weight``, ``bias``, ``gate``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``. ``gate`` = 1 is batch norm, 0 is instance norm.

    Example:
        >>> m = BatchInstanceNorm(16)
        >>> m(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    _one_value = "value per channel"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channel_axis: int = 1,
        sync: bool = False,
        process_group: object = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            channel_axis=channel_axis,
            sync=sync,
            process_group=process_group,
        )
        self.gate = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ = 1, β = 0, gate ρ = 1 (batch norm), fresh running statistics."""
        super().reset_parameters()
        nn.init.ones_(self.gate)

    def patterns(self) -> tuple[str, str]:
        """The (batch, instance) statistics patterns."""
        if self.channel_axis == 1:
            return "n c ... -> c", "n c ... -> n c"
        return "n ... c -> c", "n ... c -> n c"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routes.forward(self, x, BatchInstanceNorm._full_forward, self._route)

    def _route(self, x: torch.Tensor) -> routes.Route | None:
        # not with sync=True: whether it synchronizes depends on torch.distributed's state
        return BatchInstanceNorm._composed if not self.sync and self._composes(x) else None

    def _composes(self, x: torch.Tensor) -> bool:
        """Whether this call takes ATen's batch and instance norm mixed by the gate (the
        release's formulation) instead of the one-pass path: in eager, below the kernels'
        size floor, where the one-pass reference path's many small ops cost more; on
        contiguous channels-first float32/64 data (ATen's half-precision kernels lose
        digits far from zero), buffers ATen can update, not synchronizing."""
        if x.dtype not in (torch.float32, torch.float64) or synchronizing(self):
            return False
        if self.channel_axis != 1 or not x.is_contiguous() or x.numel() == 0:
            return False
        if transform(x) != "eager" or serves_derived(x, plan(self.patterns()[1], x.shape)):
            return False
        return not self.track_running_stats or _mixed_ok(x, self.running_mean, self.running_var)

    def _composed(self, x: torch.Tensor) -> torch.Tensor:
        if self._uses_batch_stats():
            running = self.running_mean, self.running_var
            factor = 0.0
            if self.training and self.track_running_stats:
                self.num_batches_tracked.add_(1)
                factor = self._factor()
            else:
                running = None, None
            batch = torch.batch_norm(x, None, None, *running, True, factor, self.eps, False)
        else:
            batch = torch.batch_norm(
                x, None, None, self.running_mean, self.running_var, False, 0.0, self.eps, False
            )
        inst = torch.instance_norm(x, None, None, None, None, True, 0.0, self.eps, False)
        compute = stats_dtype(x.dtype)  # the mixture in float32 at least
        rho = channel_view(self.gate.to(compute).clamp(0, 1), x.dim(), 1)
        y = torch.lerp(inst.to(compute), batch.to(compute), rho)  # ρ·x̂_BN + (1 − ρ)·x̂_IN
        if self.weight is not None:
            y = torch.addcmul(
                channel_view(self.bias, x.dim(), 1), y, channel_view(self.weight, x.dim(), 1)
            )
        return y.to(x.dtype)

    @fx_leaf
    def _full_forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.channel_axis % max(x.dim(), 1)
        check_input(self, x, None, self.num_features, axis)
        if x.dim() < 3:
            raise ValueError(
                f"{describe(self)}: expected input of at least 3 dims (N, C, positions...), "
                f"got shape {tuple(x.shape)}"
            )
        ip = plan(self.patterns()[1], x.shape)
        if x.numel() == 0 and not synchronizing(self):  # no statistics: count the batch
            weight, bias = (channel_view(t, x.dim(), axis) for t in (self.weight, self.bias))
            return empty_batch(self, x, weight, bias)
        check_training_batch(self, x, ip.set_size, "spatial element")
        if self._composes(x):
            check_training_batch(self, x, x.numel() // x.shape[1], "value per channel")
            return self._composed(x)
        use_batch, synced = self._uses_batch_stats(), synchronizing(self)
        tracked: list[Moments] = []  # the batch moments normalized with, for the buffers

        def derive(mean, var, gate):  # noqa: ANN001, ANN202
            # ρ·x̂_BN + (1 − ρ)·x̂_IN is linear in x: (x − m)·r with the r and m below
            inst = from_stats(mean, var, ip)
            if use_batch:
                batch = inst.reduce("n")
                batch = group_moments(self, batch, x) if synced else batch
                tracked.append(batch)
                bn_mean, bn_var = batch.mean, batch.var
            else:
                bn_mean, bn_var = self.running_mean, self.running_var
            r_in, r_bn = torch.rsqrt(inst.var + self.eps), torch.rsqrt(bn_var + self.eps)
            rho = gate.to(stats_dtype(gate.dtype)).clamp(0, 1)  # the mixture in float32 at least
            r = rho * r_bn + (1 - rho) * r_in
            shift = rho * r_bn * bn_mean + (1 - rho) * r_in * inst.mean
            # r = 0 (infinite variances) makes the shift 0 too: mean 0, not 0/0
            m = shift / torch.where(r > 0, r, torch.ones_like(r))
            return ip.to_stats(m), ip.to_stats(r)

        weight = channel_view(self.weight, x.dim(), axis)
        bias = channel_view(self.bias, x.dim(), axis)
        # one statistics pass, the mixture on O(N·C) numbers, one normalizing pass
        y, _ = normalize_derived(x, ip, derive, weight, bias, (self.gate,), fast=not synced)
        if tracked and self.training and self.track_running_stats:
            self._update_running(tracked[0].mean.detach(), tracked[0].unbiased_var().detach())
        return y


@torch.no_grad()
def clamp_gates_(model: nn.Module) -> nn.Module:
    """Project every BatchInstanceNorm gate onto [0, 1] in place (call after a step if wanted).

    Example:
        >>> clamp_gates_(nn.Sequential(BatchInstanceNorm(4)))[0].gate.max() <= 1
        tensor(True)
    """
    for m in model.modules():
        if isinstance(m, BatchInstanceNorm):
            m.gate.clamp_(0, 1)
    return model


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    gate_lr_scale: float = 10.0,
) -> list[dict]:
    """Optimizer groups as the release trains BIN: gates at ``gate_lr_scale``·lr, no decay.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchInstanceNorm(8))
        >>> opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=1e-4), lr=0.1)
        >>> [g["lr"] for g in opt.param_groups]
        [0.1, 1.0]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups: expected an nn.Module, got {type(model).__name__}")
    for name, value in (
        ("lr", lr),
        ("weight_decay", weight_decay),
        ("gate_lr_scale", gate_lr_scale),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"param_groups: expected {name} a float >= 0, got {value!r}")
    gates = {id(m.gate) for m in model.modules() if isinstance(m, BatchInstanceNorm)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {
            "params": [p for p in params if id(p) not in gates],
            "lr": lr,
            "weight_decay": weight_decay,
        },
        {
            "params": [p for p in params if id(p) in gates],
            "lr": lr * gate_lr_scale,
            "weight_decay": 0.0,
        },
    ]
