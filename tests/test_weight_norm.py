import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from normlab.layers.weight_norm import WeightNorm, init_from_data, remove_weight_norm, weight_norm


def manual_weight(g, v, dim):
    """w = g·v/‖v‖ with the norm over every dim but `dim`, float64, written out."""
    v = v.double()
    if dim is None:
        return g.double() * v / v.pow(2).sum().sqrt()
    moved = v.movedim(dim, 0)
    norms = moved.reshape(moved.shape[0], -1).pow(2).sum(1).sqrt()
    shape = [1] * v.dim()
    shape[dim] = -1
    return g.double().reshape(shape) * v / norms.reshape(shape)


def g_v(m):
    plist = m.parametrizations.weight
    return plist.original0, plist.original1


MODULES = [
    (lambda: nn.Linear(6, 4), (5, 6), 0),
    (lambda: nn.Conv1d(3, 4, 3), (2, 3, 8), 0),
    (lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 6, 6), 0),
    (lambda: nn.ConvTranspose2d(3, 5, 3, stride=2), (2, 3, 4, 4), 1),
    (lambda: nn.ConvTranspose1d(4, 2, 2, bias=False), (3, 4, 5), 1),
]


@pytest.mark.parametrize("build,shape,out_dim", MODULES)
def test_function_unchanged_at_init_and_norm_per_output_unit(build, shape, out_dim):
    torch.manual_seed(0)
    plain = build()
    m = weight_norm(copy.deepcopy(plain))
    x = torch.randn(shape)
    torch.testing.assert_close(m(x), plain(x), rtol=1e-5, atol=1e-5)
    g, v = g_v(m)
    assert g.numel() == plain.weight.shape[out_dim] and g.shape[out_dim] == g.numel()
    assert m.parametrizations.weight[0].dim == out_dim
    with torch.no_grad():
        g.copy_(torch.rand_like(g) + 0.5)
        v.mul_(3.0)  # the direction alone matters
    torch.testing.assert_close(m.weight.double(), manual_weight(g, v, out_dim))


def test_dim_none_and_explicit_dims():
    torch.manual_seed(1)
    m = weight_norm(nn.Conv2d(2, 3, 3), dim=None)
    g, v = g_v(m)
    assert g.dim() == 0
    torch.testing.assert_close(m.weight.double(), manual_weight(g, v, None))
    m = weight_norm(nn.Conv2d(2, 3, 3), dim=-1)  # the last dim, not the whole tensor
    assert m.parametrizations.weight[0].dim == 3 and g_v(m)[0].shape == (1, 1, 1, 3)
    m = weight_norm(nn.ConvTranspose2d(3, 4, 2), dim=0)  # torch's per-input-channel choice
    assert g_v(m)[0].shape == (3, 1, 1, 1)
    m = weight_norm(nn.Linear(3, 2), name="bias", dim=0)  # 1-D: g·sign(v)
    torch.testing.assert_close(m.bias, nn.Parameter(m.bias.detach()).detach())


def test_gradients_match_manual_formula_and_gradcheck():
    torch.manual_seed(2)
    m = weight_norm(nn.Conv2d(2, 3, 3)).double()
    g, v = g_v(m)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    gw = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    (m(x) * gw).sum().backward()
    g2, v2 = g.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True)
    y = nn.functional.conv2d(x, manual_weight(g2, v2, 0), m.bias.detach())
    (y * gw).sum().backward()
    torch.testing.assert_close(g.grad, g2.grad)
    torch.testing.assert_close(v.grad, v2.grad)
    for dim in (0, 1, None):
        gg = torch.rand(3, 1, 1, dtype=torch.float64) if dim == 0 else None
        gg = torch.rand(1, 4, 1, dtype=torch.float64) if dim == 1 else gg
        gg = torch.rand((), dtype=torch.float64) if dim is None else gg
        vv = torch.randn(3, 4, 2, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            WeightNorm(dim), (gg.requires_grad_(True), vv.requires_grad_(True))
        )


@pytest.mark.parametrize("build,shape,out_dim", MODULES)
def test_data_dependent_init_standardizes_each_unit(build, shape, out_dim):
    torch.manual_seed(3)
    data = torch.randn((64,) + shape[1:]) * 3 + 1
    m = weight_norm(build(), data=data)
    with torch.no_grad():
        t = m(data).double()
    axis = t.dim() - 1 if isinstance(m, nn.Linear) else 1
    dims = [d for d in range(t.dim()) if d != axis]
    std = t.var(dims, correction=0).sqrt()
    torch.testing.assert_close(std, torch.ones_like(std), rtol=1e-4, atol=1e-4)
    if m.bias is not None:
        mean = t.mean(dims)
        torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-4)


