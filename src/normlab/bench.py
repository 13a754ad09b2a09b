"""`normlab bench`: time normlab's norms against torch.nn and against a plain copy.

Normalization is memory bound: the floor for a forward pass is one read and one
write of the tensor, the time of ``y.copy_(x)``. Every case times a copy, the torch
counterpart and normlab, interleaved (one repetition of each in turn, each timed call
preceded by an untimed one) in one run, and reports medians as ratios: normlab/copy,
torch/copy, normlab/torch, forward and forward+backward.

For the hybrids (``ibn``: IBN-a, ``bin``: Batch-Instance, ``sn``: Switchable) torch.nn
has no counterpart: the "torch" columns time the official release's composition in
plain torch (:mod:`normlab.releases`), with the layer's own parameter values, and the
path column lists the dispatcher's choices during the layer's forward.

Memory: "saved" is the bytes of tensors autograd keeps for backward beyond the input
and the parameters (found with saved-tensor hooks, counted once per storage). Temporary
memory inside the forward is not measured.

Example:
    $ normlab bench --quick --threads 2 --cases in,gn --format md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

CNN_SHAPES = ((32, 64, 56, 56), (32, 256, 14, 14))
TRANSFORMER_SHAPE = (16, 512, 768)
HYBRIDS = ("ibn", "bin", "sn")
KINDS = ("bn", "in", "ln", "gn", "rms", "ln2d", *HYBRIDS)


@dataclass(frozen=True)
class Case:
    """One benchmark row: a norm, a shape, a memory layout and a dtype."""

    kind: str
    shape: tuple[int, ...]
    channels_last: bool
    dtype: str

    @property
    def name(self) -> str:
        layout = "cl" if self.channels_last else ("nchw" if len(self.shape) == 4 else "btd")
        return f"{self.kind} {'x'.join(map(str, self.shape))} {layout} {self.dtype}"


def cases(quick: bool = False) -> list[Case]:
    """The fixed table: ResNet-stage shapes in both layouts (every kind, hybrids included),
    a transformer shape for LayerNorm and RMSNorm."""
    out = []
    dtypes = ("fp32",) if quick else ("fp32", "bf16")
    shapes = CNN_SHAPES[:1] if quick else CNN_SHAPES
    for dtype in dtypes:
        for shape in shapes:
            for channels_last in (False, True):
                out += [Case(k, shape, channels_last, dtype) for k in KINDS]
        out += [Case(k, TRANSFORMER_SHAPE, False, dtype) for k in ("ln", "rms")]
    return out


def _modules(case: Case):  # noqa: ANN202
    """(torch module, normlab callable) computing the same normalization."""
    import torch
    import torch.nn.functional as F

    shape = case.shape
    if len(shape) == 3:  # transformer: normalize the last dim
        d = shape[-1]
        ref = torch.nn.LayerNorm(d) if case.kind == "ln" else torch.nn.RMSNorm(d, eps=1e-5)
        pattern, sizes, center = "... d -> ...", {}, case.kind == "ln"
        return ref, _functional(ref, pattern, sizes, center)
    c, h, w = shape[1:]
    if case.kind in HYBRIDS:  # the release's composition, with the layer's parameter values
        from normlab.releases import release_of

        layer = _layer(case, c, h, w)
        return release_of(layer), layer
    if case.kind == "bn":
        ref = torch.nn.BatchNorm2d(c)
        pattern, sizes, center = "n c h w -> c", {}, True
    elif case.kind == "in":
        ref = torch.nn.InstanceNorm2d(c, affine=True)
        pattern, sizes, center = "n c h w -> n c", {}, True
    elif case.kind == "ln":
        ref = torch.nn.LayerNorm([c, h, w])
        pattern, sizes, center = "n c h w -> n", {}, True
    elif case.kind == "gn":
        ref = torch.nn.GroupNorm(32, c)
        pattern, sizes, center = "n (g k) h w -> n g", {"g": 32}, True
    elif case.kind == "rms":
        ref = torch.nn.RMSNorm([c, h, w], eps=1e-5)
        pattern, sizes, center = "n c h w -> n", {}, False
    else:  # ln2d: the way timm writes it, permute + layer_norm over C + permute back

        class TimmLayerNorm2d(torch.nn.LayerNorm):
            def forward(self, x):  # noqa: ANN001, ANN202
                x = x.permute(0, 2, 3, 1)
                x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
                return x.permute(0, 3, 1, 2)

        ref = TimmLayerNorm2d(c)
        pattern, sizes, center = "n c h w -> n h w", {}, True
    layer = _layer(case, c, h, w)
    return ref, layer if layer is not None else _functional(ref, pattern, sizes, center)


def _layer(case: Case, c: int, h: int, w: int):  # noqa: ANN202
    """normlab's drop-in layer for the case, when the layers are available."""
    import normlab

    makers = {
        "bn": ("BatchNorm2d", (c,), {}),
        "in": ("InstanceNorm2d", (c,), {"affine": True}),
        "ln": ("LayerNorm", ([c, h, w],), {}),
        "gn": ("GroupNorm", (32, c), {}),
        "rms": ("RMSNorm", ([c, h, w],), {"eps": 1e-5}),
        "ln2d": ("LayerNorm2d", (c,), {}),
        "ibn": ("IBN", (c,), {}),  # IBN-a, ratio 0.5
        "bin": ("BatchInstanceNorm", (c,), {}),
        "sn": ("SwitchableNorm", (c,), {}),
    }
    name, args, kwargs = makers[case.kind]
    cls = getattr(normlab, name, None)
    if cls is None:
        return None
    return cls(*args, **kwargs)


