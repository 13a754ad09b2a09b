"""Batch renormalization (Ioffe 2017): batch norm corrected toward the running estimates.

    r = clip(σ_B/σ, 1/rmax, rmax),  d = clip((μ_B − μ)/σ, −dmax, dmax)   (both detached)
    x̂ = (x − μ_B)/σ_B·r + d,        σ_B = √(var_B + ε),  σ = √(running_var + ε)

Since r and d carry no gradient, x̂·γ + β is batch norm with weight γ·r and bias
β + γ·d: the layer is the engine's ``normalize_with`` on the batch's moments with a
corrected affine. With rmax = 1 and dmax = 0 it *is* batch norm (outputs, gradients,
running statistics). Inference is batch norm's.

The buffers are batch norm's (``running_mean``, ``running_var`` with the unbiased
variance, ``num_batches_tracked``), so BN checkpoints load both ways and tools that
fold or convert batch norm apply; σ is √(running_var + ε). The paper averages σ
itself; averaging σ² instead differs by a second-order term and keeps the exact
equivalence to batch norm.

With ``sync=True`` the batch moments μ_B, σ_B in training are those of every process
of ``process_group`` (None: the default group), so r, d and the running update are
the same on every process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from normlab.distributed import check_sync, group_moments, local_moments, synchronizing
from normlab.kernels.transforms import fx_leaf, traced
from normlab.layers.batchnorm import BatchNorm
from normlab.layers.checks import (
    channel_view,
    check_eps_momentum,
    check_input,
    check_training_batch,
    describe,
)
from normlab.layers.running import empty_batch
from normlab.moments import batch_stats, from_stats
from normlab.normalize import normalize_with
from normlab.pattern import plan

Limit = float | Callable[[int], float] | str


class Ramp:
    """A schedule: `start` until step `begin`, then linear to `end` at step `finish`.

    Example:
        >>> Ramp(1.0, 3.0, 5_000, 40_000)(22_500)
        2.0
    """

    def __init__(self, start: float, end: float, begin: int, finish: int) -> None:
        if not 0 <= begin < finish:
            raise ValueError(
                f"Ramp: expected 0 <= begin < finish, got begin={begin}, finish={finish}"
            )
        self.start, self.end, self.begin, self.finish = float(start), float(end), begin, finish

    def __call__(self, step: int) -> float:
        t = min(max((step - self.begin) / (self.finish - self.begin), 0.0), 1.0)
        return self.start + (self.end - self.start) * t

    def at(self, step: torch.Tensor) -> torch.Tensor:
        """The schedule at a step held in a tensor (no Python int, so a graph can hold it)."""
        t = ((step - self.begin) / (self.finish - self.begin)).clamp(0.0, 1.0)
        return self.start + (self.end - self.start) * t

    def __repr__(self) -> str:
        return f"Ramp({self.start:g}, {self.end:g}, {self.begin}, {self.finish})"


# The paper's schedule: plain batch norm for 5k steps, then relaxed to rmax = 3 by 40k
# steps and dmax = 5 by 25k steps.
PAPER_RMAX = Ramp(1.0, 3.0, 5_000, 40_000)
PAPER_DMAX = Ramp(0.0, 5.0, 5_000, 25_000)


def _limit(value: Limit, name: str, floor: float) -> float | Callable[[int], float]:
    if isinstance(value, str) and value == "paper":
        return PAPER_RMAX if name == "rmax" else PAPER_DMAX
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < floor:
        raise ValueError(
            f"BatchRenorm: expected {name} a float >= {floor:g}, a callable of the step or "
            f"'paper', got {value!r}"
        )
    return float(value)


class BatchRenorm(BatchNorm):
    """Batch renormalization of any rank; a batch norm in eval and in its state_dict.

    `rmax` and `dmax` are floats, callables of the step (``num_batches_tracked``
    before this batch) or ``"paper"`` (the paper's ramps, the default).

    Example:
        >>> m = BatchRenorm(16, rmax=3.0, dmax=5.0)
        >>> m(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rmax: Limit = "paper",
        dmax: Limit = "paper",
        bias: bool = True,
        channel_axis: int = 1,
        sync: bool = False,
        process_group: object = None,
    ) -> None:
        check_eps_momentum(eps, momentum, "BatchRenorm", positive=True)
        sync = check_sync(sync, process_group, "BatchRenorm")
        limits = _limit(rmax, "rmax", 1.0), _limit(dmax, "dmax", 0.0)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            True,
            device,
            dtype,
            bias=bias,
            channel_axis=channel_axis,
        )
        self.rmax, self.dmax = limits
        self.sync, self.process_group = sync, process_group

    def limits(self) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """(rmax, dmax) for the next training batch.

        Under a transform (torch.compile, export) a :class:`Ramp` is evaluated on the
        step tensor, so the graph does not read the step as a Python int.
        """
        if traced() and not any(
            callable(v) and not isinstance(v, Ramp) for v in (self.rmax, self.dmax)
        ):
            step = self.num_batches_tracked
            return tuple(v.at(step) if isinstance(v, Ramp) else v for v in (self.rmax, self.dmax))
        step = int(self.num_batches_tracked)
        rmax, dmax = (float(v(step) if callable(v) else v) for v in (self.rmax, self.dmax))
        if rmax < 1 or dmax < 0:
            raise ValueError(
                f"{describe(self)}: expected rmax >= 1 and dmax >= 0 at step {step}, "
                f"got rmax={rmax}, dmax={dmax}"
            )
        return rmax, dmax

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        axis = self.channel_axis % max(x.dim(), 1)
        check_input(self, x, None, self.num_features, axis)
        p = plan(self.pattern(), x.shape)
        if synchronizing(self):
            batch = group_moments(self, local_moments(x, p), x)
        elif x.numel() == 0:
            weight, bias = (channel_view(t, x.dim(), axis) for t in (self.weight, self.bias))
            return empty_batch(self, x, weight, bias)
        else:
            check_training_batch(self, x, p.set_size, "value per channel")
            batch = from_stats(*batch_stats(x, p), p)
        rmax, dmax = self.limits()
        with torch.no_grad():
            sigma = torch.sqrt(self.running_var.to(batch.var.dtype) + self.eps)
            r = (torch.sqrt(batch.var + self.eps) / sigma).clamp(1 / rmax, rmax)
            d = ((batch.mean - self.running_mean) / sigma).clamp(-dmax, dmax)
        weight, bias = r, d
        if self.weight is not None:
            weight, bias = self.weight * r, self.weight * d
            if self.bias is not None:
                bias = self.bias + bias
        y = normalize_with(
            x,
            p,
            batch.mean,
            batch.var,
            channel_view(weight, x.dim(), axis),
            channel_view(bias, x.dim(), axis),
            self.eps,
        )
        self._update_running(batch.mean.detach(), batch.unbiased_var().detach())
        return y

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", rmax={self.rmax!r}, dmax={self.dmax!r}"
        return text + (", sync=True" if self.sync else "")
