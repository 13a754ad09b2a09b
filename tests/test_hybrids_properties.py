"""Laws that hold for every input: hypothesis over shapes, offsets and mixing weights."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab.kernels import use_reference
from normlab.layers.batch_free import EvoNormB0, EvoNormS0, FilterResponseNorm
from normlab.layers.batch_instance import BatchInstanceNorm
from normlab.layers.batchnorm import BatchNorm
from normlab.layers.ibn import IBN
from normlab.layers.norm_act import NormAct
from normlab.layers.renorm import BatchRenorm
from normlab.layers.switchable import SwitchableNorm
from normlab.layers.weight_norm import weight_norm

shapes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.integers(2, 4))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, offset=st.sampled_from([0.0, 1e3, -50.0]), seed=st.integers(0, 99))
def test_switchable_moments_equal_direct_ones(shape, offset, seed):
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64) + offset
    _, layer, batch = SwitchableNorm(shape[1], variance="paper").moments(x)
    torch.testing.assert_close(layer.mean, x.mean((1, 2, 3)))
    torch.testing.assert_close(layer.var, x.var((1, 2, 3), correction=0))
    torch.testing.assert_close(batch.mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(batch.var, x.var((0, 2, 3), correction=0))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, rho=st.floats(0, 1), seed=st.integers(0, 99))
def test_batch_instance_is_linear_in_the_gate(shape, rho, seed):
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64)
    outs = []
    for value in (rho, 1.0, 0.0):
        m = BatchInstanceNorm(shape[1], track_running_stats=False).double()
        with torch.no_grad():
            m.gate.fill_(value)
        outs.append(m(x))
    torch.testing.assert_close(outs[0], rho * outs[1] + (1 - rho) * outs[2])


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 99), offset=st.floats(-10, 10))
def test_renorm_without_slack_is_batch_norm(shape, seed, offset):
    if shape[0] * shape[2] * shape[3] < 2:
        return
    torch.manual_seed(seed)
    x = torch.randn(shape) + offset
    brn, bn = BatchRenorm(shape[1], rmax=1.0, dmax=0.0), BatchNorm(shape[1])
    # bit for bit on the same path (batch norm alone may take ATen's kernel)
    with use_reference():
        assert torch.equal(brn(x), bn(x))
    assert torch.equal(brn.running_var, bn.running_var)


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(0.01, 100), seed=st.integers(0, 99))
def test_weight_norm_ignores_the_scale_of_v(scale, seed):
    torch.manual_seed(seed)
    m = weight_norm(torch.nn.Conv2d(3, 4, 2))
    before = m.weight.detach().clone()
    with torch.no_grad():
        m.parametrizations.weight.original1.mul_(scale)
    torch.testing.assert_close(m.weight, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "build",
    [
        lambda: IBN(8),
        lambda: BatchInstanceNorm(8),
        lambda: SwitchableNorm(8),
        lambda: BatchRenorm(8, rmax=3.0, dmax=5.0),
        lambda: FilterResponseNorm(8),
        lambda: EvoNormB0(8),
        lambda: EvoNormS0(8, 4),
        lambda: NormAct(SwitchableNorm(8)),
    ],
)
def test_half_precision_output_keeps_the_input_dtype(build, dtype):
    torch.manual_seed(0)
    m = build()
    x = (torch.randn(4, 8, 5, 5) * 3 + 100).to(dtype)
    for mode in (True, False):
        m.train(mode)
        ref = copy.deepcopy(m)(x.float())
        y = copy.deepcopy(m)(x)
        assert y.dtype == dtype
        # statistics in float32: no overflow or cancellation at mean 100, only the output rounding
        torch.testing.assert_close(y.float(), ref, rtol=0.02, atol=0.02)
