"""Kernels behind the engine: the reference path and the fast paths, chosen by `dispatch`.

Example:
    >>> with normlab.kernels.use_reference():  # plain PyTorch ops, double backward
    ...     y = normlab.normalize(x, "n c h w -> c")
"""

from normlab.kernels.dispatch import explain_dispatch, set_native, set_reference, use_reference

__all__ = ["explain_dispatch", "set_native", "set_reference", "use_reference"]
