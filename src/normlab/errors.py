"""The exception types normlab raises, and the checks shared by every layer."""

from __future__ import annotations

import torch


class PatternError(ValueError):
    """A pattern that cannot be parsed, or that does not fit the input's shape.

    Example:
        >>> normlab.normalize(torch.randn(2, 3), "n c h w -> c")  # doctest: +SKIP
        PatternError: expected 4 axes ... got input of shape (2, 3)
    """


def check_floating(x: object, who: str) -> torch.Tensor:
    """Return `x` if it is a floating-point tensor, else raise TypeError saying what came."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point tensor, got dtype {x.dtype}")
    return x
