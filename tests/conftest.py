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
