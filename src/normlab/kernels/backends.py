"""Backends: objects that accept a call with their passes, or refuse it with a reason.

A call (:class:`Call`) is the plan, the tensors, eps and centering, where its statistics
come from (the batch, given, or derived from the sets' own) and whether a gradient is
due. Each device has an ordered list of backends; the first that accepts serves the call:

====  ==========================================================================
cpu   aten (where an ATen kernel computes the pattern exactly and is the faster
      path), numba, reference
cuda  aten (cuDNN batch norm, native group and layer norm: wherever exact), triton
      (only the patterns ATen lacks), reference
====  ==========================================================================

The CUDA order is the safe one: no GPU run has yet shown a Triton path faster and
correct (``benchmarks/cuda_paths.py`` measures them), so ATen's kernels come first.

Example:
    >>> choose(Call(torch.randn(2, 3), plan("n c -> c", (2, 3)), None, None, 1e-5, True)).backend
    'aten'
    >>> choose(Call(torch.randn(2, 3), plan("n c -> n", (2, 3)), None, None, 1e-5, False)).refusals
    (('aten', 'no ATen kernel without centering (RMS)'), ('numba', '6 elements < 65536 (call overhead)'))
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

import torch

from normlab.kernels import aten
from normlab.kernels.function import Passes
from normlab.pattern import Plan

#: Below this many elements the reference path is as fast as a Numba kernel call
#: (measured on 2 cores: a fast call costs ~0.1-0.3 ms of fixed overhead, the reference
#: path's time reaches that around 64K elements). ATen's kernels have no such floor.
MIN_ELEMENTS = 65536
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_available: dict[str, bool] = {}


def available(module: str) -> bool:
    """Whether an optional accelerator module (numba, triton) can be imported."""
    if module not in _available:
        _available[module] = importlib.util.find_spec(module) is not None
    return _available[module]


@dataclass(slots=True)
class Call:
    """One normalization call as the backends see it.

    `stats`: ``"batch"`` (computed here), ``"given"`` (running estimates, other
    processes) or ``"derived"`` (from the sets' own moments: the hybrids). `grad`: a
    gradient is due (grad mode on and an input requires it). `device`: the device type
    the call is for (``x.device.type`` unless given: tests check the CUDA order with CPU
    tensors). `forced`: a backend was forced by :func:`use_backend` (no size floor);
    `threads`: split into that many tasks.
    """

    x: torch.Tensor
    p: Plan
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    center: bool
    stats: str = "batch"
    grad: bool = False
    stats_grad: bool = False
    device: str = ""
    forced: bool = False
    threads: int | None = None

    @property
    def device_type(self) -> str:
        return self.device or self.x.device.type


class Backend:
    """Accepts a call with its passes, or refuses it with a reason (a string)."""

    name = "backend"

    def accept(self, call: Call) -> Passes | str:  # pragma: no cover - interface
        raise NotImplementedError


def _common_refusal(call: Call) -> str | None:
    x = call.x
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} has no kernel"
    if call.stats_grad:
        return "statistics that need a gradient"
    if x.numel() == 0:
        return "an empty input (no sets, or empty sets)"
    if call.p.set_size <= 1:
        return "sets of one element"
    for t in (call.weight, call.bias):
        if t is not None and (t.device != x.device or not t.is_floating_point()):
            return "weight/bias on another device or not floating point"
    return None


class AtenBackend(Backend):
    """torch's own fused kernels (native batch, group and layer norm) where exact."""

    name = "aten"

    def accept(self, call: Call) -> Passes | str:
        refusal = _common_refusal(call)
        if refusal is not None:
            return refusal
        if call.stats == "derived":
            return "no ATen kernel for derived statistics"
        x, p, w, b = call.x, call.p, call.weight, call.bias
        if not aten._mixed_ok(x, w, b):
            return "weight/bias dtype ATen's kernels do not take"
        cuda = call.device_type == "cuda"
        if call.device_type not in ("cpu", "cuda"):
            return f"no kernel for device {call.device_type}"
        if call.stats == "given":
            bn = aten.batch_norm(x, p, w, b)
            if bn is None:
                return "given statistics: only batch norm has an ATen kernel"
            if not (cuda or call.forced or x.numel() < MIN_ELEMENTS):
                return "given statistics at kernel sizes: the Numba kernel is measured faster"
            return dataclasses.replace(bn, device="cuda") if cuda else bn
        # Small calls: one ATen op beats the reference path's several. At kernel sizes on
        # the CPU, only where measured faster than the Numba kernels (aten.choose).
        small = x.numel() < MIN_ELEMENTS
        anywhere = cuda or call.forced or small
        got = aten.choose(x, p, w, b, call.grad, anywhere, cuda, call.center, small and not cuda)
        return dataclasses.replace(got, device="cuda") if cuda and not isinstance(got, str) else got


class NumbaBackend(Backend):
    """normlab's Numba kernels (CPU), every pattern that fits the canonical form."""

    name = "numba"

    def accept(self, call: Call) -> Passes | str:
        from normlab.kernels.numba_passes import NumbaPasses, prepare

        if call.device_type != "cpu":
            return f"numba serves CPU tensors, not {call.device_type}"
        refusal = _common_refusal(call)
        if refusal is not None:
            return refusal
        if not available("numba"):
            return "numba is not installed"
        x = call.x
        if not call.forced and x.numel() < MIN_ELEMENTS:
            return f"{x.numel()} elements < {MIN_ELEMENTS} (call overhead)"
        if any(t is not None and t.dim() > x.dim() for t in (call.weight, call.bias)):
            return "weight/bias of higher rank than the input"
        prep = prepare(_dense(x), call.p, call.weight, call.bias, call.threads)
        return prep if isinstance(prep, str) else NumbaPasses(prep, call.p, call.threads)


class TritonBackend(Backend):
    """normlab's Triton kernels (CUDA), only for the patterns ATen's kernels lack."""

    name = "triton"

    def accept(self, call: Call) -> Passes | str:
        from normlab.kernels.triton_passes import TritonPasses, prepare_gpu

        if call.device_type != "cuda":
            return f"triton serves CUDA tensors, not {call.device_type}"
        refusal = _common_refusal(call)
        if refusal is not None:
            return refusal
        if not available("triton"):
            return "triton is not installed"
        prep = prepare_gpu(_dense(call.x), call.p, call.weight, call.bias)
        return prep if isinstance(prep, str) else TritonPasses(prep, call.p)


def _dense(x: torch.Tensor) -> torch.Tensor:
    from normlab.kernels.canonical import memory_order

    return x if memory_order(x) is not None else x.contiguous()


ATEN, NUMBA, TRITON = AtenBackend(), NumbaBackend(), TritonBackend()
BACKENDS: dict[str, Backend] = {b.name: b for b in (ATEN, NUMBA, TRITON)}

#: The ordered backends of each device type; the reference path follows every list.
#: CUDA takes ATen's kernels wherever they are exact and the reference path elsewhere:
#: on an H200 (32×64×56×56, forward+backward, benchmarks/cuda_paths.py) the Triton
#: kernels ran 4.9–47× torch.nn's time and reached 1e-2 relative error in float32, so
#: they serve only when asked for (``use_backend("triton")``) until they are fixed.
ORDER: dict[str, tuple[Backend, ...]] = {"cpu": (ATEN, NUMBA), "cuda": (ATEN,)}


@dataclass(slots=True)
class Choice:
    """The backend that serves a call (``"reference"`` when none does), its passes, and
    every refusal on the way as ``(backend, reason)``."""

    backend: str
    passes: Passes | None
    refusals: tuple[tuple[str, str], ...] = field(default=())

    def describe(self) -> str:
        """The path in one line, e.g. ``cpu (numba): family RKR, ...``."""
        if self.passes is not None:
            return self.passes.describe()
        reason = self.refusals[-1][1] if self.refusals else "reference path forced"
        return f"reference: {reason}"


def choose(call: Call, only: str | None = None) -> Choice:
    """Walk the device's backends (or `only` that one) until one accepts."""
    backends = (BACKENDS[only],) if only is not None else ORDER.get(call.device_type, ())
    if not backends:
        return Choice("reference", None, (("kernels", f"no kernel for device {call.device_type}"),))
    refusals = []
    for backend in backends:
        got = backend.accept(call)
        if not isinstance(got, str):
            return Choice(backend.name, got, tuple(refusals))
        refusals.append((backend.name, got))
    return Choice("reference", None, tuple(refusals))
