"""Every public layer inside PyTorch's compiler stack.

torch.compile(fullgraph=True) in training and eval (outputs, input and parameter
gradients, buffers against eager), NCHW and channels_last, float32 and bfloat16;
a dynamic batch making no more graphs than torch.nn's layers; torch.export with a
dynamic batch holding ATen operators only; ONNX (dynamo=True) in onnxruntime;
torch.func per-sample gradients against a loop; torch.fx.symbolic_trace; the legacy
torch.jit.trace and ONNX exporter. Each at a small size and at a size where eager
takes the kernels (at least 65,536 elements).

Compiling costs seconds per graph, so the layers sit side by side in one model (a
"bank") compiled once per case; the same harness runs torch.nn's counterparts first,
which must pass it as well.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch import nn

import normlab
from normlab.kernels.dispatch import MIN_ELEMENTS
from normlab.kernels.transforms import transform
from normlab.releases import ReleaseBatchInstanceNorm, ReleaseIBN, ReleaseSwitchNorm2d

# (N, C, H, W): small, and large enough for the kernels in eager (see test_sizes)
SMALL = (4, 8, 6, 6)
FAST = (4, 16, 32, 32)


def _flat(x):
    return x.flatten(2)


def _deep(x):
    return x.unsqueeze(2)


def _same(x):
    return x


def _nhwc(x):
    return x.permute(0, 2, 3, 1)  # channels last as a dim order, for channel_axis=-1


def normlab_layers(c: int, h: int, w: int) -> dict[str, tuple[nn.Module, object]]:
    """Every public layer, on an (N, C, H, W) input seen through an adapter."""
    conv = nn.Conv2d(c, c, 3, padding=1)
    return {
        "bn1d": (normlab.BatchNorm1d(c), _flat),
        "bn2d": (normlab.BatchNorm2d(c), _same),
        "bn3d": (normlab.BatchNorm3d(c), _deep),
        "bn_cumulative": (normlab.BatchNorm2d(c, momentum=None), _same),
        "bn_per_activation": (normlab.BatchNorm((c, h, w), per_activation=True), _same),
        "in1d": (normlab.InstanceNorm1d(c, affine=True), _flat),
        "in2d": (normlab.InstanceNorm2d(c, affine=True, track_running_stats=True), _same),
        "in3d": (normlab.InstanceNorm3d(c), _deep),
        "ln": (normlab.LayerNorm([w]), _same),
        "ln_chw": (normlab.LayerNorm([c, h, w]), _same),
        "ln2d": (normlab.LayerNorm2d(c), _same),
        "gn": (normlab.GroupNorm(4, c), _same),
        "rms": (normlab.RMSNorm([h, w]), _same),
        "bn_axis_last": (normlab.BatchNorm2d(c, channel_axis=-1), _nhwc),
        "in_axis_last": (normlab.InstanceNorm2d(c, affine=True, channel_axis=-1), _nhwc),
        "gn_axis_last": (normlab.GroupNorm(4, c, channel_axis=-1), _nhwc),
        "sync": (normlab.SyncBatchNorm(c), _same),
        "ibn": (normlab.IBN(c), _same),
        "ibnb": (normlab.IBNb(c), _same),
        "bin": (normlab.BatchInstanceNorm(c), _same),
        "sn": (normlab.SwitchableNorm(c), _same),
        "brn": (normlab.BatchRenorm(c), _same),
        "frn": (normlab.FilterResponseNorm(c), _same),
        "evob0": (normlab.EvoNormB0(c), _same),
        "evos0": (normlab.EvoNormS0(c, num_groups=4), _same),
        "bn_relu": (normlab.norm_act("bn", c), _same),
        "weight_norm": (normlab.weight_norm(conv), _same),
    }


def torch_layers(c: int, h: int, w: int) -> dict[str, tuple[nn.Module, object]]:
    """torch.nn's counterparts (the releases' compositions for the hybrids)."""
    conv = nn.Conv2d(c, c, 3, padding=1)
    return {
        "bn1d": (nn.BatchNorm1d(c), _flat),
        "bn2d": (nn.BatchNorm2d(c), _same),
        "bn3d": (nn.BatchNorm3d(c), _deep),
        # no "bn_cumulative": torch.nn's momentum=None reads float(num_batches_tracked),
        # which breaks a full graph; normlab's keeps the factor a tensor
        "in1d": (nn.InstanceNorm1d(c, affine=True), _flat),
        "in2d": (nn.InstanceNorm2d(c, affine=True, track_running_stats=True), _same),
        "in3d": (nn.InstanceNorm3d(c), _deep),
        "ln": (nn.LayerNorm([w]), _same),
        "ln_chw": (nn.LayerNorm([c, h, w]), _same),
        "gn": (nn.GroupNorm(4, c), _same),
        "rms": (nn.RMSNorm([h, w]), _same),
        "ibn": (ReleaseIBN(c, c // 2), _same),
        "bin": (ReleaseBatchInstanceNorm(c), _same),
        "sn": (ReleaseSwitchNorm2d(c), _same),
        "bn_relu": (nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()), _same),
        "weight_norm": (nn.utils.parametrizations.weight_norm(conv), _same),
    }


LIBRARIES = {"torch": torch_layers, "normlab": normlab_layers}
#: Layers whose output for one sample does not depend on the others in training.
BATCH_FREE = {
    *("in1d", "in3d", "in_axis_last", "ln", "ln_chw", "ln2d", "gn", "gn_axis_last", "rms"),
    *("frn", "evos0", "weight_norm"),
}


class Bank(nn.Module):
    """Layers side by side on one input: one graph for all of them."""

    def __init__(self, layers: dict[str, tuple[nn.Module, object]]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({k: m for k, (m, _) in layers.items()})
        self.adapters = {k: a for k, (_, a) in layers.items()}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(self.adapters[k](x)) for k, m in self.layers.items())


RELEASES = (ReleaseIBN, ReleaseBatchInstanceNorm, ReleaseSwitchNorm2d)


def make_bank(
    library: str,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    releases: bool = True,
    only: tuple[str, ...] = (),
) -> Bank:
    """The library's layers for inputs of `shape`; ``releases=False`` drops the releases'
    compositions (plain research code, not written for fx); `only` keeps those named."""
    torch.manual_seed(0)
    layers = LIBRARIES[library](*shape[1:])
    if only:
        layers = {k: v for k, v in layers.items() if k in only}
    if not releases:
        layers = {k: v for k, v in layers.items() if not isinstance(v[0], RELEASES)}
    bank = Bank(layers)
    with torch.no_grad():  # parameters and buffers away from their initial values
        for _name, t in bank.named_parameters():
            t.add_(0.1 * torch.randn_like(t))
        for _name, t in bank.named_buffers():
            if t.is_floating_point():
                t.add_(0.1 * torch.rand_like(t))
    return bank.to(dtype)


def sample(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def assert_near(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    """Within the dtype's tolerance, relative to the tensor's scale."""
    assert actual.shape == expected.shape, what
    tol = 1e-4 if dtype == torch.float32 else 4e-2
    a, e = actual.double(), expected.double()
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = 1 + e.abs().max().item() if e.numel() else 1
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


# --- the path a graph took: ATen operators only, never a normlab kernel -----------------

ALLOWED_NAMESPACES = {"aten", "prims"}


def foreign_targets(gm: torch.fx.GraphModule) -> list[str]:
    """call_function targets that are not ATen/prims operators or symbolic-size arithmetic."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        t = node.target
        if t is torch.ops.higher_order.wrap_with_set_grad_enabled:  # a no_grad block
            out += foreign_targets(getattr(gm, node.args[1].target))
        elif isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            if t.namespace not in ALLOWED_NAMESPACES:
                out.append(str(t))
        elif t is operator.getitem or getattr(t, "__module__", None) in ("_operator", "math"):
            continue
        elif getattr(t, "__name__", "").startswith("sym_"):  # torch.sym_max & co.: sizes
            continue
        else:
            out.append(str(t))
    return out


