"""A sweep: the runs an experiment needs, run once each, resumable.

Every finished run is one JSON file ``DIR/runs/<key>.json`` named by its configuration,
written atomically; a sweep started again skips the runs whose file exists. Runs are
independent, so on CPU they go to `jobs` worker processes (one run each at a time);
under ``torchrun`` they run one after another, every process taking part in each.

Example:
    >>> configs = plan_runs(["bn", "gn"], [2, 32], ["batch-size"], seeds=1, epochs=1)
    >>> records, executed = run_sweep(configs, "out", DataSpec())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import torch
import torch.distributed as dist

from normlab.lab.data import ImageData, load_data
from normlab.lab.models import count_norm_layers
from normlab.lab.noise import DEFAULT_COMPANIONS, DEFAULT_PROBES
from normlab.lab.train import RunConfig, train_run, world

EXPERIMENTS = ("batch-size", "shift", "curves", "noise", "ghost", "in-depth")
DEFAULT_EXPERIMENTS = ("batch-size", "shift", "curves")


@dataclass(frozen=True)
class DataSpec:
    """Where the images come from (see `load_data`)."""

    spec: str = "digits"
    limit: int | None = None
    cache_dir: str | None = None

    def load(self) -> ImageData:
        """Load the data; the split is always seeded with 0, the same for every run."""
        return load_data(self.spec, seed=0, cache_dir=self.cache_dir, limit=self.limit)


def reference_batch(batch_sizes: list[int]) -> int:
    """The batch size the shift and curves experiments use: 32 if swept, else the largest."""
    return 32 if 32 in batch_sizes else max(batch_sizes)


def plan_runs(
    norms: list[str],
    batch_sizes: list[int],
    experiments: list[str],
    *,
    seeds: int,
    epochs: int,
    probes: int = DEFAULT_PROBES,
    companions: int = DEFAULT_COMPANIONS,
    **common: object,
) -> list[RunConfig]:
    """The runs the experiments need, without duplicates, in a stable order.

    batch-size: every norm at every batch size; shift and curves: every norm at the
    reference batch size; noise: every norm at every batch size, each run measuring its
    batch noise (`probes` probes in `companions` batches each); ghost: ghost batch norm
    ("gbn<k>") at the reference batch size for ghost batches of 2, 4, ... up to it, with
    batch noise; in-depth: "in-first-<k>" (instance norm in the first k norm layers,
    batch norm after) for every k at the reference batch size. `common` holds the
    other `RunConfig` fields.
    """
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"experiment: expected some of {', '.join(EXPERIMENTS)}, got {unknown}")
    if not norms or not batch_sizes or seeds < 1 or epochs < 1:
        raise ValueError(
            f"expected at least one norm, one batch size, seeds >= 1 and epochs >= 1, got "
            f"norms={norms}, batch sizes={batch_sizes}, seeds={seeds}, epochs={epochs}"
        )
    sizes: set[int] = set()
    if "batch-size" in experiments:
        sizes.update(batch_sizes)
    if {"shift", "curves"} & set(experiments):
        sizes.add(reference_batch(batch_sizes))
    noise = {"probes": probes, "companions": companions}
    if "noise" in experiments:
        sizes.update(batch_sizes)
        common = {**common, **noise}
    runs = [(norm, b, common) for b in sorted(sizes) for norm in norms]
    ref = reference_batch(batch_sizes)
    if "ghost" in experiments:
        ghosts = [2**i for i in range(1, ref.bit_length()) if 2**i <= ref]
        runs += [(f"gbn{g}", ref, {**common, **noise}) for g in ghosts]
    if "in-depth" in experiments:
        model = str(common.get("model", "cnn"))
        width, depth = common.get("width"), common.get("depth")
        count = count_norm_layers(model, width, depth)  # type: ignore[arg-type]
        runs += [(f"in-first-{k}", ref, common) for k in range(count + 1)]
    configs = [
        RunConfig(norm=norm, batch_size=b, epochs=epochs, seed=seed, **extra)  # type: ignore[arg-type]
        for seed in range(seeds)
        for norm, b, extra in runs
    ]
    return list(dict.fromkeys(configs))


def _record_path(out: Path, config: RunConfig) -> Path:
    return out / "runs" / f"{config.key()}.json"


def _load_finished(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # missing or half-written: run it (again)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.part")
    partial.write_text(text)
    partial.replace(path)


_WORKER_DATA: dict[DataSpec, ImageData] = {}


def _guarded_run(config: RunConfig, images: ImageData, device: str) -> dict:
    """Train; a run that a norm cannot do (batch norm on one value per channel, say)
    becomes a record {config..., "failed": message} instead of ending the sweep."""
    try:
        return train_run(config, images, device)
    except ValueError as error:
        return {**asdict(config), "failed": str(error)}


def _worker_run(config: RunConfig, data: DataSpec, device: str, threads: int) -> dict:
    # Runs in a worker process: the data set is loaded once per worker and kept.
    torch.set_num_threads(threads)
    if data not in _WORKER_DATA:
        _WORKER_DATA[data] = data.load()
    return _guarded_run(config, _WORKER_DATA[data], device)


def _progress(total: int, enabled: bool) -> object:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar then
        return None
    return tqdm(total=total, desc="runs", unit="run", disable=not enabled, file=sys.stderr)


def run_sweep(
    configs: list[RunConfig],
    out_dir: str | os.PathLike,
    data: DataSpec,
    *,
    device: str = "cpu",
    jobs: int = 1,
    progress: bool = True,
) -> tuple[list[dict], int]:
    """Run every config not finished in `out_dir`; return (records in config order, runs executed).

    A run that raised ValueError (the norm cannot work in that setting) is kept as a
    record with a "failed" message and no accuracy; it is not run again either.
    """
    out = Path(out_dir)
    rank, world_size = world()
    done: dict[RunConfig, dict] = {}
    for config in configs:
        record = _load_finished(_record_path(out, config))
        if record is not None:
            done[config] = record
    pending = [c for c in configs if c not in done]
    if world_size > 1:  # every process must agree on what is left to run
        shared = [[c.key() for c in pending]]
        dist.broadcast_object_list(shared, src=0)
        pending = [c for c in configs if c.key() in set(shared[0])]
    bar = _progress(len(configs), progress and rank == 0)
    if bar is not None:
        bar.update(len(configs) - len(pending))

    def finish(config: RunConfig, record: dict) -> None:
        done[config] = record
        if rank == 0:
            _write_atomic(_record_path(out, config), json.dumps(record, indent=1))
        if bar is not None:
            outcome = "failed" if "failed" in record else f"acc {record['accuracy']:.3f}"
            bar.set_postfix_str(f"{config.norm} b{config.batch_size} s{config.seed}: {outcome}")
            bar.update(1)

    if jobs > 1 and len(pending) > 1 and world_size == 1 and device == "cpu":
        threads = max(1, (os.cpu_count() or 1) // jobs)
        # fork, not spawn: spawn would re-run the `python -m normlab` entry point in each
        # worker. Workers use `threads` intra-op threads (1 on 2 cores), which also keeps
        # OpenMP clear of its known trouble after fork.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(min(jobs, len(pending)), mp_context=get_context(method)) as pool:
            futures = {pool.submit(_worker_run, c, data, device, threads): c for c in pending}
            for future in as_completed(futures):
                finish(futures[future], future.result())
    elif pending:
        images = data.load()
        for config in pending:
            finish(config, _guarded_run(config, images, device))
    if bar is not None:
        bar.close()
    return [done[c] for c in configs], len(pending)
