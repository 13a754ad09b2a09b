"""Which PyTorch transform, if any, is tracing the current call.

The dispatcher takes the path each transform can see (:mod:`normlab.kernels.dispatch`):
eager calls reach the kernels directly; ``torch.export``, ``torch.func``, ``torch.fx``
and ``torch.jit`` tracing get the reference decomposition (ATen operators only).

Example:
    >>> transform()
    'eager'
"""

from __future__ import annotations

import torch

MODES = ("eager", "compile", "export", "func", "fx", "jit")


def transform(*tensors: torch.Tensor | None) -> str:
    """``"eager"``, or the transform tracing this call: ``"export"``, ``"compile"``,
    ``"func"`` (a functorch-wrapped tensor among `tensors`), ``"fx"`` (a
    ``torch.fx.Proxy`` among them) or ``"jit"`` (``torch.jit.trace``).

    Example:
        >>> transform(torch.randn(2))
        'eager'
    """
    if torch.compiler.is_compiling():
        exporting = getattr(torch.compiler, "is_exporting", None)
        return "export" if exporting is not None and exporting() else "compile"
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return "jit"
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, torch.fx.Proxy):
            return "fx"
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return "func"
    return "eager"
