"""Running a sweep's runs on Ray: one task per run, with its CPU and GPU needs.

Without an address a local Ray instance is started (and stopped at the end); with one, the
runs go to that cluster. The user's ``MODULE:FUNCTION`` modules travel to the workers in
Ray's ``runtime_env`` (``py_modules``); normlab itself must be installed on every node.
Run files are written by the driver only, as each run comes back, so a killed sweep
resumes where it stopped. A task runs the same code as a local worker process, with the
configuration's thread count, so it gives the same numbers.

Example:
    >>> run_sweep(configs, "out", DataSpec(), executor="ray",
    ...           ray_options={"cpus_per_run": 1})  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from normlab.lab.train import RunConfig


def _require_ray():  # noqa: ANN202 - the ray module
    try:
        import ray
    except ImportError as error:
        raise ValueError(
            'executor: --executor ray needs Ray: pip install "normlab[ray]"'
        ) from error
    return ray


def _task(config: RunConfig, workload: object, device: str) -> dict:
    from normlab.lab.sweep import guarded_run

    return guarded_run(config, workload, device)  # type: ignore[arg-type]


def run_on_ray(
    pending: list[RunConfig],
    workload: object,
    device: str,
    finish: Callable[[RunConfig, dict], None],
    *,
    address: str | None = None,
    cpus_per_run: float = 1,
    gpus_per_run: float = 0,
    modules: list[str] | tuple[str, ...] = (),
) -> None:
    """Send every pending run to Ray and call ``finish(config, record)`` as each returns.

    `modules`: local files or package folders the workers must be able to import.
    """
    ray = _require_ray()
    started = False
    if not ray.is_initialized():
        runtime_env = {"py_modules": list(modules)} if modules else None
        options: dict = {
            "address": address,
            "runtime_env": runtime_env,
            "include_dashboard": False,
            "log_to_driver": False,
            "configure_logging": False,
        }
        if address is None:  # a local instance: as many CPUs as the machine has
            options["address"] = "local"
        ray.init(**options)
        started = True
    try:
        remote = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(_task)
        shared = ray.put(workload)
        run_device = "cuda" if str(device).startswith("cuda") else device
        futures = {remote.remote(config, shared, run_device): config for config in pending}
        while futures:
            ready, _ = ray.wait(list(futures), num_returns=1)
            for ref in ready:
                config = futures.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as error:  # the worker died, a node was lost
                    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                    record = {**asdict(config), "crashed": f"{type(error).__name__}: {first}"}
                finish(config, record)
    finally:
        if started:
            ray.shutdown()
