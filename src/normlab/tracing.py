"""torch.fx tracing that keeps every normlab layer as one call.

A normlab layer's forward reads its input's shape to resolve its pattern, which an fx
proxy cannot give; as a leaf, the layer appears in the graph as a single module call,
which is also what the model tools want to see.
"""

from __future__ import annotations

from torch import fx, nn


class NormTracer(fx.Tracer):
    """Tracer whose leaves are torch.nn's modules and normlab's layers.

    Example:
        >>> graph_module = trace(model)  # doctest: +SKIP
    """

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("normlab.") or super().is_leaf_module(m, qualname)


def trace(module: nn.Module, tracer: fx.Tracer | None = None) -> fx.GraphModule:
    """A GraphModule of `module` traced with `tracer` (a :class:`NormTracer` by default)."""
    tracer = tracer or NormTracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)
