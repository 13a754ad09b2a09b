"""Chooses the kernel for each call: a fast path when one fits, else the reference path.

Fast paths: Numba kernels for CPU tensors (if numba is installed), Triton kernels for
CUDA tensors (if triton is installed). The reference path (plain PyTorch) takes
everything else: other devices and dtypes, tiny tensors (where a kernel launch costs
more than it saves), patterns that do not fit the canonical ``K R K R`` form,
statistics that need a gradient, and any call while the reference path is forced.

Force it with ``with normlab.kernels.use_reference(): ...``, with
``normlab.kernels.set_reference(True)``, or with the environment variable
``NORMLAB_REFERENCE=1``. See the choice with :func:`explain_dispatch` or the
``normlab.kernels`` logger at DEBUG level.

Example:
    >>> explain_dispatch(torch.randn(32, 64, 56, 56), "n c h w -> c")
    'cpu (numba): family RKR, canonical (A, B, C, D) = (1, 32, 64, 3136)'
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from collections.abc import Iterator

import torch

from normlab.kernels import native, reference
from normlab.pattern import Plan, plan

log = logging.getLogger("normlab.kernels")

#: Below this many elements the reference path is as fast as a kernel call (measured on
#: 2 cores: a fast call costs ~0.1-0.3 ms of fixed overhead, the reference path's time
#: reaches that around 64K elements).
MIN_ELEMENTS = 65536
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_forced = threading.local()
_global = {"reference": False, "native": True}


def set_native(enabled: bool = True) -> bool:
    """Allow (or stop) ATen's fused kernels where they fit; return the previous setting.

    With them off, the Numba kernels serve every pattern they can (tests use this to
    check those kernels on patterns ATen would otherwise take).
    """
    previous = _global["native"]
    _global["native"] = bool(enabled)
    return previous


def set_reference(enabled: bool = True) -> bool:
    """Force (or stop forcing) the reference path everywhere; return the previous setting."""
    previous = _global["reference"]
    _global["reference"] = bool(enabled)
    return previous


@contextlib.contextmanager
def use_reference(enabled: bool = True) -> Iterator[None]:
    """Within the block (this thread), use the reference path for every normalization.

    Example:
        >>> with use_reference():
        ...     y = normlab.normalize(x, "n c h w -> c")
    """
    previous = getattr(_forced, "value", None)
    _forced.value = bool(enabled)
    try:
        yield
    finally:
        _forced.value = previous


def reference_forced() -> bool:
    """True when a switch asks for the reference path (context, global or environment)."""
    local = getattr(_forced, "value", None)
    if local is not None:
        return local
    return _global["reference"] or os.environ.get("NORMLAB_REFERENCE", "") not in ("", "0")


_available: dict[str, bool] = {}


def available(module: str) -> bool:
    """Whether an optional accelerator module (numba, triton) can be imported."""
    if module not in _available:
        _available[module] = importlib.util.find_spec(module) is not None
    return _available[module]


def _choose(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats_grad: bool = False,
    batch: tuple[float, bool] | None = None,
) -> tuple[str, object]:
    """("cpu" | "gpu", prepared), ("native", (name, thunk)), ("native+cpu", (thunk,
    prepared)): ATen's forward and the Numba backward, or ("reference", reason).

    `batch` is ``(eps, center)`` for a call that computes its own statistics, the only
    kind ATen's fused kernels serve.
    """
    if reference_forced():
        return "reference", "reference path forced"
    if x.dtype not in KERNEL_DTYPES:
        return "reference", f"dtype {x.dtype} has no kernel"
    if stats_grad:
        return "reference", "statistics that need a gradient"
    if x.numel() == 0:
        return "reference", "an empty input (no sets, or empty sets)"
    if x.numel() < MIN_ELEMENTS:
        return "reference", f"{x.numel()} elements < {MIN_ELEMENTS} (call overhead)"
    if p.set_size <= 1:
        return "reference", "sets of one element"
    for t in (weight, bias):
        if t is not None and (t.device != x.device or not t.is_floating_point()):
            return "reference", "weight/bias on another device or not floating point"
    if x.device.type == "cpu":
        use_native = batch is not None and _global["native"]
        chosen = native.choose(x, p, weight, bias, *batch) if use_native else None
        if chosen is not None and chosen[0] != native.FORWARD_ONLY:
            return "native", chosen
        if not available("numba"):
            return "reference", "numba is not installed"
        from normlab.kernels.cpu_function import prepare

        if weight is not None or bias is not None:
            if any(t is not None and t.dim() > x.dim() for t in (weight, bias)):
                return "reference", "weight/bias of higher rank than the input"
        prep = prepare(x if _dense(x) else x.contiguous(), p, weight, bias)
        if isinstance(prep, str):
            return "reference", prep
        return ("cpu", prep) if chosen is None else ("native+cpu", (chosen[1], prep))
    if x.device.type == "cuda":
        if not available("triton"):
            return "reference", "triton is not installed"
        from normlab.kernels.gpu_function import prepare_gpu

        prep = prepare_gpu(x if _dense(x) else x.contiguous(), p, weight, bias)
        return ("reference", prep) if isinstance(prep, str) else ("gpu", prep)
    return "reference", f"no kernel for device {x.device.type}"


def _dense(x: torch.Tensor) -> bool:
    from normlab.kernels.canonical import memory_order

    return memory_order(x) is not None


def _describe(kind: str, what: object) -> str:
    if kind == "reference":
        return f"reference: {what}"
    if kind == "native":
        return f"cpu (aten): native_{what[0]}"  # type: ignore[index]
    if kind == "native+cpu":
        return "cpu (aten forward, numba backward): native_layer_norm"
    c = what.canon  # type: ignore[attr-defined]
    engine = "numba" if kind == "cpu" else "triton"
    return f"{kind} ({engine}): family {c.family}, canonical (A, B, C, D) = {c.shape}"


def explain_dispatch(
    x: torch.Tensor,
    pattern: str,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    center: bool = True,
    **sizes: int,
) -> str:
    """Which path a normalization of `x` by `pattern` takes, and why, in one line.

    Example:
        >>> explain_dispatch(torch.randn(4, 3), "n c -> c")
        'reference: 12 elements < 65536 (call overhead)'
    """
    from normlab.normalize import affine_view

    p = plan(pattern, x.shape, **sizes)
    w, b = affine_view(weight, x, p, "weight"), affine_view(bias, x, p, "bias")
    return _describe(*_choose(x, p, w, b, batch=(eps, center)))


def normalize_batch(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
    stats: bool = True,
    running: native.Running | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Batch statistics (in `p.stats_shape`) and the normalized output: ``(y, mean, var)``.

    With ``stats=False`` a kernel may skip building the statistics and return None.
    `running` (buffers and the batch's weight) lets a kernel that can update batch-norm
    running estimates itself do so: then mean and var come back None.
    """
    kind, what = _choose(x, p, weight, bias, batch=(eps, center))
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "normalize_batch %s %s: %s", p.pattern.text, tuple(x.shape), _describe(kind, what)
        )
    if kind == "reference":
        return reference.normalize_batch(x, p, weight, bias, eps, center)
    if kind == "native":
        if running is not None and what[0] == "batch_norm":  # type: ignore[index]
            return what[1](stats, running)  # type: ignore[index]
        return what[1](stats)  # type: ignore[index]
    if kind == "native+cpu":
        from normlab.kernels.cpu_function import BatchNormFunction

        run, prep = what  # type: ignore[misc]
        return BatchNormFunction.apply(x, weight, bias, p, eps, center, prep, run)
    xin = x if _dense(x) else x.contiguous()
    if kind == "cpu":
        from normlab.kernels.cpu_function import BatchNormFunction

        return BatchNormFunction.apply(xin, weight, bias, p, eps, center, what)
    from normlab.kernels.gpu_function import GpuBatchNormFunction

    return GpuBatchNormFunction.apply(xin, weight, bias, p, eps, center, what)


