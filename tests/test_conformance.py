"""Every drop-in layer against its torch.nn counterpart: train steps, eval, state_dict both ways."""

import copy

import pytest
import torch
from torch import nn

import normlab

# (id, normlab factory, torch factory, input shape, channel dim of the torch input)
LAYERS = [
    ("bn1d-2d", lambda: normlab.BatchNorm1d(5), lambda: nn.BatchNorm1d(5), (7, 5)),
    ("bn1d-3d", lambda: normlab.BatchNorm1d(5), lambda: nn.BatchNorm1d(5), (4, 5, 9)),
    ("bn2d", lambda: normlab.BatchNorm2d(3), lambda: nn.BatchNorm2d(3), (4, 3, 5, 7)),
    (
        "bn2d-cumulative",
        lambda: normlab.BatchNorm2d(3, momentum=None),
        lambda: nn.BatchNorm2d(3, momentum=None),
        (4, 3, 5, 7),
    ),
    (
        "bn2d-noaffine",
        lambda: normlab.BatchNorm2d(3, affine=False),
        lambda: nn.BatchNorm2d(3, affine=False),
        (4, 3, 5, 7),
    ),
    (
        "bn2d-nobias",
        lambda: normlab.BatchNorm2d(3, bias=False),
        lambda: nn.BatchNorm2d(3, bias=False),
        (4, 3, 5, 7),
    ),
    (
        "bn2d-untracked",
        lambda: normlab.BatchNorm2d(3, track_running_stats=False),
        lambda: nn.BatchNorm2d(3, track_running_stats=False),
        (4, 3, 5, 7),
    ),
    ("bn2d-spatial1", lambda: normlab.BatchNorm2d(3), lambda: nn.BatchNorm2d(3), (4, 3, 1, 1)),
    ("bn3d", lambda: normlab.BatchNorm3d(3), lambda: nn.BatchNorm3d(3), (2, 3, 3, 4, 5)),
    ("bn-any-rank", lambda: normlab.BatchNorm(3), lambda: nn.BatchNorm3d(3), (2, 3, 3, 4, 5)),
    ("in1d", lambda: normlab.InstanceNorm1d(5), lambda: nn.InstanceNorm1d(5), (3, 5, 11)),
    (
        "in2d-affine-tracked",
        lambda: normlab.InstanceNorm2d(3, affine=True, track_running_stats=True),
        lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        (4, 3, 5, 7),
    ),
    ("in2d", lambda: normlab.InstanceNorm2d(3), lambda: nn.InstanceNorm2d(3), (4, 3, 5, 7)),
    (
        "in3d-affine",
        lambda: normlab.InstanceNorm3d(3, affine=True),
        lambda: nn.InstanceNorm3d(3, affine=True),
        (2, 3, 3, 4, 5),
    ),
    ("ln-last", lambda: normlab.LayerNorm(7), lambda: nn.LayerNorm(7), (4, 3, 5, 7)),
    ("ln-chw", lambda: normlab.LayerNorm([3, 5, 7]), lambda: nn.LayerNorm([3, 5, 7]), (4, 3, 5, 7)),
    (
        "ln-nobias",
        lambda: normlab.LayerNorm(7, bias=False),
        lambda: nn.LayerNorm(7, bias=False),
        (2, 9, 7),
    ),
    (
        "ln-noaffine",
        lambda: normlab.LayerNorm(7, elementwise_affine=False),
        lambda: nn.LayerNorm(7, elementwise_affine=False),
        (2, 9, 7),
    ),
    ("gn", lambda: normlab.GroupNorm(3, 6), lambda: nn.GroupNorm(3, 6), (4, 6, 5, 7)),
    ("gn-groupsize1", lambda: normlab.GroupNorm(6, 6), lambda: nn.GroupNorm(6, 6), (4, 6, 5, 7)),
    ("gn-1d", lambda: normlab.GroupNorm(2, 6), lambda: nn.GroupNorm(2, 6), (4, 6, 9)),
    ("gn-3d", lambda: normlab.GroupNorm(1, 6), lambda: nn.GroupNorm(1, 6), (2, 6, 3, 4, 5)),
    (
        "gn-by-size",
        lambda: normlab.GroupNorm(num_channels=6, group_size=2),
        lambda: nn.GroupNorm(3, 6),
        (4, 6, 5, 7),
    ),
    ("rms", lambda: normlab.RMSNorm(7), lambda: nn.RMSNorm(7), (4, 3, 5, 7)),
    (
        "rms-eps",
        lambda: normlab.RMSNorm([5, 7], eps=1e-6),
        lambda: nn.RMSNorm([5, 7], eps=1e-6),
        (4, 3, 5, 7),
    ),
]

