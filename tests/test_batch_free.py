import copy

import pytest
import torch
from hybrid_oracles import per_channel
from torch import nn

from normlab import create_norm
from normlab.layers.batch_free import EvoNormB0, EvoNormS0, FilterResponseNorm


def randomize(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "eps":
                p.copy_(torch.randn_like(p) * 0.5 + (1 if name in ("weight", "v") else 0))
    return m


def frn_oracle(x, m):
    x = x.double()
    nu2 = (x**2).mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x**2
    eps = m.eps.double().abs() if isinstance(m.eps, torch.Tensor) else abs(m.eps)
    y = per_channel(m.weight, x.dim()) * x / torch.sqrt(nu2 + eps) + per_channel(m.bias, x.dim())
    return torch.maximum(y, per_channel(m.tau, x.dim())) if m.tlu else y


def b0_oracle(x, m, training):
    x = x.double()
    nd, spatial = x.dim(), tuple(range(2, x.dim()))
    if training:
        var_b = x.var(dim=(0, *spatial), correction=0, keepdim=True)
    else:
        var_b = per_channel(m.running_var, nd)
    var_i = x.var(dim=spatial, correction=0, keepdim=True)
    v = per_channel(m.v, nd)
    den = torch.maximum(torch.sqrt(var_b + m.eps), v * x + torch.sqrt(var_i + m.eps))
    return x / den * per_channel(m.weight, nd) + per_channel(m.bias, nd)


def s0_oracle(x, m):
    x = x.double()
    n, c = x.shape[:2]
    grouped = x.reshape(n, m.num_groups, -1)
    var = grouped.var(dim=-1, correction=0, keepdim=True)
    std = torch.sqrt(var + m.eps).expand_as(grouped).reshape(x.shape)
    num = x * torch.sigmoid(per_channel(m.v, x.dim()) * x)
    return num / std * per_channel(m.weight, x.dim()) + per_channel(m.bias, x.dim())


@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 7), (2, 6, 4, 5), (2, 6, 2, 3, 2)])
@pytest.mark.parametrize("learnable", [False, True])
def test_frn_matches_oracle_train_and_eval(shape, learnable):
    torch.manual_seed(0)
    m = randomize(FilterResponseNorm(6, eps=1e-3, learnable_eps=learnable))
    x = torch.randn(shape) * 2
    for mode in (True, False):
        m.train(mode)
        torch.testing.assert_close(m(x).double(), frn_oracle(x, m), rtol=1e-5, atol=1e-5)


def test_frn_gradients_learnable_eps_and_no_tlu():
    torch.manual_seed(1)
    m = randomize(FilterResponseNorm(3, eps=1e-2, learnable_eps=True)).double()
    with torch.no_grad():
        m.eps.fill_(-1e-2)  # a step may push it below 0: |ε| is used
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    ref = copy.deepcopy(m)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn_like(x)
    m(x).backward(g)
    frn_oracle(x2, ref).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(m.eps.grad, ref.eps.grad)
    torch.testing.assert_close(m.tau.grad, ref.tau.grad)
    plain = randomize(FilterResponseNorm(3, tlu=False))
    assert "tau" not in dict(plain.named_parameters())
    torch.testing.assert_close(
        plain(x.float()).double(), frn_oracle(x, plain), rtol=1e-5, atol=1e-5
    )
    assert set(FilterResponseNorm(3).state_dict()) == {"weight", "bias", "tau"}


def test_frn_is_not_centered_and_channels_last():
    torch.manual_seed(2)
    a = randomize(FilterResponseNorm(4))
    b = FilterResponseNorm(4, channel_axis=-1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 3, 3) + 5.0
    torch.testing.assert_close(b(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), a(x))
    unit = FilterResponseNorm(4, tlu=False)
    assert (unit(x) > 0).all()  # x/RMS(x) keeps the sign: no centering


@pytest.mark.parametrize("shape", [(4, 6, 7), (3, 6, 4, 5), (2, 6, 2, 3, 2)])
def test_evonorm_b0_matches_oracle_train_and_eval(shape):
    torch.manual_seed(3)
    m = randomize(EvoNormB0(6))
    x = torch.randn(shape) * 2 + 1
    torch.testing.assert_close(m(x).double(), b0_oracle(x, m, True), rtol=1e-5, atol=1e-5)
    m.eval()
    torch.testing.assert_close(m(x).double(), b0_oracle(x, m, False), rtol=1e-5, atol=1e-5)


def test_evonorm_b0_running_variance_as_batch_norm_and_grads():
    torch.manual_seed(4)
    m, bn = EvoNormB0(3), nn.BatchNorm2d(3)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 3
        m(x), bn(x)
    torch.testing.assert_close(m.running_var, bn.running_var)
    cumulative = EvoNormB0(3, momentum=None)
    xs = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    for x in xs:
        cumulative(x)
    want = torch.stack([x.var(dim=(0, 2, 3), correction=1) for x in xs]).mean(0)
    torch.testing.assert_close(cumulative.running_var, want)
    m = randomize(EvoNormB0(3)).double()
    x = torch.randn(3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    m.eval()
    assert torch.autograd.gradcheck(m, (x,))
    assert set(m.state_dict()) == {"weight", "bias", "v", "running_var", "num_batches_tracked"}


@pytest.mark.parametrize("shape,groups", [((2, 8), 4), ((3, 8, 5), 2), ((2, 8, 3, 4), 8)])
def test_evonorm_s0_matches_oracle_and_gradcheck(shape, groups):
    torch.manual_seed(5)
    m = randomize(EvoNormS0(8, num_groups=groups))
    x = torch.randn(shape) * 2 + 1
    torch.testing.assert_close(m(x).double(), s0_oracle(x, m), rtol=1e-5, atol=1e-5)
    m = m.double()
    xd = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (xd,))


def test_evonorm_s0_channels_last_and_group_size():
    torch.manual_seed(6)
    a = randomize(EvoNormS0(8, group_size=4))
    assert a.num_groups == 2
    b = EvoNormS0(8, 2, channel_axis=-1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(
        b(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), a(x), rtol=1e-5, atol=1e-5
    )


def test_registry():
    assert isinstance(create_norm("frn", 8), FilterResponseNorm)
    assert isinstance(create_norm("evonorm-b0", 8), EvoNormB0)
    assert create_norm("evonorm-s0", 64).num_groups == 32
    assert create_norm("evonorm-s0", 24, group_size=6).num_groups == 4


@pytest.mark.parametrize(
    "build",
    [
        lambda: FilterResponseNorm(0),
        lambda: FilterResponseNorm(4, eps=-1.0),
        lambda: FilterResponseNorm(4, channel_axis=2),
        lambda: EvoNormB0(4, momentum=2.0),
        lambda: EvoNormB0(True),
        lambda: EvoNormS0(24),  # 32 groups do not divide 24
        lambda: EvoNormS0(8, num_groups=3),
        lambda: EvoNormS0(8, num_groups=2, group_size=4),
        lambda: EvoNormS0(8, group_size=0),
    ],
)
def test_constructor_errors(build):
    with pytest.raises(ValueError, match="expected"):
        build()


def test_input_errors():
    for m in (FilterResponseNorm(4), EvoNormB0(4), EvoNormS0(4, 2)):
        with pytest.raises(ValueError, match="expected 4 channels"):
            m(torch.randn(2, 3, 5))
        with pytest.raises(TypeError):
            m(torch.ones(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 3 dims"):
        EvoNormB0(4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="more than 1 value"):
        EvoNormB0(4)(torch.randn(1, 4, 1))
