"""Kernels behind the engine: the reference path and the fast paths, chosen by `dispatch`.

Example:
    >>> with normlab.kernels.use_reference():  # plain PyTorch ops, double backward
    ...     y = normlab.normalize(x, "n c h w -> c")
    >>> with normlab.kernels.use_backend("numba", threads=3):  # the Numba kernels, any size
    ...     y = normlab.normalize(x, "n c h w -> c")
"""

from normlab.kernels.dispatch import (
    explain_dispatch,
    set_native,
    set_reference,
    use_backend,
    use_reference,
)
from normlab.kernels.transforms import transform

__all__ = [
    "explain_dispatch",
    "set_native",
    "set_reference",
    "transform",
    "use_backend",
    "use_reference",
]
