"""ATen's fused kernels where the dispatcher picks them: exact against the reference path."""

import pytest
import torch
from torch import nn

import normlab
from normlab.kernels import explain_dispatch, use_reference
from normlab.normalize import normalize_batch
from normlab.pattern import parse_pattern, plan

CL = torch.channels_last

# (pattern, sizes, memory format, dtype, expected native kernel or None for "not native")
CASES = [
    ("n c h w -> c", {}, CL, torch.float32, "batch_norm"),
    ("n c h w -> c", {}, None, torch.bfloat16, "batch_norm"),
    ("n c h w -> c", {}, None, torch.float32, None),  # Numba's RKR kernel is faster there
    ("n h w c -> c", {}, None, torch.float32, "batch_norm"),
    ("n c l -> c", {}, None, torch.bfloat16, "batch_norm"),
    ("n (g k) h w -> n g", {"g": 4}, None, torch.float32, "group_norm"),
    ("n (g k) l -> n g", {"k": 2}, None, torch.float64, "group_norm"),
    ("n (g k) h w -> n g", {"g": 4}, None, torch.bfloat16, "group_norm"),
    ("n c h w -> n c", {}, None, torch.bfloat16, "group_norm"),
    # with a per-channel affine, instance norm is group norm with G = C, CNN layer norm G = 1
    ("n c h w -> n c", {}, None, torch.float32, "group_norm"),
    ("n c h w -> n", {}, None, torch.float32, "group_norm"),
    ("b t d -> b t", {}, None, torch.float32, "layer_norm"),
    # channels-last instance norm: ATen's channels-last group norm is slow with G = C
    ("n c h w -> n c", {}, CL, torch.float32, None),
    ("n c h w -> n h w", {}, None, torch.float32, None),  # LayerNorm2d on NCHW: Numba's KRK
    ("n c h w -> n h w", {}, CL, torch.float32, "layer_norm"),  # channels contiguous: rows
    # half precision with an affine: ATen's forward, normlab's backward (ATen's bf16 γ/β
    # gradients are too coarse)
    ("n c h w -> n h w", {}, CL, torch.bfloat16, "layer_norm_forward"),
]


def make(shape, fmt, dtype):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    x = x.to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def shape_of(pattern):
    # at kernel sizes (>= MIN_ELEMENTS), where the choice follows the measurements
    return {2: (6400, 12), 3: (160, 12, 40), 4: (64, 12, 9, 11)}[len(parse_pattern(pattern).dims)]


