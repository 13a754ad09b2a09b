"""normalize(): (x − mean)·rsqrt(var + eps), then the affine, over the sets of a pattern.

`normalize` is the public function; `normalize_batch` and `normalize_with` are what the
layers call (batch statistics, or statistics from elsewhere: running estimates, other
processes). Both go through the kernel dispatcher, whose reference path is plain
PyTorch operations (differentiable twice, any device and dtype). Under a program
transform (``torch.export``, ``torch.func``, ``torch.jit.trace``) calls take the
reference path directly: the transform sees ATen operations only; under
``torch.compile`` they take ATen's own normalization kernel where one is exact (what
torch.nn's layers hand Inductor), else the reference path.
"""

from __future__ import annotations

import torch

from normlab.errors import check_floating
from normlab.kernels import dispatch, reference
from normlab.kernels.reference import Derive
from normlab.kernels.transforms import traced, transform
from normlab.moments import Moments, from_stats
from normlab.pattern import Plan, plan


def affine_view(
    param: torch.Tensor | None, x: torch.Tensor, p: Plan, role: str
) -> torch.Tensor | None:
    """Shape a weight or bias so it broadcasts against `x`.

    Accepted: a tensor already of `x`'s rank; a 1-D tensor per channel (the input dim
    holding axis `c` or a group such as `(g k)`); otherwise the trailing dims of `x`
    (LayerNorm's convention).
    """
    if param is None:
        return None
    check_floating(param, f"normalize {role}")
    if param.dim() == x.dim():
        view = param
    else:
        channel = next(
            (
                d
                for d, members in enumerate(p.input_dims)
                if len(members) > 1 or p.axes[members[0]] == "c"
            ),
            None,
        )
        if channel is not None and param.dim() == 1:
            shape = [1] * x.dim()
            shape[channel] = -1
            if param.numel() != x.shape[channel]:
                raise ValueError(
                    f"normalize: expected {role} of {x.shape[channel]} channels (dim {channel} "
                    f"of input shape {tuple(x.shape)}), got shape {tuple(param.shape)}"
                )
            return param.reshape(shape)
        view = param
        if tuple(param.shape) != tuple(x.shape[x.dim() - param.dim() :]):
            raise ValueError(
                f"normalize: expected {role} of shape {tuple(x.shape[x.dim() - param.dim() :])} "
                f"(the trailing dims of input shape {tuple(x.shape)}), got {tuple(param.shape)}"
            )
    try:
        torch.broadcast_shapes(view.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"normalize: {role} of shape {tuple(param.shape)} does not broadcast against "
            f"input shape {tuple(x.shape)}"
        ) from None
    return view


def normalize_batch(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    center: bool = True,
    running: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, Moments | None]:
    """Normalize with the batch's own statistics; return the output and those moments.

    `weight`/`bias` must already broadcast against `x` (see :func:`affine_view`).
    With `running` = (running_mean, running_var, weight of this batch), a kernel that
    updates batch-norm buffers itself (unbiased variance) may do so and return None
    for the moments; otherwise the caller updates them from the moments.
    """
    if traced(x):
        y, mean, var = _traced_batch(x, p, weight, bias, eps, center, True, running)
    else:
        y, mean, var = dispatch.normalize_batch(x, p, weight, bias, eps, center, running=running)
    if mean is None:
        return y, None
    return y, from_stats(mean.detach(), var.detach(), p)


def normalize_plan(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    center: bool = True,
) -> torch.Tensor:
    """Normalize with the batch's own statistics, for layers that keep none of them."""
    if traced(x):
        return _traced_batch(x, p, weight, bias, eps, center, False)[0]
    return dispatch.normalize_batch(x, p, weight, bias, eps, center, stats=False)[0]


def _traced_batch(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
    stats: bool,
    running: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A batch-statistics call under a transform: under ``torch.compile`` ATen's kernel
    where one is exact (torch.nn's own operators), else the reference decomposition."""
    if transform(x) == "compile":
        passes = dispatch.compile_kernel(x, p, weight, bias, center)
        if passes is not None:
            y, _, mean, var = passes.forward(x, eps, center, stats, running)
            return y, mean, var
    return reference.normalize_batch(x, p, weight, bias, eps, center)


def normalize_with(
    x: torch.Tensor,
    p: Plan,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Normalize with given statistics of `p.kept_shape` (running estimates, say)."""
    mean, var = p.to_stats(mean), p.to_stats(var)
    if traced(x):
        passes = None
        if transform(x) == "compile":
            passes = dispatch.compile_kernel(x, p, weight, bias, True, "given")
        if passes is not None and not (mean.requires_grad or var.requires_grad):
            return passes.apply(x, mean, var, eps)[0]
        return reference.normalize_with(x, p, mean, var, weight, bias, eps)
    return dispatch.normalize_with(x, p, mean, var, weight, bias, eps)


def normalize_derived(
    x: torch.Tensor,
    p: Plan,
    derive: Derive,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    inputs: tuple[torch.Tensor, ...] = (),
    fast: bool = True,
) -> tuple[torch.Tensor, Moments]:
    """Normalize with statistics derived from the sets' own moments (hybrid norms).

    ``(mean, rstd) = derive(set_mean, set_var, *inputs)``, all in `p.stats_shape`; the
    output is (x − mean)·rstd·weight + bias, and the sets' own moments come back
    (detached) for running estimates. Differentiable in x, weight, bias and `inputs`.

    Example:
        >>> p = plan("n c h w -> n c", (8, 4, 5, 5))  # instance moments...
        >>> def as_batch_norm(mean, var):  # ...give batch norm's
        ...     batch = from_stats(mean, var, p).reduce("n")
        ...     rstd = torch.rsqrt(batch.var + 1e-5)
        ...     return p.to_stats(batch.mean.expand(8, 4)), p.to_stats(rstd.expand(8, 4))
        >>> y, instance = normalize_derived(torch.randn(8, 4, 5, 5), p, as_batch_norm)
    """
    if traced(x):
        y, mean, var = reference.normalize_derived(x, p, derive, weight, bias, tuple(inputs))
    else:
        y, mean, var = dispatch.normalize_derived(x, p, derive, weight, bias, tuple(inputs), fast)
    return y, from_stats(mean.detach(), var.detach(), p)


def normalize(
    x: torch.Tensor,
    pattern: str,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    center: bool = True,
    **sizes: int,
) -> torch.Tensor:
    """Normalize every set S of `pattern` to mean 0 and variance 1, then apply the affine.

    Statistics are float32 or wider; the output has `x`'s dtype and memory format.
    ``center=False`` divides by the root mean square instead (RMS norm).

    Example:
        >>> y = normalize(torch.randn(8, 64, 4, 4), "n (g k) h w -> n g", g=32)  # GroupNorm
    """
    check_floating(x, "normalize")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"normalize: expected eps >= 0, got {eps!r}")
    p = plan(pattern, x.shape, **sizes)
    w, b = affine_view(weight, x, p, "weight"), affine_view(bias, x, p, "bias")
    return normalize_plan(x, p, w, b, float(eps), center)
