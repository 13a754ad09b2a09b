"""The Triton kernels run by Triton's interpreter on the CPU, against the reference path.

The interpreter executes the same kernel code with NumPy, so the kernels' indexing,
masking, statistics and gradients are checked on any machine with triton installed
(speed on a GPU is measured by ``normlab bench`` there). Triton decides at import
whether it interprets, so the checks (``tests/triton_interpreter.py``) run once in a
child process; each one is reported here as its own test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the GPU kernels are written in triton")

from triton_interpreter import checks  # noqa: E402  (names only: no kernel runs here)

HERE = Path(__file__).parent

NAMES = list(checks())


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(HERE / "triton_interpreter.py")],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", NAMES)
def test_triton_kernel_under_the_interpreter(results, name):
    assert results[name] == "ok", results[name]
