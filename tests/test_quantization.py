"""conv/linear + normlab batch norm (+ ReLU) through torch.ao.quantization's fusion, with
normlab's fuser mapping: the fused model computes what the unfused one does."""

import copy

import pytest
import torch
from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.ao.quantization import fuse_modules, fuse_modules_qat

import normlab

CONFIG = {"additional_fuser_method_mapping": normlab.FUSER_METHODS}
SHAPES = {1: (4, 3, 9), 2: (4, 3, 7, 6), 3: (2, 3, 5, 4, 6)}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
RANKED = {1: normlab.BatchNorm1d, 2: normlab.BatchNorm2d, 3: normlab.BatchNorm3d}


class Block(nn.Module):
    def __init__(self, conv, bn, relu=True):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.relu = nn.ReLU() if relu else nn.Identity()
        self.head = nn.Flatten()

    def forward(self, x):
        return self.head(self.relu(self.bn(self.conv(x))))


def _trained(model, x, steps=3):
    """Non-trivial running statistics and affine, as after training."""
    model.train()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-1, 1)
        for _ in range(steps):
            model(x * 2 + 1)
    return model


def _block(rank, bn_class, relu, bias):
    torch.manual_seed(rank)
    conv = CONVS[rank](3, 8, 3, padding=1, bias=bias).double()
    return Block(conv, bn_class(8, dtype=torch.float64), relu)


def _names(relu):
    return [["conv", "bn", "relu"]] if relu else [["conv", "bn"]]


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_eval_fusion_of_conv_and_batch_norm_equals_the_unfused_model(rank, generic, relu):
    bn_class = normlab.BatchNorm if generic else RANKED[rank]
    x = torch.randn(SHAPES[rank], dtype=torch.float64)
    model = _trained(_block(rank, bn_class, relu, bias=rank != 2), x).eval()
    fused = fuse_modules(copy.deepcopy(model), _names(relu), fuse_custom_config_dict=CONFIG)
    expected_type = {False: CONVS[rank], True: getattr(nni, f"ConvReLU{rank}d")}[relu]
    assert type(fused.conv) is expected_type and isinstance(fused.bn, nn.Identity)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("generic", [False, True])
def test_eval_fusion_of_linear_and_batch_norm_1d(generic):
    torch.manual_seed(0)
    bn = (normlab.BatchNorm if generic else normlab.BatchNorm1d)(8, dtype=torch.float64)
    model = Block(nn.Linear(5, 8).double(), bn, relu=False)
    x = torch.randn(16, 5, dtype=torch.float64)
    model = _trained(model, x).eval()
    fused = fuse_modules(copy.deepcopy(model), [["conv", "bn"]], fuse_custom_config_dict=CONFIG)
    assert type(fused.conv) is nn.Linear
    torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("relu", [False, True])
def test_qat_fusion_trains_as_the_unfused_model(relu):
    x = torch.randn(SHAPES[2], dtype=torch.float64)
    model = _trained(_block(2, normlab.BatchNorm2d, relu, bias=False), x)
    fused = fuse_modules_qat(copy.deepcopy(model), _names(relu), fuse_custom_config_dict=CONFIG)
    assert type(fused.conv) is (nni.ConvBnReLU2d if relu else nni.ConvBn2d)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused.conv[1].running_var, model.bn.running_var)


def test_batch_norm_without_bias_folds_with_beta_zero():
    x = torch.randn(SHAPES[2], dtype=torch.float64)
    model = _block(2, lambda c, **o: normlab.BatchNorm2d(c, bias=False, **o), False, True)
    model.train()
    with torch.no_grad():
        model(x * 3 - 1)
    model.eval()
    fused = fuse_modules(copy.deepcopy(model), [["conv", "bn"]], fuse_custom_config_dict=CONFIG)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


def test_channels_last_batch_norm_is_refused():
    model = _block(2, lambda c, **o: normlab.BatchNorm2d(c, channel_axis=-1, **o), False, True)
    with pytest.raises(ValueError, match="expected a batch norm over the channels at dim 1"):
        fuse_modules(model.eval(), [["conv", "bn"]], fuse_custom_config_dict=CONFIG)
