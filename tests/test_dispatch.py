"""The dispatcher: which path each call takes, the switches that force the reference path."""

from __future__ import annotations

import logging

import pytest
import torch

import normlab
from normlab.kernels import dispatch, explain_dispatch, set_reference, use_reference

BIG = (8, 16, 32, 32)  # 131072 elements: above the small-tensor threshold


@pytest.fixture
def numba_only(monkeypatch):
    monkeypatch.setitem(dispatch._global, "native", False)


def test_small_tensors_go_to_reference():
    assert explain_dispatch(torch.randn(2, 3, 4, 4), "n c h w -> c").startswith("reference")
    assert "elements" in explain_dispatch(torch.randn(2, 3, 4, 4), "n c h w -> c")


@pytest.mark.parametrize(
    ("pattern", "layout", "family"),
    [
        ("n c h w -> c", None, "RKR"),
        ("n c h w -> c", torch.channels_last, "RK"),
        ("n c h w -> n c", None, "KR"),
        ("n c h w -> n c", torch.channels_last, "KRK"),
        ("n c h w -> n h w", None, "KRK"),
        ("n c h w -> n", None, "KR"),
    ],
)
def test_fast_path_chosen_by_family(pattern, layout, family, numba_only):
    x = torch.randn(BIG)
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    assert explain_dispatch(x, pattern).startswith(f"cpu (numba): family {family},")


def test_contiguous_inner_run_is_the_reduced_block(numba_only):
    x = torch.randn(BIG)
    # instance norm, with or without affine: rows of H*W contiguous elements
    assert explain_dispatch(x, "n c h w -> n c").endswith("(128, 1, 1, 1024)")
    assert explain_dispatch(x, "n c h w -> n c", weight=torch.ones(16)).endswith(
        "(128, 1, 1, 1024)"
    )
    # group norm with a per-channel affine: the channel-in-group axis is split off
    assert explain_dispatch(x, "n (g k) h w -> n g", g=4, weight=torch.ones(16)).endswith(
        "(32, 4, 1, 1024)"
    )


def test_group_norm_channels_last_is_krkr():
    x = torch.randn(BIG).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert "family KRKR" in explain_dispatch(x, "n (g k) h w -> n g", g=4)


def test_unsupported_cases_fall_back_with_a_reason(monkeypatch):
    x = torch.randn(BIG)
    # R K R K in memory order does not fit K R K R
    assert "does not fit" in explain_dispatch(x, "n c h w -> c w")
    assert "dtype" in explain_dispatch(torch.randn(BIG, dtype=torch.complex64), "n c h w -> c")
    monkeypatch.setitem(dispatch._available, "numba", False)
    assert explain_dispatch(x, "n c h w -> c") == "reference: numba is not installed"
    # and the result is still right
    y = normlab.normalize(x, "n c h w -> c")
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_statistics_with_gradient_use_reference():
    x = torch.randn(BIG)
    p = normlab.plan("n c h w -> c", x.shape)
    mean = torch.zeros(p.stats_shape, requires_grad=True)
    var = torch.ones(p.stats_shape, requires_grad=True)
    y = dispatch.normalize_with(x, p, mean, var, None, None, 1e-5)
    (gm,) = torch.autograd.grad(y.sum(), mean)
    torch.testing.assert_close(gm, torch.full_like(gm, -x[:, 0].numel() / (1 + 1e-5) ** 0.5))


def test_forcing_the_reference_path(monkeypatch):
    x = torch.randn(BIG)
    assert explain_dispatch(x, "n c h w -> c").startswith("cpu")
    with use_reference():
        assert explain_dispatch(x, "n c h w -> c") == "reference: reference path forced"
        with use_reference(False):  # an inner block may re-enable the fast path
            assert explain_dispatch(x, "n c h w -> c").startswith("cpu")
    assert explain_dispatch(x, "n c h w -> c").startswith("cpu")
    previous = set_reference(True)
    try:
        assert explain_dispatch(x, "n c h w -> c").startswith("reference")
    finally:
        set_reference(previous)
    monkeypatch.setenv("NORMLAB_REFERENCE", "1")
    assert explain_dispatch(x, "n c h w -> c").startswith("reference")
    monkeypatch.setenv("NORMLAB_REFERENCE", "0")
    assert explain_dispatch(x, "n c h w -> c").startswith("cpu")


def test_choice_is_logged(caplog, numba_only):
    x = torch.randn(BIG)
    with caplog.at_level(logging.DEBUG, logger="normlab.kernels"):
        normlab.normalize(x, "n c h w -> n c")
        with use_reference():
            normlab.normalize(x, "n c h w -> n c")
    lines = [r.getMessage() for r in caplog.records]
    assert any("family KR" in line for line in lines)
    assert any("reference path forced" in line for line in lines)


def test_gpu_path_only_for_cuda_tensors():
    # CPU tensors never reach the Triton kernels, installed or not.
    assert not explain_dispatch(torch.randn(BIG), "n c h w -> c").startswith("gpu")


def test_explain_dispatch_rejects_bad_input():
    with pytest.raises(normlab.PatternError):
        explain_dispatch(torch.randn(BIG), "n c h -> c")
    with pytest.raises(ValueError, match="channels"):
        explain_dispatch(torch.randn(BIG), "n c h w -> c", weight=torch.ones(3))
