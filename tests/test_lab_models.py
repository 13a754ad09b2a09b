"""The laboratory's models: every norm from the registry, RNN per-step statistics,
the synchronized batch norm used by `syncbn`, and the appearance shifts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
from normlab.lab import models
from normlab.lab.models import PlainCNN, RowRNN, SmallResNet, build_model, norm_layer
from normlab.lab.shifts import SHIFTS, brightness, contrast, gamma, invert, noise

NORMS = ["bn", "gn", "in", "ln", "none"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def registry_calls(monkeypatch):
    """Record every (name, channels) the models ask the registry for."""
    calls = []
    real = normlab.create_norm

    def spy(name, channels, **options):
        calls.append((name, channels))
        return real(name, channels, **options)

    monkeypatch.setattr(normlab, "create_norm", spy)
    return calls


@pytest.mark.parametrize("model", ["cnn", "resnet"])
def test_every_norm_comes_from_the_registry_with_the_conv_width(model, registry_calls):
    net = build_model(model, "gn", image_shape=(1, 16, 16), num_classes=10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    # one norm per conv, asked for with that conv's output channels, in order
    assert registry_calls == [("gn", c.out_channels) for c in convs]
    assert net(torch.rand(3, 1, 16, 16)).shape == (3, 10)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("model", ["cnn", "resnet", "rnn"])
def test_models_train_a_step_with_every_norm(model, norm):
    if (model, norm) == ("rnn", "in"):
        with pytest.raises(ValueError, match="cannot normalize a hidden vector"):
            build_model(model, norm, image_shape=(3, 16, 12), num_classes=7)
        return
    torch.manual_seed(0)
    net = build_model(model, norm, image_shape=(3, 16, 12), num_classes=7)
    x = torch.rand(4, 3, 16, 12)
    loss = nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 2, 6]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_none_means_no_norm_layers():
    net = build_model("cnn", "none", image_shape=(1, 16, 16), num_classes=10)
    with_bn = build_model("cnn", "bn", image_shape=(1, 16, 16), num_classes=10)
    conv_params = sum(
        p.numel()
        for m in net.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
        for p in m.parameters()
    )
    assert sum(p.numel() for p in net.parameters()) == conv_params
    assert sum(p.numel() for p in with_bn.parameters()) > conv_params


def test_cnn_deepest_maps_are_2x2_on_16x16():
    net = PlainCNN("bn", 1, 10, width=16, depth=5)
    assert net.features(torch.rand(2, 1, 16, 16)).shape == (2, 64, 2, 2)


def test_resnet_has_torchvision_names_and_shapes():
    net = SmallResNet("bn", 3, 10, width=8, blocks=2)
    names = dict(net.named_modules())
    for name in ["bn1", "layer1.0.bn1", "layer1.1.bn2", "layer2.0.downsample.1", "layer4.1.bn2"]:
        assert name in names
    assert "layer1.0.downsample" not in names or names["layer1.0.downsample"] is None
    assert net(torch.rand(2, 3, 16, 16)).shape == (2, 10)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="model: expected one of"):
        build_model("vgg", "bn", image_shape=(1, 8, 8), num_classes=2)
    with pytest.raises(ValueError, match="depth >= 1"):
        PlainCNN("bn", 1, 10, depth=0)
    with pytest.raises(ValueError, match="blocks >= 1"):
        SmallResNet("bn", 1, 10, blocks=0)


def test_rnn_keeps_batch_statistics_per_time_step_and_shares_layer_norm():
    bn = RowRNN("bn", 1, 10, width=16, steps=8, row_size=8)
    ln = RowRNN("ln", 1, 10, width=16, steps=8, row_size=8)
    assert bn.per_step and len(bn.norm_x) == 8 and len(bn.norm_h) == 8
    assert not ln.per_step and len(ln.norm_x) == 1
    with pytest.raises(ValueError, match="per-step batch statistics exist for 8 rows"):
        bn(torch.rand(2, 1, 9, 8))
    assert ln(torch.rand(2, 1, 9, 8)).shape == (2, 10)  # LN reads any length


def test_rnn_layer_norm_is_per_sample_batch_norm_is_not():
    # In training mode, LN's output for one image does not depend on the rest of the
    # batch; BN's does (its statistics are the batch's). This is why LN suits RNNs.
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    for norm, independent in (("ln", True), ("bn", False)):
        net = RowRNN(norm, 1, 10, width=16, steps=8, row_size=8).train()
        alone = net(x[:3])
        together = net(x)[:3]
        assert torch.allclose(alone, together, atol=1e-5) is independent


def test_rnn_reads_rows_in_order():
    # Flipping the image upside down changes the sequence, hence the output.
    torch.manual_seed(0)
    net = RowRNN("ln", 1, 10, width=16, steps=8, row_size=8).eval()
    x = torch.rand(2, 1, 8, 8)
    assert not torch.allclose(net(x), net(x.flip(2)))


def test_sync_batch_norm_alone_is_batch_norm():
    torch.manual_seed(0)
    sync, reference = norm_layer("syncbn", 5), nn.BatchNorm2d(5)
    x = torch.randn(4, 5, 3, 3) * 3 + 1
    assert torch.allclose(sync(x), reference(x), atol=1e-5)
    assert torch.allclose(sync.running_var, reference.running_var, atol=1e-5)
    sync.eval()
    reference.eval()
    assert torch.allclose(sync(x), reference(x), atol=1e-5)


def test_syncbn_is_a_norm_name_for_every_model():
    net = build_model("cnn", "syncbn", image_shape=(1, 16, 16), num_classes=10)
    assert sum(1 for m in net.modules() if hasattr(m, "running_mean")) == 5
    assert set(models.CONVERTED_NORMS) == {"ibn-a", "ibn-b"}


# ---------------------------------------------------------------- shifts


def test_shifts_follow_their_formulas():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 6, 6) * 0.5 + 0.25  # no clipping for these parameters
    c = contrast(x, 0.3)
    assert torch.allclose(c.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-6)
    assert torch.allclose(c.std((1, 2, 3)), 0.3 * x.std((1, 2, 3)), atol=1e-6)
    assert torch.allclose(brightness(x, 0.1), x + 0.1)
    assert torch.equal(brightness(torch.ones(1, 1, 2, 2)), torch.ones(1, 1, 2, 2))  # clipped
    assert torch.allclose(gamma(x, 2.0), x * x)
    assert torch.allclose(invert(invert(x)), x)
    assert torch.equal(noise(x), noise(x))  # the same noise every call
    assert 0.15 < float((noise(x, 0.2) - x).std()) < 0.25
    for shift in SHIFTS.values():
        y = shift(torch.rand(2, 3, 4, 4))
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_ibn_a_is_ibn_net_placement_on_the_resnet():
    net = build_model("resnet", "ibn-a", image_shape=(3, 16, 16), num_classes=10)
    ibn = {name for name, m in net.named_modules() if isinstance(m, normlab.IBN)}
    assert ibn == {"layer1.0.bn1", "layer2.0.bn1", "layer3.0.bn1"}  # not the stem, not layer4
    assert net(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="rnn"):
        build_model("rnn", "ibn-a", image_shape=(1, 16, 16), num_classes=10)


def test_ibn_b_traces_through_normlab_layers():
    # The blocks hold normlab norms, whose forwards read shapes: tracing must keep them whole.
    net = build_model("resnet", "ibn-b", image_shape=(3, 16, 16), num_classes=10)
    names = {name for name, m in net.named_modules()}
    assert {"layer1.0.IN", "layer2.0.IN"} <= names and "layer3.0.IN" not in names
    assert isinstance(net.bn1, normlab.InstanceNorm) and net.bn1.affine
    assert net(torch.rand(2, 3, 16, 16)).shape == (2, 10)
