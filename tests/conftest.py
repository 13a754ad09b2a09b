import os

import pytest
import torch
from hypothesis import settings

# Small, bounded property tests: the law is checked on many shapes, not for a long time.
settings.register_profile("normlab", max_examples=40, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "normlab"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def numba_kernels(monkeypatch):
    """Every call a Numba kernel can take goes to it (ATen's fused kernels off, no size
    floor), cut into 3 tasks on the thread pool as if it were large."""
    from normlab.kernels import cpu_function, dispatch

    monkeypatch.setattr(dispatch, "MIN_ELEMENTS", 0)
    monkeypatch.setitem(dispatch._global, "native", False)
    monkeypatch.setattr(cpu_function, "SERIAL_BELOW", 0)
    monkeypatch.setattr(cpu_function, "threads", lambda: 3)
    cpu_function._layout.cache_clear()
    yield
    cpu_function._layout.cache_clear()
