"""Where a layer's statistics come from: the batch in training, running estimates in eval.

torch's semantics: the buffer keeps the *unbiased* batch variance, normalization uses the
biased one; running = (1 − momentum)·running + momentum·batch; ``momentum=None`` is a
cumulative average over ``num_batches_tracked`` batches (for every layer here, instance
norm included). Checkpoints without ``num_batches_tracked`` load.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from normlab.kernels.transforms import transform
from normlab.layers.checks import check_training_batch
from normlab.moments import Moments
from normlab.normalize import normalize_batch, normalize_with
from normlab.pattern import Plan

ToRunning = Callable[[Moments], tuple[torch.Tensor, torch.Tensor]]


def batch_to_running(m: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch norm: the set's mean and unbiased variance go to the buffers as they are."""
    return m.mean, m.unbiased_var()


def add_missing_counter(module: torch.nn.Module, state_dict: dict, prefix: str) -> None:
    """Older checkpoints (and other libraries) have no ``num_batches_tracked``: start the
    counter at 0, as torch's batch norm does, instead of refusing the checkpoint."""
    key = prefix + "num_batches_tracked"
    if getattr(module, "num_batches_tracked", None) is not None and key not in state_dict:
        state_dict[key] = torch.tensor(0, dtype=torch.long)


def empty_batch(
    module: torch.nn.Module,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The output for an input with no elements, as torch's batch norm gives it.

    An empty batch (a detection head with no proposals) has no statistics: the running
    buffers stay as they are, but in training the batch is still counted
    (``num_batches_tracked`` += 1, as ``torch.nn.BatchNorm2d`` does). The output is the
    empty input through the affine, so that the affine parameters get (zero) gradients.
    """
    counter = getattr(module, "num_batches_tracked", None)
    if module.training and getattr(module, "track_running_stats", True) and counter is not None:
        with torch.no_grad():
            counter.add_(1)
    y = x.clone()  # keeps the memory format
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


class RunningStatsMixin:
    """Forward for layers with optional running statistics (batch norm, instance norm).

    Subclasses set ``_one_value`` (the error's wording) and call :meth:`_forward_tracked`.
    """

    _one_value = "value per channel"

    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def _forward_tracked(
        self,
        x: torch.Tensor,
        batch_plan: Plan,
        running_plan: Plan,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        to_running: ToRunning = batch_to_running,
    ) -> torch.Tensor:
        if not self._uses_batch_stats():
            return normalize_with(
                x, running_plan, self.running_mean, self.running_var, weight, bias, self.eps
            )
        if x.numel() == 0:
            return empty_batch(self, x, weight, bias)
        check_training_batch(self, x, batch_plan.set_size, self._one_value)
        tracking = self.training and self.track_running_stats
        running = None
        fused = to_running is batch_to_running and batch_plan is running_plan
        mode = transform(x)
        # under compile only with a fixed momentum (a cumulative average reads the counter)
        updates = mode == "eager" or (mode == "compile" and self.momentum is not None)
        if tracking and fused and updates:
            # batch norm: a kernel may update the buffers as it goes (ATen's does)
            running = (self.running_mean, self.running_var, self._factor(1))
        y, batch = normalize_batch(x, batch_plan, weight, bias, self.eps, running=running)
        if tracking:
            if batch is None:  # the kernel updated the buffers
                self.num_batches_tracked.add_(1)
            else:
                self._update_running(*to_running(batch))
        return y

    def _factor(self, ahead: int = 0) -> float:
        """The weight of the batch in the running update (`ahead` batches not yet counted)."""
        if self.momentum is None:  # a cumulative average
            return 1.0 / (float(self.num_batches_tracked) + ahead)
        return float(self.momentum)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # a tensor, not float(): no data-dependent Python value
            factor = self.num_batches_tracked.reciprocal().to(self.running_mean.dtype)
        else:
            factor = float(self.momentum)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        add_missing_counter(self, state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
