"""torch's own fused kernels, for the patterns one of them computes exactly.

Where ATen has a single-pass kernel for a pattern (layer norm over trailing dims,
group norm on contiguous NCHW data, batch norm in any layout) and it measures faster
than normlab's Numba kernel, the dispatcher uses it: `normlab` is then as fast as
`torch.nn` there, and every other pattern keeps its own kernel. Each recognizer checks
the plan's geometry, not the caller's name for it, so any pattern that *is* one of
these normalizations gets the native kernel. Gradients come from
the ATen ops' own derivative formulas: these passes are `differentiable` (eager
calls reach them directly, as torch.nn's do; double backward comes with them), so
normlab's formula (:mod:`normlab.kernels.function`) is not needed for them.

Each recognizer returns the passes of its kernel for the call, or None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from normlab.pattern import Plan

#: Running buffers a batch-norm kernel may update itself: (mean, var, weight of the batch).
Running = tuple[torch.Tensor, torch.Tensor, float]

Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
Forward = tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None, torch.Tensor | None]


def _single_axes(p: Plan) -> bool:
    return all(len(members) == 1 for members in p.input_dims)


def _per_channel(t: torch.Tensor | None, channels: int, dim: int, ndim: int) -> bool:
    """`t` is None or a per-channel vector along input dim `dim` (shaped to broadcast)."""
    if t is None:
        return True
    shape = [1] * ndim
    shape[dim] = channels
    return (
        tuple(t.shape) in (tuple(shape), (channels,))
        if dim == ndim - 1
        else tuple(t.shape) == tuple(shape)
    )


def _stats(
    mean: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    p: Plan,
    stats: bool,
    inverse: list[int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """ATen's mean and 1/sqrt(var + eps) as (mean, biased var) in `p.stats_shape`, if wanted."""
    if not stats:  # layers without running estimates: skip the per-set work
        return None, None
    mean, rstd = mean.detach(), rstd.detach()
    var = (rstd.double().pow(-2) - eps).clamp(min=0).to(rstd.dtype)
    if inverse is not None:
        mean, var = mean.permute(inverse), var.permute(inverse)
    return mean.reshape(p.stats_shape), var.reshape(p.stats_shape)


