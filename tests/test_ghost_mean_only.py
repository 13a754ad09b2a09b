"""Ghost batch norm and mean-only batch norm against torch.nn and float64 formulas."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from oracle import standardize
from torch import nn

import normlab


def _per_chunk_oracle(x, ghost, weight, bias, channels_last=False):
    """torch.nn.BatchNorm2d, a fresh one per ghost batch (momentum 1: its buffers become
    that ghost batch's mean and unbiased variance)."""
    outs, means, vars_ = [], [], []
    for chunk in x.split(ghost):
        bn = nn.BatchNorm2d(x.shape[-1] if channels_last else x.shape[1], momentum=1.0)
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        if channels_last:
            outs.append(bn(chunk.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        else:
            outs.append(bn(chunk))
        means.append(bn.running_mean)
        vars_.append(bn.running_var)
    return torch.cat(outs), torch.stack(means).mean(0), torch.stack(vars_).mean(0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_ghost_batch_norm_is_batch_norm_per_ghost_batch(channels_last):
    x = torch.randn(12, 3, 4, 5) * 2 + 1
    if channels_last:
        x = x.permute(0, 2, 3, 1).contiguous()
    layer = normlab.GhostBatchNorm(3, ghost_size=4, channel_axis=-1 if channels_last else 1)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    y = layer(xa)
    expected, mean, var = _per_chunk_oracle(
        xb, 4, layer.weight.detach(), layer.bias.detach(), channels_last
    )
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    # running estimates: one update with the ghosts' averaged mean and unbiased variance
    torch.testing.assert_close(layer.running_mean, 0.1 * mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * var, atol=1e-6, rtol=1e-5)
    assert int(layer.num_batches_tracked) == 1


@given(
    ghosts=st.integers(1, 4),
    ghost_size=st.integers(2, 5),
    channels=st.integers(1, 4),
    hw=st.tuples(st.integers(1, 3), st.integers(1, 3)),
)
def test_ghost_batch_norm_property(ghosts, ghost_size, channels, hw):
    x = torch.randn(ghosts * ghost_size, channels, *hw, dtype=torch.float64)
    layer = normlab.GhostBatchNorm(channels, ghost_size=ghost_size, dtype=torch.float64)
    expected = torch.cat([standardize(c, (0, 2, 3)) for c in x.split(ghost_size)])
    torch.testing.assert_close(layer(x), expected, atol=1e-9, rtol=1e-9)


def test_ghost_batch_norm_eval_and_small_batches_are_batch_norm():
    x = torch.randn(4, 3, 5, 5)
    ghost, bn = normlab.GhostBatchNorm(3, ghost_size=8), nn.BatchNorm2d(3)
    torch.testing.assert_close(ghost(x), bn(x))  # 4 <= 8: one ghost batch
    torch.testing.assert_close(ghost.running_var, bn.running_var)
    ghost.eval()
    bn.eval()
    z = torch.randn(3, 3, 5, 5)  # eval: running statistics, any batch size
    torch.testing.assert_close(ghost(z), bn(z))
    assert set(ghost.state_dict()) == set(bn.state_dict())


def test_ghost_batch_norm_errors():
    with pytest.raises(ValueError, match="expected ghost_size a positive int, got 0"):
        normlab.GhostBatchNorm(3, ghost_size=0)
    with pytest.raises(ValueError, match="multiple of ghost_size=4"):
        normlab.GhostBatchNorm(3, ghost_size=4)(torch.randn(10, 3, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel in each ghost batch"):
        normlab.GhostBatchNorm(3, ghost_size=1)(torch.randn(4, 3))


def test_mean_only_batch_norm_against_the_formula():
    x = (torch.randn(6, 4, 3, 3, dtype=torch.float64) * 3 + 2).requires_grad_(True)
    layer = normlab.MeanOnlyBatchNorm(4, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.uniform_(-1, 1)
    y = layer(x)
    expected = x - x.mean((0, 2, 3), keepdim=True) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(layer.running_mean, 0.1 * x.detach().mean((0, 2, 3)))
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    layer.eval()
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected = z - layer.running_mean.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(z), expected)
    assert set(layer.state_dict()) == {"bias", "running_mean", "num_batches_tracked"}


def test_mean_only_batch_norm_channels_last_and_cumulative():
    x = torch.randn(5, 3, 3, 4)
    layer = normlab.MeanOnlyBatchNorm(4, channel_axis=-1, momentum=None, bias=False)
    torch.testing.assert_close(layer(x), x - x.mean((0, 1, 2)))
    layer(x + 2)
    torch.testing.assert_close(layer.running_mean, x.mean((0, 1, 2)) + 1)  # average of two


def test_mean_only_batch_norm_errors():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        normlab.MeanOnlyBatchNorm(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="expected 3 channels at dim 1, got 4"):
        normlab.MeanOnlyBatchNorm(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="expected num_features a positive int"):
        normlab.MeanOnlyBatchNorm(0)


def test_registry_names():
    names = normlab.available_norms()
    assert "gbn" in names and "mobn" in names
    x = torch.randn(8, 16, 5, 5) + 1
    torch.testing.assert_close(
        normlab.create_norm("gbn", 16, ghost_size=2)(x).double(),
        torch.cat([standardize(c, (0, 2, 3)) for c in x.split(2)]),
        atol=1e-4,
        rtol=1e-4,
    )
    torch.testing.assert_close(
        normlab.create_norm("mobn", 16)(x).double(),
        x.double() - x.double().mean((0, 2, 3), keepdim=True),
        atol=1e-5,
        rtol=1e-5,
    )
