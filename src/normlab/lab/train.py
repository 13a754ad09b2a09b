"""One training run: a model, a norm, a batch size, a seed -> one result record.

The GN paper's protocol: every batch size trains for the same number of epochs, with the
learning rate scaled linearly with the batch size (``lr = base_lr * batch_size / 32``),
SGD with momentum and a cosine decay. Runs are deterministic: the seed fixes the
initial weights and the order of the data, and deterministic algorithms are used.

Under ``torchrun`` (a process group is initialized) the model is wrapped in
DistributedDataParallel and each process takes its slice of every global batch, so the
global batch is `batch_size` whatever the number of processes; plain batch norm then
sees ``batch_size / world_size`` images, ``syncbn`` all of them.

Example:
    >>> config = RunConfig(norm="gn", batch_size=8, epochs=1)
    >>> record = train_run(config, load_data("digits"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from normlab.lab.data import ImageData
from normlab.lab.models import build_model
from normlab.lab.noise import noise_record
from normlab.lab.shifts import SHIFTS
from normlab.lab.weightnorm import INIT_IMAGES, init_weight_norm, weight_normed

REFERENCE_BATCH = 32  # the batch size at which lr == base_lr


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's numbers; its `key` names the run's result file."""

    norm: str
    batch_size: int
    epochs: int
    seed: int = 0
    model: str = "cnn"
    data: str = "digits"
    limit: int | None = None
    width: int | None = None
    depth: int | None = None
    base_lr: float = 0.1
    weight_decay: float = 5e-4
    world_size: int = 1
    probes: int = 0  # > 0: measure batch noise with this many probes (see lab.noise)
    companions: int = 0  # companion batches per probe

    def key(self) -> str:
        """A file-name-safe key: readable prefix plus a hash of every field."""
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{self.model}-{self.norm}-b{self.batch_size}-s{self.seed}-{digest[:10]}"


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def deterministic(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch and ask for deterministic kernels (cheap on CPU; warn-only on CUDA);
    the caller's random state and determinism setting are restored afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Fraction of `x` classified as `y`, in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch):
        logits = model(x[start : start + batch])
        correct += int((logits.argmax(1) == y[start : start + batch]).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def shifted_accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy on the test set under every shift in `SHIFTS`."""
    return {name: accuracy(model, shift(x), y) for name, shift in SHIFTS.items()}


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # Depends on (seed, epoch) only, never on global RNG state: resumable and rank-agnostic.
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator)


def train_run(
    config: RunConfig, data: ImageData, device: str | torch.device = "cpu", progress: object = None
) -> dict:
    """Train one configuration and return its record (accuracy, shifts, curves, timing).

    `progress`: an object with ``update(n)`` (a tqdm bar) told of every finished step.
    """
    device = torch.device(device)
    _, world_size = world()
    batch = config.batch_size
    if batch < 1 or batch % world_size:
        raise ValueError(
            f"batch size: expected a positive multiple of the {world_size} processes, got {batch}"
        )
    n_train = len(data.x_train)
    if n_train < batch:
        raise ValueError(
            f"batch size: expected at most {n_train} (the training images), got {batch}"
        )
    with deterministic(config.seed, device):
        return _train(config, data, device, progress)


def _train(config: RunConfig, data: ImageData, device: torch.device, progress: object) -> dict:
    rank, world_size = world()
    batch = config.batch_size
    local = batch // world_size
    n_train = len(data.x_train)
    model = build_model(
        config.model,
        config.norm,
        image_shape=data.image_shape,
        num_classes=data.num_classes,
        width=config.width,
        depth=config.depth,
    ).to(device)
    if weight_normed(model):  # data-dependent init: the first batch, at least INIT_IMAGES
        first = _epoch_order(n_train, config.seed, 0)[: max(batch, INIT_IMAGES)].to(device)
        init_weight_norm(model, data.x_train.to(device)[first])
    net: nn.Module = model
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(model)
    lr = config.base_lr * batch / REFERENCE_BATCH
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=0.9,
        weight_decay=config.weight_decay,
        fused=device.type in ("cpu", "cuda"),  # one kernel per step: a third faster on small nets
    )
    steps_per_epoch = n_train // batch  # drop the last partial batch: every step is full
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total))
    )
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    train_loss, test_acc = [], []
    start = time.perf_counter()
    for epoch in range(config.epochs):
        net.train()
        order = _epoch_order(n_train, config.seed, epoch).to(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for step in range(steps_per_epoch):
            idx = order[step * batch + rank * local : step * batch + (rank + 1) * local]
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach()
            if progress is not None:
                progress.update(1)
        if world_size > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world_size
        mean_loss = float(loss_sum) / steps_per_epoch
        if not math.isfinite(mean_loss):
            mean_loss = float("nan")
        train_loss.append(mean_loss)
        test_acc.append(accuracy(model, x_test, y_test))
    wall = time.perf_counter() - start
    record = {
        **asdict(config),
        "accuracy": test_acc[-1],
        "error": 1.0 - test_acc[-1],
        "shifted": shifted_accuracies(model, x_test, y_test),
        "train_loss": train_loss,
        "test_accuracy": test_acc,
        "lr": lr,
        "per_process_batch": local,
        "steps": total,
        "num_classes": data.num_classes,
        "train_images": n_train,
        "test_images": len(x_test),
        "wall_time": wall,
        "device": device.type,
    }
    if config.probes > 0:
        record.update(
            noise_record(
                model,
                x_test,
                x_train,
                batch_size=batch,
                probes=config.probes,
                companions=config.companions,
                seed=config.seed,
            )
        )
    return record
