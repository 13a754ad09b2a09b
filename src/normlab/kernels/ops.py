"""The fast passes as registered PyTorch operators (``normlab::…``).

Each operator is functional (it returns outputs and statistics and mutates nothing;
running buffers are updated by the caller with ordinary in-place ops, as
``torch/_decomp``'s ``native_batch_norm`` does), has a fake implementation (shapes
only: no NumPy, no ``.item()``, sizes may be symbolic) and a registered autograd
formula, so ``torch.compile(fullgraph=True)`` sees a well-formed operator:

* ``normlab::batch_forward(x, weight, bias, plan, eps, center, backend)`` →
  ``(y, mean, var, rstd)``, statistics (biased var) in the plan's stats shape;
* ``normlab::given_forward(x, weight, bias, mean, var, plan, eps, backend)`` → ``y``;
* ``normlab::backward(gy, x, weight, bias, mean, rstd, plan, batch, center, eps, backend)``
  → ``(gx, gweight, gbias)`` (the affine ones empty when there is no weight or bias).

`plan` is the pattern with its group sizes (:func:`plan_spec`), `backend` ``"numba"``
or ``"triton"``; a call the backend refuses (no canonical form, sets of one element)
is computed by the reference path inside the operator, so a traced graph never fails. Eager calls do not go through them: a custom-operator call costs
20–40 µs on the CPU, more than a small normalization; the dispatcher calls the passes
directly there. Under ``torch.compile`` the dispatcher takes ATen's kernels or the
reference decomposition instead, which measured faster than these operators in a
conv → norm → ReLU block (``benchmarks/compile_path.py``); the operators stay for
``opcheck`` (torch's operator test) and for graphs that call them explicitly.

Example:
    >>> x = torch.randn(8, 4, 16, 16)
    >>> y, mean, var, rstd = torch.ops.normlab.batch_forward(
    ...     x, None, None, plan_spec(plan("n c h w -> c", x.shape)), 1e-5, True, "numba"
    ... )
"""

from __future__ import annotations

import math

import torch
from torch import library as torch_library

from normlab.kernels import backends, reference
from normlab.kernels.canonical import stats_from_plan, stats_to_plan
from normlab.moments import stats_dtype
from normlab.pattern import ELLIPSIS, Plan, parse_pattern, plan

__all__ = ["plan_spec", "batch_forward", "given_forward"]


def plan_spec(p: Plan) -> str:
    """A plan as the string an operator takes: the pattern and the sizes of its groups.

    Example:
        >>> plan_spec(plan("n (g k) h w -> n g", (2, 8, 4, 4), g=2))
        'n (g k) h w -> n g;g=2'
    """
    sizes = [
        f"{p.axes[i]}={p.expanded_shape[i]}"
        for members in p.input_dims
        if len(members) > 1
        for i in members[:-1]
    ]
    return ";".join([p.pattern.text, *sizes])


def _sizes(spec: str) -> tuple[str, dict[str, int]]:
    text, *sizes = spec.split(";")
    return text, {name: int(value) for name, value in (s.split("=") for s in sizes)}


def _plan(spec: str, x: torch.Tensor) -> Plan:
    text, sizes = _sizes(spec)
    return plan(text, tuple(x.shape), **sizes)


def _stats_shape(spec: str, shape: torch.Size) -> list:
    """The plan's stats shape from the pattern alone: sizes stay symbolic under tracing."""
    text, known = _sizes(spec)
    pattern = parse_pattern(text)
    extra = len(shape) - (len(pattern.dims) - pattern.has_ellipsis)
    out, d = [], 0
    for names in pattern.dims:
        if names == (ELLIPSIS,):
            for _ in range(extra):
                out.append(shape[d] if ELLIPSIS in pattern.kept else 1)
                d += 1
            continue
        given = math.prod(known[n] for n in names if n in known)
        for n in names:
            size = known[n] if n in known else shape[d] // given
            out.append(size if n in pattern.kept else 1)
        d += 1
    return out


def _passes(backend: str, x: torch.Tensor, p: Plan, weight, bias, eps: float, center: bool):  # noqa: ANN001, ANN202
    """The backend's passes, or None where it refuses (the reference path computes it)."""
    if backend not in ("numba", "triton"):
        raise ValueError(
            f"normlab operators: expected backend 'numba' or 'triton', got {backend!r}"
        )
    call = backends.Call(x, p, weight, bias, eps, center, forced=True)
    got = backends.BACKENDS[backend].accept(call)
    return None if isinstance(got, str) else got


