"""convert(): every norm replaced, what carries carried and reported, behaviour never dropped;
the IBN-Net recipes placed by torchvision module names on a ResNet-50-shaped model."""

import copy
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import normlab
from normlab import registry
from normlab.convert import convert, is_norm

# ----------------------------------------------------------------- a ResNet-50-shaped model
# torchvision's module names and block layout, written here for the tests (no torchvision).


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), width=64, num_classes=10):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], 2)
        self.layer3 = self._make_layer(width * 4, layers[2], 2)
        self.layer4 = self._make_layer(width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * 4, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomize_norms(model, seed=0):
    """Non-trivial affine and running statistics, so that carrying them is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, name, None) if is_norm(m) else None
                if t is not None:
                    low = 0.5 if name in ("weight", "running_var") else -1.0
                    t.copy_(torch.rand(t.shape, generator=g) * 1.5 + low)
    return model


def resnet50_like(width=64):
    torch.manual_seed(0)
    return randomize_norms(ResNet(width=width))


def _bn_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


# ----------------------------------------------------------------- plain conversions


def test_bn_to_gn_carries_affine_and_reports_the_rest():
    model = resnet50_like(width=8)
    before = {n: (m.weight.clone(), m.bias.clone()) for n, m in model.named_modules() if is_norm(m)}
    model.layer1[0].bn1.weight.requires_grad_(False)
    model, report = convert(model, "gn", num_groups=2)
    assert len(report) == len(before) == 53  # 1 stem + 16 blocks·3 + 4 downsample
    for name, (weight, bias) in before.items():
        layer = model.get_submodule(name)
        assert type(layer) is normlab.GroupNorm and layer.num_groups == 2
        torch.testing.assert_close(layer.weight, weight)
        torch.testing.assert_close(layer.bias, bias)
    assert not model.layer1[0].bn1.weight.requires_grad and model.layer1[0].bn2.weight.requires_grad
    missing = report.not_carried["layer1.0.bn1"]
    assert any(s.startswith("running_mean") for s in missing)
    assert "layer1.0.bn1: BatchNorm2d -> GroupNorm" in str(report)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_dtype_device_and_mode_are_kept():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    model = model.double()
    model[3].eval()
    model, _ = convert(model, "ln2d")
    assert model[1].weight.dtype == torch.float64 and model[1].training and not model[3].training
    assert model(torch.randn(2, 3, 5, 5, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("to", ["in", "ln", "ln2d", "gn", "rms", "bn", "frozenbn", "syncbn"])
def test_every_registry_name_builds_a_working_model(to):
    model = resnet50_like(width=8)
    model, report = convert(model, to)
    assert not _bn_names(model)  # normlab's BatchNorm (any rank) is not a BatchNorm2d
    assert len(report) == 53
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_running_stats_carry_between_layers_that_have_them():
    bn = randomize_norms(nn.Sequential(nn.BatchNorm2d(6, eps=1e-3, momentum=0.3)))
    bn[0].num_batches_tracked.fill_(7)
    (inorm,), report = convert(copy.deepcopy(bn), "in", track_running_stats=True)
    assert report.not_carried == {}
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(inorm, key), getattr(bn[0], key))
    assert (inorm.eps, inorm.momentum) == (1e-3, 0.3)
    # options given explicitly win over the carried values
    (inorm,) = convert(copy.deepcopy(bn), "in", eps=1e-6)[0]
    assert inorm.eps == 1e-6


def test_class_or_factory_as_target_and_where_filters():
    model = resnet50_like(width=8)
    model, report = convert(model, normlab.InstanceNorm2d, where="layer4.*", affine=True)
    assert {r.name for r in report.replaced} == {
        n for n, m in model.named_modules() if n.startswith("layer4.") and is_norm(m)
    }
    assert type(model.layer4[0].bn1) is normlab.InstanceNorm2d
    assert isinstance(model.layer3[0].bn1, nn.BatchNorm2d)
    model, report = convert(
        model,
        lambda c, **o: nn.GroupNorm(4, c),
        where=lambda name, m: isinstance(m, nn.BatchNorm2d) and "downsample" in name,
    )
    # layer4's downsample is an InstanceNorm2d by now
    assert len(report) == 3 and type(model.layer2[0].downsample[1]) is nn.GroupNorm


def test_channels_last_layers_stay_channels_last():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    model, report = convert(model, "rms")
    assert model[1].channel_axis == -1
    x = torch.randn(2, 5, 8)
    h = model[0](x)
    expected = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-5) * model[1].weight
    torch.testing.assert_close(model[1](h), expected)


def test_shared_layers_stay_shared_and_root_norm_is_replaced():
    norm = nn.BatchNorm1d(4)
    model = nn.Sequential(norm, nn.ReLU(), norm)
    model, report = convert(model, "gn", num_groups=2)
    assert model[0] is model[2] and len(report) == 1
    new, report = convert(nn.BatchNorm2d(4), "gn", num_groups=2)
    assert type(new) is normlab.GroupNorm


def test_round_trip_through_sync_batch_norm_is_identical():
    model = resnet50_like(width=8).double()
    original = copy.deepcopy(model)
    model, _ = convert(model, "syncbn")
    assert all(isinstance(m, normlab.SyncBatchNorm) for m in model.modules() if is_norm(m))
    model, _ = convert(model, "bn")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for mode in ("eval", "train"):
        getattr(original, mode)(), getattr(model, mode)()
        torch.testing.assert_close(model(x), original(x), rtol=1e-9, atol=1e-9)
    state, expected = model.state_dict(), original.state_dict()
    assert state.keys() == expected.keys()
    for key in state:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------- subclasses


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style norm + activation."""

    def __init__(self, num_features, act=nn.ReLU):
        super().__init__(num_features)
        self.drop = nn.Dropout(0.0)
        self.act = act()

    def forward(self, x):
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            self.momentum, self.eps,
        )  # fmt: skip
        return self.act(self.drop(x))