class Capture:
    """An aot_eager-like backend that keeps the forward/backward ATen graphs and counts graphs."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.dynamo_graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.dynamo_graphs += 1

        def keep(g: torch.fx.GraphModule, _inputs: list) -> object:
            self.graphs.append(g)
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)


def _weights(outputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(o.shape, generator=g).to(o.dtype) for o in outputs]


def _run(bank: nn.Module, x: torch.Tensor, train: bool):
    x = x.detach().clone().requires_grad_(True)
    outs = bank(x)
    if train:
        loss = sum((o.float() * w.float()).sum() for o, w in zip(outs, _weights(outs), strict=True))
        loss.backward()
    return outs, x.grad


# --- torch.compile(fullgraph=True): train and eval, layouts, dtypes, sizes ----------------


@pytest.mark.parametrize(
    "library, shape, dtype, channels_last",
    [
        ("torch", SMALL, torch.float32, False),
        ("torch", SMALL, torch.bfloat16, True),
        ("normlab", SMALL, torch.float32, False),
        ("normlab", SMALL, torch.bfloat16, True),
        ("normlab", FAST, torch.float32, True),
        ("normlab", FAST, torch.bfloat16, False),
    ],
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(library, shape, dtype, channels_last, train):
    torch._dynamo.reset()
    eager = make_bank(library, shape, dtype).train(train)
    compiled_bank = copy.deepcopy(eager)
    capture = Capture()
    compiled = torch.compile(compiled_bank, fullgraph=True, backend=capture)
    x = sample(shape, dtype, channels_last)
    for step in range(2):  # the second step reads the buffers the first one updated
        xs = x + step
        want, want_grad = _run(eager, xs, train)
        got, got_grad = _run(compiled, xs, train)
        for name, a, e in zip(eager.layers, got, want, strict=True):
            assert_near(a, e, dtype, f"{name} output")
            if channels_last and e.dim() == 4:
                assert a.is_contiguous(memory_format=torch.channels_last) == e.is_contiguous(
                    memory_format=torch.channels_last
                ), f"{name} memory format"
        if train:
            assert_near(got_grad, want_grad, dtype, "input gradient")
    if train:
        for (name, p), (_, q) in zip(
            compiled_bank.named_parameters(), eager.named_parameters(), strict=True
        ):
            assert_near(p.grad, q.grad, dtype, f"{name} gradient")
    for (name, b), (_, c) in zip(compiled_bank.named_buffers(), eager.named_buffers(), strict=True):
        assert_near(b, c, dtype if b.is_floating_point() else torch.float32, f"buffer {name}")
    assert capture.dynamo_graphs == 1
    assert len(capture.graphs) == (2 if train else 1)
    for g in capture.graphs:  # the path: the reference decomposition, no kernel call
        assert foreign_targets(g) == []


def test_sizes():
    """FAST is large enough that eager takes the kernels for every layer's input."""
    assert SMALL[0] * SMALL[1] * SMALL[2] * SMALL[3] < MIN_ELEMENTS
    assert FAST[0] * FAST[1] * FAST[2] * FAST[3] >= MIN_ELEMENTS


