"""A sweep: the runs an experiment needs, run once each, resumable.

Every finished run is one JSON file ``DIR/runs/<key>.json`` named by its configuration,
written atomically by the driver; a sweep started again skips the runs whose file holds a
finished record (an unreadable file is run again, with a warning). One sweep at a time
owns DIR (an exclusive lock on ``DIR/.lock``).

Runs are independent, so on CPU they go to `jobs` worker processes (one run each at a
time; a worker exits when its parent dies), or to Ray workers (`executor="ray"`, see
:mod:`normlab.lab.ray_executor`); under ``torchrun`` they run one after another, every
process taking part in each. A run's numbers depend on its configuration only (its
thread count is part of it), never on the executor or the number of jobs.

A run that raises ValueError (the norm cannot work in that setting: batch norm on one
value per channel, say) is recorded as ``"failed"`` for good; any other exception is
recorded as ``"crashed"`` with its message and run again on the next resume.

Example:
    >>> configs = plan_runs(["bn", "gn"], [2, 32], ["batch-size"], seeds=1, epochs=1)
    >>> records, executed = run_sweep(configs, "out", DataSpec())  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import torch
import torch.distributed as dist

from normlab.lab.models import count_norm_layers
from normlab.lab.noise import DEFAULT_COMPANIONS, DEFAULT_PROBES
from normlab.lab.sources import DataSpec, LoadedData
from normlab.lab.train import RunConfig, train_run, world

EXPERIMENTS = ("batch-size", "shift", "curves", "noise", "ghost", "in-depth")
DEFAULT_EXPERIMENTS = ("batch-size", "shift", "curves")
EXECUTORS = ("process", "ray")
LOCK_FILE = ".lock"

__all__ = [
    "DEFAULT_EXPERIMENTS",
    "EXECUTORS",
    "EXPERIMENTS",
    "DataSpec",
    "SweepLocked",
    "Workload",
    "plan_runs",
    "reference_batch",
    "run_sweep",
    "sweep_lock",
]


class SweepLocked(ValueError):
    """Another sweep holds the output folder."""


@dataclass(frozen=True)
class Workload:
    """What every run of a sweep reads: the data, and the user's model function when it was
    given as a callable (from Python). `workers`: DataLoader processes per run."""

    data: DataSpec
    model_function: Callable | None = None
    workers: int = 0


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


# --------------------------------------------------------------------------- run files


def record_path(out: Path, config: RunConfig) -> Path:
    """Where a run's record lives."""
    return Path(out) / "runs" / f"{config.key()}.json"


def _warn(text: str) -> None:
    print(f"normlab compare: warning: {text}", file=sys.stderr)


def load_finished(path: Path) -> dict | None:
    """The finished record in `path`, or None: missing, half-written, unreadable (a warning
    says so) or a crashed run (retried)."""
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        _warn(f"{path} is unreadable ({type(error).__name__}); running it again")
        return None
    if not isinstance(record, dict) or not ("accuracy" in record or "failed" in record):
        _warn(f"{path} holds no finished run; running it again")
        return None
    if "crashed" in record:
        return None
    return record


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.part")
    partial.write_text(text)
    partial.replace(path)


@contextlib.contextmanager
def sweep_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on `out_dir` (created if needed) for the duration; SweepLocked
    when another sweep holds it, OSError when the folder cannot be written."""
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole block
    try:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no lock
            pass
        except BlockingIOError as error:
            raise SweepLocked(
                f"out: another normlab compare is running on {out}; wait for it or use "
                "another --out"
            ) from error
        yield out
    finally:
        handle.close()


# --------------------------------------------------------------------------- one run


_DATA_CACHE: dict[tuple, LoadedData] = {}
_WORKLOAD: Workload | None = None  # what forked workers inherit


def _load(data: DataSpec) -> LoadedData:
    key = (data, id(data.function))
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one data set per worker at a time
        _DATA_CACHE[key] = data.load()
    return _DATA_CACHE[key]


def guarded_run(config: RunConfig, workload: Workload, device: str) -> dict:
    """Train; ValueError (the norm cannot work there) -> a final ``"failed"`` record; any
    other exception -> a ``"crashed"`` record, run again on the next resume."""
    try:
        return train_run(
            config,
            _load(workload.data),
            device,
            model_function=workload.model_function,
            workers=workload.workers,
        )
    except ValueError as error:
        return {**asdict(config), "failed": str(error)}
    except Exception as error:  # noqa: BLE001 - kept in the record, retried on resume
        return {**asdict(config), "crashed": f"{type(error).__name__}: {error}"}


def exit_with_parent(parent: int) -> None:
    """Make this (worker) process exit when `parent` dies: the kernel's parent-death signal
    on Linux, and a thread that polls the parent id everywhere. The worker starts with one
    intra-op thread (each run sets its own count)."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="normlab-parent-watch", daemon=True).start()


