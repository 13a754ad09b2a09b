"""Layer normalization and RMS normalization: statistics per position over features.

``LayerNorm(normalized_shape)`` normalizes the trailing dims (``... d -> ...``), as
torch's; with ``channel_axis=1`` it normalizes over the channels of NCHW data without
permutes (``n c ... -> n ...``), which is what :class:`LayerNorm2d` is (the ConvNeXt
layer — not ``GroupNorm(1, C)``, which normalizes over C, H and W together).
RMS norm is the same pattern without centering.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.kernels.dispatch import eager_kernel
from normlab.kernels.transforms import fx_leaf
from normlab.layers import routes
from normlab.layers.checks import (
    channel_view,
    check_channel_axis,
    check_input,
    check_positive_int,
    describe,
)
from normlab.moments import stats_dtype
from normlab.normalize import normalize_plan
from normlab.pattern import plan


class _FeatureNormForward(routes.Routed):
    """Shared forward of LayerNorm and RMSNorm; `center` tells them apart."""

    center = True

    def _setup(self, channel_axis: int) -> None:
        self.channel_axis = check_channel_axis(channel_axis)
        if channel_axis != -1 and len(self.normalized_shape) != 1:
            raise ValueError(
                f"{type(self).__name__}: channel_axis={channel_axis} normalizes one axis, so expected "
                f"an int normalized_shape, got {self.normalized_shape}"
            )

    def pattern(self) -> str:
        """The statistics pattern of this layer (any input rank)."""
        if self.channel_axis == 1:
            return "n c ... -> n ..."
        names = " ".join(f"d{i}" for i in range(len(self.normalized_shape)))
        return f"... {names} -> ..."

    def _eps(self, x: torch.Tensor) -> float:
        return self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routes.forward(self, x, _FeatureNormForward._full_forward, self._route)

    @fx_leaf
    def _full_forward(self, x: torch.Tensor) -> torch.Tensor:
        p, weight, bias = self._resolve(x)
        return normalize_plan(x, p, weight, bias, self._eps(x), self.center)

    def _route(self, x: torch.Tensor) -> routes.Route | None:
        p, weight, bias = self._resolve(x)
        eps = self._eps(x)  # fixed for the route's dtype (RMSNorm's eps=None depends on it)
        return routes.kernel_route(eager_kernel(x, p, weight, bias, eps, self.center), eps)

    def _resolve(self, x: torch.Tensor) -> tuple:
        weight = getattr(self, "weight", None)
        bias = getattr(self, "bias", None)
        if self.channel_axis == 1:
            check_input(self, x, None, self.normalized_shape[0], 1)
            weight, bias = channel_view(weight, x.dim(), 1), channel_view(bias, x.dim(), 1)
        else:
            dims = len(self.normalized_shape)
            check_input(self, x, None, None, -1, min_rank=dims)
            if tuple(x.shape[x.dim() - dims :]) != tuple(self.normalized_shape):
                raise ValueError(
                    f"{describe(self)}: expected input of shape "
                    f"(*, {', '.join(map(str, self.normalized_shape))}), got {tuple(x.shape)}"
                )
        return plan(self.pattern(), x.shape), weight, bias

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra + (f", channel_axis={self.channel_axis}" if self.channel_axis != -1 else "")


class LayerNorm(_FeatureNormForward, nn.LayerNorm):
    """Drop-in ``torch.nn.LayerNorm``; ``channel_axis=1`` normalizes NCHW channels in place.

    Example:
        >>> LayerNorm(768)(torch.randn(2, 16, 768)).shape
        torch.Size([2, 16, 768])
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...] | list[int] | torch.Size,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channel_axis: int = -1,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._setup(channel_axis)


class LayerNorm2d(LayerNorm):
    """ConvNeXt's LayerNorm2d: per sample and position over C, with per-channel γ and β.

    Keys ``weight`` and ``bias`` of shape (C,), like timm's. Any rank (N, C, ...).

    Example:
        >>> LayerNorm2d(64)(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64, 7, 7])
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        affine: bool = True,
        *,
        channel_axis: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive_int(num_channels, "LayerNorm2d", "num_channels")
        super().__init__(
            num_channels, eps, affine, affine, device, dtype, channel_axis=channel_axis
        )


class RMSNorm(_FeatureNormForward, nn.RMSNorm):
    """Drop-in ``torch.nn.RMSNorm``: x / sqrt(mean(x²) + eps) · γ; ``eps=None`` uses the eps of
    the computation dtype (float32's for half and float32 input, float64's for float64).

    Example:
        >>> RMSNorm(768)(torch.randn(2, 16, 768)).shape
        torch.Size([2, 16, 768])
    """

    center = False

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...] | list[int] | torch.Size,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channel_axis: int = -1,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self._setup(channel_axis)

    def _eps(self, x: torch.Tensor) -> float:
        # torch.nn.RMSNorm: eps=None is the eps of the computation (opmath) dtype, float32
        # for float16/bfloat16/float32 input, float64 for float64
        return torch.finfo(stats_dtype(x.dtype)).eps if self.eps is None else self.eps