COMPILE_PATHS = [  # pattern, layout, the operator the compiled graph holds
    ("n c h w -> c", None, "native_batch_norm"),
    ("n c h w -> c", torch.channels_last, "native_batch_norm"),
    ("n (g k) h w -> n g", None, "native_group_norm"),
    ("n c h w -> n c", None, "batch_norm"),  # instance_norm: batch norm over (1, N·C, H, W)
    ("n c h w -> n c", torch.channels_last, "var_mean"),  # no ATen kernel keeps NHWC there
    ("n c h w -> n", None, "native_layer_norm"),  # LayerNorm over (C, H, W)
    ("n c h w -> n h w", torch.channels_last, "native_layer_norm"),  # LayerNorm2d, NHWC
    ("n c h w -> n h w", None, "var_mean"),  # LayerNorm2d on NCHW: the decomposition
]


@pytest.mark.parametrize(("pattern", "layout", "op"), COMPILE_PATHS)
def test_compiled_graph_holds_the_named_path(pattern, layout, op):
    """Under torch.compile a call takes ATen's own kernel where one is exact (the operator
    torch.nn hands Inductor), else the decomposition; explain_dispatch says which."""
    torch._dynamo.reset()
    x = sample(FAST, torch.float32, layout is not None).requires_grad_()
    sizes = {"g": 4} if "(g k)" in pattern else {}
    said = normlab.explain_dispatch(x, pattern, mode="compile", **sizes)
    assert said.startswith("reference" if op == "var_mean" else "cpu (aten)"), said
    if op == "batch_norm":
        assert said.startswith("cpu (aten): instance_norm"), said
    capture = Capture()
    f = torch.compile(lambda t: normlab.normalize(t, pattern, **sizes), backend=capture)
    f(x).sum().backward()
    ops = {str(n.target) for n in capture.graphs[0].graph.nodes if n.op == "call_function"}
    assert any(op in o for o in ops), ops


