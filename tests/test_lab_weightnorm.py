"""The lab's weight-norm candidates: every conv/linear weight-normed, and the paper's
data-dependent init giving standardized pre-activations on the init batch."""

import pytest
import torch
from torch import nn

from normlab.lab.data import load_data
from normlab.lab.models import build_model
from normlab.lab.norm_layers import norm_layers
from normlab.lab.train import RunConfig, train_run
from normlab.lab.weightnorm import init_weight_norm, weight_normed
from normlab.layers.mean_only import MeanOnlyBatchNorm

WEIGHTED = (nn.Linear, nn.Conv2d)


@pytest.fixture(scope="module")
def batch():
    return load_data("digits", limit=64).x_train[:32]


def _first_outputs(model, x):
    """Each weight-normed module's output on its first call, in float64."""
    outputs = {}
    modules = weight_normed(model)
    names = {id(m): n for n, m in modules.items()}

    def hook(module, args, out):
        outputs.setdefault(names[id(module)], out.detach().double())

    hooks = [m.register_forward_hook(hook) for m in modules.values()]
    model.train()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outputs


@pytest.mark.parametrize("model", ["cnn", "resnet", "rnn"])
@pytest.mark.parametrize("norm", ["wn", "wn-mobn"])
def test_data_dependent_init_standardizes_pre_activations(model, norm, batch):
    torch.manual_seed(0)
    net = build_model(model, norm, image_shape=(1, 16, 16), num_classes=10)
    every = [m for m in net.modules() if isinstance(m, WEIGHTED)]
    assert every and set(map(id, every)) == set(map(id, weight_normed(net).values()))
    layers = norm_layers(net)
    if norm == "wn":
        assert not layers
        if model != "rnn":  # convs get the bias their norm layer's β used to be
            assert all(m.bias is not None for m in every)
    else:
        assert layers and all(isinstance(m, MeanOnlyBatchNorm) for m in layers.values())
    before = {k: v.clone() for k, v in net.named_buffers()}
    left = init_weight_norm(net, batch)
    for key, value in net.named_buffers():
        assert torch.equal(value, before[key]), key  # running buffers untouched
    assert left == (["hidden"] if model == "rnn" else [])  # the RNN's zero initial state
    outputs = _first_outputs(net, batch)
    for name, module in weight_normed(net).items():
        if name in left:
            g = module.parametrizations["weight"].original0
            torch.testing.assert_close(g, torch.ones_like(g))
            continue
        t = outputs[name]
        dims = [0] if t.dim() == 2 else [0, 2, 3]
        var, mean = torch.var_mean(t, dim=dims, correction=0)
        torch.testing.assert_close(var, torch.ones_like(var), atol=1e-4, rtol=1e-4)
        if module.bias is not None:
            torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)


def test_training_a_weight_norm_run_inits_from_the_first_batch():
    data = load_data("digits", limit=40)
    for norm in ("wn", "wn-mobn"):
        record = train_run(RunConfig(norm=norm, batch_size=8, epochs=1), data)
        assert 0.0 <= record["accuracy"] <= 1.0 and all(
            v == v for v in record["train_loss"]
        )  # finite, not NaN
