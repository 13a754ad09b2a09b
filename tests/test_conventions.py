"""Momentum and variance conventions, and loading Keras/Flax batch-norm weights; oracles are
the Keras/Flax update and inference formulas written out here."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab
from normlab.conventions import (
    biased_var,
    load_flax_batchnorm,
    load_keras_batchnorm,
    momentum_from_keras,
    momentum_to_keras,
    unbiased_var,
)


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 1))
def test_momentum_round_trip(m):
    assert momentum_to_keras(momentum_from_keras(m)) == pytest.approx(m, abs=1e-12)


def test_converted_momentum_gives_the_keras_moving_average():
    keras_momentum = 0.9
    layer = normlab.BatchNorm1d(3, momentum=momentum_from_keras(keras_momentum))
    moving = torch.zeros(3)  # Keras' moving_mean starts at 0 as torch's running_mean does
    for step in range(4):
        x = torch.randn(16, 3) + step
        layer(x)
        moving = keras_momentum * moving + (1 - keras_momentum) * x.mean(0)
    torch.testing.assert_close(layer.running_mean, moving)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 50), st.integers(0, 2**16))
def test_variance_conventions(n, seed):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    biased, unbiased = x.var(0, correction=0), x.var(0, correction=1)
    torch.testing.assert_close(unbiased_var(biased, n), unbiased)
    torch.testing.assert_close(biased_var(unbiased, n), biased)


def _keras(x, gamma, beta, mean, var, eps):
    """Keras' inference formula, channels last."""
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


@pytest.mark.parametrize("kind", ["normlab", "torch", "frozen"])
def test_load_keras_batchnorm_gives_keras_inference(kind):
    rng = np.random.default_rng(0)
    gamma, beta = rng.uniform(0.5, 2, 4), rng.uniform(-1, 1, 4)
    mean, var = rng.uniform(-1, 1, 4), rng.uniform(0.5, 2, 4)
    layer = {
        "normlab": normlab.BatchNorm2d(4, channel_axis=-1),
        "torch": torch.nn.BatchNorm2d(4),
        "frozen": normlab.FrozenBatchNorm(4, channel_axis=-1),
    }[kind].double()
    loaded = load_keras_batchnorm(layer, gamma, beta, mean, var, momentum=0.95)
    assert loaded is layer and layer.eps == 1e-3
    if kind != "frozen":
        assert layer.momentum == pytest.approx(0.05)
    x = rng.normal(size=(2, 3, 3, 4))
    inp = torch.from_numpy(x)
    out = layer.eval()(inp if kind != "torch" else inp.permute(0, 3, 1, 2))
    out = out if kind != "torch" else out.permute(0, 2, 3, 1)
    np.testing.assert_allclose(
        out.detach().numpy(), _keras(x, gamma, beta, mean, var, 1e-3), rtol=1e-12
    )


def test_load_keras_options():
    layer = normlab.BatchNorm1d(2)
    load_keras_batchnorm(layer, None, [0.5, 0.5], [0, 0], [0.9, 1.8], n=10)
    torch.testing.assert_close(layer.weight, torch.ones(2))
    torch.testing.assert_close(layer.running_var, torch.tensor([1.0, 2.0]))
    flax = load_flax_batchnorm(
        normlab.BatchNorm1d(2),
        {"scale": [2.0, 3.0], "bias": [0.0, 1.0]},
        {"mean": [1.0, 2.0], "var": [4.0, 9.0]},
    )
    assert flax.eps == 1e-5
    torch.testing.assert_close(flax.weight, torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(flax.running_var, torch.tensor([4.0, 9.0]))


def test_errors():
    with pytest.raises(ValueError, match=r"momentum in \[0, 1\]"):
        momentum_from_keras(1.5)
    with pytest.raises(ValueError, match="got None"):
        momentum_to_keras(None)
    with pytest.raises(ValueError, match="int >= 2"):
        unbiased_var(1.0, 1)
    with pytest.raises(ValueError, match="int >= 2"):
        biased_var(1.0, 2.5)
    ones = [1.0, 1.0]
    with pytest.raises(TypeError, match="batch norm module"):
        load_keras_batchnorm("bn", ones, ones, ones, ones)
    with pytest.raises(ValueError, match="running statistics"):
        load_keras_batchnorm(
            normlab.BatchNorm1d(2, track_running_stats=False), ones, ones, ones, ones
        )
    with pytest.raises(ValueError, match=r"moving_mean of shape \(2,\).*got \(3,\)"):
        load_keras_batchnorm(normlab.BatchNorm1d(2), ones, ones, [0.0] * 3, ones)
    with pytest.raises(TypeError, match="moving_variance as an array"):
        load_keras_batchnorm(normlab.BatchNorm1d(2), ones, ones, ones, "big")
    with pytest.raises(ValueError, match="got gamma but the layer has no weight"):
        load_keras_batchnorm(normlab.BatchNorm1d(2, affine=False), ones, None, ones, ones)
    with pytest.raises(ValueError, match="epsilon >= 0"):
        load_keras_batchnorm(normlab.BatchNorm1d(2), ones, ones, ones, ones, epsilon=-1)
    with pytest.raises(ValueError, match="momentum"):
        load_keras_batchnorm(normlab.BatchNorm1d(2), ones, ones, ones, ones, momentum=2)
    with pytest.raises(TypeError, match="expected dicts"):
        load_flax_batchnorm(normlab.BatchNorm1d(2), [], {})
    with pytest.raises(ValueError, match=r"batch_stats\['var'\]"):
        load_flax_batchnorm(normlab.BatchNorm1d(2), {}, {"mean": ones})