def _same_dtype(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    return all(t is None or t.dtype == x.dtype for t in params)


def _mixed_ok(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """ATen's CPU kernels take parameters of the input's dtype, or float32 beside half input."""
    allowed = {x.dtype, torch.float32} if x.dtype in (torch.bfloat16, torch.float16) else {x.dtype}
    return all(t is None or t.dtype in allowed for t in params)


#: A direct call of one ATen kernel with the layer's own (flat) parameters:
#: ``(x, weight, bias, eps) -> y``, no statistics (see :mod:`normlab.layers.routes`).
Kernel = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", float], torch.Tensor]


@dataclass(slots=True)
class LayerNormPasses:
    """``native_layer_norm`` over the trailing dims of the input permuted to memory order.

    With `copy` the permuted input is not contiguous (LayerNorm2d on NCHW data): ATen
    reads it through a contiguous copy and the output is copied back to the input's
    layout, which only pays on small inputs (one kernel instead of the reference path's
    several).
    """

    p: Plan
    order: tuple[int, ...]
    inverse: tuple[int, ...]
    trailing: tuple[int, ...]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    device: str = "cpu"
    #: "" (a view, no copy), or how the output is copied back: "contiguous" (the input
    #: is), "like" (into the input's own strides)
    copy: str = ""

    name = "aten"
    op = "layer_norm"
    differentiable = True

    def rebind(
        self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> LayerNormPasses:
        """The same passes for another call of the same geometry (cached choice)."""
        order, n = list(self.order), len(self.order)
        w, b = (_trailing_affine(t, order, self.trailing, n) for t in (weight, bias))
        return dataclasses.replace(self, weight=w, bias=b)

    def describe(self) -> str:
        how = " on a contiguous copy (small input)" if self.copy else ""
        return f"{self.device} (aten): native_layer_norm{how}"

    def forward(
        self, x: torch.Tensor, eps: float, center: bool, stats: bool = True, running: object = None
    ) -> Forward:
        xm = x.permute(self.order)
        y, mean, rstd = torch.native_layer_norm(xm, self.trailing, self.weight, self.bias, eps)
        return (
            _back(y, x, self.inverse, self.copy),
            (mean, rstd),
            *_stats(mean, rstd, eps, self.p, stats, self.inverse),
        )

    def kernel(self) -> Kernel:
        """``torch.layer_norm`` on the permuted view, for a layer's eager route."""
        order, inverse, trailing, copy = self.order, self.inverse, self.trailing, self.copy
        if order == tuple(range(len(order))):
            return lambda x, w, b, eps: torch.layer_norm(x, trailing, w, b, eps)
        if copy == "contiguous":  # LayerNorm2d on NCHW data: the route's one case
            return lambda x, w, b, eps: (
                torch.layer_norm(x.permute(order), trailing, w, b, eps).permute(inverse)
            ).contiguous()
        return lambda x, w, b, eps: _back(
            torch.layer_norm(x.permute(order), trailing, w, b, eps), x, inverse, copy
        )


def _back(y: torch.Tensor, x: torch.Tensor, inverse: tuple[int, ...], copy: str) -> torch.Tensor:
    """A kernel's output on the permuted view, back in `x`'s dim order (and memory layout)."""
    y = y.permute(inverse)
    if not copy:
        return y
    return y.contiguous() if copy == "contiguous" else torch.empty_like(x).copy_(y)


@dataclass(slots=True)
class RmsNormPasses:
    """``rms_norm`` over the trailing dims of the input permuted to memory order (small
    inputs: one ATen call where the reference path takes several)."""

    p: Plan
    order: tuple[int, ...]
    inverse: tuple[int, ...]
    trailing: tuple[int, ...]
    weight: torch.Tensor | None
    device: str = "cpu"

    name = "aten"
    op = "rms_norm"
    differentiable = True

    def rebind(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):  # noqa: ANN201
        """The same passes for another call of the same geometry (cached choice)."""
        w = _trailing_affine(weight, list(self.order), self.trailing, len(self.order))
        return dataclasses.replace(self, weight=w)

    def describe(self) -> str:
        return f"{self.device} (aten): rms_norm"

    def forward(
        self, x: torch.Tensor, eps: float, center: bool, stats: bool = True, running: object = None
    ) -> Forward:
        y = self.kernel()(x, self.weight, None, eps)
        if not stats:
            return y, (), None, None
        square = x.to(_stats_dtype(x)).square().mean(self.p.reduced, keepdim=True)
        square = square.reshape(self.p.stats_shape)
        return y, (), torch.zeros_like(square), square

    def kernel(self) -> Kernel:
        """``torch.rms_norm`` on the permuted view, for a layer's eager route."""
        order, inverse, trailing = self.order, self.inverse, self.trailing
        if order == tuple(range(len(order))):
            return lambda x, w, b, eps: torch.rms_norm(x, trailing, w, eps)
        return lambda x, w, b, eps: torch.rms_norm(x.permute(order), trailing, w, eps).permute(
            inverse
        )


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layer_norm(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    copy: bool = False,
) -> LayerNormPasses | None:
    """Sets that are the trailing dims *in memory order*: ``native_layer_norm`` on a view.

    ``... d -> ...`` on contiguous data, and also LayerNorm2d (``n c h w -> n h w``) on
    channels-last data, whose channels are contiguous: permuted to memory order, both
    are a layer norm over the last dims, with no copy. With `copy`, also sets of single
    dims elsewhere in memory (LayerNorm2d on NCHW data), through a copy.
    """
    geometry = _trailing_geometry(x, p, weight, bias, copy)
    if geometry is None:
        return None
    order, inverse, trailing, (w, b), copied = geometry
    how = ("contiguous" if x.is_contiguous() else "like") if copied else ""
    return LayerNormPasses(p, order, inverse, trailing, w, b, copy=how)


def rms_norm(
    x: torch.Tensor, p: Plan, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> RmsNormPasses | None:
    """RMS norm (no centering, no bias) over the trailing dims in memory order: ``rms_norm``."""
    if bias is not None or not _same_dtype(x, weight):
        return None  # torch's rms_norm takes no bias, and warns on a weight of another dtype
    geometry = _trailing_geometry(x, p, weight, None, False)
    if geometry is None:
        return None
    order, inverse, trailing, (w, _), _ = geometry
    return RmsNormPasses(p, order, inverse, trailing, w)


def _trailing_geometry(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    copy: bool,
) -> tuple | None:
    """(order, inverse, trailing shape, (weight, bias) of that shape, copied) of a layer
    norm over the trailing dims of `x` permuted to memory order, or None."""
    k = len(p.reduced)
    if not _single_axes(p) or k == 0 or k == x.dim():
        return None
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))  # outermost first
    copied = False
    if set(order[-k:]) != set(p.reduced):
        if not copy:
            return None
        # the kept dims first, the reduced ones last, each in memory order
        order = [d for d in order if d not in p.reduced] + [d for d in order if d in p.reduced]
        copied = True
    xm = x.permute(order)
    if not copied and not xm.is_contiguous():
        return None
    trailing = tuple(xm.shape[-k:])
    params = [_trailing_affine(t, order, trailing, x.dim()) for t in (weight, bias)]
    if any(t is False for t in params):
        return None
    inverse = sorted(range(x.dim()), key=order.__getitem__)
    return tuple(order), tuple(inverse), trailing, params, copied


def _trailing_affine(
    t: torch.Tensor | None, order: list[int], trailing: tuple[int, ...], ndim: int
) -> torch.Tensor | None | bool:
    """`t` as a tensor of the `trailing` shape, or False when it is not one in disguise."""
    if t is None:
        return None
    if t.dim() == ndim:
        tp = t.permute(order)
        kept = tp.shape[: ndim - len(trailing)]
        return (
            tp.reshape(trailing)
            if all(s == 1 for s in kept) and tp.shape[len(kept) :] == trailing
            else False
        )
    identity = order == sorted(order)
    return t if identity and tuple(t.shape) == trailing else False


def group_norm(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    inference: bool = False,
) -> GroupNormPasses | None:
    """Per sample and channel group on contiguous NCHW data: ``native_group_norm``.

    Covers ``n (g k) ... -> n g`` (group norm), ``n c ... -> n c`` (instance norm, G = C)
    and ``n c ... -> n`` (layer norm over C and every position, G = 1). On channels-last
    data for `inference` (no gradient): ATen's forward is faster there; with a gradient
    only for wide groups on small maps (see ``CL_GRAD_MIN_GROUP``), elsewhere normlab's
    forward+backward is much faster.
    """
    if x.dim() < 3 or p.input_dims[0] != (0,) or not _single_axes_after(p, 2):
        return None
    if not x.is_contiguous() and not _channels_last(x):
        return None
    channel = p.input_dims[1]
    if len(channel) == 2 and p.kept == (0, channel[0]):
        groups = p.expanded_shape[channel[0]]
    elif len(channel) == 1 and p.kept == (0, channel[0]):
        groups = x.shape[1]
    elif len(channel) == 1 and p.kept == (0,):
        groups = 1
    else:
        return None
    c = x.shape[1]
    if not x.is_contiguous() and (groups == c or x.dtype not in (torch.float32, torch.float64)):
        # ATen's channels-last group norm is slow per group: instance norm (G = C) ran 68×
        # a copy, bfloat16 60×; normlab's own kernel serves those.
        return None
    if not x.is_contiguous() and not inference and not _wide_groups_small_maps(x, c // groups):
        return None
    if not (_per_channel(weight, c, 1, x.dim()) and _per_channel(bias, c, 1, x.dim())):
        return None
    w = None if weight is None else weight.reshape(c)
    b = None if bias is None else bias.reshape(c)
    return GroupNormPasses(p, groups, w, b)


@dataclass(slots=True)
class GroupNormPasses:
    """``native_group_norm`` (G groups of channels per sample)."""

    p: Plan
    groups: int
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    device: str = "cpu"

    name = "aten"
    op = "group_norm"
    differentiable = True

    def rebind(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):  # noqa: ANN201
        """The same passes for another call of the same geometry (cached choice)."""
        w = None if weight is None else weight.reshape(-1)
        b = None if bias is None else bias.reshape(-1)
        return dataclasses.replace(self, weight=w, bias=b)

    def describe(self) -> str:
        return f"{self.device} (aten): native_group_norm"

    def forward(
        self, x: torch.Tensor, eps: float, center: bool, stats: bool = True, running: object = None
    ) -> Forward:
        n, c = x.shape[0], x.shape[1]
        hw = x.numel() // (n * c) if n * c else 0
        y, mean, rstd = torch.native_group_norm(
            x, self.weight, self.bias, n, c, hw, self.groups, eps
        )
        return y, (mean, rstd), *_stats(mean, rstd, eps, self.p, stats)

    def kernel(self) -> Kernel:
        """``torch.group_norm`` with this many groups, for a layer's eager route."""
        groups = self.groups
        return lambda x, w, b, eps: torch.group_norm(x, groups, w, b, eps)


#: With a gradient, ATen's channels-last group norm (forward+backward) still beat normlab's
#: kernel where groups hold at least this many channels and maps are small (2 threads,
#: float32: 32×256×14×14 with G = 32, 0.6 against 1.3 ms; 32×512×7×7 2.2×, 32×128×14×14
#: 3.6×); with 2 or 4 channels per group, or 28×28 maps, normlab's was up to 6× faster.
CL_GRAD_MIN_GROUP = 8
CL_GRAD_MAX_POSITIONS = 256


def _wide_groups_small_maps(x: torch.Tensor, group: int) -> bool:
    return group >= CL_GRAD_MIN_GROUP and x[0, 0].numel() <= CL_GRAD_MAX_POSITIONS


def _channels_last(x: torch.Tensor) -> bool:
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return x.dim() in formats and x.is_contiguous(memory_format=formats[x.dim()])


def _single_axes_after(p: Plan, start: int) -> bool:
    return all(len(members) == 1 for members in p.input_dims[start:])


def batch_norm(
    x: torch.Tensor, p: Plan, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> BatchNormPasses | None:
    """One kept input dim (the channels, anywhere but the first dim): ``native_batch_norm``."""
    if not (_single_axes(p) and len(p.kept) == 1 and x.dim() >= 2 and p.kept[0] != 0):
        return None
    dim = p.kept[0]
    c = x.shape[dim]
    if not (_per_channel(weight, c, dim, x.dim()) and _per_channel(bias, c, dim, x.dim())):
        return None
    w = None if weight is None else weight.reshape(c)
    b = None if bias is None else bias.reshape(c)
    return BatchNormPasses(p, dim, w, b)


@dataclass(slots=True)
class BatchNormPasses:
    """``native_batch_norm`` (one kept dim, the channels), with batch or given statistics.

    With `running` buffers in eager mode ATen updates them itself (unbiased variance),
    the optional running-buffer pass; no statistics come back then.
    """

    p: Plan
    dim: int
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    device: str = "cpu"

    name = "aten"
    op = "batch_norm"
    differentiable = True

    def rebind(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):  # noqa: ANN201
        """The same passes for another call of the same geometry (cached choice)."""
        w = None if weight is None else weight.reshape(-1)
        b = None if bias is None else bias.reshape(-1)
        return dataclasses.replace(self, weight=w, bias=b)

    def describe(self) -> str:
        return f"{self.device} (aten): native_batch_norm"

    def forward(
        self,
        x: torch.Tensor,
        eps: float,
        center: bool,
        stats: bool = True,
        running: Running | None = None,
    ) -> Forward:
        # Channels at dim 1 as ATen expects; a view, so channels-last memory stays as it is.
        xc = x.movedim(self.dim, 1)
        if self.fuses_running(x, running):
            rm, rv, factor = running  # type: ignore[misc]
            y, mean, invstd = torch.native_batch_norm(
                xc, self.weight, self.bias, rm, rv, True, factor, eps
            )
            return y.movedim(1, self.dim), (mean, invstd), None, None
        y, mean, invstd = torch.native_batch_norm(
            xc, self.weight, self.bias, None, None, True, 0.0, eps
        )
        return y.movedim(1, self.dim), (mean, invstd), *_stats(mean, invstd, eps, self.p, stats)

    def apply(
        self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        m, v = mean.detach().reshape(-1), var.detach().reshape(-1)
        xc = x.movedim(self.dim, 1)
        y = torch.native_batch_norm(xc, self.weight, self.bias, m, v, False, 0.0, eps)[0]
        return y.movedim(1, self.dim), ()

    def fuses_running(self, x: torch.Tensor, running: Running | None) -> bool:
        """Whether `forward` lets ATen update these running buffers itself."""
        return running is not None and _mixed_ok(x, *running[:2]) and running[0].dim() == 1


@dataclass(slots=True)
class InstanceNormPasses:
    """``instance_norm`` (ATen's: batch norm over a (1, N·C, ...) view), what torch.nn's
    InstanceNorm layers call; taken under torch.compile, where Inductor's code for it
    measured faster than for ``native_group_norm`` with G = C (docs/performance.md)."""

    p: Plan
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    device: str = "cpu"

    name = "aten"
    op = "instance_norm"
    differentiable = True

    def describe(self) -> str:
        return f"{self.device} (aten): instance_norm"

    def forward(
        self, x: torch.Tensor, eps: float, center: bool, stats: bool = True, running: object = None
    ) -> Forward:
        y = torch.instance_norm(x, self.weight, self.bias, None, None, True, 0.0, eps, False)
        if not stats:
            return y, (), None, None
        var, mean = torch.var_mean(
            x.to(_stats_dtype(x)), self.p.reduced, correction=0, keepdim=True
        )
        return y, (), mean.reshape(self.p.stats_shape), var.reshape(self.p.stats_shape)


def instance_norm(
    x: torch.Tensor, p: Plan, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> InstanceNormPasses | None:
    """Per sample and channel (dim 1) over every position: ``n c ... -> n c``, on
    contiguous data (its output is contiguous)."""
    if x.dim() < 3 or not _single_axes(p) or p.kept != (0, 1) or not x.is_contiguous():
        return None
    c = x.shape[1]
    if not (_per_channel(weight, c, 1, x.dim()) and _per_channel(bias, c, 1, x.dim())):
        return None
    w = None if weight is None else weight.reshape(c)
    b = None if bias is None else bias.reshape(c)
    return InstanceNormPasses(p, w, b)


def choose(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    grad: bool,
    anywhere: bool,
    cuda: bool = False,
    center: bool = True,
    small: bool = False,
) -> object:
    """The passes of the ATen kernel that computes this batch-statistics call exactly, or
    why none is taken.

    `small`: a CPU call below the kernels' size floor, where one ATen call beats the
    reference path's several even through a copy (LayerNorm2d on NCHW data).

    `anywhere`: take any exact kernel (small calls, CUDA, a forced backend). Otherwise
    only where it is the faster path, as measured on 2 cores (docs/performance.md):
    ATen's single-pass kernels beat the Numba kernels for layer norm over trailing dims
    and for group, instance and layer norm on contiguous NCHW data, and for batch norm
    on channels-last or half-precision data; the Numba kernels win for batch norm on
    NCHW float32/64, RMS norm, LayerNorm2d and every per-sample norm on channels-last
    data (where ATen makes a contiguous copy).
    """
    from normlab.kernels.backends import available

    half = x.dtype in (torch.bfloat16, torch.float16)
    inference = not grad
    if not center:
        if not anywhere:
            # torch's rms_norm is several ops on the CPU (no fused kernel), the Numba one
            return "RMS norm at kernel sizes: the Numba kernel makes one pass"
        rms = rms_norm(x, p, weight, bias)
        return rms if rms is not None else "no ATen kernel for this RMS norm (trailing dims only)"
    if cuda and not _same_dtype(x, weight, bias):
        # CUDA's layer and group norm kernels take parameters of the input's dtype only
        # ("expected scalar type BFloat16 but found Float"; with a cast, bfloat16 instance
        # norm measured 17× the reference path's error on an H200): batch norm alone here.
        passes = batch_norm(x, p, weight, bias)
        return (
            passes if passes is not None else "CUDA's layer/group norm: parameters in another dtype"
        )
    passes = layer_norm(x, p, weight, bias)
    if passes is not None:
        affine = weight is not None or bias is not None
        if half and affine and grad and not cuda and available("numba"):
            # ATen's half-precision layer norm accumulates γ and β gradients too coarsely
            # on the CPU (4-9% off the float64 sums in a test here): its forward, and the
            # Numba kernel's backward.
            return ForwardOnly(passes, weight, bias)
        return passes
    passes = group_norm(x, p, weight, bias, inference or anywhere)
    if passes is not None and (anywhere or not cuda):
        if cuda and not x.is_contiguous():
            return "channels-last group norm on CUDA: ATen copies it"
        return passes
    passes = batch_norm(x, p, weight, bias)
    if passes is None:
        copied = layer_norm(x, p, weight, bias, copy=True) if small else None
        if copied is not None:
            return copied
        return f"pattern '{p.pattern.text}' is not one of ATen's (batch, group, layer norm)"
    channels_first = x.movedim(p.kept[0], 1).is_contiguous()
    if anywhere or half or not channels_first:
        return passes
    if not available("numba"):
        return passes
    return "batch norm on channels-first float data: the Numba kernel is measured faster"


@dataclass(slots=True)
class ForwardOnly:
    """ATen's forward and the Numba kernel's backward (half-precision layer norm)."""

    forward_passes: LayerNormPasses
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    name = "aten"
    op = "layer_norm"

    def describe(self) -> str:
        return "cpu (aten forward, numba backward): native_layer_norm"

    def rebind(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):  # noqa: ANN201
        """The same passes for another call of the same geometry (cached choice)."""
        fp = self.forward_passes.rebind(x, weight, bias)
        return dataclasses.replace(self, forward_passes=fp, weight=weight, bias=bias)

    def forward(
        self, x: torch.Tensor, eps: float, center: bool, stats: bool = True, running: object = None
    ) -> Forward:
        from normlab.kernels.canonical import stats_from_plan

        y, _, mean, var = self.forward_passes.forward(x, eps, center, True)
        numba = self._numba(x)
        c, p = numba.canon, self.forward_passes.p
        m = stats_from_plan(mean, p, c)
        r = torch.rsqrt(stats_from_plan(var.double(), p, c) + eps).to(m.dtype)
        return y, (m, r), *((mean, var) if stats else (None, None))

    def backward(
        self,
        x: torch.Tensor,
        gy: torch.Tensor,
        saved: tuple[torch.Tensor, ...],
        batch: bool,
        center: bool,
        needs: tuple[bool, bool, bool],
    ) -> Grads:
        return self._numba(x).backward(x, gy, saved, batch, center, needs)

    def _numba(self, x: torch.Tensor):  # noqa: ANN202
        from normlab.kernels.numba_passes import NumbaPasses, prepare

        p = self.forward_passes.p
        prep = prepare(x, p, self.weight, self.bias)
        if isinstance(prep, str):  # pragma: no cover - a trailing layer norm always fits
            raise RuntimeError(prep)
        return NumbaPasses(prep, p)
