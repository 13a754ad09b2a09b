"""Eager routes: a layer's call resolved once per input geometry, then one ATen call.

On a small input a normalization costs its fixed overhead: the input checks, the
pattern's plan, the parameters' views and the dispatcher's choice are 20–50 µs of
Python, where torch.nn's layers spend 5–13 µs. When the dispatcher sends a layer's call
to one of ATen's kernels whatever the gradient (every small input it can, layer norm
over trailing dims at any size), the layer keeps a *route* for the input's geometry
(shape, strides, dtype, device, training mode): a function that calls that kernel with
the layer's current parameters and buffers, as torch.nn's forward does. The next call
of the same geometry takes it after one dictionary look-up, with the same result as
the full path (the same kernel, the same arguments).

Routes hold in plain eager mode only: under a transform (compile, export, torch.func,
jit tracing), autocast, a tensor subclass, or any dispatcher switch
(:func:`~normlab.kernels.dispatch.defaults_in_force`), the layer takes its full path.
A layer drops its routes when it is moved or cast (``.to()``, ``.half()``) or when an
attribute is assigned (a new weight, eps, momentum).

Example:
    >>> layer = normlab.BatchNorm2d(16)
    >>> y = layer(torch.randn(2, 16, 8, 8))  # resolves and keeps the route
    >>> y = layer(torch.randn(2, 16, 8, 8))  # takes it
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from normlab.kernels.aten import GroupNormPasses, LayerNormPasses, RmsNormPasses
from normlab.kernels.dispatch import defaults_in_force

#: A resolved call: ``route(layer, x) -> y``.
Route = Callable[[nn.Module, torch.Tensor], torch.Tensor]

_MAX_ROUTES = 64  # geometries kept per layer (a dynamic-shape workload refills them)


def _plain_eager(x: object) -> bool:
    return (
        not torch.compiler.is_compiling()  # first: a constant to dynamo
        and type(x) is torch.Tensor  # not a Proxy (torch.fx), a fake or another subclass
        and not torch._C._is_tracing()
        and not torch._C._are_functorch_transforms_active()
        and not torch._C._is_any_autocast_enabled()
        and defaults_in_force()
    )


def forward(layer: nn.Module, x: torch.Tensor, full: Route, route_for: Callable) -> torch.Tensor:
    """A routed layer's forward: its route for `x`'s geometry, else ``full(layer, x)`` (the
    full path, every check included), after which ``route_for(x)`` (the layer's route,
    or None) is kept for this geometry; without one the full path is kept, so each
    geometry is resolved once."""
    eager = _plain_eager(x)
    if eager:
        table = layer.__dict__.get("_routes")
        if table is not None:
            route = table.get((x.shape, x.stride(), x.dtype, x.device, layer.training))
            if route is not None:
                return route(layer, x)
    y = full(layer, x)  # raises for bad input: only checked geometries get a route
    if eager:
        table = layer.__dict__.setdefault("_routes", {})
        if len(table) >= _MAX_ROUTES:
            table.clear()
        key = (x.shape, x.stride(), x.dtype, x.device, layer.training)
        table[key] = route_for(x) or full
    return y


class Routed:
    """Mixin of layers with eager routes: drop them whenever the layer changes."""

    def _apply(self, fn: Callable, *args: object, **kwargs: object) -> nn.Module:
        self.__dict__.pop("_routes", None)
        return super()._apply(fn, *args, **kwargs)

    def __setattr__(self, name: str, value: object) -> None:
        if name != "training":  # train()/eval() switch modes; the key holds the mode
            self.__dict__.pop("_routes", None)
        super().__setattr__(name, value)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_routes", None)  # closures: neither pickled nor copied
        return state


def kernel_route(passes: object, eps: float | None = None) -> Route | None:
    """ATen's group, layer or RMS norm with the layer's own weight and bias (`eps`: fixed,
    else the layer's), where the full path takes that kernel; else None.

    The layer's parameters are what these kernels take as they are: per channel for
    group norm (GroupNorm, InstanceNorm as G = C), of the trailing shape for layer and
    RMS norm (the recognizers accept no other affine, see :mod:`normlab.kernels.aten`).
    """
    if not isinstance(passes, (GroupNormPasses, LayerNormPasses, RmsNormPasses)):
        return None
    kernel = passes.kernel()
    if isinstance(passes, RmsNormPasses):  # no bias
        if eps is not None:
            return lambda m, x: kernel(x, m.weight, None, eps)
        return lambda m, x: kernel(x, m.weight, None, m.eps)
    if eps is not None:
        return lambda m, x: kernel(x, m.weight, m.bias, eps)
    return lambda m, x: kernel(x, m.weight, m.bias, m.eps)