def test_compile_takes_the_reference_path():
    """Under dynamo the dispatcher names the reference path; in eager the kernels (fast size)."""
    seen = []

    def spy(x):
        seen.append(transform(x))
        return x

    torch.compile(spy, fullgraph=True, backend="eager")(torch.randn(3))
    assert seen == ["compile"]
    assert transform(torch.randn(3)) == "eager"
    x = sample(FAST, torch.float32, False)
    assert not normlab.explain_dispatch(x, "n c h w -> c").startswith("reference")


_SEEN: list[str] = []


class _Spy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _SEEN.append(transform(x))
        return x * 2


def test_transform_names_each_transform():
    spy, x = _Spy(), torch.randn(2, 3)
    _SEEN.clear()
    spy(x)
    torch.func.vmap(spy)(x)
    torch.func.grad(lambda t: spy(t).sum())(x)
    torch.jit.trace(spy, x, check_trace=False)
    assert _SEEN == ["eager", "func", "func", "jit"]
    _SEEN.clear()
    torch.export.export(spy, (x,))
    assert _SEEN and set(_SEEN) == {"export"}
    _SEEN.clear()
    torch.fx.symbolic_trace(spy)
    assert _SEEN == ["fx"]


def test_inductor_train_matches_eager():
    """Inductor itself on a representative few (Inductor compiles slowly): same numbers."""
    torch._dynamo.reset()
    eager = make_bank("normlab", SMALL, only=("bn2d", "gn", "ln2d", "rms", "ibn", "sn")).train()
    compiled_bank = copy.deepcopy(eager)
    compiled = torch.compile(compiled_bank, fullgraph=True)
    x = sample(SMALL, torch.float32, True)
    want, want_grad = _run(eager, x, True)
    got, got_grad = _run(compiled, x, True)
    for name, a, e in zip(eager.layers, got, want, strict=True):
        assert_near(a, e, torch.float32, f"{name} output")
    assert_near(got_grad, want_grad, torch.float32, "input gradient")
    for (name, b), (_, c) in zip(compiled_bank.named_buffers(), eager.named_buffers(), strict=True):
        assert_near(b, c, torch.float32, f"buffer {name}")


# --- a dynamic batch ---------------------------------------------------------------------


