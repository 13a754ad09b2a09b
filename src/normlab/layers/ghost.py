"""Ghost batch normalization: batch norm whose statistics come from slices of the batch.

A training batch of N = g·m samples is split into g "ghost batches" of m consecutive
samples, and each is normalized with its own statistics: pattern ``(g m) c ... -> g c``
(``(g m) ... c -> g c`` channels-last). The weights, the output of eval mode and the
state are batch norm's; the running estimates are updated once per step with the
ghost batches' mean and unbiased variance averaged over the g ghosts (what a batch
norm trained at batch m would average over g steps). A batch of at most `ghost_size`
samples is one ghost batch: plain batch norm.

Changing `ghost_size` at a fixed batch size changes only how many companions each
sample's statistics depend on, nothing else of the training: the control for whether
batch norm's noise helps.
"""

from __future__ import annotations

import torch

from normlab.layers.batchnorm import BatchNorm
from normlab.layers.checks import channel_view, check_input, describe
from normlab.normalize import normalize_batch
from normlab.pattern import plan


class GhostBatchNorm(BatchNorm):
    """Batch norm over ghost batches of `ghost_size` samples in training; batch norm in eval.

    Example:
        >>> layer = GhostBatchNorm(16, ghost_size=4)
        >>> layer(torch.randn(32, 16, 5, 5)).shape  # 8 ghost batches of 4
        torch.Size([32, 16, 5, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        ghost_size: int = 4,
        bias: bool = True,
        channel_axis: int = 1,
    ) -> None:
        if isinstance(ghost_size, bool) or not isinstance(ghost_size, int) or ghost_size < 1:
            raise ValueError(
                f"GhostBatchNorm: expected ghost_size a positive int, got {ghost_size!r}"
            )
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            channel_axis=channel_axis,
        )
        self.ghost_size = ghost_size

    def ghost_pattern(self) -> str:
        """The statistics pattern in training (size ``g``: the number of ghost batches);
        `pattern()` is batch norm's (eval mode, or a batch of one ghost)."""
        return "(g m) c ... -> g c" if self.channel_axis == 1 else "(g m) ... c -> g c"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._uses_batch_stats() or x.dim() < 1 or x.shape[0] <= self.ghost_size:
            return super().forward(x)
        axis = check_input(self, x, None, self.num_features, self.channel_axis)
        n = x.shape[0]
        if n % self.ghost_size:
            raise ValueError(
                f"{describe(self)}: expected a batch size that is a multiple of ghost_size="
                f"{self.ghost_size}, got input of shape {tuple(x.shape)}"
            )
        p = plan(self.ghost_pattern(), x.shape, g=n // self.ghost_size)
        if self.training and p.set_size <= 1:
            raise ValueError(
                f"{describe(self)}: expected more than 1 value per channel in each ghost batch "
                f"when training, got input of shape {tuple(x.shape)}"
            )
        weight = channel_view(self.weight, x.dim(), axis)
        bias = channel_view(self.bias, x.dim(), axis)
        y, ghosts = normalize_batch(x, p, weight, bias, self.eps)
        if self.training and self.track_running_stats and ghosts is not None:
            # kept axes (g, c): average the ghosts' estimates, one update per step
            self._update_running(ghosts.mean.mean(0), ghosts.unbiased_var().mean(0))
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ghost_size={self.ghost_size}"