def _worker_run(config: RunConfig, workload: Workload | None, device: str) -> dict:
    return guarded_run(config, workload or _WORKLOAD, device)  # type: ignore[arg-type]


def _progress(total: int, enabled: bool) -> object:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar then
        return None
    return tqdm(total=total, desc="runs", unit="run", disable=not enabled, file=sys.stderr)


def outcome(record: dict) -> str:
    """A few words on how a run ended, for the progress bar."""
    if "crashed" in record:
        return "crashed"
    if "failed" in record:
        return "failed"
    return f"acc {record['accuracy']:.3f}"


# --------------------------------------------------------------------------- the sweep


def preload(data: DataSpec, loaded: LoadedData) -> None:
    """Hand data already loaded here to the runs (and the workers forked from here)."""
    _DATA_CACHE.clear()
    _DATA_CACHE[(data, id(data.function))] = loaded


def run_sweep(
    configs: list[RunConfig],
    out_dir: str | os.PathLike,
    data: DataSpec | Workload,
    *,
    device: str = "cpu",
    jobs: int = 1,
    progress: bool = True,
    executor: str = "process",
    ray_options: dict | None = None,
) -> tuple[list[dict], int]:
    """Run every config not finished in `out_dir`; return (records in config order, runs executed).

    `executor`: ``"process"`` (`jobs` local worker processes; 1: in this process) or
    ``"ray"`` (`ray_options`: address, cpus_per_run, gpus_per_run, modules). Records
    of crashed runs are returned (and written) but run again on the next call.
    """
    global _WORKLOAD
    if executor not in EXECUTORS:
        raise ValueError(f"executor: expected one of {', '.join(EXECUTORS)}, got {executor!r}")
    if jobs < 1:
        raise ValueError(f"jobs: expected a positive number, got {jobs}")
    workload = data if isinstance(data, Workload) else Workload(data)
    out = Path(out_dir)
    rank, world_size = world()
    done: dict[RunConfig, dict] = {}
    for config in configs:
        record = load_finished(record_path(out, config))
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
            _write_atomic(record_path(out, config), json.dumps(record, indent=1))
        if bar is not None:
            bar.set_postfix_str(
                f"{config.norm} b{config.batch_size} s{config.seed}: {outcome(record)}"
            )
            bar.update(1)

    try:
        if pending and executor == "ray":
            from normlab.lab.ray_executor import run_on_ray

            run_on_ray(pending, workload, device, finish, **(ray_options or {}))
        elif jobs > 1 and len(pending) > 1 and world_size == 1 and device == "cpu":
            # fork, not spawn: spawn would re-run the `python -m normlab` entry point in
            # each worker, and forked workers inherit the workload (callables included).
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            _WORKLOAD = workload
            shipped = None if method == "fork" else workload
            with ProcessPoolExecutor(
                min(jobs, len(pending)),
                mp_context=get_context(method),
                initializer=exit_with_parent,
                initargs=(os.getpid(),),
            ) as pool:
                futures = {pool.submit(_worker_run, c, shipped, device): c for c in pending}
                for future in as_completed(futures):
                    config = futures[future]
                    try:
                        record = future.result()
                    except BrokenProcessPool as error:  # a worker was killed (memory, signal)
                        record = {**asdict(config), "crashed": f"worker died: {error}"}
                    finish(config, record)
        else:
            for config in pending:
                finish(config, guarded_run(config, workload, device))
    finally:
        _WORKLOAD = None
        if bar is not None:
            bar.close()
    return [done[c] for c in configs], len(pending)