def _functional(ref, pattern: str, sizes: dict, center: bool):  # noqa: ANN001, ANN202
    """normlab.normalize with the torch module's own parameters (same affine, same eps)."""
    import normlab

    weight = getattr(ref, "weight", None)
    bias = getattr(ref, "bias", None)

    def run(x):  # noqa: ANN001, ANN202
        return normlab.normalize(
            x, pattern, weight=weight, bias=bias, eps=1e-5, center=center, **sizes
        )

    run.parameters = ref.parameters  # type: ignore[attr-defined]
    return run


def _saved_bytes(fn: Callable, x, params) -> int:  # noqa: ANN001
    """Bytes autograd keeps for backward beyond the input's and parameters' storages."""
    import torch

    skip = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):  # noqa: ANN001, ANN202
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def measure(case: Case, repeats: int, device: str = "cpu") -> dict[str, float | str]:
    """Median times (ms) of copy, torch, normlab (forward; forward+backward) and saved bytes."""
    import torch

    from normlab.kernels import explain_dispatch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case.dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=gen).to(device=device, dtype=dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref, mine = _modules(case)
    ref = ref.to(device=device, dtype=dtype)
    if isinstance(mine, torch.nn.Module):
        mine = mine.to(device=device, dtype=dtype)
    else:
        mine = _functional(ref, *_pattern_of(case))
    params = list(ref.parameters()) + (
        list(mine.parameters()) if isinstance(mine, torch.nn.Module) else []
    )
    out = torch.empty_like(x)
    xg = x.detach().clone().requires_grad_()
    grad = torch.randn(case.shape, generator=gen).to(device=device, dtype=dtype)
    if case.channels_last:  # as a channels_last network would hand it back
        grad = grad.contiguous(memory_format=torch.channels_last)

    def both(fn):  # noqa: ANN001, ANN202
        def step():  # noqa: ANN202
            fn(xg).backward(grad)
            xg.grad = None
            for p in params:
                p.grad = None

        return step

    fns = {
        "copy": lambda: out.copy_(x),
        "torch": lambda: ref(x),
        "normlab": lambda: mine(x),
        "torch_fb": both(ref),
        "normlab_fb": both(mine),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    # a GPU runs asynchronously: wait for it before reading the clock
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with torch.no_grad():  # forward timings without autograd bookkeeping
        fns["torch"](), fns["normlab"]()  # warm up (and compile)
    fns["torch_fb"](), fns["normlab_fb"]()
    for _ in range(repeats):
        for key, fn in fns.items():
            with torch.no_grad() if not key.endswith("_fb") else _nothing():
                # run once untimed, then time: each measurement finds the thread pool it
                # uses awake, whichever library ran before it
                fn()
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[key].append(time.perf_counter() - start)
    result: dict[str, float | str] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result["saved_torch"] = _saved_bytes(ref, xg, params)
    result["saved_normlab"] = _saved_bytes(mine, xg, params)
    with torch.no_grad():  # the forward's kernel (with a gradient another may serve)
        if case.kind in HYBRIDS:
            result["path"] = _dispatched(mine, x)
        else:
            pattern, sizes, center = _pattern_of(case)
            weight = getattr(ref, "weight", None)
            path = explain_dispatch(x, pattern, weight=weight, center=center, **sizes)
            result["path"] = path.splitlines()[0].split(",")[0]
    return result


def _dispatched(fn: Callable, x) -> str:  # noqa: ANN001
    """The dispatcher's choices during ``fn(x)``, read from the ``normlab.kernels`` log.

    A hybrid layer makes several normalizations (its IN and BN parts, or statistics
    then one application); each logged call becomes "pattern: path", in order, once.
    """
    import copy
    import logging

    import torch

    calls: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # "normalize_batch n c ... -> n c (32, 32, 56, 56): cpu (aten): native_..."
            head, _, path = record.getMessage().partition(": ")
            pattern = head.split(" ", 1)[-1].rsplit(" (", 1)[0]
            call = f"{pattern}: {path.split(',')[0]}" if path else head
            if call not in calls:
                calls.append(call)

    if isinstance(fn, torch.nn.Module):  # a fresh copy: no eager route kept from a warm-up
        fn = copy.deepcopy(fn)
    log = logging.getLogger("normlab.kernels")
    handler, level, propagate = Collect(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False  # the records are for this table, not the user's handlers
    try:
        fn(x)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    return "; ".join(calls) if calls else "no dispatcher call (the layer's own torch ops)"


class _nothing:
    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *args):  # noqa: ANN002, ANN204
        return False


def _pattern_of(case: Case) -> tuple[str, dict, bool]:
    if len(case.shape) == 3:
        return "... d -> ...", {}, case.kind == "ln"
    return {
        "bn": ("n c h w -> c", {}, True),
        "in": ("n c h w -> n c", {}, True),
        "ln": ("n c h w -> n", {}, True),
        "gn": ("n (g k) h w -> n g", {"g": 32}, True),
        "rms": ("n c h w -> n", {}, False),
        "ln2d": ("n c h w -> n h w", {}, True),
    }[case.kind]


COLUMNS = (
    ("case", "case"),
    ("nl/copy", "forward normlab/copy"),
    ("torch/copy", "forward torch/copy"),
    ("nl/torch", "forward normlab/torch"),
    ("fb nl/copy", "forward+backward normlab/copy"),
    ("fb torch/copy", "forward+backward torch/copy"),
    ("fb nl/torch", "forward+backward normlab/torch"),
    ("saved nl MB", "normlab saved for backward"),
    ("saved torch MB", "torch saved for backward"),
    ("path", "normlab's kernel"),
)


def row(case: Case, r: dict) -> list[str]:
    """One table row of ratios for a measured case."""
    copy = r["copy"]
    return [
        case.name,
        f"{r['normlab'] / copy:.2f}",
        f"{r['torch'] / copy:.2f}",
        f"{r['normlab'] / r['torch']:.2f}",
        f"{r['normlab_fb'] / copy:.2f}",
        f"{r['torch_fb'] / copy:.2f}",
        f"{r['normlab_fb'] / r['torch_fb']:.2f}",
        f"{r['saved_normlab'] / 2**20:.1f}",
        f"{r['saved_torch'] / 2**20:.1f}",
        str(r["path"]),
    ]


def matches(case: Case, wanted: str) -> bool:
    """Whether ``--cases`` text picks the case: a kind by its name alone ("bn" is not
    "ibn", "ln" not "ln2d"), other text anywhere in the case's name."""
    if wanted in KINDS:
        return case.kind == wanted
    return wanted in case.name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `normlab bench`."""
    parser.add_argument("--quick", action="store_true", help="one shape, fp32, fewer repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch/numba threads")
    parser.add_argument(
        "--cases",
        default="",
        help="comma-separated; a kind (bn, ibn, ln, ...) picks that kind's rows, other text "
        "the rows whose name contains it (cl, bf16, 14x14)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per case")
    parser.add_argument("--format", choices=("text", "md"), default="text")
    parser.add_argument("--device", default="cpu", help="where to run: cpu (default) or cuda")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="normlab under torch.compile against torch.nn under torch.compile "
        "(conv-norm-ReLU blocks, the norms alone) and the eager per-call cost on small inputs",
    )


def run(args: argparse.Namespace) -> int:
    """Run the table (or the filtered cases) and print it; return 0."""
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"bench: expected --threads >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = getattr(args, "device", "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"bench: expected --device cpu or cuda, got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"bench: --device {device} asked for, but no CUDA device is available")
    wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
    chosen = [c for c in cases(args.quick) if not wanted or any(matches(c, w) for w in wanted)]
    if not chosen:
        raise ValueError(f"bench: no case matches --cases {args.cases!r}; e.g. 'gn', 'cl', 'bf16'")
    repeats = args.repeats or (5 if args.quick else 11)
    if getattr(args, "compile", False):
        from normlab.bench_compile import run_compiled

        return run_compiled(args.quick, wanted, repeats, args.format == "md")
    header = [short for short, _ in COLUMNS]
    where = f"{torch.get_num_threads()} threads" if device == "cpu" else device
    print(f"# normlab bench: {where}, torch {torch.__version__}, "
          f"median of {repeats}; ratios of time, lower is better")  # fmt: skip
    if args.format == "md":
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    else:
        print("  ".join(f"{h:>14}" if i else f"{h:<28}" for i, h in enumerate(header)))
    for case in chosen:
        cells = row(case, measure(case, repeats, device))
        if args.format == "md":
            print("| " + " | ".join(cells) + " |", flush=True)
        else:
            print(
                "  ".join(f"{c:>14}" if i else f"{c:<28}" for i, c in enumerate(cells)), flush=True
            )
    return 0
