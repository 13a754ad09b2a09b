"""Appearance shifts applied to test images only (never seen in training).

IBN-Net's claim: instance normalization in the shallow layers removes appearance
variation (brightness, contrast, style), so a network with it keeps its accuracy
when the test images look different. Each shift maps images in [0, 1] to [0, 1].

Example:
    >>> shifted = SHIFTS["contrast"](torch.rand(2, 1, 16, 16))
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def brightness(x: torch.Tensor, delta: float = 0.4) -> torch.Tensor:
    """Add `delta` to every pixel (clipped to [0, 1])."""
    return (x + delta).clamp(0.0, 1.0)


def contrast(x: torch.Tensor, factor: float = 0.3) -> torch.Tensor:
    """Scale each image's deviations from its own mean by `factor`."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0.0, 1.0)


def gamma(x: torch.Tensor, exponent: float = 2.5) -> torch.Tensor:
    """Raise every pixel to `exponent` (> 1 darkens the mid-tones)."""
    return x.clamp(0.0, 1.0).pow(exponent)


def invert(x: torch.Tensor) -> torch.Tensor:
    """Intensity inversion: 1 - x."""
    return 1.0 - x


def noise(x: torch.Tensor, std: float = 0.2, seed: int = 0) -> torch.Tensor:
    """Add Gaussian noise of standard deviation `std` (fixed seed: the same noise each call)."""
    generator = torch.Generator().manual_seed(seed)
    added = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return (x + std * added).clamp(0.0, 1.0)


SHIFTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "brightness": brightness,
    "contrast": contrast,
    "gamma": gamma,
    "invert": invert,
    "noise": noise,
}
SHIFT_LABELS = {
    "brightness": "brightness +0.4",
    "contrast": "contrast ×0.3",
    "gamma": "gamma 2.5",
    "invert": "inverted",
    "noise": "noise σ=0.2",
}