# How the same data reaches each layer: (id, transform of the torch input, whether it is channels-last data)
LAYOUTS = [
    ("contiguous", lambda x: x),
    (
        "channels_last",
        lambda x: (
            x.contiguous(memory_format=torch.channels_last)
            if x.dim() == 4
            else x.contiguous(memory_format=torch.channels_last_3d)
            if x.dim() == 5
            else x
        ),
    ),
    ("non_contiguous", lambda x: torch.cat([x, x], dim=-1)[..., : x.shape[-1]]),
    ("odd_sizes", None),  # handled by the shapes already (5, 7, 9, 11)
]


def run_steps(layer, x, grads):
    outs, input_grads, param_grads = [], [], []
    for g in grads:
        xi = x.detach().clone().requires_grad_(True)
        y = layer(xi)
        y.backward(g)
        outs.append(y.detach())
        input_grads.append(xi.grad)
        param_grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
        layer.zero_grad()
    return outs, input_grads, param_grads


def assert_same(a, b, what):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize(
    "layout_id, layout",
    [row for row in LAYOUTS if row[1] is not None],
    ids=lambda v: v if isinstance(v, str) else "",
)
@pytest.mark.parametrize("case", LAYERS, ids=[row[0] for row in LAYERS])
def test_matches_torch_nn(case, layout_id, layout):
    _, make_ours, make_theirs, shape = case
    ours, theirs = make_ours(), make_theirs()
    with torch.no_grad():  # non-trivial affine parameters, shared by both
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict())
    x = layout(torch.randn(shape) * 2 + 0.5)
    grads = [torch.randn(shape) for _ in range(3)]
    o_out, o_gx, o_gp = run_steps(ours, x, grads)
    t_out, t_gx, t_gp = run_steps(theirs, x, grads)
    for step in range(3):
        assert_same(o_out[step], t_out[step], f"output step {step}")
        assert_same(o_gx[step], t_gx[step], f"input grad step {step}")
        for name in t_gp[step]:
            assert_same(o_gp[step][name], t_gp[step][name], f"{name} grad step {step}")
    if x.dim() >= 4 and layout_id == "channels_last":
        assert o_out[0].is_contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    for name, buffer in theirs.named_buffers():
        if name == "num_batches_tracked" and isinstance(
            theirs, nn.modules.instancenorm._InstanceNorm
        ):
            continue  # torch's instance norm never counts batches; normlab's does (momentum=None needs it)
        assert_same(dict(ours.named_buffers())[name].double(), buffer.double(), f"buffer {name}")
    ours.eval(), theirs.eval()
    assert_same(ours(x), theirs(x), "eval output")
    # state_dict both ways, strict.
    fresh_theirs, fresh_ours = make_theirs(), make_ours()
    fresh_theirs.load_state_dict(ours.state_dict())
    fresh_ours.load_state_dict(theirs.state_dict())
    fresh_theirs.eval(), fresh_ours.eval()
    assert_same(fresh_ours(x), theirs(x), "normlab loaded from torch")
    assert_same(fresh_theirs(x), ours(x), "torch loaded from normlab")


CHANNELS_LAST = [
    ("bn1d", lambda: normlab.BatchNorm1d(5, channel_axis=-1), lambda: nn.BatchNorm1d(5), (4, 5, 9)),
    (
        "bn2d",
        lambda: normlab.BatchNorm2d(3, channel_axis=-1),
        lambda: nn.BatchNorm2d(3),
        (4, 3, 5, 7),
    ),
    (
        "bn3d",
        lambda: normlab.BatchNorm3d(3, channel_axis=-1),
        lambda: nn.BatchNorm3d(3),
        (2, 3, 3, 4, 5),
    ),
    (
        "in2d",
        lambda: normlab.InstanceNorm2d(3, affine=True, track_running_stats=True, channel_axis=-1),
        lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        (4, 3, 5, 7),
    ),
    (
        "gn",
        lambda: normlab.GroupNorm(3, 6, channel_axis=-1),
        lambda: nn.GroupNorm(3, 6),
        (4, 6, 5, 7),
    ),
    (
        "ln2d",
        lambda: normlab.LayerNorm2d(6, channel_axis=-1),
        lambda: nn.LayerNorm(6, eps=1e-6),
        (4, 6, 5, 7),
    ),
]


def to_last(t):
    return t.movedim(1, -1)


@pytest.mark.parametrize("case", CHANNELS_LAST, ids=[row[0] for row in CHANNELS_LAST])
def test_channel_axis_minus_one_matches_torch_on_permuted_data(case):
    _, make_ours, make_theirs, shape = case
    ours, theirs = make_ours(), make_theirs()
    ours.load_state_dict(theirs.state_dict())
    is_ln = isinstance(theirs, nn.LayerNorm)
    x = torch.randn(shape) + 1
    for step in range(3):
        g = torch.randn(shape)
        xo, xt = to_last(x).detach().requires_grad_(), x.clone().requires_grad_()
        yo = ours(xo)
        yt = theirs(to_last(xt)) if is_ln else theirs(xt)
        yt = yt if is_ln else to_last(yt)
        yo.backward(to_last(g)), yt.backward(to_last(g))
        assert_same(yo, yt, f"output step {step}")
        assert_same(xo.grad, to_last(xt.grad), f"input grad step {step}")
        for (name, p), (_, q) in zip(
            ours.named_parameters(), theirs.named_parameters(), strict=True
        ):
            assert_same(p.grad, q.grad, f"{name} grad")
        ours.zero_grad(), theirs.zero_grad()
    for name, buffer in theirs.named_buffers():
        if name != "num_batches_tracked":
            assert_same(dict(ours.named_buffers())[name], buffer, name)


