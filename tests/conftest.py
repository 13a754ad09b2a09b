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
def numba_kernels():
    """Every call a Numba kernel can take goes to it (no size floor, ATen's kernels not
    tried), cut into 3 tasks on the thread pool as if it were large."""
    from normlab.kernels import use_backend

    with use_backend("numba", threads=3):
        yield
