import copy

import pytest
import torch
from hybrid_oracles import per_channel
from torch import nn

from normlab import create_norm
from normlab.layers.switchable import (
    SwitchableNorm,
    convert_release_state_dict,
    load_release_state_dict,
    release_momentum,
)


def sn_oracle(x, weight, bias, mean_logits, var_logits, eps, unbiased, running=None):
    """The SN formula in float64 on (N, C, ...) input, moments written out by hand.

    `running` = (mean, var) replaces the BN moments (eval); None uses the batch's.
    """
    x = x.double()
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    m = flat.shape[-1]
    mean_in = flat.mean(-1)
    var_in = ((flat - mean_in[..., None]) ** 2).sum(-1) / (m - 1 if unbiased else m)
    second = var_in + mean_in**2
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = second.mean(1, keepdim=True) - mean_ln**2
    means, variances = [mean_in, mean_ln], [var_in, var_ln]
    if len(mean_logits) == 3:
        if running is None:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = second.mean(0, keepdim=True) - mean_bn**2
        else:
            mean_bn, var_bn = running[0].double()[None], running[1].double()[None]
        means.append(mean_bn)
        variances.append(var_bn)
    wm = torch.softmax(mean_logits.double(), 0)
    wv = torch.softmax(var_logits.double(), 0)
    mean = sum(w * t for w, t in zip(wm, means, strict=True))
    var = sum(w * t for w, t in zip(wv, variances, strict=True))
    shape = (n, c) + (1,) * (x.dim() - 2)
    y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    return y * per_channel(weight, x.dim()) + per_channel(bias, x.dim())