def test_layernorm2d_normalizes_over_channels_only_not_groupnorm1():
    x = torch.randn(2, 6, 5, 7)
    ln2d = normlab.LayerNorm2d(6, eps=1e-5)
    expected = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), eps=1e-5).permute(0, 3, 1, 2)
    assert_same(ln2d(x), expected, "LayerNorm2d vs permuted LayerNorm")
    assert not torch.allclose(ln2d(x), nn.functional.group_norm(x, 1), atol=1e-3)


def test_layernorm_channel_axis_1_equals_layernorm2d():
    x = torch.randn(2, 6, 5, 7)
    assert_same(
        normlab.LayerNorm(6, channel_axis=1)(x),
        normlab.LayerNorm2d(6, eps=1e-5)(x),
        "ln(channel_axis=1)",
    )


def test_per_activation_batch_norm_matches_alg1():
    # BN paper Alg. 1 applied literally: statistics per activation (c, h, w) over the batch.
    layer = normlab.BatchNorm((3, 4, 5), per_activation=True, momentum=0.5)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 4, 5))
        layer.bias.copy_(torch.randn(3, 4, 5))
    x = torch.randn(8, 3, 4, 5, dtype=torch.float64)
    y = layer.double()(x)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * layer.weight + layer.bias
    assert_same(y, expected, "per-activation output")
    assert_same(layer.running_mean, 0.5 * mean, "running mean")
    assert_same(layer.running_var, 0.5 + 0.5 * x.var(0, unbiased=True), "running var (unbiased)")
    layer.eval()
    expected_eval = (x - layer.running_mean) / torch.sqrt(
        layer.running_var + 1e-5
    ) * layer.weight + layer.bias
    assert_same(layer(x), expected_eval, "per-activation eval")


def test_instance_norm_momentum_none_is_cumulative_average():
    layer = normlab.InstanceNorm2d(3, track_running_stats=True, momentum=None)
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(4)]
    for b in batches:
        layer(b)
    per_batch_var = [b.var((2, 3), unbiased=True).mean(0) for b in batches]
    per_batch_mean = [b.mean((2, 3)).mean(0) for b in batches]
    assert_same(layer.running_mean, torch.stack(per_batch_mean).mean(0), "cumulative mean")
    assert_same(layer.running_var, torch.stack(per_batch_var).mean(0), "cumulative var")
    assert int(layer.num_batches_tracked) == 4


def test_batch_norm_momentum_none_is_cumulative_average():
    layer = normlab.BatchNorm2d(3, momentum=None)
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(4)]
    for b in batches:
        layer(b)
    assert_same(
        layer.running_mean, torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0), "mean"
    )


def test_checkpoint_without_num_batches_tracked_loads():
    source = nn.BatchNorm2d(3)
    source(torch.randn(4, 3, 2, 2))
    state = copy.deepcopy(source.state_dict())
    del state["num_batches_tracked"]
    layer = normlab.BatchNorm2d(3)
    layer.load_state_dict(state)  # strict: must not complain
    assert int(layer.num_batches_tracked) == 0
    assert_same(layer.running_mean, source.running_mean, "running mean")


def test_unbatched_instance_norm_input():
    x = torch.randn(3, 5, 7)
    assert_same(normlab.InstanceNorm2d(3)(x), nn.InstanceNorm2d(3)(x), "unbatched")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_keeps_dtype_in_layers(dtype):
    x = torch.randn(4, 6, 5, 5).to(dtype)
    for layer in [
        normlab.BatchNorm2d(6),
        normlab.GroupNorm(2, 6),
        normlab.LayerNorm2d(6),
        normlab.InstanceNorm2d(6),
    ]:
        y = layer(x)
        assert y.dtype == dtype
        running = getattr(layer, "running_mean", None)
        assert running is None or running.dtype == torch.float32


def test_isinstance_of_torch_classes():
    assert isinstance(normlab.BatchNorm2d(3), nn.BatchNorm2d)
    assert isinstance(normlab.GroupNorm(1, 3), nn.GroupNorm)
    assert isinstance(normlab.LayerNorm2d(3), nn.LayerNorm)
    assert isinstance(normlab.InstanceNorm2d(3), nn.InstanceNorm2d)