class MyBatchNorm(nn.BatchNorm2d):
    """Changes only the defaults: safe to treat as a BatchNorm2d."""

    def __init__(self, num_features):
        super().__init__(num_features, eps=1e-3)


class WithGate(nn.BatchNorm2d):
    def __init__(self, num_features):
        super().__init__(num_features)
        self.gate = nn.Linear(num_features, num_features)


def test_norm_activation_keeps_its_activation_and_keys():
    layer = randomize_norms(BatchNormAct2d(6, act=nn.GELU)).eval()
    x = torch.randn(3, 6, 4, 4)
    new, report = convert(copy.deepcopy(layer), "gn", num_groups=3)
    assert isinstance(new, normlab.NormAct) and type(new.norm) is normlab.GroupNorm
    assert isinstance(new.act, nn.GELU)
    gn = nn.GroupNorm(3, 6)
    gn.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    torch.testing.assert_close(new(x), F.gelu(gn(x)))
    assert "kept drop/act" in str(report)
    frozen = normlab.freeze(copy.deepcopy(layer))
    assert frozen.state_dict().keys() == {"weight", "bias", "running_mean", "running_var"}
    torch.testing.assert_close(frozen(x), layer(x))
    torch.testing.assert_close(pickle.loads(pickle.dumps(frozen))(x), layer(x))


def test_norm_act_is_looked_into():
    model = randomize_norms(
        nn.Sequential(nn.Conv2d(3, 8, 1), normlab.norm_act("bn", 8, act="silu"))
    )
    keys = model.state_dict().keys()
    model, report = convert(model, "frozenbn")
    assert [r.name for r in report.replaced] == ["1.norm"]
    assert isinstance(model[1], normlab.NormAct) and isinstance(model[1].act, nn.SiLU)
    assert model.state_dict().keys() == keys - {"1.num_batches_tracked"}
    # and a registry norm-activation target receives what the old norm carried
    bn = randomize_norms(nn.Sequential(nn.BatchNorm2d(8)))
    (new,), report = convert(copy.deepcopy(bn), "bn-relu")
    torch.testing.assert_close(new.norm.running_var, bn[0].running_var)
    assert report.not_carried == {}


def test_subclass_that_only_changes_defaults_is_its_base():
    new, report = convert(nn.Sequential(MyBatchNorm(4)), "bn")
    assert type(new[0]) is normlab.BatchNorm and new[0].eps == 1e-3


def test_subclass_with_extra_submodule_fails_clearly():
    with pytest.raises(TypeError, match=r"0 \(WithGate.*submodules \['gate'\]"):
        convert(nn.Sequential(WithGate(4)), "gn", num_groups=2)


# ----------------------------------------------------------------- IBN-Net recipes


