"""Eager routes: a layer's resolved call gives exactly what its full path gives.

The oracle of a routed call is the same layer's full path: a twin layer called inside
``use_backend("aten")`` (a switch: routes off, the dispatcher's own choice, which for
these small inputs is the same ATen kernel). Outputs, gradients and buffers must be
bitwise equal over several steps, in training and eval.
"""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch

import normlab
from normlab.kernels import use_backend, use_reference

SMALL = (2, 16, 8, 8)

# (id, factory, input shape, memory format or None)
ROUTED = [
    ("bn2d", lambda: normlab.BatchNorm2d(16), SMALL, None),
    ("bn2d-cl", lambda: normlab.BatchNorm2d(16), SMALL, torch.channels_last),
    ("bn2d-cumulative", lambda: normlab.BatchNorm2d(16, momentum=None), SMALL, None),
    ("bn2d-untracked", lambda: normlab.BatchNorm2d(16, track_running_stats=False), SMALL, None),
    ("bn2d-noaffine", lambda: normlab.BatchNorm2d(16, affine=False), SMALL, None),
    ("bn1d", lambda: normlab.BatchNorm1d(16), (6, 16), None),
    ("bn3d", lambda: normlab.BatchNorm3d(4), (2, 4, 3, 4, 5), None),
    ("bn-channels-last-axis", lambda: normlab.BatchNorm(8, channel_axis=-1), (2, 5, 5, 8), None),
    ("syncbn-one-process", lambda: normlab.SyncBatchNorm(16), SMALL, None),
    ("gn", lambda: normlab.GroupNorm(4, 16), SMALL, None),
    ("in", lambda: normlab.InstanceNorm2d(16), SMALL, None),
    ("in-affine", lambda: normlab.InstanceNorm2d(16, affine=True), SMALL, None),
    ("ln", lambda: normlab.LayerNorm([16, 8, 8]), SMALL, None),
    ("ln-token", lambda: normlab.LayerNorm(32), (3, 7, 32), None),
    ("ln2d", lambda: normlab.LayerNorm2d(16), SMALL, None),
    ("ln2d-cl", lambda: normlab.LayerNorm2d(16), SMALL, torch.channels_last),
    ("rms", lambda: normlab.RMSNorm([16, 8, 8]), SMALL, None),
    ("rms-eps", lambda: normlab.RMSNorm(32, eps=1e-3), (3, 7, 32), None),
    # hybrids below the kernels' size floor: ATen's kernels for the parts
    ("ibn", lambda: normlab.IBN(16), SMALL, None),
    ("ibn-cl", lambda: normlab.IBN(16), SMALL, torch.channels_last),
    ("bin", lambda: normlab.BatchInstanceNorm(16), SMALL, None),
    ("bin-cumulative", lambda: normlab.BatchInstanceNorm(16, momentum=None), SMALL, None),
]


def _sample(shape, fmt, step, dtype=torch.float32):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(step)) * 2 + 0.5
    x = x.to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def _step(layer, x, full: bool):
    x = x.detach().clone().requires_grad_(True)
    if full:
        with use_backend("aten"):
            y = layer(x)
    else:
        y = layer(x)
    w = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)
    (y * w).sum().backward()
    return y, x.grad


def _kept_routes(layer) -> list:
    """The routes a layer keeps, other than its full path."""
    full = {cls.__dict__.get("_full_forward") for cls in type(layer).__mro__}
    return [r for r in layer.__dict__.get("_routes", {}).values() if r not in full]


# half-precision layer norm with an affine has a gradient-dependent path (ATen's forward,
# normlab's backward): no route, see test_a_grad_dependent_choice_keeps_the_full_path;
# half-precision IBN and BIN keep their one-pass path (float32 inside)
CASES = [
    pytest.param(*row, dtype, id=f"{row[0]}-{label}")
    for row in ROUTED
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    if not (dtype == torch.bfloat16 and row[0].startswith(("ln", "ibn", "bin")))
]


