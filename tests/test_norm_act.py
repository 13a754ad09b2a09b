import copy
import pickle

import pytest
import torch
from torch import nn

from normlab import create_norm, norm_act
from normlab.layers.batch_instance import BatchInstanceNorm
from normlab.layers.ibn import IBN
from normlab.layers.norm_act import NormAct
from normlab.layers.switchable import SwitchableNorm


def trained(m, c=6):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    m.train()
    m(torch.randn(4, c, 3, 3))
    return m


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.BatchNorm2d(6),
        lambda: nn.GroupNorm(3, 6),
        lambda: IBN(6),
        lambda: BatchInstanceNorm(6),
        lambda: SwitchableNorm(6),
    ],
)
def test_state_dict_equals_plain_norm_and_loads_both_ways(build):
    torch.manual_seed(0)
    plain = trained(build())
    wrapped = NormAct(build(), act="relu")
    wrapped.load_state_dict(plain.state_dict())  # strict: every key matched
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(wrapped.state_dict()[k], v)
    back = build()
    back.load_state_dict(trained(NormAct(build()), 6).state_dict())
    x = torch.randn(3, 6, 4, 4)
    for mode in (True, False):
        plain.train(mode), wrapped.train(mode)
        torch.testing.assert_close(wrapped(x), torch.relu(plain(x)))


def test_prefixes_in_a_model_and_metadata():
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    fused = nn.Sequential(nn.Conv2d(3, 4, 1), NormAct(nn.BatchNorm2d(4)))
    trained(plain[1], 4)
    sd = plain.state_dict()
    fused.load_state_dict({k: v for k, v in sd.items()})
    out = fused.state_dict()
    assert list(out) == list(sd)
    assert out._metadata["1"] == sd._metadata["1"] == {"version": 2}
    x = torch.randn(2, 3, 5, 5)
    plain.eval(), fused.eval()
    torch.testing.assert_close(fused(x), plain(x))
    plain.load_state_dict(fused.state_dict())
    prefixed = {
        k.replace("1.", "1.norm.", 1) if k.startswith("1.") else k: v for k, v in sd.items()
    }
    fused.load_state_dict(prefixed)  # keys with the child's own names load as well


def test_activation_with_parameters_keeps_its_keys():
    m = NormAct(nn.BatchNorm1d(3), act=nn.PReLU())
    keys = set(m.state_dict())
    assert "act.weight" in keys and "weight" in keys and "norm.weight" not in keys
    m.load_state_dict(m.state_dict())


def test_dropout_activations_and_attribute_access():
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(4)
    m = NormAct(bn, act="silu", drop=0.5)
    x = torch.randn(3, 4, 5, 5)
    torch.manual_seed(3)
    y = m(x)
    torch.manual_seed(3)
    want = nn.functional.silu(nn.functional.dropout(bn(x), 0.5, True))
    torch.testing.assert_close(y, want)
    m.eval()
    torch.testing.assert_close(m(x), nn.functional.silu(bn(x)))
    assert m.running_mean is bn.running_mean and m.num_features == 4
    assert isinstance(NormAct(bn, act=None).act, nn.Identity)
    with pytest.raises(AttributeError):
        _ = m.no_such_thing


def test_copies_registry_and_factory():
    m = norm_act("bn", 8, act="relu", momentum=0.2)
    assert isinstance(m.norm, nn.modules.batchnorm._BatchNorm) and m.norm.momentum == 0.2
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert list(clone.state_dict()) == list(m.state_dict())
    r = create_norm("gn-silu", 64)
    assert isinstance(r, NormAct) and isinstance(r.act, nn.SiLU) and r.norm.num_groups == 32
    assert "bn-relu" in __import__("normlab").available_norms()


def test_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        NormAct("bn")
    with pytest.raises(ValueError, match="act"):
        NormAct(nn.BatchNorm2d(3), act="softplusplus")
    with pytest.raises(ValueError, match="drop"):
        NormAct(nn.BatchNorm2d(3), drop=1.0)
    with pytest.raises(ValueError, match="unknown normalization"):
        norm_act("bnx", 3)


def test_sync_batchnorm_conversion_keeps_the_activation():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), NormAct(nn.BatchNorm2d(4), act="silu"))
    keys = list(model.state_dict())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(synced[1].norm, nn.SyncBatchNorm) and isinstance(synced[1].act, nn.SiLU)
    assert list(synced.state_dict()) == keys