def make(c, **kw):
    m = SwitchableNorm(c, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m


def run_oracle(m, x, running=None):
    return sn_oracle(
        x,
        m.weight,
        m.bias,
        m.mean_weight,
        m.var_weight,
        m.eps,
        m.variance == "release",
        running,
    )


@pytest.mark.parametrize("variance", ["release", "paper"])
@pytest.mark.parametrize("shape", [(4, 6, 9), (3, 6, 4, 5), (2, 6, 2, 3, 3)])
def test_matches_oracle_train_and_eval(variance, shape):
    torch.manual_seed(0)
    m = make(6, variance=variance)
    x = torch.randn(shape) * 2 + 3
    torch.testing.assert_close(m(x).double(), run_oracle(m, x), rtol=1e-4, atol=1e-4)
    m.eval()
    x = torch.randn(shape)
    want = run_oracle(m, x, (m.running_mean, m.running_var))
    torch.testing.assert_close(m(x).double(), want, rtol=1e-4, atol=1e-4)


def test_without_bn_term():
    torch.manual_seed(1)
    m = make(5, using_bn=False)
    assert m.mean_weight.shape == (2,) and "running_mean" not in m.state_dict()
    x = torch.randn(1, 5, 4, 4)  # batch of one: the reason for using_bn=False
    for mode in (True, False):
        m.train(mode)
        torch.testing.assert_close(m(x).double(), run_oracle(m, x), rtol=1e-4, atol=1e-4)


def one_hot(m, k):
    with torch.no_grad():
        logits = torch.full((3,), float("-inf"))
        logits[k] = 0
        m.mean_weight.copy_(logits)
        m.var_weight.copy_(logits)
    return m


def test_one_hot_weights_reproduce_in_ln_bn_exactly():
    torch.manual_seed(2)
    x = torch.randn(4, 6, 5, 5) * 3 - 1
    refs = [
        nn.InstanceNorm2d(6, affine=True),
        nn.GroupNorm(1, 6),  # layer norm over C, H, W
        nn.BatchNorm2d(6),
    ]
    for k, ref in enumerate(refs):
        m = one_hot(make(6, variance="paper"), k)
        ref.load_state_dict(
            {
                "weight": m.weight,
                "bias": m.bias,
                **(
                    {"running_mean": m.running_mean, "running_var": m.running_var} if k == 2 else {}
                ),
            },
            strict=False,
        )
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
        m.eval(), ref.eval()
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
        if k == 2:
            torch.testing.assert_close(m.running_var, ref.running_var)
            torch.testing.assert_close(m.running_mean, ref.running_mean)


def test_derived_moments_equal_direct_ones():
    torch.manual_seed(3)
    x = (torch.randn(5, 4, 3, 6) * 10 + 1000).double()
    inst, layer, batch = SwitchableNorm(4, variance="paper").moments(x)
    torch.testing.assert_close(inst.mean, x.mean((2, 3)))
    torch.testing.assert_close(inst.var, x.var((2, 3), correction=0))
    torch.testing.assert_close(layer.mean, x.mean((1, 2, 3)))
    torch.testing.assert_close(layer.var, x.var((1, 2, 3), correction=0))
    torch.testing.assert_close(batch.mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(batch.var, x.var((0, 2, 3), correction=0))
    inst, _, _ = SwitchableNorm(4).moments(x)
    torch.testing.assert_close(inst.var, x.var((2, 3), correction=1))


def test_running_stats_follow_release_update_with_converted_momentum():
    torch.manual_seed(4)
    m = SwitchableNorm(3, momentum=release_momentum(0.9))
    mean, var = m.running_mean.clone().double(), m.running_var.clone().double()
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        m(x)
        flat = x.double().reshape(4, 3, -1)
        mi, vi = flat.mean(-1), flat.var(-1, correction=1)
        mb = mi.mean(0)
        vb = (vi + mi**2).mean(0) - mb**2
        mean, var = 0.9 * mean + 0.1 * mb, 0.9 * var + 0.1 * vb
    torch.testing.assert_close(m.running_mean.double(), mean)
    torch.testing.assert_close(m.running_var.double(), var)
    assert int(m.num_batches_tracked) == 3


def test_release_checkpoint_converts_and_behaves_the_same():
    torch.manual_seed(5)
    c = 4
    release = {
        "block.0.weight": torch.randn(c, 2, 1, 1),  # a conv: left alone
        "block.1.weight": torch.randn(1, c, 1, 1),
        "block.1.bias": torch.randn(1, c, 1, 1),
        "block.1.mean_weight": torch.randn(3),
        "block.1.var_weight": torch.randn(3),
        "block.1.running_mean": torch.randn(1, c, 1),
        "block.1.running_var": torch.rand(1, c, 1) + 0.5,
    }
    model = nn.Module()
    model.block = nn.Sequential(nn.Conv2d(2, c, 1, bias=False), SwitchableNorm(c))
    load_release_state_dict(model, release)
    sn = model.block[1].eval()
    x = torch.randn(2, c, 3, 3)
    want = sn_oracle(
        x,
        release["block.1.weight"].flatten(),
        release["block.1.bias"].flatten(),
        release["block.1.mean_weight"],
        release["block.1.var_weight"],
        1e-5,
        True,
        (release["block.1.running_mean"].flatten(), release["block.1.running_var"].flatten()),
    )
    torch.testing.assert_close(sn(x).double(), want, rtol=1e-4, atol=1e-4)
    converted = convert_release_state_dict(release)
    assert converted["block.0.weight"] is release["block.0.weight"]
    assert int(converted["block.1.num_batches_tracked"]) == 0
    no_bn = {k: v for k, v in release.items() if "running" not in k}
    no_bn["block.1.mean_weight"] = no_bn["block.1.var_weight"] = torch.zeros(2)
    converted = convert_release_state_dict(no_bn)
    assert "block.1.num_batches_tracked" not in converted
    with pytest.raises(ValueError, match="mean_weight"):
        convert_release_state_dict({"weight": torch.ones(3)})
    with pytest.raises(TypeError):
        convert_release_state_dict([1, 2])
    with pytest.raises(TypeError):
        load_release_state_dict("model", release)


@pytest.mark.parametrize("variance", ["release", "paper"])
def test_gradcheck_float64(variance):
    torch.manual_seed(6)
    m = make(3, variance=variance).double()
    x = torch.randn(3, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    m.eval()
    assert torch.autograd.gradcheck(m, (x,))


def test_gradients_match_oracle():
    torch.manual_seed(7)
    m = make(4)
    ref = copy.deepcopy(m)
    x = torch.randn(3, 4, 4, 4, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 4, 4, 4)
    m(x).backward(g)
    run_oracle(ref, x2).float().backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-3, atol=1e-4)
    for a, b in zip(m.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)


def test_channels_last_last_gamma_and_registry():
    torch.manual_seed(8)
    a = make(5)
    b = SwitchableNorm(5, channel_axis=-1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(
        b(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), a(x), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(SwitchableNorm(5, last_gamma=True).weight, torch.zeros(5))
    assert isinstance(create_norm("sn", 8, using_bn=False), SwitchableNorm)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_features": 0},
        {"num_features": 4, "variance": "unbiased"},
        {"num_features": 4, "eps": -1e-5},
        {"num_features": 4, "momentum": 0.9j},
        {"num_features": 4, "channel_axis": 2},
    ],
)
def test_constructor_errors(kwargs):
    with pytest.raises(ValueError, match="expected"):
        SwitchableNorm(**kwargs)
    with pytest.raises(ValueError, match="momentum"):
        release_momentum(1.5)


def test_input_errors():
    m = SwitchableNorm(4)
    with pytest.raises(ValueError, match="expected 4 channels"):
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="at least 3 dims"):
        m(torch.randn(2, 4))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        m(torch.randn(2, 4, 1, 1))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(2, 4, 3, 3, dtype=torch.long))