def _affine_grad(g: torch.Tensor | None, t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if t is None or g is None:
        return x.new_empty(0) if t is None else torch.zeros_like(t)
    return g.to(t.dtype).reshape(t.shape)


@torch_library.custom_op("normlab::batch_forward", mutates_args=())
def batch_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    plan: str,
    eps: float,
    center: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize with batch statistics: ``(y, mean, var, rstd)`` (plan's stats shape)."""
    p = _plan(plan, x)
    passes = _passes(backend, backends._dense(x), p, weight, bias, eps, center)
    dtype = stats_dtype(x.dtype)
    if passes is None:
        with torch.no_grad():
            y, mean, var = reference.normalize_batch(x, p, weight, bias, eps, center)
        return y, mean.to(dtype), var.to(dtype), torch.rsqrt(var.to(dtype) + eps)
    y, (_, rstd), mean, var = passes.forward(backends._dense(x), eps, center, True)
    return (
        y,
        mean.to(dtype).clone(),
        var.to(dtype).clone(),
        stats_to_plan(rstd.to(dtype), p, passes.canon).clone(),
    )


@batch_forward.register_fake
def _(x, weight, bias, plan, eps, center, backend):  # noqa: ANN001, ANN202
    shape = _stats_shape(plan, x.shape)
    dtype = stats_dtype(x.dtype)
    stats = [x.new_empty(shape, dtype=dtype) for _ in range(3)]
    return torch.empty_like(x), *stats


@torch_library.custom_op("normlab::given_forward", mutates_args=())
def given_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    plan: str,
    eps: float,
    backend: str,
) -> torch.Tensor:
    """Normalize with given statistics (plan's stats shape, no gradient to them)."""
    p = _plan(plan, x)
    passes = _passes(backend, backends._dense(x), p, weight, bias, eps, True)
    if passes is None:
        with torch.no_grad():
            return reference.normalize_with(x, p, mean, var, weight, bias, eps)
    return passes.apply(backends._dense(x), mean, var, eps)[0]


@given_forward.register_fake
def _(x, weight, bias, mean, var, plan, eps, backend):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


@torch_library.custom_op("normlab::backward", mutates_args=())
def backward(
    gy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    plan: str,
    batch: bool,
    center: bool,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gx, gweight, gbias)`` from the saved statistics (plan's stats shape)."""
    p = _plan(plan, x)
    xd = backends._dense(x)
    passes = _passes(backend, xd, p, weight, bias, 0.0, center)
    if passes is None:
        return _reference_backward(gy, x, weight, bias, mean, rstd, p, batch, center, eps)
    c = passes.canon
    saved = (stats_from_plan(mean, p, c), stats_from_plan(rstd, p, c))
    needs = (True, weight is not None, bias is not None)
    gx, gw, gb = passes.backward(
        xd,
        gy.contiguous() if not gy.is_contiguous() and xd.is_contiguous() else gy,
        saved,
        batch,
        center,
        needs,
    )
    return gx, _affine_grad(gw, weight, x), _affine_grad(gb, bias, x)


def _reference_backward(gy, x, weight, bias, mean, rstd, p, batch, center, eps):  # noqa: ANN001, ANN202
    """The gradients in plain tensor ops, for calls the backend refuses (autograd does not
    run inside an operator): with x̂ = (x − mean)·rstd and g = gy·w,
    gx = rstd·(g − mean(g) − x̂·mean(g·x̂)) for batch statistics (no mean(g) without
    centering), rstd·g for given ones; gw = Σ gy·x̂, gb = Σ gy."""
    dtype = stats_dtype(x.dtype)
    xhat = ((x.reshape(p.expanded_shape).to(dtype) - mean) * rstd).reshape(x.shape)
    g = gy.to(dtype) if weight is None else gy.to(dtype) * weight.to(dtype)
    ge = g.reshape(p.expanded_shape)
    gxe = ge
    if batch:
        he = xhat.reshape(p.expanded_shape)
        gxe = ge - he * (ge * he).mean(p.reduced, keepdim=True)
        if center:
            gxe = gxe - ge.mean(p.reduced, keepdim=True)
    gx = (gxe * rstd).reshape(x.shape).to(x.dtype)
    gw = None if weight is None else (gy.to(dtype) * xhat).sum_to_size(weight.shape)
    gb = None if bias is None else gy.to(dtype).sum_to_size(bias.shape)
    return gx, _affine_grad(gw, weight, x), _affine_grad(gb, bias, x)


@backward.register_fake
def _(gy, x, weight, bias, mean, rstd, plan, batch, center, eps, backend):  # noqa: ANN001, ANN202
    gw = x.new_empty(0) if weight is None else torch.empty_like(weight)
    gb = x.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(x), gw, gb


def _setup_batch(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, plan, eps, center, backend = inputs
    _, mean, _, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.args = (plan, center, eps, backend)


def _batch_backward(ctx, gy, _gmean, _gvar, _grstd):  # noqa: ANN001, ANN202
    x, weight, bias, mean, rstd = ctx.saved_tensors
    plan, center, eps, backend = ctx.args
    gx, gw, gb = torch.ops.normlab.backward(
        gy, x, weight, bias, mean, rstd, plan, True, center, eps, backend
    )
    return (
        gx,
        gw if weight is not None else None,
        gb if bias is not None else None,
        None,
        None,
        None,
        None,
    )


batch_forward.register_autograd(_batch_backward, setup_context=_setup_batch)


def _setup_given(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, mean, var, plan, eps, backend = inputs
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.args = (plan, eps, backend)


def _given_backward(ctx, gy):  # noqa: ANN001, ANN202
    x, weight, bias, mean, var = ctx.saved_tensors
    plan, eps, backend = ctx.args
    dtype = stats_dtype(x.dtype)
    mean, rstd = mean.to(dtype), torch.rsqrt(var.to(dtype) + eps)
    gx, gw, gb = torch.ops.normlab.backward(
        gy, x, weight, bias, mean, rstd, plan, False, True, eps, backend
    )
    return (
        gx,
        gw if weight is not None else None,
        gb if bias is not None else None,
        None,
        None,
        None,
        None,
        None,
    )


given_forward.register_autograd(_given_backward, setup_context=_setup_given)