class _TestIBN(nn.Module):
    """IBN-a layer for the tests: InstanceNorm on the first half, BatchNorm on the rest."""

    def __init__(self, planes, ratio=0.5):
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)
        self.planes = planes

    def forward(self, x):
        a, b = torch.split(x, [self.half, self.planes - self.half], 1)
        return torch.cat([self.IN(a), self.BN(b)], 1)


@pytest.fixture
def ibn(monkeypatch):
    """The registry's "ibn" where there is one; otherwise the tests' IBN-a layer."""
    if "ibn" not in normlab.available_norms():
        entry = registry.Entry(_TestIBN, "IBN-a (tests)")
        monkeypatch.setitem(registry._REGISTRY, "ibn", entry)


def test_ibn_a_places_ibn_on_bn1_of_layer1_to_layer3(ibn):
    model = resnet50_like()
    original = copy.deepcopy(model)
    model, report = convert(model, "ibn-a")
    expected = {f"layer{s}.{b}.bn1" for s, n in ((1, 3), (2, 4), (3, 6)) for b in range(n)}
    assert {r.name for r in report.replaced} == expected
    for name in expected:
        assert not isinstance(model.get_submodule(name), nn.BatchNorm2d)
    unchanged = _bn_names(original) - expected
    # stem, bn2/bn3, layer4, downsample (the IBN layers' own BN halves aside)
    assert unchanged == {n for n in _bn_names(model) if not n.endswith("bn1.BN")}
    assert (
        "bn1" in unchanged and "layer4.0.bn1" in unchanged and "layer1.0.downsample.1" in unchanged
    )
    keys = model.state_dict().keys()
    assert {"layer1.0.bn1.IN.weight", "layer1.0.bn1.BN.running_var"} <= keys
    # the IN half takes the first channels' γ, β; the BN half the rest, with its statistics
    old, new = original.layer2[1].bn1, model.layer2[1].bn1
    half = new.IN.weight.numel()
    torch.testing.assert_close(new.IN.weight, old.weight[:half])
    torch.testing.assert_close(new.BN.bias, old.bias[half:])
    torch.testing.assert_close(new.BN.running_mean, old.running_mean[half:])
    assert any("running_mean[0:" in s for s in report.not_carried["layer2.1.bn1"])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _bottleneck_with_in(block, inorm, x):
    """The IBN-b block by hand: IN after the residual sum, before the last ReLU."""
    out = F.relu(block.bn1(block.conv1(x)))
    out = F.relu(block.bn2(block.conv2(out)))
    out = block.bn3(block.conv3(out))
    identity = x if block.downsample is None else block.downsample(x)
    return F.relu(inorm(out + identity))


