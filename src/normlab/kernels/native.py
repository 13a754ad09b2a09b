"""torch's own fused kernels, for the patterns one of them computes exactly.

Where ATen has a single-pass kernel for a pattern (layer norm over trailing dims,
group norm on contiguous NCHW data, batch norm in any layout) and it measures faster
than normlab's Numba kernel, the dispatcher uses it: `normlab` is then as fast as
`torch.nn` there, and every other pattern keeps its own kernel. Each recognizer checks
the plan's geometry, not the caller's name for it, so any pattern that *is* one of
these normalizations gets the native kernel. Autograd (and double backward) come with
the ATen ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from normlab.pattern import Plan

# A prepared call: run(stats) -> (y, mean, var), the statistics None unless `stats`.
Native = Callable[[bool], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]

#: Running buffers a batch-norm kernel may update itself: (mean, var, weight of the batch).
Running = tuple[torch.Tensor, torch.Tensor, float]

#: The choice whose backward normlab's own kernel computes (ATen's forward only).
FORWARD_ONLY = "layer_norm_forward"


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
    var = (rstd.double().pow(-2) - eps).clamp(min=0).to(rstd.dtype)
    if inverse is not None:
        mean, var = mean.permute(inverse), var.permute(inverse)
    return mean.reshape(p.stats_shape), var.reshape(p.stats_shape)


def _mixed_ok(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """ATen's CPU kernels take parameters of the input's dtype, or float32 beside half input."""
    allowed = {x.dtype, torch.float32} if x.dtype in (torch.bfloat16, torch.float16) else {x.dtype}
    return all(t is None or t.dtype in allowed for t in params)


def layer_norm(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> Native | None:
    """Sets that are the trailing dims *in memory order*: ``native_layer_norm`` on a view.

    ``... d -> ...`` on contiguous data, and also LayerNorm2d (``n c h w -> n h w``) on
    channels-last data, whose channels are contiguous: permuted to memory order, both
    are a layer norm over the last dims, with no copy.
    """
    k = len(p.reduced)
    if not _single_axes(p) or k == 0 or k == x.dim():
        return None
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))  # outermost first
    xm = x.permute(order)
    if not xm.is_contiguous() or set(order[-k:]) != set(p.reduced):
        return None
    trailing = tuple(xm.shape[-k:])
    params = [_trailing_affine(t, order, trailing, x.dim()) for t in (weight, bias)]
    if any(t is False for t in params):
        return None
    inverse = sorted(range(x.dim()), key=order.__getitem__)

    def run(stats: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        y, mean, rstd = torch.native_layer_norm(xm, trailing, *params, eps)
        return y.permute(inverse), *_stats(mean, rstd, eps, p, stats, inverse)

    return run


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
    eps: float,
    inference: bool = False,
) -> Native | None:
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

    def run(stats: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        n = x.shape[0]
        y, mean, rstd = torch.native_group_norm(x, w, b, n, c, x[0, 0].numel(), groups, eps)
        return y, *_stats(mean, rstd, eps, p, stats)

    return run


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
    x: torch.Tensor, p: Plan, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> Native | None:
    """One kept input dim (the channels, anywhere but the first dim): ``native_batch_norm``."""
    if not (_single_axes(p) and len(p.kept) == 1 and x.dim() >= 2 and p.kept[0] != 0):
        return None
    dim = p.kept[0]
    c = x.shape[dim]
    if not (_per_channel(weight, c, dim, x.dim()) and _per_channel(bias, c, dim, x.dim())):
        return None
    w = None if weight is None else weight.reshape(c)
    b = None if bias is None else bias.reshape(c)

    def run(
        stats: bool, running: Running | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # Channels at dim 1 as ATen expects; a view, so channels-last memory stays as it is.
        xc = x.movedim(dim, 1)
        if running is not None and _mixed_ok(x, *running[:2]) and running[0].dim() == 1:
            # ATen updates the buffers itself (unbiased variance): no statistics come back
            rm, rv, factor = running
            y = torch.native_batch_norm(xc, w, b, rm, rv, True, factor, eps)[0]
            return y.movedim(1, dim), None, None
        y, mean, invstd = torch.native_batch_norm(xc, w, b, None, None, True, 0.0, eps)
        return y.movedim(1, dim), *_stats(mean, invstd, eps, p, stats)

    return run


def choose(
    x: torch.Tensor,
    p: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
) -> tuple[str, Native] | None:
    """(name, thunk) of the ATen kernel that computes this call exactly, where it is the faster path.

    Measured on 2 cores (docs/performance.md): ATen's single-pass kernels beat the Numba
    kernels for layer norm over trailing dims and for group, instance and layer norm on
    contiguous NCHW data, and for batch norm on channels-last or half-precision data; the
    Numba kernels win for batch norm on NCHW float32/64, RMS norm, LayerNorm2d and every
    per-sample norm on channels-last data (where ATen makes a contiguous copy).
    """
    if not center or x.device.type != "cpu" or not _mixed_ok(x, weight, bias):
        return None
    half = x.dtype in (torch.bfloat16, torch.float16)
    tensors = [t for t in (x, weight, bias) if t is not None]
    inference = not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    run = layer_norm(x, p, weight, bias, eps)
    if run is not None:
        # ATen's half-precision layer norm accumulates γ and β gradients too coarsely (4-9%
        # off the float64 sums in a test here): with an affine and a gradient to come, its
        # forward is used and normlab's kernel computes the backward.
        affine = weight is not None or bias is not None
        return (FORWARD_ONLY if half and affine and not inference else "layer_norm"), run
    run = group_norm(x, p, weight, bias, eps, inference)
    if run is not None:
        return "group_norm", run
    run = batch_norm(x, p, weight, bias, eps)
    channels_first = run is not None and x.movedim(p.kept[0], 1).is_contiguous()
    if run is not None and (half or not channels_first):
        return "batch_norm", run
    return None
