import copy
import pickle

import pytest
import torch
from hybrid_oracles import per_channel
from torch import nn

from normlab import BatchNorm2d, create_norm
from normlab.kernels import use_reference
from normlab.layers.renorm import PAPER_DMAX, PAPER_RMAX, BatchRenorm, Ramp


def brn_oracle(x, m, running_mean, running_var):
    """The paper's x̂ = (x − μ_B)/σ_B·r + d with r, d detached, float64, (N, C, ...) input."""
    x = x.double()
    dims = (0, *range(2, x.dim()))
    mu = x.mean(dims, keepdim=True)
    sigma_b = torch.sqrt(((x - mu) ** 2).mean(dims, keepdim=True) + m.eps)
    rm, rv = per_channel(running_mean, x.dim()), per_channel(running_var, x.dim())
    sigma = torch.sqrt(rv + m.eps)
    rmax, dmax = m.limits()
    r = (sigma_b / sigma).clamp(1 / rmax, rmax).detach()
    d = ((mu - rm) / sigma).clamp(-dmax, dmax).detach()
    xhat = (x - mu) / sigma_b * r + d
    return xhat * per_channel(m.weight, x.dim()) + per_channel(m.bias, x.dim()), r, d


def randomize(m):
    with torch.no_grad():
        m.weight.copy_(torch.randn_like(m.weight))
        m.bias.copy_(torch.randn_like(m.bias))
    return m


@pytest.mark.parametrize("shape", [(16, 4), (6, 4, 7), (4, 4, 3, 5)])
def test_rmax_one_dmax_zero_is_exactly_batch_norm(shape):
    torch.manual_seed(0)
    brn = randomize(BatchRenorm(4, rmax=1.0, dmax=0.0))
    bn = BatchNorm2d(4) if len(shape) == 4 else create_norm("bn", 4)
    bn.load_state_dict(brn.state_dict())
    with torch.no_grad():  # running estimates far from the batch: r and d would matter
        for m in (bn, brn):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(50.0)
    torch_bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](4)
    torch_bn.load_state_dict(bn.state_dict())
    for step in range(3):
        x = (torch.randn(shape) * 2 + 1).requires_grad_(True)
        outs = []
        for m in (brn, bn, torch_bn):
            xi = x.detach().clone().requires_grad_(True)
            m.zero_grad()
            # the same formula on the same path (the reference path) is bit for bit equal;
            # normlab's batch norm may otherwise take ATen's kernel
            with use_reference(m is not torch_bn):
                y = m(xi)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            outs.append((y, xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
        for a, b in zip(outs[0], outs[1], strict=True):
            assert torch.equal(a, b), step
        for a, b in zip(outs[0], outs[2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(brn, name), getattr(bn, name))
        torch.testing.assert_close(getattr(brn, name), getattr(torch_bn, name))
    brn.eval(), bn.eval()
    x = torch.randn(shape)
    assert torch.equal(brn(x), bn(x))


def test_clipping_when_running_estimates_are_far_off():
    torch.manual_seed(1)
    m = randomize(BatchRenorm(3, rmax=3.0, dmax=5.0, momentum=0.0)).double()
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([100.0, 0.0, -0.1]))
        m.running_var.copy_(torch.tensor([1.0, 1e4, 1.0]))
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    want, r, d = brn_oracle(x2, m, m.running_mean, m.running_var)
    assert d.flatten()[0] == -5.0  # (μ_B − 100)/1 clipped to −dmax
    assert r.flatten()[1] == pytest.approx(1 / 3)  # σ_B/100 clipped to 1/rmax
    assert -5 < d.flatten()[2] < 5 and 1 / 3 < r.flatten()[2] < 3  # unclipped channel
    y = m(x)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)


def test_gradcheck_where_r_and_d_are_constant():
    # r and d carry no gradient by definition, so finite differences agree with autograd
    # only where they do not move: rmax = 1, dmax = 0, or every channel clipped.
    torch.manual_seed(4)
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    m = randomize(BatchRenorm(3, rmax=1.0, dmax=0.0, momentum=0.0)).double()
    assert torch.autograd.gradcheck(m, (x,))
    m = randomize(BatchRenorm(3, rmax=1.5, dmax=0.5, momentum=0.0)).double()
    with torch.no_grad():
        m.running_mean.fill_(500.0), m.running_var.fill_(1e4)
    assert torch.autograd.gradcheck(m, (x,))


def test_running_stats_update_and_eval_is_batch_norm():
    torch.manual_seed(2)
    m = randomize(BatchRenorm(3, rmax=2.0, dmax=1.0))
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(m.state_dict())
    for _ in range(4):
        x = torch.randn(5, 3, 4, 4) * 3 + 2
        m(x), ref(x)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)
    m.eval(), ref.eval()
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


def test_schedules():
    assert PAPER_RMAX(0) == 1.0 and PAPER_RMAX(5_000) == 1.0 and PAPER_RMAX(40_000) == 3.0
    assert PAPER_RMAX(22_500) == pytest.approx(2.0) and PAPER_RMAX(10**6) == 3.0
    assert PAPER_DMAX(5_000) == 0.0 and PAPER_DMAX(15_000) == pytest.approx(2.5)
    assert PAPER_DMAX(25_000) == 5.0
    m = BatchRenorm(2)
    assert m.limits() == (1.0, 0.0)
    m.num_batches_tracked.fill_(40_000)
    assert m.limits() == (3.0, 5.0)
    seen = []
    m = BatchRenorm(2, rmax=lambda s: seen.append(s) or 1.0 + s, dmax=0.5)
    for _ in range(3):
        m(torch.randn(4, 2))
    assert seen == [0, 1, 2] and m.limits() == (4.0, 0.5)
    with pytest.raises(ValueError, match="begin < finish"):
        Ramp(1, 3, 10, 5)


def test_checkpoints_pickle_and_copies():
    bn = nn.BatchNorm2d(4)
    m = BatchRenorm(4)
    m.load_state_dict(bn.state_dict())
    bn.load_state_dict(m.state_dict())
    clone = pickle.loads(pickle.dumps(m))
    assert isinstance(clone.rmax, Ramp) and clone.limits() == m.limits()
    copy.deepcopy(m)
    assert isinstance(create_norm("brn", 4, rmax=2.0), BatchRenorm)


def test_channels_last():
    torch.manual_seed(3)
    a = randomize(BatchRenorm(3, rmax=3.0, dmax=5.0))
    b = BatchRenorm(3, rmax=3.0, dmax=5.0, channel_axis=-1)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.running_mean.fill_(2.0), b.running_mean.fill_(2.0)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(
        b(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), a(x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rmax": 0.5},
        {"dmax": -1.0},
        {"rmax": "ramp"},
        {"dmax": True},
        {"channel_axis": 3},
        {"momentum": -0.1},
    ],
)
def test_constructor_errors(kwargs):
    with pytest.raises(ValueError):
        BatchRenorm(4, **kwargs)


def test_input_errors():
    m = BatchRenorm(4)
    with pytest.raises(ValueError, match="expected 4 channels"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="more than 1 value"):
        m(torch.randn(1, 4))
    with pytest.raises(TypeError):
        m(torch.ones(2, 4, dtype=torch.long))
    bad = BatchRenorm(4, rmax=lambda step: 0.5)
    with pytest.raises(ValueError, match="rmax >= 1"):
        bad(torch.randn(3, 4))
