"""One training run: a model, a norm, a batch size, a seed -> one result record.

The GN paper's protocol: every batch size trains for the same number of epochs, with the
learning rate scaled linearly with the batch size (``lr = base_lr * batch_size / 32``),
SGD with momentum and a cosine decay. Runs are deterministic: the seed fixes the
initial weights and the order of the data, and deterministic algorithms are used.

Under ``torchrun`` (a process group is initialized) the model is wrapped in
DistributedDataParallel and each process takes its slice of every global batch, so the
global batch is `batch_size` whatever the number of processes; plain batch norm then
sees ``batch_size / world_size`` images, ``syncbn`` all of them.

A run's numbers are a pure function of its configuration: the number of intra-op
threads (`threads`) is part of it, and the data is read in an order fixed by the seed,
whatever process, executor or number of DataLoader workers runs it.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlab.lab.data import ImageData
from normlab.lab.noise import noise_record
from normlab.lab.shifts import SHIFTS
from normlab.lab.sources import LoadedData, build_run_model, norm_modules
from normlab.lab.weightnorm import INIT_IMAGES, init_weight_norm, weight_normed

REFERENCE_BATCH = 32  # the batch size at which lr == base_lr
EVAL_BATCH = 512  # evaluation batch: fixed, so that per-batch shifts do not depend on anything
# Fields that vary from one execution of the same run to the next (never compared).
TIMING_FIELDS = ("wall_time",)


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
    threads: int = 1
    num_classes: int | None = None
    fingerprint: str = ""
    probes: int = 0  # > 0: measure batch noise with this many probes (see lab.noise)
    companions: int = 0  # companion batches per probe

    def key(self) -> str:
        """A file-name-safe key: readable prefix plus a hash of every field that differs
        from its default (a field added later with a default keeps old keys valid)."""
        changed = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != f.default
        }
        digest = hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()
        model = self.model.rsplit(":", 1)[-1].replace("/", "_").replace(".", "_")
        return f"{model}-{self.norm}-b{self.batch_size}-s{self.seed}-{digest[:10]}"


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


def as_datasets(data: LoadedData | ImageData) -> LoadedData:
    """In-memory `ImageData` as a pair of TensorDatasets; `LoadedData` unchanged."""
    if isinstance(data, LoadedData):
        return data
    return LoadedData(
        data.name,
        TensorDataset(data.x_train, data.y_train),
        TensorDataset(data.x_test, data.y_test),
        data.image_shape,
        data.num_classes,
    )


def batches(
    dataset: object, index_lists: Iterable[list[int]], workers: int = 0
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) for each list of indices, in order: tensors of an in-memory
    TensorDataset are indexed directly; any other Dataset is read by a DataLoader with
    `workers` worker processes (the same values either way)."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[0], dataset.tensors[1]
        for idx in index_lists:
            index = torch.as_tensor(idx, dtype=torch.long)
            yield x[index], y[index]
        return
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_sampler=list(index_lists),
        num_workers=workers,
        persistent_workers=False,
    )
    for x, y in loader:
        yield x, torch.as_tensor(y, dtype=torch.long)


def images(dataset: object, indices: list[int], device: str | torch.device) -> torch.Tensor:
    """The images of `dataset` at `indices`, stacked in that order, on `device`: a few
    examples read on demand (the data is never held in memory as a whole).

    Example:
        >>> x = images(TensorDataset(torch.zeros(5, 1, 2, 2), torch.zeros(5)), [3, 0], "cpu")
        >>> tuple(x.shape)
        (2, 1, 2, 2)
    """
    if len(indices) == 0:
        raise ValueError("images: expected at least one index, got none")
    x, _ = next(iter(batches(dataset, [list(indices)])))
    return x.to(device)


def _eval_batches(n: int) -> list[list[int]]:
    return [list(range(start, min(start + EVAL_BATCH, n))) for start in range(0, n, EVAL_BATCH)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    test: object,
    device: torch.device,
    *,
    shifts: bool = False,
    workers: int = 0,
) -> tuple[float, dict[str, float], str | None]:
    """(accuracy, accuracy under each shift, why the shifts were skipped or None), in eval
    mode, reading `test` batch by batch. The shifts are applied per batch (the noise shift
    seeded by the batch's number); they assume images in [0, 1], so on data outside that
    range they are skipped and the reason is returned."""
    was_training = model.training
    model.eval()
    n = len(test)  # type: ignore[arg-type]
    correct = 0
    shifted = dict.fromkeys(SHIFTS, 0)
    skipped = None if shifts else "not asked for"
    for number, (x, y) in enumerate(batches(test, _eval_batches(n), workers)):
        x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        if skipped is None:
            low, high = float(x.min()), float(x.max())
            if low < 0.0 or high > 1.0:
                skipped = (
                    f"the appearance shifts assume images in [0, 1]; test images hold values "
                    f"in [{low:.3g}, {high:.3g}]"
                )
                continue
            for name, shift in SHIFTS.items():
                moved = shift(x, seed=number) if name == "noise" else shift(x)
                shifted[name] += int((model(moved).argmax(1) == y).sum())
    model.train(was_training)
    total = max(n, 1)
    if skipped is not None:
        return correct / total, {}, skipped
    return correct / total, {k: v / total for k, v in shifted.items()}, None


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # Depends on (seed, epoch) only, never on global RNG state: resumable and rank-agnostic.
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator)


@contextlib.contextmanager
def num_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_run(
    config: RunConfig,
    data: LoadedData | ImageData,
    device: str | torch.device = "cpu",
    progress: object = None,
    *,
    model_function: Callable | None = None,
    workers: int = 0,
) -> dict:
    """Train one configuration and return its record (accuracy, shifts, curves, timing).

    `progress`: an object with ``update(n)`` (a tqdm bar) told of every finished step.
    `model_function`: the user's model function when `config.model` is not a built-in or
    ``MODULE:FUNCTION`` name. `workers`: DataLoader worker processes (no effect on numbers).
    """
    device = torch.device(device)
    data = as_datasets(data)
    _, world_size = world()
    batch = config.batch_size
    if batch < 1 or batch % world_size:
        raise ValueError(
            f"batch size: expected a positive multiple of the {world_size} processes, got {batch}"
        )
    n_train = len(data.train)  # type: ignore[arg-type]
    if n_train < batch:
        raise ValueError(
            f"batch size: expected at most {n_train} (the training images), got {batch}"
        )
    if config.threads < 1:
        raise ValueError(f"threads: expected a positive number, got {config.threads}")
    with num_threads(config.threads), deterministic(config.seed, device):
        return _train(config, data, device, progress, model_function, workers)


def _train(
    config: RunConfig,
    data: LoadedData,
    device: torch.device,
    progress: object,
    model_function: Callable | None,
    workers: int,
) -> dict:
    rank, world_size = world()
    batch = config.batch_size
    local = batch // world_size
    n_train = len(data.train)  # type: ignore[arg-type]
    num_classes = config.num_classes or data.num_classes
    model, notes = build_run_model(
        config.model,
        config.norm,
        image_shape=data.image_shape,
        num_classes=num_classes,
        width=config.width,
        depth=config.depth,
        function=model_function,
    )
    model = model.to(device)
    if weight_normed(model):  # data-dependent init: the first batch, at least INIT_IMAGES
        first = _epoch_order(n_train, config.seed, 0)[: max(batch, INIT_IMAGES)].tolist()
        init_weight_norm(model, images(data.train, first, device))
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
    train_loss, test_acc = [], []
    start = time.perf_counter()
    for epoch in range(config.epochs):
        net.train()
        order = _epoch_order(n_train, config.seed, epoch)
        steps = (
            order[step * batch + rank * local : step * batch + (rank + 1) * local].tolist()
            for step in range(steps_per_epoch)
        )
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for x, y in batches(data.train, steps, workers):
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(net(x), y)
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
        test_acc.append(evaluate(model, data.test, device, workers=workers)[0])
    wall = time.perf_counter() - start
    _, shifted, skipped = evaluate(model, data.test, device, shifts=True, workers=workers)
    record = {
        **asdict(config),
        "accuracy": test_acc[-1],
        "error": 1.0 - test_acc[-1],
        "shifted": shifted,
        "train_loss": train_loss,
        "test_accuracy": test_acc,
        "lr": lr,
        "per_process_batch": local,
        "steps": total,
        "num_classes": num_classes,
        "train_images": n_train,
        "test_images": len(data.test),  # type: ignore[arg-type]
        "norm_modules": norm_modules(model),
        "wall_time": wall,
        "device": device.type,
    }
    if skipped is not None:
        record["shifts_skipped"] = skipped
    if notes:
        record["norm_notes"] = notes
    if config.probes > 0:
        record.update(
            noise_record(
                model,
                lambda idx: images(data.test, idx, device),
                lambda idx: images(data.train, idx, device),
                test_size=len(data.test),  # type: ignore[arg-type]
                train_size=n_train,
                batch_size=batch,
                probes=config.probes,
                companions=config.companions,
                seed=config.seed,
            )
        )
    return record
