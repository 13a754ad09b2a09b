"""Normalization with statistics derived from the sets' own moments, on a kernel backend.

    y = (x − m)·r·weight + bias,   (m, r) = derive(mean, var, *inputs)

`mean`, `var` are the moments of the plan's sets (instance moments, for the hybrid
norms) and `derive` any differentiable function of them and of `inputs` (parameters
such as Switchable norm's mixture weights or Batch-Instance norm's gate). A backend
supplies four passes over the data on its canonical layout (:class:`Passes`: Numba on
the CPU, Triton on CUDA); this module does the O(#sets) work between them:

* forward: moments (one read), `derive`, normalize (one read, one write);
* backward: per-set Σ w·gy and Σ w·gy·x̂ (one read of x and gy), autograd through
  `derive` for ∂L/∂mean and ∂L/∂var, then gx (one read of each, one write).

Saved for backward: the input, O(#sets) statistics and the small graph of `derive`.
Double backward (``create_graph=True``) recomputes through the reference path.
"""

from __future__ import annotations

from typing import Protocol

import torch

from normlab.kernels import reference
from normlab.kernels.canonical import Canonical, stats_from_plan, stats_to_plan
from normlab.moments import stats_dtype
from normlab.pattern import Plan


class Passes(Protocol):
    """A backend's passes for one call, on per-set statistics of shape (A, C) (canonical)."""

    canon: Canonical

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance of every set."""

    def normalize(self, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        """y = (x − mean)·rstd·w + b, in x's dtype and layout."""

    def grad_sums(
        self, x: torch.Tensor, gy: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per set Σ w·gy and Σ w·gy·x̂; per affine entry Σ gy·x̂ and Σ gy (flat, float64)."""

    def grad_input(
        self,
        x: torch.Tensor,
        gy: torch.Tensor,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        k1: torch.Tensor,
        k2: torch.Tensor,
    ) -> torch.Tensor:
        """gx = rstd·(gy·w − k1 − x̂·k2) with per-set k1, k2."""


def normalize_derived(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    p: Plan,
    derive: reference.Derive,
    passes: Passes,
    inputs: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, var)`` on the backend's passes; through autograd only when grad is on."""
    if torch.is_grad_enabled():
        return DerivedFunction.apply(x, weight, bias, p, derive, passes, *inputs)
    mean, var = _moments(x, p, passes)
    m, r = derive(mean, var, *inputs)
    return _output(x, p, passes, m, r)[0], mean, var


def _moments(x: torch.Tensor, p: Plan, passes: Passes) -> tuple[torch.Tensor, torch.Tensor]:
    sdtype = stats_dtype(x.dtype)
    mean, var = (stats_to_plan(t.to(sdtype), p, passes.canon) for t in passes.moments(x))
    return mean, var


def _output(x: torch.Tensor, p: Plan, passes: Passes, m: torch.Tensor, r: torch.Tensor):  # noqa: ANN202
    """y, and the statistics it was normalized with per set (canonical order)."""
    sdtype = stats_dtype(x.dtype)
    m_set, r_set = (stats_from_plan(t.detach().to(sdtype), p, passes.canon) for t in (m, r))
    return passes.normalize(x, m_set, r_set), m_set, r_set


class DerivedFunction(torch.autograd.Function):
    """``(y, mean, var)``: the output and the sets' own moments (not differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, p, derive, passes, *inputs):  # noqa: ANN001, ANN205
        mean, var = _moments(x, p, passes)
        grads = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[6:])
        with torch.enable_grad() if grads else torch.no_grad():
            leaves = [mean.clone().requires_grad_(grads), var.clone().requires_grad_(grads)]
            leaves += [
                t.detach().requires_grad_(need)
                for t, need in zip(inputs, ctx.needs_input_grad[6:], strict=True)
            ]
            m, r = derive(*leaves)
        y, m_set, r_set = _output(x, p, passes, m, r)
        ctx.save_for_backward(x, weight, bias, m_set, r_set, *inputs)
        ctx.graph = (m, r, leaves) if grads else None
        ctx.args = (p, derive, passes)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):  # noqa: ANN001, ANN205
        x, weight, bias, m_set, r_set, *inputs = ctx.saved_tensors
        p, derive, passes = ctx.args
        nothing = (None, None, None)
        if torch.is_grad_enabled():  # create_graph: differentiate the reference path instead
            return _through_reference(ctx, p, derive, gy, x, weight, bias, inputs)
        s1, s2, dw, db = passes.grad_sums(x, gy, m_set, r_set)
        gw = dw.to(weight.dtype).reshape(weight.shape) if ctx.needs_input_grad[1] else None
        gb = db.to(bias.dtype).reshape(bias.shape) if ctx.needs_input_grad[2] else None
        if ctx.graph is None:  # only the affine needs a gradient
            return None, gw, gb, *nothing, *(None for _ in inputs)
        got = _through_derive(ctx.graph, s1, s2, r_set, p, passes.canon)
        gx = None
        if ctx.needs_input_grad[0]:
            # gx = r·w·gy + P·x + Q, P and Q from the gradient of the sets' own moments
            c, n = passes.canon, float(p.set_size)
            gmean, gvar = (
                torch.zeros_like(r_set, dtype=torch.float64) if g is None
                else stats_from_plan(g.double(), p, c)
                for g in got[:2]
            )  # fmt: skip
            mu = stats_from_plan(ctx.graph[2][0].detach().double(), p, c)
            r64, m64 = r_set.double(), m_set.double()
            big_p = 2.0 * gvar / n
            big_q = gmean / n - big_p * mu
            k1 = (-(big_q + big_p * m64) / r64).to(r_set.dtype)
            k2 = (-big_p / r64.square()).to(r_set.dtype)
            gx = passes.grad_input(x, gy, m_set, r_set, k1, k2)
        ginputs = [
            None if g is None else g.to(t.dtype)
            for g, t in zip(got[2:], inputs, strict=True)
        ]  # fmt: skip
        return gx, gw, gb, *nothing, *ginputs


def _through_derive(graph, s1, s2, r_set, p, c):  # noqa: ANN001, ANN202
    """Gradients of (set mean, set var, *inputs) from the per-set sums.

    y = (x − m)·r·w + b gives ∂L/∂m = −r·Σ w·gy and ∂L/∂r = Σ w·gy·x̂ / r; autograd
    carries them through `derive` (O(#sets) work). Leaves without a gradient get None.
    """
    m, r, leaves = graph
    r64 = r_set.double()
    outs = [
        (m, stats_to_plan((-r64 * s1.double()).to(m.dtype), p, c)),
        (r, stats_to_plan((s2.double() / r64).to(r.dtype), p, c)),
    ]
    live = [(o, g) for o, g in outs if o.requires_grad]
    wanted = [i for i, t in enumerate(leaves) if t.requires_grad]
    got = [None] * len(leaves)
    if live and wanted:
        found = torch.autograd.grad(
            [o for o, _ in live], [leaves[i] for i in wanted], [g for _, g in live],
            retain_graph=True, allow_unused=True,  # the outer graph may be retained too
        )  # fmt: skip
        for i, g in zip(wanted, found, strict=True):
            got[i] = g
    return got


def _through_reference(ctx, p, derive, gy, x, weight, bias, inputs):  # noqa: ANN001, ANN202
    """Gradients with a graph (double backward), from the reference path's formulation."""
    args = (x, weight, bias, *inputs)
    needs = ctx.needs_input_grad[:3] + ctx.needs_input_grad[6:]
    wanted = [t for t, need in zip(args, needs, strict=True) if need and t is not None]
    y = reference.normalize_derived(x, p, derive, weight, bias, tuple(inputs))[0]
    grads = iter(torch.autograd.grad(y, wanted, gy, create_graph=True))
    out = [
        next(grads) if need and t is not None else None for t, need in zip(args, needs, strict=True)
    ]
    return (*out[:3], None, None, None, *out[3:])