def test_init_from_data_directly_and_linear_with_extra_dims():
    torch.manual_seed(4)
    m = weight_norm(nn.Linear(5, 3))
    data = torch.randn(4, 7, 5)
    init_from_data(m, data)
    with torch.no_grad():
        t = m(data).reshape(-1, 3).double()
    torch.testing.assert_close(t.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(t.std(0, correction=0), torch.ones(3, dtype=torch.float64))


def test_deepcopy_pickle_and_torch_save_keep_weight_norm():
    torch.manual_seed(5)
    model = nn.Sequential(
        weight_norm(nn.Conv2d(3, 4, 3)), nn.Flatten(), weight_norm(nn.Linear(4, 2))
    )
    with torch.no_grad():
        g_v(model[0])[1].mul_(7.0)  # ‖v‖ ≠ g: a rebuild from the weight alone would differ
    x = torch.randn(2, 3, 3, 3)
    want = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [
        copy.deepcopy(model),
        pickle.loads(pickle.dumps(model)),
        torch.load(buffer, weights_only=False),
    ]
    for clone in copies:
        torch.testing.assert_close(clone(x), want)
        for a, b in ((clone[0], model[0]), (clone[2], model[2])):
            assert parametrize.is_parametrized(a, "weight")
            for p, q in zip(g_v(a), g_v(b), strict=True):
                assert torch.equal(p, q) and p is not q
        clone(x).sum().backward()
        assert g_v(clone[0])[0].grad is not None and g_v(clone[0])[1].grad is not None
        assert set(clone.state_dict()) == set(model.state_dict())
    torch.testing.assert_close(model(x), want)  # the original is untouched


def test_old_new_and_plain_keys_load():
    torch.manual_seed(6)
    ours = weight_norm(nn.Conv2d(3, 4, 3))
    x = torch.randn(2, 3, 5, 5)
    with pytest.warns(FutureWarning):
        old = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    assert {"weight_g", "weight_v"} <= set(old.state_dict())
    ours.load_state_dict(old.state_dict())
    torch.testing.assert_close(ours(x), old(x))
    new = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    ours.load_state_dict(new.state_dict())
    torch.testing.assert_close(ours(x), new(x))
    new.load_state_dict(weight_norm(nn.Conv2d(3, 4, 3)).state_dict())
    plain = nn.Conv2d(3, 4, 3)
    ours.load_state_dict(plain.state_dict())
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-6)
    parent = nn.Sequential(nn.Identity(), ours)
    wrapped_old = {f"1.{k}": v for k, v in old.state_dict().items()}
    parent.load_state_dict(wrapped_old)
    torch.testing.assert_close(parent(x), old(x))


def test_remove_weight_norm():
    torch.manual_seed(7)
    m = weight_norm(nn.ConvTranspose2d(3, 2, 2))
    with torch.no_grad():
        g_v(m)[0].mul_(2)
    x = torch.randn(1, 3, 4, 4)
    want = m(x)
    remove_weight_norm(m)
    assert type(m) is nn.ConvTranspose2d and isinstance(m.weight, nn.Parameter)
    assert set(m.state_dict()) == {"weight", "bias"} and not m._load_state_dict_pre_hooks
    torch.testing.assert_close(m(x), want)
    pickle.dumps(m)


def test_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        weight_norm(torch.randn(3, 3))
    with pytest.raises(ValueError, match="name of a parameter"):
        weight_norm(nn.Linear(2, 2), name="kernel")
    with pytest.raises(ValueError, match="expected dim"):
        weight_norm(nn.Linear(2, 2), dim=2)
    with pytest.raises(ValueError, match="expected dim"):
        weight_norm(nn.Linear(2, 2), dim="input")
    with pytest.raises(ValueError, match="already weight-normed"):
        weight_norm(weight_norm(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="grouped"):
        weight_norm(nn.ConvTranspose2d(4, 4, 2, groups=2))
    with pytest.raises(ValueError, match="one g per output unit"):
        weight_norm(nn.Conv2d(2, 3, 3), dim=1, data=torch.randn(2, 2, 5, 5))
    with pytest.raises(ValueError, match="Linear, ConvNd"):
        weight_norm(nn.Embedding(5, 3), data=torch.randn(2, 3))
    with pytest.raises(TypeError, match="data"):
        weight_norm(nn.Linear(2, 2), data=[[1.0, 2.0]])
    with pytest.raises(ValueError, match="not weight-normed"):
        remove_weight_norm(nn.Linear(2, 2))
    with pytest.raises(TypeError):
        remove_weight_norm("layer")
    with pytest.raises(ValueError, match="weight-normed"):
        init_from_data(nn.Linear(2, 2), torch.randn(3, 2))