def _graphs_for_batches(library: str, train: bool) -> int:
    torch._dynamo.reset()
    bank = make_bank(library, SMALL).train(train)
    count = {"n": 0}

    def counting(gm, example_inputs):
        count["n"] += 1
        return gm.forward

    compiled = torch.compile(bank, fullgraph=True, backend=counting)
    for n in (2, 3, 5, 7):
        x = sample((n, *SMALL[1:]), torch.float32, False)
        torch._dynamo.mark_dynamic(x, 0)
        want = bank(x)
        for name, a, e in zip(bank.layers, compiled(x), want, strict=True):
            assert a.shape == e.shape, name
    return count["n"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dynamic_batch_does_not_specialize(train):
    ours, theirs = _graphs_for_batches("normlab", train), _graphs_for_batches("torch", train)
    assert ours <= theirs, f"normlab made {ours} graphs over 4 batch sizes, torch.nn {theirs}"
    assert ours == 1


# --- torch.export and ONNX ---------------------------------------------------------------


def _export(bank: nn.Module, x: torch.Tensor):
    batch = torch.export.Dim("batch", min=2, max=64)
    return torch.export.export(bank, (x,), dynamic_shapes=({0: batch},))


@pytest.mark.parametrize("library", ["torch", "normlab"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_export_dynamic_batch_holds_aten_only(library, train):
    bank = make_bank(library, SMALL).train(train)
    program = _export(copy.deepcopy(bank), sample(SMALL, torch.float32, False))
    assert foreign_targets(program.graph_module) == []
    for n, shape in ((3, SMALL), (4, SMALL)):
        x = sample((n, *shape[1:]), torch.float32, False, seed=n)
        want = copy.deepcopy(bank)(x)
        got = program.module()(x)
        for name, a, e in zip(bank.layers, got, want, strict=True):
            assert_near(a, e, torch.float32, f"{name} exported output")


@pytest.mark.parametrize("library", ["torch", "normlab"])
def test_onnx_dynamo_runs_in_onnxruntime(library, tmp_path):
    import onnxruntime as ort  # the test extra installs it: a missing one fails

    bank = make_bank(library, SMALL).eval()
    x = sample(SMALL, torch.float32, False)
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.onnx.export(bank, (x,), dynamo=True, dynamic_shapes=({0: batch},))
    path = tmp_path / "bank.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (3, 4):
        xn = sample((n, *SMALL[1:]), torch.float32, False, seed=n)
        got = session.run(None, {session.get_inputs()[0].name: xn.numpy()})
        for name, a, e in zip(bank.layers, got, bank(xn), strict=True):
            assert_near(torch.from_numpy(a), e.detach(), torch.float32, f"{name} onnx output")


# --- torch.func: per-sample gradients ----------------------------------------------------


@pytest.mark.parametrize("shape", [SMALL, (4, 16, 64, 64)], ids=["small", "fast"])
def test_vmap_grad_per_sample_gradients(shape):
    """vmap(grad) of every layer without batch statistics against a loop of single grads."""
    from torch.func import functional_call, grad, vmap

    if shape != SMALL:  # one sample alone reaches the kernels in eager
        assert shape[1] * shape[2] * shape[3] >= MIN_ELEMENTS
    layers = normlab_layers(*shape[1:])
    x = sample(shape, torch.float32, False)
    t = sample(shape, torch.float32, False, seed=3)
    for name, (layer, adapt) in layers.items():
        for train in (False, True) if name in BATCH_FREE else (False,):
            layer.train(train)
            params = {k: v.detach() for k, v in layer.named_parameters()}
            buffers = {k: v.detach().clone() for k, v in layer.named_buffers()}

            def loss(p, xi, ti, layer=layer, adapt=adapt, buffers=buffers):
                y = functional_call(layer, (p, buffers), (adapt(xi[None]),))
                return (y * adapt(ti[None])).sum()

            per_param, per_input = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0, 0))(
                params, x, t
            )
            for i in range(shape[0]):
                layer.zero_grad()
                xi = x[i : i + 1].clone().requires_grad_(True)
                (layer(adapt(xi)) * adapt(t[i : i + 1])).sum().backward()
                what = f"{name} ({'train' if train else 'eval'}) sample {i}"
                assert_near(per_input[i], xi.grad[0], torch.float32, f"{what} input gradient")
                for k, v in layer.named_parameters():
                    assert_near(per_param[k][i], v.grad, torch.float32, f"{what} {k}")


# --- torch.fx, torch.jit.trace and the legacy ONNX exporter -------------------------------


@pytest.mark.parametrize("library", ["torch", "normlab"])
@pytest.mark.parametrize("shape", [SMALL, FAST], ids=["small", "fast"])
def test_fx_symbolic_trace_matches_eager(library, shape):
    """Each layer appears as one call in the traced graph; the traced model computes the same."""
    bank = make_bank(library, shape, releases=False)
    graph_module = torch.fx.symbolic_trace(bank)
    called = {n.target for n in graph_module.graph.nodes if n.op == "call_module"}
    for name, layer in bank.layers.items():
        if isinstance(layer, normlab.NormAct):  # traced through: its norm is one call
            assert f"layers.{name}.norm" in called, name
        elif type(layer).__module__.startswith("normlab."):
            assert f"layers.{name}" in called, name
    for train in (True, False):
        eager, traced_copy = copy.deepcopy(bank).train(train), copy.deepcopy(graph_module)
        traced_copy.train(train)
        x = sample(shape, torch.float32, True)
        for name, a, e in zip(bank.layers, traced_copy(x), eager(x), strict=True):
            assert_near(a, e, torch.float32, f"{name} traced output")
        for (name, b), (_, c) in zip(
            traced_copy.named_buffers(), eager.named_buffers(), strict=True
        ):
            assert_near(b, c, torch.float32, f"buffer {name}")


def test_fx_tracing_a_layer_alone_is_refused_clearly():
    with pytest.raises(TypeError, match="inside the traced model"):
        torch.fx.symbolic_trace(normlab.BatchNorm2d(8))
    assert isinstance(torch.fx.symbolic_trace(nn.Sequential(normlab.BatchNorm2d(8))), nn.Module)


@pytest.mark.parametrize("library", ["torch", "normlab"])
@pytest.mark.parametrize("shape", [SMALL, FAST], ids=["small", "fast"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_jit_trace_is_correct(library, shape, train):
    """The trace records the reference path: new data of the traced shape gives eager's output."""
    bank = make_bank(library, shape).train(train)
    eager, first = copy.deepcopy(bank), sample(shape, torch.float32, False)
    with torch.no_grad():
        traced_bank = torch.jit.trace(copy.deepcopy(bank), first, check_trace=False)
        eager(first)  # the trace ran the model once (buffers updated in training)
    for seed in (5, 6):
        x = sample(shape, torch.float32, seed % 2 == 0, seed=seed)
        with torch.no_grad():
            got, want = traced_bank(x), eager(x)
        for name, a, e in zip(bank.layers, got, want, strict=True):
            assert_near(a, e, torch.float32, f"{name} jit output")
    for (name, b), (_, c) in zip(traced_bank.named_buffers(), eager.named_buffers(), strict=True):
        assert_near(b, c, torch.float32, f"buffer {name}")


@pytest.mark.parametrize("library", ["torch", "normlab"])
def test_legacy_onnx_runs_in_onnxruntime(library, tmp_path):
    import onnxruntime as ort  # the test extra installs it: a missing one fails

    bank = make_bank(library, SMALL).eval()
    path = tmp_path / "bank.onnx"
    if library == "torch":  # torch's RMSNorm is refused by this exporter (no aten::rms_norm)
        with pytest.raises(torch.onnx.errors.UnsupportedOperatorError, match="rms_norm"):
            torch.onnx.export(bank.layers.rms, (torch.randn(2, 3, 6, 6),), str(path), dynamo=False)
        del bank.layers["rms"]
    torch.onnx.export(bank, (sample(SMALL, torch.float32, False),), str(path), dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = sample(SMALL, torch.float32, False, seed=9)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for name, a, e in zip(bank.layers, got, bank(x), strict=True):
        assert_near(torch.from_numpy(a), e.detach(), torch.float32, f"{name} onnx output")
