"""Helpers shared by the laboratory's tests: process trees from /proc, records without
their timing fields, and `normlab` run in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from normlab.lab.train import TIMING_FIELDS

SRC = str(Path(__file__).resolve().parents[1] / "src")


def untimed(records: list[dict]) -> list[dict]:
    """Records without the fields that vary between executions of the same run."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":  # zombies are dead already
            parents[int(entry)] = int(fields[1])
    return parents


def descendants(pid: int) -> set[int]:
    """Every living process below `pid`."""
    parents = _parents()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (not zombies)."""
    return pids & set(_parents())


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Wait until none of `pids` runs, at most `timeout` s; return those left."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def normlab_process(args: list[str], cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """`python -m normlab ARGS` in a child process, with torch's default thread count (each
    run sets its own), output captured."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = SRC
    return subprocess.Popen(
        [sys.executable, "-m", "normlab", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_normlab(
    args: list[str], cwd: str | os.PathLike | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """`python -m normlab ARGS` to the end: its status, stdout and stderr."""
    proc = normlab_process(args, cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