@pytest.mark.parametrize(("name", "make", "shape", "fmt", "dtype"), CASES)
def test_routed_calls_equal_the_full_path(name, make, shape, fmt, dtype):
    torch.manual_seed(0)
    routed = make().to(dtype) if dtype != torch.float32 else make()
    with torch.no_grad():
        for p in routed.parameters():
            p.copy_(torch.randn(p.shape))
    full = copy.deepcopy(routed)
    for mode in ("train", "eval", "train"):
        routed.train(mode == "train"), full.train(mode == "train")
        for step in range(3):
            x = _sample(shape, fmt, step, dtype)
            y, gx = _step(routed, x, full=False)
            y_full, gx_full = _step(full, x, full=True)
            assert torch.equal(y, y_full), f"{mode} step {step}: output"
            assert y.stride() == y_full.stride(), f"{mode} step {step}: memory format"
            assert torch.equal(gx, gx_full), f"{mode} step {step}: input gradient"
    for (pname, p), (_, q) in zip(routed.named_parameters(), full.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), pname
    for (bname, b), (_, c) in zip(routed.named_buffers(), full.named_buffers(), strict=True):
        assert torch.equal(b, c), bname
    assert _kept_routes(routed), "no route was kept: the test measured the full path only"


@pytest.mark.parametrize("case", ["gn-channels-last", "ln-bf16-affine"])
def test_a_grad_dependent_choice_keeps_the_full_path(case):
    if case == "gn-channels-last":  # ATen's kernel without a gradient, normlab's with one
        layer = normlab.GroupNorm(32, 64)  # 2 channels a group, at a kernel size
        x = _sample((4, 64, 16, 16), torch.channels_last, 0)
    else:  # ATen's forward alone, or with normlab's backward
        layer, x = normlab.LayerNorm(32).bfloat16(), _sample((3, 7, 32), None, 0, torch.bfloat16)
    full = copy.deepcopy(layer)
    for grad in (False, True, False):
        with torch.set_grad_enabled(grad):
            y, y_full = layer(x), full(x)
        assert torch.equal(y, y_full)
    assert not _kept_routes(layer)
    assert layer.__dict__["_routes"], "the full path is kept for the geometry"


@pytest.mark.parametrize("cast", ["double", "half-to-float"])
def test_moving_or_casting_drops_the_routes(cast):
    layer = normlab.BatchNorm2d(16).eval()
    x = _sample(SMALL, None, 0)
    layer(x)
    layer(x)
    assert _kept_routes(layer)
    if cast == "double":
        layer.double()
        x = x.double()
        ref = torch.nn.BatchNorm2d(16).double().eval()
    else:
        layer.half().float()
        ref = torch.nn.BatchNorm2d(16).eval()
    assert "_routes" not in layer.__dict__
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


def test_assigning_an_attribute_drops_the_routes():
    layer, ref = normlab.LayerNorm(32), torch.nn.LayerNorm(32)
    x = _sample((3, 7, 32), None, 0)
    layer(x)
    layer(x)
    layer.eps = 0.5
    ref.eps = 0.5
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)
    layer.weight = torch.nn.Parameter(torch.full((32,), 3.0))
    ref.weight = torch.nn.Parameter(torch.full((32,), 3.0))
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


def test_train_and_eval_keep_their_own_routes():
    layer, ref = normlab.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
    for step in range(4):
        x = _sample(SMALL, None, step)
        for mode in (True, False):
            layer.train(mode), ref.train(mode)
            torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=0, atol=0)
    assert len(_kept_routes(layer)) == 2


def test_a_layer_with_routes_pickles_and_copies():
    layer = normlab.GroupNorm(4, 16)
    x = _sample(SMALL, None, 0)
    layer(x)
    layer(x)
    for twin in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert "_routes" not in twin.__dict__
        torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)


def test_switches_turn_the_routes_off(caplog):
    layer = normlab.BatchNorm2d(16).eval()
    x = _sample(SMALL, None, 0)
    layer(x)
    with caplog.at_level(logging.DEBUG, logger="normlab.kernels"):
        routed = layer(x)
        assert not caplog.records  # a route: no dispatcher call
        with use_reference():
            forced = layer(x)
        assert [r.getMessage().endswith("reference path forced") for r in caplog.records] == [True]
    with use_reference():
        want = normlab.BatchNorm2d(16).eval()(x)
    assert torch.equal(forced, want)
    torch.testing.assert_close(routed, want)


def test_no_routes_under_autocast_or_for_subclasses():
    layer = normlab.LayerNorm(32)
    x = _sample((3, 7, 32), None, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert "_routes" not in layer.__dict__

    class Tagged(torch.Tensor):
        pass

    layer(x.as_subclass(Tagged))
    assert "_routes" not in layer.__dict__


def test_bad_input_after_a_route_still_gets_the_full_checks():
    layer = normlab.BatchNorm2d(16)
    layer(_sample(SMALL, None, 0))
    layer(_sample(SMALL, None, 1))
    with pytest.raises(ValueError, match="expected 16 channels"):
        layer(torch.randn(2, 8, 8, 8))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 16, 1, 1))
