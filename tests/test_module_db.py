"""PyTorch's module test database against normlab's drop-in layers, in a process of its own.

``torch.testing._internal`` changes global state when imported (``torch.backends`` flags,
the hypothesis profile, TorchScript's call hooks), so the cases in
``torch_module_db_cases.py`` run in a separate pytest process and normlab's other tests
never see those changes.
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_torch_module_db_cases_pass_in_their_own_process():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), *sys.path])}
    env.pop("PYTEST_XDIST_WORKER", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         str(HERE / "torch_module_db_cases.py")],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail


def test_importing_this_module_left_torch_flags_alone():
    """The isolation holds: torch's test utilities were never imported here."""
    assert "torch.testing._internal.common_utils" not in sys.modules
