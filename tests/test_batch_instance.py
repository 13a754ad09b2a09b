import copy

import pytest
import torch
from hybrid_oracles import batch_dims, per_channel, spatial_dims, standardize
from torch import nn

from normlab import create_norm
from normlab.layers.batch_instance import BatchInstanceNorm, clamp_gates_, param_groups


def oracle(x, m, training):
    """(ρ·x̂_B + (1 − ρ)·x̂_I)·γ + β in float64, from the paper's definition."""
    nd = x.dim()
    rho = per_channel(m.gate, nd).clamp(0, 1)
    if training:
        x_b = standardize(x, batch_dims(x), m.eps)
    else:
        x_b = (x.double() - per_channel(m.running_mean, nd)) / torch.sqrt(
            per_channel(m.running_var, nd) + m.eps
        )
    x_i = standardize(x, spatial_dims(x), m.eps)
    return (rho * x_b + (1 - rho) * x_i) * per_channel(m.weight, nd) + per_channel(m.bias, nd)


def make(c, gate=None, **kw):
    m = BatchInstanceNorm(c, **kw)
    with torch.no_grad():
        m.weight.copy_(torch.randn(c))
        m.bias.copy_(torch.randn(c))
        m.gate.copy_(torch.rand(c) if gate is None else gate)
    return m


@pytest.mark.parametrize("shape", [(4, 6, 7), (3, 6, 4, 5), (2, 6, 3, 2, 3)])
def test_matches_oracle_train_then_eval(shape):
    torch.manual_seed(0)
    m = make(6)
    x = torch.randn(shape) * 3 + 1
    torch.testing.assert_close(m(x).double(), oracle(x, m, True), rtol=1e-5, atol=1e-5)
    m.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(m(x).double(), oracle(x, m, False), rtol=1e-5, atol=1e-5)


def test_running_stats_as_torch_batchnorm():
    torch.manual_seed(1)
    m, ref = make(5), nn.BatchNorm2d(5)
    for _ in range(3):
        x = torch.randn(4, 5, 3, 3) * 2 + 0.5
        m(x), ref(x)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)
    assert int(m.num_batches_tracked) == 3


def test_gate_one_is_batch_norm_and_zero_is_instance_norm():
    torch.manual_seed(2)
    x = torch.randn(4, 5, 3, 4)
    bn, inorm = nn.BatchNorm2d(5), nn.InstanceNorm2d(5, affine=True)
    m1, m0 = make(5, torch.ones(5)), make(5, torch.zeros(5))
    bn.load_state_dict(m1.state_dict(), strict=False)
    inorm.load_state_dict({"weight": m0.weight, "bias": m0.bias})
    torch.testing.assert_close(m1(x), bn(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m0(x), inorm(x), rtol=1e-5, atol=1e-5)
    m1.eval(), bn.eval(), m0.eval()
    torch.testing.assert_close(m1(x), bn(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m0(x), inorm(x), rtol=1e-5, atol=1e-5)  # IN ignores running stats


def test_gate_outside_unit_interval_behaves_clamped():
    torch.manual_seed(3)
    x = torch.randn(4, 3, 5, 5)
    outside = make(3, torch.tensor([1.7, -0.4, 0.3]))
    inside = copy.deepcopy(outside)
    with torch.no_grad():
        inside.gate.copy_(torch.tensor([1.0, 0.0, 0.3]))
    torch.testing.assert_close(outside(x), inside(x))
    outside(x).square().sum().backward()
    assert outside.gate.grad[0] == 0 and outside.gate.grad[1] == 0 and outside.gate.grad[2] != 0
    clamp_gates_(outside)
    assert torch.equal(outside.gate.detach(), inside.gate.detach())


def test_gate_at_initial_one_gets_a_gradient():
    torch.manual_seed(4)
    m = BatchInstanceNorm(3)
    (m(torch.randn(4, 3, 5, 5)) * torch.randn(4, 3, 5, 5)).sum().backward()
    assert (m.gate.grad != 0).all()


def test_gradients_match_oracle_and_gradcheck():
    torch.manual_seed(5)
    m = make(4).double()
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    m(x).backward(g)
    params = [m.weight, m.bias, m.gate]
    grads = [p.grad.clone() for p in params]
    ref = copy.deepcopy(m)
    oracle(x2, ref, True).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    for got, p in zip(grads, [ref.weight, ref.bias, ref.gate], strict=True):
        torch.testing.assert_close(got, p.grad)
    m.track_running_stats = False  # keep buffers still during gradcheck's repeated calls
    assert torch.autograd.gradcheck(m, (x.detach().requires_grad_(True),))


def test_channels_last_and_state_dict_keys():
    torch.manual_seed(6)
    a = make(5)
    b = BatchInstanceNorm(5, channel_axis=-1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(
        b(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), a(x), rtol=1e-5, atol=1e-5
    )
    assert set(a.state_dict()) == {
        "weight",
        "bias",
        "gate",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    old = {k: v for k, v in a.state_dict().items() if k != "num_batches_tracked"}
    BatchInstanceNorm(5).load_state_dict(old)  # checkpoints without the counter load


def test_without_running_stats_or_affine():
    torch.manual_seed(7)
    m = BatchInstanceNorm(4, affine=False, track_running_stats=False).eval()
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(m(x).double(), standardize(x, (0, 2), 1e-5), rtol=1e-5, atol=1e-5)
    assert set(m.state_dict()) == {"gate"}


def test_param_groups_gate_lr_and_no_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchInstanceNorm(4), nn.Conv2d(4, 4, 1))
    groups = param_groups(model, lr=0.1, weight_decay=5e-4)
    assert groups[1]["params"] == [model[1].gate]
    assert groups[1]["lr"] == pytest.approx(1.0) and groups[1]["weight_decay"] == 0
    assert len(groups[0]["params"]) == len(list(model.parameters())) - 1
    torch.optim.SGD(groups, lr=0.1)
    with pytest.raises(TypeError):
        param_groups([1], 0.1)
    with pytest.raises(ValueError, match="lr"):
        param_groups(model, -1.0)


def test_registry():
    assert isinstance(create_norm("bin", 8), BatchInstanceNorm)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_features": 0},
        {"num_features": 2.5},
        {"num_features": 4, "eps": -1.0},
        {"num_features": 4, "momentum": 1.5},
        {"num_features": 4, "channel_axis": 0},
    ],
)
def test_constructor_errors(kwargs):
    with pytest.raises(ValueError, match="expected"):
        BatchInstanceNorm(**kwargs)


def test_input_errors():
    m = BatchInstanceNorm(4)
    with pytest.raises(ValueError, match="expected 4 channels"):
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="at least 3 dims"):
        m(torch.randn(2, 4))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        m(torch.randn(2, 4, 1, 1))
    with pytest.raises(TypeError):
        m(torch.ones(2, 4, 3, dtype=torch.int32))