def test_ibn_b_stem_instance_norm_and_in_after_the_last_blocks_of_layer1_layer2():
    model = resnet50_like().eval()
    original = copy.deepcopy(model)
    model, report = convert(model, "ibn-b")
    assert type(model.bn1) is normlab.InstanceNorm and model.bn1.num_features == 64
    assert model.bn1.affine and not model.bn1.track_running_stats
    torch.testing.assert_close(model.bn1.weight, original.bn1.weight)
    keys = model.state_dict().keys()
    added = {k.rsplit(".", 1)[0] for k in keys if ".IN." in k}
    assert added == {"layer1.2.IN", "layer2.3.IN"}
    assert model.layer1[2].IN.num_features == 256 and model.layer2[3].IN.num_features == 512
    stem_stats = {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"}
    new_keys = {f"{n}.{p}" for n in added for p in ("weight", "bias")}
    assert (set(original.state_dict()) - stem_stats) | new_keys == set(keys)
    with torch.no_grad():
        model.layer1[2].IN.weight.uniform_(0.5, 2)
    x = torch.randn(2, 256, 8, 8)
    expected = _bottleneck_with_in(original.layer1[2], model.layer1[2].IN, x.clone())
    torch.testing.assert_close(model.layer1[2](x.clone()), expected)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert [r.name for r in report.replaced] == ["bn1", "layer1.2", "layer2.3"]


# ----------------------------------------------------------------- errors


def test_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        convert("model", "gn")
    with pytest.raises(TypeError, match="expected `to` a registry name"):
        convert(model, 3)
    with pytest.raises(ValueError, match="unknown normalization 'gm'.*did you mean 'gn'"):
        convert(model, "gm")
    with pytest.raises(TypeError, match="where= a predicate"):
        convert(model, "gn", where=3)
    with pytest.raises(ValueError, match="no normalization layer matched"):
        convert(model, "gn", where="layer9.*")
    with pytest.raises(ValueError, match="no normalization layer matched"):
        convert(nn.Linear(2, 2), "gn")
    with pytest.raises(TypeError, match="expected .* to build an nn.Module"):
        convert(model, lambda c: "not a module")
    with pytest.raises(TypeError, match="building .* failed"):
        convert(model, "gn", no_such_option=1)
    with pytest.raises(ValueError, match="per-activation"):
        convert(nn.Sequential(normlab.BatchNorm((3, 4), per_activation=True)), "gn")
    with pytest.raises(ValueError, match="trailing dims"):
        convert(nn.Sequential(nn.LayerNorm((4, 5))), "rms")


def test_recipe_errors(ibn):
    with pytest.raises(ValueError, match="expected a ResNet with torchvision module names"):
        convert(nn.Sequential(nn.BatchNorm2d(3)), "ibn-a")
    model = resnet50_like(width=8)
    model.layer1[0] = nn.Conv2d(32, 32, 1)
    with pytest.raises(ValueError, match="layer1.0 to be a block with a norm 'bn1'"):
        convert(model, "ibn-a")
    model = resnet50_like(width=8)
    model.layer1[2].__class__ = NoFinalReLU
    with pytest.raises(ValueError, match="layer1.2 to end with relu.*not a ReLU"):
        convert(model, "ibn-b")
    model.layer1[2].__class__ = Bottleneck
    model.layer1[2].forward = lambda x: x
    with pytest.raises(ValueError, match="patched on the instance"):
        convert(model, "ibn-b")


class NoFinalReLU(Bottleneck):
    def forward(self, x):
        return self.bn3(self.conv3(self.conv2(self.conv1(x)))) + x


def test_switched_off_features_stay_off():
    bn = nn.Sequential(
        nn.BatchNorm2d(4, affine=False), nn.BatchNorm2d(4, track_running_stats=False)
    )
    model, report = convert(copy.deepcopy(bn), "syncbn")
    assert model[0].weight is None and model[1].running_mean is None
    model, report = convert(copy.deepcopy(bn), "ln2d")  # LayerNorm2d has no such switch
    assert model[0].weight is None
    model, report = convert(copy.deepcopy(bn), "rms")  # RMSNorm has no `affine`
    assert "does not take {'affine': False}" in str(report)


def test_bn_to_ibn_and_back_carries_the_parts():
    bn = randomize_norms(nn.Sequential(nn.BatchNorm2d(6)))
    ibn_model, _ = convert(copy.deepcopy(bn), "ibn")
    assert isinstance(ibn_model[0], normlab.IBN)
    back, report = convert(ibn_model, "bn")
    for key in ("weight", "bias"):
        torch.testing.assert_close(getattr(back[0], key), getattr(bn[0], key))
    assert "IN.weight+BN.weight->weight" in report.replaced[0].carried
    assert "BN.num_batches_tracked->num_batches_tracked" in report.replaced[0].carried
    assert report.not_carried["0"] == ["running_mean (IN has none)", "running_var (IN has none)"]


# ----------------------------------------------------------------- recognised by behaviour


class TimmLayerNorm2d(nn.LayerNorm):
    """timm.layers.LayerNorm2d (timm 1.0), copied here: timm imports torchvision at import
    time, which this test environment cannot install. A LayerNorm over C of NCHW data."""

    def __init__(self, num_channels, eps=1e-6, affine=True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ForwardAsBase(nn.LayerNorm):
    """Overrides forward with the base's computation (timm's LayerNorm does this)."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ScaledRMS(nn.Module):
    """A T5/Llama-style RMS norm under another name: weight, `epsilon`, no torch base."""

    def __init__(self, d, epsilon=1e-3):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.epsilon = epsilon

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.epsilon) * self.weight


class NotANorm(nn.Module):
    """Has a weight vector and an eps, but only scales: must not be taken for a norm."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * self.weight + self.eps


class DoublingLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return 2 * super().forward(x)


def _transformer(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), norm, nn.GELU(), nn.Linear(16, 16), nn.LayerNorm(16))


def test_ln_keeps_a_transformer_layer_norm_per_token():
    model = randomize_norms(_transformer(nn.LayerNorm(16)))
    x = torch.randn(3, 5, 6) * 4 + 1
    expected = model(x)
    model, report = convert(model, "ln")
    assert all(type(m) is normlab.LayerNorm and m.channel_axis == -1 for m in model[1::3])
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # a CNN's batch norm still becomes the per-sample layer norm over channels and positions
    (new,), _ = convert(nn.Sequential(nn.BatchNorm2d(4)), "ln")
    assert type(new) is normlab.GroupNorm and new.num_groups == 1


def test_timm_layer_norm_2d_converts_with_outputs_unchanged():
    layer = randomize_norms(nn.Sequential(TimmLayerNorm2d(6)))
    x = torch.randn(2, 6, 5, 7) * 3 + 2
    expected = layer(x)
    for to, kind in (("ln2d", normlab.LayerNorm2d), ("ln", normlab.LayerNorm)):
        (new,), report = convert(copy.deepcopy(layer), to)
        assert isinstance(new, kind) and new.channel_axis == 1 and new.eps == 1e-6
        torch.testing.assert_close(new(x), expected, rtol=1e-5, atol=1e-5)
    (new,), _ = convert(copy.deepcopy(layer), "rms")  # an RMS norm over the same axis
    w = layer[0].weight.reshape(-1, 1, 1)
    expected = x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(new(x), expected, rtol=1e-5, atol=1e-5)


def test_subclass_whose_forward_is_the_base_computation_is_the_base():
    layer = randomize_norms(nn.Sequential(ForwardAsBase(8)))
    x = torch.randn(2, 3, 8)
    (new,), _ = convert(copy.deepcopy(layer), "ln")
    assert type(new) is normlab.LayerNorm
    torch.testing.assert_close(new(x), layer(x))


def test_rms_norm_without_a_torch_base_is_recognised_by_behaviour():
    torch.manual_seed(0)
    norm = ScaledRMS(8)
    assert is_norm(norm) and not is_norm(NotANorm(8))
    model = nn.Sequential(nn.Linear(4, 8), norm, nn.Linear(8, 8), NotANorm(8))
    x = torch.randn(3, 2, 4) * 1e-2  # small enough that epsilon (1e-3) matters
    expected = model(x)
    model, report = convert(model, "rms")
    assert [r.name for r in report.replaced] == ["1"]
    assert type(model[1]) is normlab.RMSNorm and model[1].eps == 1e-3
    assert type(model[3]) is NotANorm
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_behaviour_that_cannot_be_kept_still_raises():
    with pytest.raises(TypeError, match=r"0 \(DoublingLayerNorm.*overrides forward"):
        convert(nn.Sequential(DoublingLayerNorm(8)), "ln")


class HandWrittenNorm(nn.Module):
    """A per-position norm written out by hand, under a name no tool knows."""

    def __init__(self, d, eps, centered, axis):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d, dtype=torch.float64) + 0.5)
        self.bias = nn.Parameter(torch.randn(d, dtype=torch.float64)) if centered else None
        self.variance_epsilon, self.centered, self.axis = eps, centered, axis

    def forward(self, x):
        h = x.movedim(self.axis, -1)
        if self.centered:
            h = h - h.mean(-1, keepdim=True)
        y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.variance_epsilon)
        y = y * self.weight + (self.bias if self.bias is not None else 0)
        return y.movedim(-1, self.axis)


