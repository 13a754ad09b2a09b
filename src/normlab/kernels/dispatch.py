"""Chooses the path of each call: a backend that accepts it, else the reference path.

Backends (:mod:`.backends`) are tried in order per device: on the CPU ATen's fused
kernels where they compute the pattern exactly and are the faster path, then the Numba
kernels (if numba is installed); on CUDA ATen's kernels wherever exact, then the Triton
kernels (if triton is installed) for the patterns ATen lacks. The reference path (plain
PyTorch) takes everything else: other devices and dtypes, small tensors no ATen kernel
computes (where a kernel call costs more than it saves), patterns that do not fit the
canonical ``K R K R`` form, statistics that need a gradient, and any call while the
reference path is forced.

Under a transform (:func:`normlab.kernels.transforms.transform`) the path follows what
the transform can see: ``torch.export``, ONNX export, ``torch.func``, ``torch.fx`` and
``torch.jit`` get the reference decomposition (graphs of ATen operators only); under
``torch.compile`` a call takes ATen's own kernel where one computes it exactly
(:func:`compile_kernel`: torch.nn's operators, which Inductor decomposes with
hand-written backward formulas), else the reference decomposition. Both measured
faster there than the ``normlab::`` custom operators (``benchmarks/compile_path.py``),
which are opaque to Inductor's fusion.

Force the reference path with ``with normlab.kernels.use_reference(): ...``, with
``normlab.kernels.set_reference(True)``, or with the environment variable
``NORMLAB_REFERENCE=1`` (read when normlab is imported); force one backend with
:func:`use_backend`. See the choice with :func:`explain_dispatch` or the
``normlab.kernels`` logger at DEBUG level.

Example:
    >>> print(explain_dispatch(torch.randn(32, 64, 56, 56), "n c h w -> c"))
    cpu (numba): family RKR, canonical (A, B, C, D) = (1, 32, 64, 3136)
      aten refused: batch norm on channels-first float data: the Numba kernel is measured faster
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Iterator

import torch

from normlab.kernels import aten, backends, function, reference, transforms
from normlab.kernels.backends import KERNEL_DTYPES, MIN_ELEMENTS, Call, Choice, available
from normlab.kernels.function import Passes
from normlab.pattern import Plan, plan

log = logging.getLogger("normlab.kernels")

__all__ = [
    "KERNEL_DTYPES",
    "MIN_ELEMENTS",
    "available",
    "explain_dispatch",
    "normalize_batch",
    "normalize_derived",
    "normalize_with",
    "set_native",
    "set_reference",
    "use_backend",
    "use_reference",
]

_forced = threading.local()
#: The process-wide switches; ``NORMLAB_REFERENCE=1`` in the environment when normlab is
#: imported starts with the reference path forced (read once: every call asks the switches)
_global = {
    "reference": os.environ.get("NORMLAB_REFERENCE", "") not in ("", "0"),
    "native": True,
}
BACKEND_NAMES = ("aten", "numba", "triton", "reference")


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
        _restore("value", previous)


def _restore(name: str, previous: object) -> None:
    # An attribute left at None would still count as a switch in `defaults_in_force`.
    if previous is None:
        _forced.__dict__.pop(name, None)
    else:
        setattr(_forced, name, previous)


def reference_forced() -> bool:
    """True when a switch asks for the reference path (context, global or environment)."""
    local = getattr(_forced, "value", None)
    if local is not None:
        return local
    return _global["reference"]


@contextlib.contextmanager
def use_backend(name: str, *, threads: int | None = None) -> Iterator[None]:
    """Within the block (this thread), send every call the named backend accepts to it.

    `name` is one of ``"aten"``, ``"numba"``, ``"triton"``, ``"reference"``. While a
    backend is forced it has no size floor (small test inputs take the kernels), and
    calls it refuses take the reference path. `threads` also forces the Numba kernels'
    split into that many tasks, as if the input were large.

    Example:
        >>> with use_backend("numba", threads=3):
        ...     y = normlab.normalize(torch.randn(4, 3, 5, 5), "n c h w -> c")
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"use_backend: expected one of {', '.join(BACKEND_NAMES)}, got {name!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"use_backend: expected threads >= 1, got {threads!r}")
    previous = getattr(_forced, "backend", None)
    _forced.backend = (name, threads)
    try:
        if name == "reference":
            with use_reference():
                yield
        else:
            yield
    finally:
        _restore("backend", previous)


def defaults_in_force() -> bool:
    """True when no switch is in force: no backend or reference path forced (context,
    global or environment) and ATen's kernels allowed. A layer's eager routes
    (:mod:`normlab.layers.routes`) hold only then."""
    return not _forced.__dict__ and _global["native"] and not _global["reference"]


def forced_backend() -> tuple[str, int | None] | None:
    """The backend forced by :func:`use_backend` in this thread, and its thread count."""
    return getattr(_forced, "backend", None)