@pytest.mark.parametrize(
    "pattern, sizes, fmt, dtype, kernel", CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES]
)
def test_native_choice_and_exactness(pattern, sizes, fmt, dtype, kernel):
    x = make(shape_of(pattern), fmt, dtype)
    p = plan(pattern, x.shape, **sizes)
    channel = p.input_dim_of("c") if "c" in p.axes else (1 if "(g k)" in pattern else None)
    w = b = None
    if channel is not None:
        shape = [1] * x.dim()
        shape[channel] = x.shape[channel]
        w = (1 + 0.3 * torch.randn(shape)).to(dtype if dtype != torch.bfloat16 else torch.float32)
        b = (0.3 * torch.randn(shape)).to(w.dtype)
    wanted = None if w is None else w.reshape(-1)
    if kernel == "layer_norm_forward":  # the split applies with a gradient to come
        wanted = wanted.detach().requires_grad_()
    choice = explain_dispatch(x, pattern, weight=wanted, **sizes)
    if kernel is None:
        assert "aten" not in choice.splitlines()[0]
        return
    if kernel == "layer_norm_forward":
        assert choice == "cpu (aten forward, numba backward): native_layer_norm", choice
    else:
        assert choice == f"cpu (aten): native_{kernel}", choice
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    ws = [w.detach().clone().requires_grad_() for _ in range(2)] if w is not None else [None, None]
    outs = []
    for i, forced in enumerate([False, True]):
        with use_reference(forced):
            y, m = normalize_batch(xs[i], p, ws[i], None if b is None else b, 1e-5)
        outs.append((y, m))
        y.float().square().sum().backward()
    (y0, m0), (y1, m1) = outs
    tol = {"atol": 5e-2, "rtol": 5e-2} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    assert y0.dtype == dtype and y0.is_contiguous(memory_format=fmt or torch.contiguous_format)
    torch.testing.assert_close(y0.float(), y1.float(), **tol)
    torch.testing.assert_close(m0.mean, m1.mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m0.var, m1.var, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(xs[0].grad.float(), xs[1].grad.float(), **tol)
    if w is not None:
        torch.testing.assert_close(ws[0].grad, ws[1].grad, atol=tol["atol"] * 10, rtol=tol["rtol"])


def test_half_precision_layer_norm_with_affine_takes_the_numba_backward():
    """bf16 LayerNorm over the last dim: ATen's forward, normlab's γ/β gradients (float32 sums)."""
    x = make((64, 24, 96), None, torch.bfloat16)
    layers = [normlab.LayerNorm(96).to(torch.bfloat16) for _ in range(2)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(1 + torch.linspace(-0.5, 0.5, 96))
            layer.bias.copy_(torch.linspace(-0.3, 0.3, 96))
    w = layers[0].weight.reshape(-1)
    assert "aten forward, numba backward" in explain_dispatch(x, "b t d -> b t", weight=w)
    with torch.no_grad():  # no gradient to come: ATen's kernel alone
        assert explain_dispatch(x, "b t d -> b t", weight=w) == "cpu (aten): native_layer_norm"
    g = make((64, 24, 96), None, torch.bfloat16)
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    for forced, layer, xi in zip([False, True], layers, xs, strict=True):
        with use_reference(forced):
            layer(xi).backward(g)
    x64 = x.double().requires_grad_()
    w64, b64 = (t.detach().double().requires_grad_() for t in (layers[0].weight, layers[0].bias))
    torch.nn.functional.layer_norm(x64, (96,), w64, b64, 1e-5).backward(g.double())
    for layer in layers:  # both paths' parameter gradients against float64
        torch.testing.assert_close(layer.weight.grad.double(), w64.grad, atol=2.0, rtol=2e-2)
        torch.testing.assert_close(layer.bias.grad.double(), b64.grad, atol=2.0, rtol=2e-2)
    torch.testing.assert_close(xs[0].grad.double(), x64.grad, atol=5e-2, rtol=5e-2)


def test_large_mean_through_native_kernels():
    x64 = torch.randn(16, 8, 24, 24, dtype=torch.float64) * 0.01 + 100
    x = x64.float()
    for pattern, sizes in [
        ("n (g k) h w -> n g", {"g": 2}),
        ("n c h w -> n", {}),
        ("n c h w -> n c", {}),
    ]:
        assert "aten" in explain_dispatch(x, pattern, **sizes)
        y = normlab.normalize(x, pattern, eps=0.0, **sizes)
        with use_reference():
            ref = normlab.normalize(x.double(), pattern, eps=0.0, **sizes)
        assert (y.double() - ref).abs().max() < 1e-2, pattern


def test_double_backward_through_native_kernels():
    x = torch.randn(4, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for pattern, sizes in [("n (g k) h w -> n g", {"g": 3}), ("n c h w -> n", {})]:
        assert "aten" in explain_dispatch(x, pattern, weight=w, **sizes)
        assert torch.autograd.gradgradcheck(
            lambda x, w, pattern=pattern, sizes=sizes: normlab.normalize(
                x, pattern, weight=w, **sizes
            ),
            (x, w),
        )


@pytest.mark.parametrize(
    "ours, theirs, fmt",
    [
        (lambda: normlab.BatchNorm2d(12), lambda: nn.BatchNorm2d(12), CL),
        (
            lambda: normlab.BatchNorm2d(12, momentum=None),
            lambda: nn.BatchNorm2d(12, momentum=None),
            CL,
        ),
        (lambda: normlab.GroupNorm(4, 12), lambda: nn.GroupNorm(4, 12), None),
        (
            lambda: normlab.InstanceNorm2d(12, affine=True, track_running_stats=True),
            lambda: nn.InstanceNorm2d(12, affine=True, track_running_stats=True),
            None,
        ),
        (lambda: normlab.LayerNorm([12, 7, 9]), lambda: nn.LayerNorm([12, 7, 9]), None),
    ],
)
def test_layers_on_native_kernels_match_torch_nn(ours, theirs, fmt):
    a, t = ours(), theirs()
    a.load_state_dict(t.state_dict())
    x = make((16, 12, 7, 9), fmt, torch.float32)
    assert "aten" in explain_dispatch(
        x,
        a.pattern() if hasattr(a, "pattern") else "n c h w -> c",
        **({"g": 4} if isinstance(a, nn.GroupNorm) else {}),
    )
    for _ in range(2):
        xa, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yt = a(xa), t(xt)
        torch.testing.assert_close(ya, yt, atol=1e-5, rtol=1e-5)
        ya.square().sum().backward(), yt.square().sum().backward()
        torch.testing.assert_close(xa.grad, xt.grad, atol=1e-4, rtol=1e-4)
    for (name, u), (_, v) in zip(a.named_buffers(), t.named_buffers(), strict=True):
        if name != "num_batches_tracked" or isinstance(a, nn.BatchNorm2d):
            torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def test_batch_norm_lets_aten_update_its_buffers_in_bfloat16():
    """Channels-last bf16 input, float32 buffers: ATen's kernel updates them (unbiased var)."""
    layer = normlab.BatchNorm2d(12, momentum=0.3)
    x = make((16, 12, 7, 9), CL, torch.bfloat16)
    for _ in range(3):
        layer(x)
    xf = x.double()
    mean, var = xf.mean((0, 2, 3)), xf.var((0, 2, 3))  # unbiased, as the buffer keeps it
    expected_mean = torch.zeros(12, dtype=torch.float64)
    expected_var = torch.ones(12, dtype=torch.float64)
    for _ in range(3):
        expected_mean = 0.7 * expected_mean + 0.3 * mean
        expected_var = 0.7 * expected_var + 0.3 * var
    assert int(layer.num_batches_tracked) == 3
    torch.testing.assert_close(layer.running_mean.double(), expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_var.double(), expected_var, atol=1e-5, rtol=1e-5)


def test_layernorm2d_on_channels_last_is_a_row_layer_norm_without_copies():
    layer = normlab.LayerNorm2d(12)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12))
        layer.bias.copy_(torch.randn(12))
    x = make((16, 12, 7, 9), CL, torch.float32).requires_grad_()
    assert "native_layer_norm" in explain_dispatch(x, "n c h w -> n h w", weight=layer.weight)
    y = layer(x)
    assert y.is_contiguous(memory_format=CL)
    xt = x.detach().clone().requires_grad_()
    expected = nn.functional.layer_norm(
        xt.permute(0, 2, 3, 1), (12,), layer.weight, layer.bias, 1e-6
    ).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    y.square().sum().backward(), expected.square().sum().backward()
    torch.testing.assert_close(x.grad, xt.grad, atol=1e-4, rtol=1e-4)


def test_group_norm_on_channels_last_takes_aten_for_inference_only():
    x = make((64, 12, 9, 11), CL, torch.float32)
    w = torch.randn(12)
    with torch.no_grad():
        choice = explain_dispatch(x, "n (g k) h w -> n g", weight=w, g=4)
        assert choice == "cpu (aten): native_group_norm"
        y = normlab.normalize(x, "n (g k) h w -> n g", weight=w, g=4)
    assert y.is_contiguous(memory_format=CL)
    with use_reference():
        torch.testing.assert_close(y, normlab.normalize(x, "n (g k) h w -> n g", weight=w, g=4))
    # With a gradient to compute, normlab's channels-last kernel (faster forward+backward);
    # in bfloat16 too (ATen's channels-last bfloat16 group norm is slow).
    assert (
        "numba"
        in explain_dispatch(x.bfloat16(), "n (g k) h w -> n g", weight=w, g=4).splitlines()[0]
    )
    x.requires_grad_()
    assert "numba" in explain_dispatch(x, "n (g k) h w -> n g", weight=w, g=4).splitlines()[0]


@pytest.mark.parametrize(
    "shape, groups, kernel",
    [
        ((64, 32, 6, 7), 4, "aten"),  # 8 channels per group, 42 positions: ATen with gradients
        ((4, 64, 16, 16), 4, "aten"),  # 16 per group, 256 positions
        ((128, 16, 6, 7), 4, "numba"),  # 4 channels per group: normlab's kernel
        ((8, 32, 17, 16), 4, "numba"),  # 272 positions: normlab's kernel
    ],
)
def test_group_norm_on_channels_last_with_gradients_by_geometry(shape, groups, kernel):
    x = make(shape, CL, torch.float32).requires_grad_()
    c = shape[1]
    w = (1 + 0.3 * torch.randn(c)).requires_grad_()
    b = (0.3 * torch.randn(c)).requires_grad_()
    pattern = "n (g k) h w -> n g"
    assert kernel in explain_dispatch(x, pattern, weight=w, g=groups).splitlines()[0]
    gy = torch.randn(shape).contiguous(memory_format=CL)
    grads = []
    for forced in (False, True):
        with use_reference(forced):
            y = normlab.normalize(x, pattern, weight=w, bias=b, g=groups)
        (gx, gw, gb) = torch.autograd.grad(y, (x, w, b), gy)
        grads.append((y, gx, gw, gb))
    assert grads[0][0].is_contiguous(memory_format=CL)
    for ours, ref in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
