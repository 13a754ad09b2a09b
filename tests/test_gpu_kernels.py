"""The Triton kernels against the reference path (needs triton and a CUDA device)."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab.kernels import explain_dispatch, use_backend, use_reference

pytest.importorskip("triton", reason="the GPU fast path needs triton")
if not torch.cuda.is_available():
    pytest.skip("the GPU fast path needs a CUDA device", allow_module_level=True)

CASES = [
    ((8, 12, 9, 7), "n c h w -> c", {}, False),
    ((8, 12, 9, 7), "n c h w -> c", {}, True),
    ((8, 12, 9, 7), "n c h w -> n c", {}, False),
    ((8, 12, 9, 7), "n c h w -> n c", {}, True),
    ((8, 12, 9, 7), "n (g k) h w -> n g", {"g": 4}, True),
    ((8, 12, 9, 7), "n c h w -> n h w", {}, False),
]


@pytest.fixture(autouse=True)
def small_tensors_take_the_kernel():
    with use_backend("triton"):
        yield


@pytest.mark.parametrize(("shape", "pattern", "sizes", "channels_last"), CASES)
def test_gpu_matches_reference(shape, pattern, sizes, channels_last):
    x = torch.randn(shape, device="cuda") * 3 + 100
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device="cuda", requires_grad=True)
    b = torch.randn(shape[1], device="cuda", requires_grad=True)
    assert explain_dispatch(x, pattern, weight=w, **sizes).startswith("gpu")
    xf = x.clone().requires_grad_()
    y = normlab.normalize(xf, pattern, weight=w, bias=b, **sizes)
    with use_reference():
        xr = x.double().requires_grad_()
        yr = normlab.normalize(xr, pattern, weight=w.double(), bias=b.double(), **sizes)
    torch.testing.assert_close(y.double(), yr, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(x)
    for mine, ref in zip(
        torch.autograd.grad(y, (xf, w, b), g),
        torch.autograd.grad(yr, (xr, w, b), g.double()),
        strict=True,
    ):
        torch.testing.assert_close(mine.double(), ref.double(), atol=1e-3, rtol=1e-3)
