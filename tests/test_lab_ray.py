"""Sweeps on Ray (a local instance started and stopped here) give the process pool's
records; a killed Ray sweep leaves no process once Ray has cleaned up, and resumes with
nothing lost. And the documented `torchrun` command, with 2 gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray  # the `ray` extra, installed by the `test` extra: a missing one fails
from lab_helpers import SRC, descendants, normlab_process, untimed, wait_gone

from normlab.lab.sweep import DataSpec, plan_runs, record_path, run_sweep

DATA = DataSpec("digits", limit=40)
CONFIGS = plan_runs(["bn", "gn"], [8], ["batch-size"], seeds=1, epochs=1, limit=40)
ARGV = [
    "compare",
    "--norms",
    "bn",
    "gn",
    "--batch-sizes",
    "8",
    "--epochs",
    "1",
    "--seeds",
    "1",
    "--limit",
    "40",
    "--experiment",
    "batch-size",
    "--no-progress",
]


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    out = tmp_path_factory.mktemp("pool")
    records, _ = run_sweep(CONFIGS, out, DATA, jobs=2, progress=False)
    return records


def test_a_local_ray_instance_gives_the_process_pools_records(tmp_path, pooled):
    options = {"cpus_per_run": 1}
    records, executed = run_sweep(
        CONFIGS, tmp_path, DATA, executor="ray", ray_options=options, progress=False
    )
    assert executed == len(CONFIGS)
    assert untimed(records) == untimed(pooled)
    assert not ray.is_initialized()  # the instance the sweep started is stopped


def test_a_killed_ray_sweep_resumes_with_nothing_lost(tmp_path, pooled):
    out = tmp_path / "out"
    proc = normlab_process([*ARGV, "--executor", "ray", "--out", str(out)])
    below: set[int] = set()
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        below |= descendants(proc.pid)
        if (out / "runs").exists() and any((out / "runs").glob("*.json")):
            break
        time.sleep(0.1)
    below |= descendants(proc.pid)
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
    assert below, "Ray started no process"
    assert not wait_gone(below, timeout=150), "Ray processes left after the driver was killed"
    finished = len(list((out / "runs").glob("*.json")))
    records, executed = run_sweep(CONFIGS, out, DATA, executor="ray", progress=False)
    assert executed == len(CONFIGS) - finished
    assert untimed(records) == untimed(pooled)
    assert all(record_path(out, c).exists() for c in CONFIGS)


def test_the_documented_torchrun_command_with_two_gloo_processes(tmp_path):
    # docs/lab.md: torchrun --standalone --nproc-per-node N -m normlab compare ...
    # (torchrun is torch.distributed.run; on CPU the processes talk over gloo)
    argv = ["--norms", "syncbn", "--batch-sizes", "8", "--epochs", "1", "--seeds", "1"]
    argv += ["--limit", "40", "--experiment", "curves", "--no-progress", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    result = subprocess.run(
        [*launcher, "--nproc-per-node", "2", "-m", "normlab", "compare", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = json.loads((Path(tmp_path) / "results.json").read_text())
    assert record["world_size"] == 2 and record["per_process_batch"] == 4
