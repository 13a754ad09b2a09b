import pickle

import pytest
import torch
from hybrid_oracles import batch_dims, per_channel, spatial_dims, standardize
from torch import nn

from normlab import create_norm
from normlab.layers.ibn import IBN, IBNb


def randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
        for name, b in m.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn_like(b))
    return m


class TorchIBN(nn.Module):
    """The release's layer written with torch.nn, split by explicit sizes."""

    def __init__(self, planes, ratio):
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x):
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], 1)
        return torch.cat([self.IN(a), self.BN(b)], 1)


@pytest.mark.parametrize("planes,ratio", [(64, 0.5), (7, 0.5), (12, 0.25), (9, 0.7)])
def test_matches_torch_composition_train_eval_and_grads(planes, ratio):
    torch.manual_seed(0)
    ref = randomize(TorchIBN(planes, ratio))
    ours = IBN(planes, ratio)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, planes, 5, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    for mode in (True, False):
        ref.train(mode), ours.train(mode)
        y_ref, y = ref(x), ours(x2)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        y_ref.backward(g), y.backward(g)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-4)
        for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=n)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)


def test_float64_oracle_from_definition():
    torch.manual_seed(1)
    m = randomize(IBN(10, 0.3)).double()
    x = torch.randn(3, 10, 4, 4, dtype=torch.float64)
    h = 3
    a, b = x[:, :h], x[:, h:]
    want_in = standardize(a, spatial_dims(a), 1e-5) * per_channel(m.IN.weight, 4) + per_channel(
        m.IN.bias, 4
    )
    want_bn = standardize(b, batch_dims(b), 1e-5) * per_channel(m.BN.weight, 4) + per_channel(
        m.BN.bias, 4
    )
    torch.testing.assert_close(m(x), torch.cat([want_in, want_bn], 1))
    m.eval()
    want_bn = (b - per_channel(m.BN.running_mean, 4)) / torch.sqrt(
        per_channel(m.BN.running_var, 4) + 1e-5
    ) * per_channel(m.BN.weight, 4) + per_channel(m.BN.bias, 4)
    torch.testing.assert_close(m(x), torch.cat([want_in, want_bn], 1))


def test_gradcheck_float64():
    torch.manual_seed(2)
    m = randomize(IBN(5, 0.5)).double()
    x = torch.randn(3, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_state_dict_keys_as_release():
    keys = set(IBN(64).state_dict())
    assert keys == {
        "IN.weight",
        "IN.bias",
        "BN.weight",
        "BN.bias",
        "BN.running_mean",
        "BN.running_var",
        "BN.num_batches_tracked",
    }
    m = IBN(64)
    assert m.IN.weight.shape == (32,) and m.BN.weight.shape == (32,)
    assert IBN(12, 0.25).IN.num_features == 3 and IBN(7).IN.num_features == 3


def test_channels_last_equals_channels_first():
    torch.manual_seed(3)
    a = randomize(IBN(9, 0.5))
    b = IBN(9, 0.5, channel_axis=-1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 9, 4, 5)
    y = b(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, a(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.BN.running_mean, a.BN.running_mean)


def test_registry_and_pickle():
    m = create_norm("ibn", 16, ratio=0.25)
    assert isinstance(m, IBN) and m.instance_channels == 4
    clone = pickle.loads(pickle.dumps(m))
    x = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(clone(x), m(x))


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((0,), {}),
        ((1,), {}),  # int(0.5) = 0 instance channels
        ((8, 0.0), {}),
        ((8, 1.0), {}),
        ((8, "half"), {}),
        ((8.0,), {}),
        ((8, 0.05), {}),  # int(0.4) = 0
        ((8,), {"channel_axis": 2}),
    ],
)
def test_constructor_errors(args, kwargs):
    with pytest.raises(ValueError, match="expected"):
        IBN(*args, **kwargs)


def test_input_errors():
    m = IBN(8)
    with pytest.raises(ValueError, match="expected 8 channels"):
        m(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="at least 3 dims"):
        m(torch.randn(2, 8))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(2, 8, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="more than 1"):
        m(torch.randn(2, 8, 1, 1))


def test_ibn_b_adds_residual_then_normalizes():
    torch.manual_seed(4)
    m = randomize(IBNb(6))
    ref = nn.InstanceNorm2d(6, affine=True)
    ref.load_state_dict(m.state_dict())
    out, identity = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(m(out, identity), ref(out + identity), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(out), ref(out), rtol=1e-5, atol=1e-5)
    assert set(m.state_dict()) == {"weight", "bias"}
    block = nn.Module()
    block.IN = m
    assert set(block.state_dict()) == {"IN.weight", "IN.bias"}
    with pytest.raises(ValueError, match="residual of shape"):
        m(out, identity[:1])
    with pytest.raises(ValueError, match="num_features"):
        IBNb(0)