def normalize_with(
    x: torch.Tensor,
    p: Plan,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """(x − mean)·rsqrt(var + eps)·weight + bias with statistics in `p.stats_shape`."""
    stats_grad = torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad)
    kind, what = _choose(x, p, weight, bias, stats_grad)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("normalize_with %s %s: %s", p.pattern.text, tuple(x.shape), _describe(kind, what))
    if kind == "reference":
        return reference.normalize_with(x, p, mean, var, weight, bias, eps)
    xin = x if _dense(x) else x.contiguous()
    if kind == "cpu":
        from normlab.kernels.cpu_function import ApplyFunction

        return ApplyFunction.apply(xin, weight, bias, p, mean, var, eps, what)
    from normlab.kernels.gpu_function import GpuApplyFunction

    return GpuApplyFunction.apply(xin, weight, bias, p, mean, var, eps, what)


def normalize_derived(
    x: torch.Tensor,
    p: Plan,
    derive: reference.Derive,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    inputs: tuple[torch.Tensor, ...] = (),
    fast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize with statistics derived from the sets' own: ``(y, mean, var)``.

    ``(m, rstd) = derive(mean, var, *inputs)`` (`p.stats_shape`, differentiable); y =
    (x − m)·rstd·weight + bias. A kernel path (Numba, Triton: :mod:`.derived`) reads x
    once for the statistics and once to normalize; ``fast=False`` keeps the reference
    path (a `derive` that talks to other processes, whose backward must stay in
    autograd's order).
    """
    kind, what = ("reference", "asked for") if not fast else _choose(x, p, weight, bias)
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "normalize_derived %s %s: %s", p.pattern.text, tuple(x.shape), _describe(kind, what)
        )
    if kind == "reference":
        return reference.normalize_derived(x, p, derive, weight, bias, inputs)
    from normlab.kernels import derived

    if kind == "cpu":
        from normlab.kernels.cpu_function import NumbaPasses as Passes
    else:
        from normlab.kernels.gpu_function import TritonPasses as Passes
    xin = x if _dense(x) else x.contiguous()
    return derived.normalize_derived(xin, weight, bias, p, derive, Passes(what), inputs)
