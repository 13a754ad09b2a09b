"""Which of PyTorch's program transforms is looking at a call, if any.

The kernels (Numba, Triton) run on real data only; a transform that traces or
rewrites the program sees the reference path instead, plain ATen operations it
can follow: exported graphs (``torch.export``, ONNX) then hold standard operators
only and run where normlab is not installed, ``torch.func`` differentiates and
batches them, and ``torch.compile`` fuses them with their neighbours.

Example:
    >>> transform()
    'eager'
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import Proxy

#: The answers of :func:`transform`.
TRANSFORMS = ("eager", "compile", "export", "func", "fx", "jit")
MODES = TRANSFORMS


def transform(*tensors: object) -> str:
    """The transform tracing this call: "eager" when none.

    "compile" (dynamo tracing), "export" (``torch.export``, ONNX ``dynamo=True``), "fx"
    (a ``torch.fx`` Proxy among `tensors`), "jit" (``torch.jit.trace``, which the legacy
    ONNX exporter uses), "func" (a ``torch.func`` transform such as ``grad`` or
    ``vmap``), "compile" again for fake tensors met outside dynamo, else "eager". Cheap
    in eager (about a microsecond): every normalization asks.

    Example:
        >>> transform(torch.zeros(2))
        'eager'
    """
    if torch.compiler.is_compiling():  # a constant to dynamo; also set under export
        return "export" if torch.compiler.is_exporting() else "compile"
    for t in tensors:
        if isinstance(t, Proxy):
            return "fx"
    if torch._C._is_tracing():
        return "jit"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "func"
    for t in tensors:
        if isinstance(t, FakeTensor):
            return "compile"
    return "eager"


def traced(*tensors: object) -> bool:
    """True under any transform (the reference path's calls; no kernels, no size branches)."""
    return transform(*tensors) != "eager"


def fx_leaf(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Make a layer's ``forward`` record itself as one call under ``torch.fx`` tracing.

    torch.nn's norms are leaves of ``torch.fx.symbolic_trace`` (by their module path);
    a normlab layer reads its input's shape to resolve its pattern, which a Proxy
    cannot give, so under tracing it adds a ``call_module`` node for itself instead:
    the traced module calls the layer, as it calls torch.nn's.

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNorm2d(8)))
    """

    @functools.wraps(forward)
    def traced_forward(self: torch.nn.Module, x: object, *args: object, **kwargs: object) -> Any:
        if isinstance(x, Proxy):
            tracer = x.tracer
            try:
                path = tracer.path_of_module(self)
            except NameError:
                path = ""
            if not path:
                raise TypeError(
                    f"torch.fx: expected {type(self).__name__} inside the traced model, got it "
                    "as the model itself; trace a model that holds it "
                    "(e.g. nn.Sequential(layer)), where it appears as one call"
                )
            return tracer.create_proxy("call_module", path, (x, *args), kwargs)
        return forward(self, x, *args, **kwargs)

    return traced_forward