def _call(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
    stats: str,
    stats_grad: bool = False,
    device: str = "",
) -> Call:
    forced = forced_backend()
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    return Call(
        x, p, weight, bias, eps, center, stats, grad, stats_grad, device,
        forced is not None, None if forced is None else forced[1],
    )  # fmt: skip


def _choose(call: Call, mode: str | None = None) -> Choice:
    """The backend for `call` under `mode` (the current transform when None)."""
    if reference_forced():
        return Choice("reference", None, (("switch", "reference path forced"),))
    mode = transforms.transform(call.x, call.weight, call.bias) if mode is None else mode
    if mode != "eager":
        return _under_transform(mode, call)
    forced = forced_backend()
    key = _key(call, forced)
    cached, plan_of = _cache.get(key, (None, None))
    if cached is not None and plan_of is call.p:
        if cached.passes is None:
            return cached
        x = backends._dense(call.x)
        return Choice(
            cached.backend, cached.passes.rebind(x, call.weight, call.bias), cached.refusals
        )
    choice = _choose_uncached(call, forced)
    if len(_cache) >= 1024:
        _cache.clear()
    _cache[key] = (choice, call.p)
    return choice


#: Choices by everything they depend on (shape, strides, dtype, device, plan, affine
#: geometry, statistics kind, gradients, switches): a repeated call skips the backends'
#: checks and only rebinds its tensors.
_cache: dict[tuple, tuple[Choice, Plan]] = {}


def _meta(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device)


def _key(call: Call, forced: tuple[str, int | None] | None) -> tuple:
    x = call.x
    return (
        x.shape, x.stride(), x.dtype, x.device, id(call.p), call.center, call.stats,
        call.grad, call.stats_grad, call.device, forced, _global["native"],
        _meta(call.weight), _meta(call.bias), tuple(backends._available.items()),
    )  # fmt: skip


def _choose_uncached(call: Call, forced: tuple[str, int | None] | None) -> Choice:
    only = None if forced is None else forced[0]
    if only == "reference":
        return Choice("reference", None, (("switch", "reference path forced"),))
    if only is None and not _global["native"]:
        only_order = [b for b in backends.ORDER.get(call.device_type, ()) if b.name != "aten"]
        refusals = [("aten", "ATen's kernels switched off (set_native)")]
        for backend in only_order:
            got = backend.accept(call)
            if not isinstance(got, str):
                return Choice(backend.name, got, tuple(refusals))
            refusals.append((backend.name, got))
        return Choice("reference", None, tuple(refusals))
    return backends.choose(call, only)


def eager_kernel(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
    stats: str = "batch",
) -> Passes | None:
    """The ATen passes that serve this eager call both with and without a gradient, or
    None: another backend, the reference path, a switch in force, or a choice that
    depends on the gradient. What a layer's eager route (:mod:`normlab.layers.routes`)
    may call directly, with the same result as the full path.
    """
    if not defaults_in_force() or transforms.traced(x, weight, bias):
        return None
    got = []
    for grad in (False, True):
        choice = backends.choose(Call(x, p, weight, bias, eps, center, stats, grad))
        if choice.backend != "aten" or not getattr(choice.passes, "differentiable", False):
            return None
        got.append(choice.passes)
    return got[0] if type(got[0]) is type(got[1]) else None


def serves_derived(x: torch.Tensor, p: Plan) -> bool:
    """Whether a kernel backend (not the reference path) serves an eager call of
    derived statistics over `p` (the hybrids' one-pass path)."""
    return _choose(_call(x, p, None, None, 0.0, True, "derived"), "eager").passes is not None


def compile_kernel(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    center: bool,
    stats: str = "batch",
) -> Passes | None:
    """Under ``torch.compile``: ATen's passes where one of its kernels computes the call
    exactly (batch, instance, group, layer, RMS norm), else None (the reference
    decomposition).

    These are torch.nn's own operators, so Inductor sees what it sees for torch.nn's
    layers (``native_batch_norm``, ``native_layer_norm``, ``native_group_norm`` with their
    hand-written backward decompositions) and fuses them with their neighbours. No size
    enters the choice, so a dynamic batch does not specialize.
    """
    if x.dtype not in KERNEL_DTYPES or reference_forced():
        return None
    if not aten._mixed_ok(x, weight, bias) or not all(
        t is None or (t.device == x.device and t.is_floating_point()) for t in (weight, bias)
    ):
        return None
    cuda = x.device.type == "cuda"
    if stats == "given":
        passes = aten.batch_norm(x, p, weight, bias)
    else:
        # torch.nn's instance norm: Inductor's code for it beat group norm's with G = C
        passes = aten.instance_norm(x, p, weight, bias) if center else None
        if passes is None:
            # with a gradient, half-precision layer norm with an affine is refused as in
            # eager (ATen's γ/β gradients are too coarse there): the decomposition
            grad = function._needs_grad(x, weight, bias)
            passes = aten.choose(x, p, weight, bias, grad, True, cuda, center)
    if not getattr(passes, "differentiable", False):
        return None
    return dataclasses.replace(passes, device="cuda") if cuda else passes  # type: ignore[arg-type]


