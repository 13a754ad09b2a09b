"""The sweep under faults: runs that raise, corrupt run files, a second sweep on the same
folder, worker processes whose parent dies, and a sweep killed (SIGKILL) at points and
restarted, which must end with the records of an uninterrupted sweep whatever --jobs."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from lab_helpers import descendants, normlab_process, run_normlab, untimed, wait_gone

from normlab.lab import sweep as sweep_module
from normlab.lab.sweep import (
    DataSpec,
    SweepLocked,
    plan_runs,
    record_path,
    run_sweep,
    sweep_lock,
)

DATA = DataSpec("digits", limit=40)


@pytest.fixture
def two_threads():
    # The caller's own thread setting must not reach a run's numbers.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _configs(norms=("bn", "gn"), sizes=(4, 8)):
    return plan_runs(list(norms), list(sizes), ["batch-size"], seeds=1, epochs=1, limit=40)


def test_records_do_not_depend_on_jobs_or_the_callers_threads(tmp_path, two_threads):
    configs = _configs()
    serial, _ = run_sweep(configs, tmp_path / "one", DATA, jobs=1, progress=False)
    pooled, _ = run_sweep(configs, tmp_path / "two", DATA, jobs=2, progress=False)
    assert untimed(serial) == untimed(pooled)
    assert all(r["threads"] == 1 for r in serial)  # the thread count is recorded
    assert torch.get_num_threads() == 2  # and the caller's setting is restored


def test_the_thread_count_is_part_of_the_configuration(tmp_path):
    one = _configs(("gn",), (8,))
    two = plan_runs(["gn"], [8], ["batch-size"], seeds=1, epochs=1, limit=40, threads=2)
    assert one[0].key() != two[0].key()
    (record,), _ = run_sweep(two, tmp_path, DATA, progress=False)
    assert record["threads"] == 2


def test_a_crash_is_recorded_and_retried_a_value_error_is_final(tmp_path, monkeypatch):
    configs = _configs(("bn", "gn", "ln"), (8,))
    real = sweep_module.train_run

    def flaky(config, *args, **kwargs):
        if config.norm == "gn":
            raise RuntimeError("out of memory (simulated)")
        if config.norm == "ln":
            raise ValueError("ln cannot work here (simulated)")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "train_run", flaky)
    records, executed = run_sweep(configs, tmp_path, DATA, progress=False)
    assert executed == 3
    by_norm = {r["norm"]: r for r in records}
    assert "accuracy" in by_norm["bn"]
    assert by_norm["gn"]["crashed"] == "RuntimeError: out of memory (simulated)"
    assert by_norm["ln"]["failed"] == "ln cannot work here (simulated)"
    on_disk = json.loads(record_path(tmp_path, configs[1]).read_text())
    assert on_disk["crashed"].startswith("RuntimeError")  # the message is kept
    monkeypatch.setattr(sweep_module, "train_run", real)
    records, executed = run_sweep(configs, tmp_path, DATA, progress=False)
    assert executed == 1  # only the crashed run again; the failed one is final
    assert "accuracy" in records[1] and records[2]["failed"].startswith("ln cannot")


@pytest.mark.parametrize("content", [b"{}", b"\xff\xfe\x00garbage", b"[1, 2]", b'{"norm": "bn"'])
def test_an_unreadable_run_file_is_run_again_with_a_warning(tmp_path, capsys, content):
    configs = _configs(("gn",), (8,))
    first, _ = run_sweep(configs, tmp_path, DATA, progress=False)
    record_path(tmp_path, configs[0]).write_bytes(content)
    again, executed = run_sweep(configs, tmp_path, DATA, progress=False)
    assert executed == 1 and untimed(again) == untimed(first)
    assert "warning" in capsys.readouterr().err


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path):
    with sweep_lock(tmp_path):
        with pytest.raises(SweepLocked, match="another normlab compare"):
            with sweep_lock(tmp_path):
                pass
        result = run_normlab(["compare", "--norms", "gn", "--out", str(tmp_path)])
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("normlab compare: error: out: another normlab compare")
        assert "Traceback" not in result.stderr
        assert not list((tmp_path / "runs").glob("*.json"))
    with sweep_lock(tmp_path):  # released at the end of the block
        pass


SWEEP = [
    "compare",
    "--norms",
    "bn",
    "gn",
    "--batch-sizes",
    "4",
    "8",
    "--epochs",
    "1",
    "--seeds",
    "1",
    "--limit",
    "80",
    "--experiment",
    "batch-size",
    "--no-progress",
]


def _finished(out: Path) -> int:
    return len(list((out / "runs").glob("*.json"))) if (out / "runs").exists() else 0


def _kill_when(proc, out: Path, finished: int | None, timeout: float = 120) -> set[int]:
    """SIGKILL `proc` once `finished` run files exist (None: once it has children); return
    the processes that were below it."""
    deadline = time.monotonic() + timeout
    below: set[int] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        below |= descendants(proc.pid)
        if below if finished is None else _finished(out) >= finished:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        below |= descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    return below


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    proc = normlab_process([*SWEEP, "--jobs", "2", "--out", str(tmp_path)])
    workers = _kill_when(proc, tmp_path, None)
    assert workers, "the sweep started no worker process"
    assert not wait_gone(workers, timeout=15), "worker processes outlived their parent"


def test_a_sweep_killed_at_points_and_restarted_loses_nothing(tmp_path):
    # Killed with 2 jobs after one finished run, then with 1 job after two; finished with
    # 2 jobs: the records equal those of one uninterrupted sweep in this process.
    configs = plan_runs(["bn", "gn"], [4, 8], ["batch-size"], seeds=1, epochs=1, limit=80)
    expected, _ = run_sweep(
        configs, tmp_path / "reference", DataSpec("digits", limit=80), progress=False
    )
    out = tmp_path / "killed"
    left: set[int] = set()
    for jobs, finished in (("2", 1), ("1", 2)):
        proc = normlab_process([*SWEEP, "--jobs", jobs, "--out", str(out)])
        before = _finished(out)
        left |= _kill_when(proc, out, finished)
        assert _finished(out) >= before  # no finished run lost
    assert not wait_gone(left, timeout=15), "processes left behind after SIGKILL"
    result = run_normlab([*SWEEP, "--jobs", "2", "--out", str(out)])
    assert result.returncode == 0, result.stderr
    got = [json.loads(record_path(out, c).read_text()) for c in configs]
    assert untimed(got) == untimed(expected)
    assert len(json.loads((out / "results.json").read_text())) == len(configs)
