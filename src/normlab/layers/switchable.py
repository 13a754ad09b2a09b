"""Switchable normalization (Luo et al. 2019): learned mixtures of IN, LN and BN moments.

    ĥ = γ·(h − Σ_k w_k μ_k)/√(Σ_k w'_k σ²_k + ε) + β,   k ∈ [in, ln, bn]
    w = softmax(mean_weight), w' = softmax(var_weight)

The instance-norm moments are computed once (pattern ``n c ... -> n c``); the
layer-norm and batch-norm moments follow from them with Chan's formula
(``Moments.reduce("c")`` and ``Moments.reduce("n")``), so one pass over the data
serves all three, and a second one normalizes
(:func:`~normlab.normalize.normalize_derived`). ``variance="release"`` (default) uses
the *unbiased* instance variance everywhere, as the official release does (so its
weights behave the same);
``variance="paper"`` uses the biased one, which makes each term the exact IN, LN
and BN statistic.

With ``sync=True`` (and ``using_bn``) the BN moments in training are those of every
process of ``process_group`` (None: the default group): the per-process BN moments,
reduced from the instance moments, combine exactly with the same formula. The IN and
LN moments are per sample and stay local.

Running statistics follow torch's convention (``momentum`` is the weight of the new
batch, 0.1; ``None`` is a cumulative average). The release weighs the *old* value
(0.9), starts its buffers at zero and has no ``num_batches_tracked``:
:func:`convert_release_state_dict` and :func:`load_release_state_dict` read its
checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from normlab.distributed import group_moments, synchronizing
from normlab.kernels.transforms import fx_leaf
from normlab.layers.checks import (
    channel_view,
    check_choice,
    check_input,
    check_training_batch,
    describe,
)
from normlab.layers.running import empty_batch
from normlab.layers.tracked import TrackedNorm
from normlab.moments import Moments, batch_stats, from_stats, stats_dtype
from normlab.normalize import normalize_derived
from normlab.pattern import plan

VARIANCES = ("release", "paper")


class SwitchableNorm(TrackedNorm):
    """Switchable norm over IN, LN and (``using_bn=True``) BN statistics, any rank ≥ 3.

    Keys: ``weight``, ``bias``, ``mean_weight``, ``var_weight`` and, with ``using_bn``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``. ``last_gamma=True``
    starts γ at zero (for the last norm of a residual branch).

    Example:
        >>> m = SwitchableNorm(16)
        >>> m(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
        >>> torch.softmax(m.mean_weight, 0)  # [in, ln, bn]
        tensor([0.3333, 0.3333, 0.3333], grad_fn=<SoftmaxBackward0>)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        using_bn: bool = True,
        last_gamma: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        variance: str = "release",
        channel_axis: int = 1,
        sync: bool = False,
        process_group: object = None,
    ) -> None:
        check_choice(variance, VARIANCES, "SwitchableNorm", "variance")
        if sync is True and not using_bn:
            raise ValueError(
                "SwitchableNorm: sync=True synchronizes the BN term; expected using_bn=True, "
                "got using_bn=False"
            )
        super().__init__(
            num_features,
            eps,
            momentum,
            True,
            bool(using_bn),
            device,
            dtype,
            channel_axis=channel_axis,
            sync=sync,
            process_group=process_group,
        )
        self.using_bn, self.last_gamma, self.variance = bool(using_bn), bool(last_gamma), variance
        terms = 3 if self.using_bn else 2
        self.mean_weight = nn.Parameter(torch.empty(terms, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.empty(terms, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ = 1 (0 with ``last_gamma``), β = 0, equal mixture weights, fresh buffers."""
        super().reset_parameters()
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)
        if self.last_gamma:
            nn.init.zeros_(self.weight)

    def pattern(self) -> str:
        """The pattern of the one statistics pass (instance norm's)."""
        return "n c ... -> n c" if self.channel_axis == 1 else "n ... c -> n c"

    def moments(self, x: torch.Tensor) -> tuple[Moments, Moments, Moments]:
        """Batch moments ``(in, ln, bn)`` over axes (n, c), (n,) and (c,), as used in training.

        Differentiable; the variances are the release's (from the unbiased instance
        variance) or the paper's (biased, exact) according to ``variance``.
        """
        p = plan(self.pattern(), x.shape)
        return self._terms(from_stats(*batch_stats(x, p), p))

    def _terms(self, inst: Moments) -> tuple[Moments, Moments, Moments]:
        if self.variance == "release":
            inst = Moments(inst.mean, inst.unbiased_var(), inst.count, inst.axes)
        return inst, inst.reduce("c"), inst.reduce("n")

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.channel_axis % max(x.dim(), 1)
        check_input(self, x, None, self.num_features, axis)
        if x.dim() < 3:
            raise ValueError(
                f"{describe(self)}: expected input of at least 3 dims (N, C, positions...), "
                f"got shape {tuple(x.shape)}"
            )
        p = plan(self.pattern(), x.shape)
        if x.numel() == 0 and not synchronizing(self):  # no statistics: count the batch
            weight, bias = (channel_view(t, x.dim(), axis) for t in (self.weight, self.bias))
            return empty_batch(self, x, weight, bias)
        check_training_batch(self, x, p.set_size, "spatial element")
        synced = synchronizing(self)
        tracked: list[Moments] = []  # the batch moments normalized with, for the buffers

        def derive(mean, var, mean_weight, var_weight):  # noqa: ANN001, ANN202
            inst, layer, batch = self._terms(from_stats(mean, var, p))
            means = [inst.mean, layer.mean[:, None]]
            variances = [inst.var, layer.var[:, None]]
            if self.using_bn:
                if self.training:
                    batch = group_moments(self, batch, x) if synced else batch
                    tracked.append(batch)
                    bn_mean, bn_var = batch.mean, batch.var
                else:
                    bn_mean, bn_var = self.running_mean, self.running_var
                means.append(bn_mean[None, :])
                variances.append(bn_var[None, :])
            # the mixture in float32 at least: half-precision weights do not sum to 1
            w_mean = torch.softmax(mean_weight, 0, dtype=stats_dtype(mean_weight.dtype))
            w_var = torch.softmax(var_weight, 0, dtype=stats_dtype(var_weight.dtype))
            mix_mean = sum(w * m for w, m in zip(w_mean, means, strict=True))
            mix_var = sum(w * v for w, v in zip(w_var, variances, strict=True))
            return p.to_stats(mix_mean), p.to_stats(torch.rsqrt(mix_var + self.eps))

        weight = channel_view(self.weight, x.dim(), axis)
        bias = channel_view(self.bias, x.dim(), axis)
        inputs = (self.mean_weight, self.var_weight)
        # one statistics pass, the mixture on O(N·C) numbers, one normalizing pass
        y, _ = normalize_derived(x, p, derive, weight, bias, inputs, fast=not synced)
        if tracked:
            self._track(tracked[0])
        return y

    def _track(self, batch: Moments) -> None:
        # The buffer keeps what eval normalizes with: the paper's biased variance made
        # unbiased (torch's convention, n = N·positions), or the release's value as is
        # (already built from unbiased instance variances).
        var = batch.unbiased_var() if self.variance == "paper" else batch.var
        self._update_running(batch.mean.detach(), var.detach())

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
        if not self.using_bn:
            text += ", using_bn=False"
        if self.last_gamma:
            text += ", last_gamma=True"
        if self.variance != "release":
            text += f", variance={self.variance!r}"
        text += f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else ""
        return text + (", sync=True" if self.sync else "")


def release_momentum(momentum: float) -> float:
    """The release's momentum (weight of the old value, 0.9) in torch's convention (0.1)."""
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not 0 <= momentum <= 1
    ):
        raise ValueError(f"release_momentum: expected a momentum in [0, 1], got {momentum!r}")
    return 1.0 - float(momentum)


def convert_release_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """A checkpoint of the official release's SwitchNorm2d/3d layers in normlab's layout.

    Each layer is found by its ``mean_weight`` key: γ, β (1, C, 1, 1) and the running
    buffers (1, C, 1) become (C,), and ``num_batches_tracked`` (absent there) is added
    as 0. Other keys pass unchanged. Only checkpoints trained with the release's
    moving average (its default) hold running estimates; its "batch average" mode
    stores sums that its own script divides later.

    Example:
        >>> release = {"mean_weight": torch.ones(3), "var_weight": torch.ones(3),
        ...            "weight": torch.ones(1, 4, 1, 1), "bias": torch.zeros(1, 4, 1, 1),
        ...            "running_mean": torch.zeros(1, 4, 1), "running_var": torch.zeros(1, 4, 1)}
        >>> SwitchableNorm(4).load_state_dict(convert_release_state_dict(release))
        <All keys matched successfully>
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"convert_release_state_dict: expected a mapping of names to tensors, "
            f"got {type(state_dict).__name__}"
        )
    out = dict(state_dict)
    prefixes = [k[: -len("mean_weight")] for k in state_dict if k.endswith("mean_weight")]
    if not prefixes:
        raise ValueError(
            "convert_release_state_dict: expected at least one switchable-norm layer "
            "(a key ending in 'mean_weight'), got none"
        )
    for prefix in prefixes:
        for name in ("weight", "bias", "running_mean", "running_var"):
            key = prefix + name
            if key in out:
                out[key] = out[key].reshape(-1)
        if prefix + "running_mean" in out and prefix + "num_batches_tracked" not in out:
            out[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def load_release_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> object:
    """Load a release checkpoint into a model built with :class:`SwitchableNorm` layers.

    Example:
        >>> load_release_state_dict(SwitchableNorm(4), release)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_release_state_dict: expected an nn.Module, got {type(model).__name__}"
        )
    return model.load_state_dict(convert_release_state_dict(state_dict), strict=strict)