def _under_transform(mode: str, call: Call | None = None) -> Choice:
    if mode == "compile" and call is not None and call.stats != "derived" and not call.stats_grad:
        passes = compile_kernel(call.x, call.p, call.weight, call.bias, call.center, call.stats)
        if passes is not None:
            why = "under torch.compile ATen's own kernel (torch.nn's operator), where exact"
            return Choice("aten", passes, (("transform", why),))
    why = {
        "compile": "under torch.compile the plain-ATen decomposition (no ATen kernel computes "
        "this pattern; Inductor fuses it with its neighbours)",
        "export": "under torch.export the graph holds ATen operators only",
        "func": "under torch.func the decomposition (its transforms see through it)",
        "fx": "under torch.fx tracing the graph holds ATen operators only",
        "jit": "under torch.jit tracing the graph holds ATen operators only",
    }.get(mode)
    if why is None:
        raise ValueError(
            "explain_dispatch: expected mode one of eager, compile, export, func, fx, jit, "
            f"got {mode!r}"
        )
    return Choice("reference", None, (("transform", why),))


def explain_dispatch(
    x: torch.Tensor,
    pattern: str,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    center: bool = True,
    mode: str | None = None,
    device: str | None = None,
    **sizes: int,
) -> str:
    """Which path a normalization of `x` by `pattern` takes, and why.

    The first line names the chosen path; each following line a backend that refused
    the call and its reason. `mode` asks for the path under a transform (``"eager"``,
    ``"compile"``, ``"export"``, ``"func"``, ``"fx"``, ``"jit"``; default: the current
    one); `device` for another device type than `x`'s (``"cuda"``: the CUDA order,
    checked on any machine).

    Example:
        >>> explain_dispatch(torch.randn(4, 3), "n c -> c")
        'cpu (aten): native_batch_norm'
    """
    from normlab.normalize import affine_view

    p = plan(pattern, x.shape, **sizes)
    w, b = affine_view(weight, x, p, "weight"), affine_view(bias, x, p, "bias")
    call = _call(x, p, w, b, float(eps), center, "batch", device=device or "")
    choice = _choose(call, mode)
    lines = [choice.describe()]
    if choice.passes is not None or len(choice.refusals) > 1:
        last = None if choice.passes is not None else choice.refusals[-1]
        lines += [
            f"  {why}" if name == "transform" else f"  {name} refused: {why}"
            for name, why in choice.refusals
            if (name, why) != last
        ]
    return "\n".join(lines)


def _log(kind: str, p: Plan, x: torch.Tensor, choice: Choice) -> None:
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
        log.debug("%s %s %s: %s", kind, p.pattern.text, tuple(x.shape), choice.describe())


def normalize_batch(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
    stats: bool = True,
    running: aten.Running | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Batch statistics (in `p.stats_shape`) and the normalized output: ``(y, mean, var)``.

    With ``stats=False`` a kernel may skip building the statistics and return None.
    `running` (buffers and the batch's weight) lets a kernel that can update batch-norm
    running estimates itself do so in eager mode (ATen's): then mean and var come back
    None. Otherwise the caller updates them from the statistics, with in-place ops.
    """
    choice = _choose(_call(x, p, weight, bias, eps, center, "batch"))
    _log("normalize_batch", p, x, choice)
    if choice.passes is None:
        return reference.normalize_batch(x, p, weight, bias, eps, center)
    xin = backends._dense(x)
    return function.normalize_batch(
        xin, weight, bias, p, eps, center, choice.passes, stats, running
    )


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
    choice = _choose(_call(x, p, weight, bias, eps, True, "given", stats_grad))
    _log("normalize_with", p, x, choice)
    if choice.passes is None:
        return reference.normalize_with(x, p, mean, var, weight, bias, eps)
    return function.normalize_with(
        backends._dense(x), weight, bias, p, mean, var, eps, choice.passes
    )


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
    (x − m)·rstd·weight + bias. A kernel path (Numba, Triton) reads x once for the
    statistics and once to normalize; ``fast=False`` keeps the reference path (a
    `derive` that talks to other processes, whose backward must stay in autograd's order).
    """
    if not fast:
        choice = Choice("reference", None, (("caller", "asked for"),))
    else:
        choice = _choose(_call(x, p, weight, bias, 0.0, True, "derived"))
    _log("normalize_derived", p, x, choice)
    if choice.passes is None:
        return reference.normalize_derived(x, p, derive, weight, bias, inputs)
    return function.normalize_derived(
        backends._dense(x), weight, bias, p, derive, choice.passes, inputs
    )