@given(
    d=st.integers(2, 12),
    eps=st.sampled_from([1e-6, 1e-5, 1e-3, 0.1]),
    centered=st.booleans(),
    axis=st.sampled_from([1, -1]),
    seed=st.integers(0, 2**16),
)
def test_any_per_position_norm_is_recognised_and_kept_like_for_like(d, eps, centered, axis, seed):
    torch.manual_seed(seed)
    norm = HandWrittenNorm(d, eps, centered, axis)
    x = torch.randn((2, d, 3, 4) if axis == 1 else (2, 5, d), dtype=torch.float64) + 1
    expected = norm(x)
    new, report = convert(norm, "ln" if centered else "rms")
    assert new.channel_axis == axis and new.eps == eps
    assert type(new) is (normlab.LayerNorm if centered else normlab.RMSNorm)
    torch.testing.assert_close(new(x), expected, rtol=1e-9, atol=1e-9)


def test_weight_norm_parametrization_is_not_an_activation_norm():
    torch.manual_seed(0)
    model = nn.Sequential(normlab.weight_norm(nn.Conv2d(3, 4, 1)), nn.BatchNorm2d(4))
    model, report = convert(model, "gn", num_groups=2)
    assert [r.name for r in report.replaced] == ["1"]
    assert is_norm(normlab.IBNb(4)) and model(torch.randn(2, 3, 5, 5)).shape == (2, 4, 5, 5)
