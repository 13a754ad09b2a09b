"""`compare`: the laboratory from Python (a notebook), the same sweep as `normlab compare`.

Every argument is checked before any training starts; the model and data are built and
run once on two images, so that a model whose output does not match the classes fails
at once with a one-line message. The same files as the command line are written to
`out` (one JSON per run, results.json/.csv, summary.md, report.html, figures), and a run
already finished there is not run again: its key includes a fingerprint of the model and
data functions' source, so an edited function gets new runs.

Example:
    >>> records = compare(model="cnn", norms=["bn", "gn"], batch_sizes=[4, 32],
    ...                   experiments=["batch-size"], epochs=1, seeds=1, out="out")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import normlab
from normlab.lab.models import CONVERTED_NORMS, GHOST_NORM, IN_FIRST, MODELS
from normlab.lab.noise import DEFAULT_COMPANIONS, DEFAULT_PROBES
from normlab.lab.sources import (
    DataSpec,
    LoadedData,
    SourceError,
    check_model,
    fingerprint,
    is_reference,
    module_paths,
    resolve,
)
from normlab.lab.sweep import (
    DEFAULT_EXPERIMENTS,
    EXECUTORS,
    EXPERIMENTS,
    Workload,
    plan_runs,
    preload,
    run_sweep,
    sweep_lock,
)
from normlab.lab.train import RunConfig, num_threads, world
from normlab.lab.weightnorm import WEIGHT_NORMS

DEFAULT_NORMS = ("bn", "gn", "in", "ln", "ibn")
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 32)


def known_norms() -> list[str]:
    """Every plain norm name a sweep accepts: the registry's, the whole-model conversions
    and the weight-norm candidates; besides these, the built-in models take ``gbn<k>``
    (ghost batches of k) and ``in-first-<k>`` (see :func:`is_known_norm`).

    Example:
        >>> "wn" in known_norms()
        True
    """
    return sorted({*normlab.available_norms(), *CONVERTED_NORMS, *WEIGHT_NORMS})


def is_known_norm(norm: str, model: str | None = "cnn") -> bool:
    """True if a sweep of `model` (a built-in name; None for the user's own model) can
    train with `norm`: a name from :func:`known_norms`, and on the built-in models also
    ``gbn<k>`` (k >= 1), and ``in-first-<k>`` on cnn and resnet (k up to their number of
    norm layers is checked when the model is built).

    Example:
        >>> is_known_norm("gbn8"), is_known_norm("in-first-2", "rnn")
        (True, False)
    """
    builtin = model in MODELS
    if norm in WEIGHT_NORMS:
        return builtin
    if norm in known_norms():
        return True
    ghost = GHOST_NORM.fullmatch(norm)
    if ghost:
        return builtin and int(ghost[1]) >= 1
    return bool(IN_FIRST.fullmatch(norm)) and builtin and model != "rnn"


def _positive(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _label(function: Callable) -> str:
    module = getattr(function, "__module__", None) or "__main__"
    return f"{module}:{getattr(function, '__qualname__', type(function).__name__)}"


@dataclass
class Sweep:
    """A checked, planned sweep: what `compare` runs."""

    configs: list[RunConfig]
    workload: Workload
    data: LoadedData
    model_label: str
    data_label: str
    experiments: list[str]
    norms: list[str]
    batch_sizes: list[int]
    executor: str
    jobs: int
    ray_options: dict = field(default_factory=dict)


def prepare(
    *,
    model: str | Callable = "cnn",
    data: str | Callable | tuple = "digits",
    norms: Sequence[str] = DEFAULT_NORMS,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    experiments: Sequence[str] = DEFAULT_EXPERIMENTS,
    epochs: int = 3,
    seeds: int = 2,
    limit: int | None = None,
    width: int | None = None,
    depth: int | None = None,
    lr: float = 0.1,
    num_classes: int | None = None,
    cache_dir: str | None = None,
    jobs: int | None = None,
    executor: str = "process",
    address: str | None = None,
    cpus_per_run: int = 1,
    gpus_per_run: float = 0,
    data_workers: int = 0,
    world_size: int = 1,
    probes: int = DEFAULT_PROBES,
    companions: int = DEFAULT_COMPANIONS,
) -> Sweep:
    """Check every argument, load the data and try the model; ValueError/TypeError (a
    SourceError for the model and data) before anything trains."""
    norms, batch_sizes, experiments = list(norms), list(batch_sizes), list(experiments)
    if not norms:
        raise ValueError("norms: expected at least one norm name, got none")
    builtin = model if isinstance(model, str) and model in MODELS else None
    unknown = [n for n in norms if not is_known_norm(n, builtin)]
    if unknown:
        raise ValueError(
            f"norms: unknown {', '.join(map(repr, unknown))}; expected names from "
            f"{', '.join(known_norms())} (wn and wn-mobn on the built-in models only), or "
            f"gbn<k> (built-in models), in-first-<k> (cnn, resnet)"
        )
    if not batch_sizes:
        raise ValueError("batch_sizes: expected at least one batch size, got none")
    for b in batch_sizes:
        _positive("batch size", b)
    bad = [e for e in experiments if e not in EXPERIMENTS]
    if bad or not experiments:
        raise ValueError(f"experiments: expected some of {', '.join(EXPERIMENTS)}, got {bad}")
    own = [e for e in experiments if e in ("ghost", "in-depth")]
    if own and (builtin is None or ("in-depth" in own and builtin == "rnn")):
        raise ValueError(
            f"experiments: {', '.join(own)} build their own norms into the built-in models "
            f"(in-depth: cnn or resnet), got model {model!r}"
        )
    _positive("epochs", epochs)
    _positive("seeds", seeds)
    _positive("probes", probes)
    _positive("companions", companions)
    for name, value in (("limit", limit), ("width", width), ("depth", depth)):
        _positive(name, value, allow_none=True)
    _positive("num_classes", num_classes, allow_none=True)
    _positive("jobs", jobs, allow_none=True)
    _positive("cpus_per_run", cpus_per_run)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr: expected a finite positive learning rate, got {lr!r}")
    if not (isinstance(gpus_per_run, int | float) and math.isfinite(gpus_per_run)) or (
        gpus_per_run < 0
    ):
        raise ValueError(f"gpus_per_run: expected a number >= 0, got {gpus_per_run!r}")
    if isinstance(data_workers, bool) or not isinstance(data_workers, int) or data_workers < 0:
        raise ValueError(f"data_workers: expected an integer >= 0, got {data_workers!r}")
    if executor not in EXECUTORS:
        raise ValueError(f"executor: expected one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "ray":
        from normlab.lab.ray_executor import _require_ray

        _require_ray()

    # the model
    model_function: Callable | None = None
    resolved: Callable | None = None
    if callable(model):
        model_function, model_label = model, _label(model)
    elif isinstance(model, str) and model in MODELS:
        model_label = model
    elif isinstance(model, str) and is_reference(model):
        model_label = model
        resolved = resolve(model, "model")
    else:
        raise SourceError(
            f"model: expected one of {', '.join(MODELS)}, MODULE:FUNCTION or a callable, "
            f"got {model!r}"
        )
    # the data
    data_function: Callable | None = None
    if isinstance(data, tuple | list) and len(data) == 2:
        parts = tuple(data)
        data_function = lambda: parts  # noqa: E731 - Datasets given directly
        data_label = f"{type(parts[0]).__name__} ({len(parts[0])} train images)"
        data_source = type(parts[0])
    elif callable(data):
        data_function, data_label, data_source = data, _label(data), data
    elif isinstance(data, str):
        data_label = data
        data_source = resolve(data, "data") if is_reference(data) else None
    else:
        raise SourceError(
            f"data: expected a built-in name or path, MODULE:FUNCTION, a callable or "
            f"(train, test) Datasets, got {type(data).__name__}"
        )
    spec = DataSpec(
        data_label if data_function is not None else data,  # type: ignore[arg-type]
        limit,
        cache_dir,
        num_classes,
        function=data_function,
    )
    user_model = model_function or (None if model_label in MODELS else resolved)
    # One thread: this process forks the sweep's workers later, and a process that has
    # started a thread team (OpenMP) must not fork workers that use one.
    with num_threads(1):
        loaded = spec.load()
        for norm in norms if user_model is not None else norms[:1]:
            check_model(
                model_label, norm, loaded, width=width, depth=depth, function=model_function
            )
    source = fingerprint(user_model, data_source)
    threads = cpus_per_run
    configs = plan_runs(
        norms,
        batch_sizes,
        experiments,
        seeds=seeds,
        epochs=epochs,
        probes=probes,
        companions=companions,
        model=model_label,
        data=data_label,
        limit=limit,
        width=width,
        depth=depth,
        base_lr=float(lr),
        world_size=world_size,
        threads=threads,
        num_classes=num_classes,
        fingerprint=source,
    )
    ray_options: dict = {}
    if executor == "ray":
        specs = [s for s in (model, data) if isinstance(s, str)]
        ray_options = {
            "address": address,
            "cpus_per_run": cpus_per_run,
            "gpus_per_run": gpus_per_run,
            "modules": module_paths(*specs),
        }
    return Sweep(
        configs=configs,
        workload=Workload(spec, model_function, data_workers),
        data=loaded,
        model_label=model_label,
        data_label=data_label,
        experiments=experiments,
        norms=norms,
        batch_sizes=batch_sizes,
        executor=executor,
        jobs=jobs or max(1, (os.cpu_count() or 1) // cpus_per_run),
        ray_options=ray_options,
    )


@dataclass
class Outcome:
    """What a sweep gave: every record (finished, failed, crashed), runs executed, files."""

    records: list[dict]
    executed: int
    paths: dict[str, Path]

    @property
    def finished(self) -> list[dict]:
        """Runs that trained."""
        return [r for r in self.records if "failed" not in r and "crashed" not in r]

    @property
    def failed(self) -> list[dict]:
        """Runs the norm cannot do (final)."""
        return [r for r in self.records if "failed" in r]

    @property
    def crashed(self) -> list[dict]:
        """Runs that raised something else (run again on the next resume)."""
        return [r for r in self.records if "crashed" in r]


def execute(
    sweep: Sweep, out: str | os.PathLike, *, device: str = "cpu", progress: bool = True
) -> Outcome:
    """Run what is not finished in `out` (holding its lock) and write the outputs."""
    from normlab.lab.report import write_outputs

    rank, _ = world()
    lock = sweep_lock(out) if rank == 0 else _no_lock(out)
    with lock:
        preload(sweep.workload.data, sweep.data)
        records, executed = run_sweep(
            sweep.configs,
            out,
            sweep.workload,
            device=device,
            jobs=sweep.jobs,
            progress=progress,
            executor=sweep.executor,
            ray_options=sweep.ray_options,
        )
        paths: dict[str, Path] = {}
        outcome = Outcome(records, executed, paths)
        if rank == 0 and outcome.finished:
            order = {n: i for i, n in enumerate(sweep.norms)}
            # the norms in the order asked for; the experiments' own norms (gbn<k>, ...) last
            finished = sorted(outcome.finished, key=lambda r: order.get(r["norm"], len(order)))
            paths.update(
                write_outputs(
                    finished,
                    out,
                    sweep.experiments,
                    header=f"{sweep.data_label}, {sweep.model_label}, "
                    f"{sweep.configs[0].epochs} epochs",
                    failed=outcome.failed + outcome.crashed,
                    label=f"model {sweep.model_label}, data {sweep.data_label}",
                )
            )
    return outcome


class _no_lock:
    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)

    def __enter__(self) -> Path:
        return self.out

    def __exit__(self, *exc: object) -> None:
        return None


def compare(
    model: str | Callable = "cnn",
    data: str | Callable | tuple = "digits",
    norms: Sequence[str] = DEFAULT_NORMS,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    experiments: Sequence[str] = DEFAULT_EXPERIMENTS,
    out: str | os.PathLike = "compare-out",
    *,
    device: str = "cpu",
    progress: bool = True,
    **options: object,
) -> list[dict]:
    """Train `model` with each norm on `data` and compare them; return every run's record.

    `model`: ``"cnn"``, ``"resnet"``, ``"rnn"``, ``"MODULE:FUNCTION"`` or a callable
    returning an ``nn.Module`` (given ``norm_layer=``, ``num_classes=``, ``in_channels=``/
    ``in_chans=`` when it takes them). `data`: a built-in spec, ``"MODULE:FUNCTION"``, a
    callable returning ``(train, test)`` Datasets of (image [C, H, W], label), or that pair
    itself. `options`: epochs, seeds, limit, width, depth, lr, num_classes, jobs,
    executor ("process" or "ray"), address, cpus_per_run, gpus_per_run, data_workers,
    probes and companions (the noise and ghost experiments' batch-noise measurement).
    A record with ``"failed"`` is a run the norm cannot do; ``"crashed"`` is retried on
    the next call with the same `out`.

    Example:
        >>> records = compare("cnn", "digits", ["bn", "gn"], [8], ["batch-size"],
        ...                   "out", epochs=1, seeds=1, limit=100)  # doctest: +SKIP
    """
    sweep = prepare(
        model=model,
        data=data,
        norms=norms,
        batch_sizes=batch_sizes,
        experiments=experiments,
        **options,  # type: ignore[arg-type]
    )
    return execute(sweep, out, device=device, progress=progress).records
