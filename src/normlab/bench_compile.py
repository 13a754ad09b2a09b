"""`normlab bench --compile`: normlab under torch.compile against torch.nn under torch.compile.

Three tables, every figure a ratio from one run (medians of interleaved repetitions):

1. conv → norm → ReLU blocks (8×32×32×32, float32), forward and forward+backward,
   normlab compiled / torch.nn compiled (the releases' compositions compiled, for the
   hybrids ``ibn``, ``bin``, ``sn``);
2. the eager per-call cost on a small input (2×16×8×8): normlab / torch.nn, and the
   microseconds of each (fixed cost, where the arithmetic is negligible);
3. the bench table's norms alone (float32, NCHW), both compiled.

Example:
    $ normlab bench --compile --quick --threads 2 --format md
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from normlab.bench import KINDS, Case, _modules, cases, matches

BLOCK_SHAPE = (8, 32, 32, 32)
SMALL_SHAPE = (2, 16, 8, 8)


def _block(norm):  # noqa: ANN001, ANN202
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(BLOCK_SHAPE[1], BLOCK_SHAPE[1], 3, padding=1), norm, nn.ReLU())


def _pair(kind: str, shape: tuple[int, ...], block: bool):  # noqa: ANN202
    """(torch.nn module, normlab module) for `kind`, the same parameters in both."""
    import copy

    if kind == "gn" and shape[1] < 32:  # the table's 32 groups need 32 channels or more
        import torch

        import normlab

        ref, mine = torch.nn.GroupNorm(8, shape[1]), normlab.GroupNorm(8, shape[1])
    else:
        ref, mine = _modules(Case(kind, shape, False, "fp32"))
    if block:
        ref, mine = _block(ref), _block(mine)
        mine[0] = copy.deepcopy(ref[0])
    return ref, mine


def _times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each function per repetition, interleaved (one of each in turn), each
    timed call after an untimed one."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            fn()
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def _ratio(times: dict[str, list[float]], mine: str, theirs: str) -> float:
    """Median of the ratios of neighbouring repetitions: a slow moment of the machine
    falls on both sides of each ratio, so this is steadier than a ratio of medians."""
    return statistics.median(a / b for a, b in zip(times[mine], times[theirs], strict=True))


def compiled_ratios(kind: str, shape: tuple[int, ...], block: bool, repeats: int) -> dict:
    """normlab compiled / torch compiled, forward (no grad) and forward+backward."""
    import torch

    ref, mine = _pair(kind, shape, block)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    xg = x.clone().requires_grad_()
    compiled = {"torch": torch.compile(ref), "normlab": torch.compile(mine)}

    def forward(fn):  # noqa: ANN001, ANN202
        def step():  # noqa: ANN202
            with torch.no_grad():
                return fn(x)

        return step

    def both(fn, module):  # noqa: ANN001, ANN202
        def step():  # noqa: ANN202
            fn(xg).sum().backward()
            xg.grad = None
            if isinstance(module, torch.nn.Module):  # not normlab.normalize with torch's params
                module.zero_grad(set_to_none=True)

        return step

    fns = {k: forward(f) for k, f in compiled.items()}
    fns |= {f"{k}_fb": both(f, m) for (k, f), m in zip(compiled.items(), (ref, mine), strict=True)}
    for fn in fns.values():  # compile outside the clock
        fn()
    t = _times(fns, repeats)
    return {
        "fwd": _ratio(t, "normlab", "torch"),
        "fb": _ratio(t, "normlab_fb", "torch_fb"),
        "torch_fb_ms": statistics.median(t["torch_fb"]) * 1e3,
    }


def eager_call_cost(kind: str, repeats: int) -> dict:
    """Eager forward on a small input: normlab's and torch.nn's microseconds per call."""
    import torch

    ref, mine = _pair(kind, SMALL_SHAPE, block=False)
    x = torch.randn(SMALL_SHAPE, generator=torch.Generator().manual_seed(0))
    calls = 50

    def many(fn):  # noqa: ANN001, ANN202
        def step():  # noqa: ANN202
            for _ in range(calls):
                fn(x)

        return step

    t = _times({"torch": many(ref), "normlab": many(mine)}, repeats)
    out = {k: statistics.median(v) / calls * 1e6 for k, v in t.items()}
    return out | {"ratio": _ratio(t, "normlab", "torch")}


def run_compiled(quick: bool, wanted: list[str], repeats: int, md: bool) -> int:
    """Print the three tables; return 0."""
    import torch

    kinds = [k for k in KINDS if not wanted or any(w == k for w in wanted)] or list(KINDS)

    def header(title: str, names: list[str]) -> None:
        print(f"\n## {title}\n")
        if md:
            print("| " + " | ".join(names) + " |")
            print("|" + "---|" * len(names))

    def line(cells: list[str]) -> None:
        text = ("| " + " | ".join(cells) + " |") if md else "  ".join(f"{c:<28}" for c in cells)
        print(text, flush=True)

    print(f"# normlab bench --compile: {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {repeats}; ratios of time, lower is better")  # fmt: skip
    header(
        "conv → norm → ReLU, 8×32×32×32 fp32, compiled",
        ["norm", "fwd nl/torch", "fb nl/torch", "torch fb ms"],
    )
    for kind in kinds:
        r = compiled_ratios(kind, BLOCK_SHAPE, True, repeats)
        line([kind, f"{r['fwd']:.2f}", f"{r['fb']:.2f}", f"{r['torch_fb_ms']:.2f}"])
        torch._dynamo.reset()
    header(
        "eager per-call cost, 2×16×8×8 fp32 forward", ["norm", "nl/torch", "normlab µs", "torch µs"]
    )
    for kind in kinds:
        r = eager_call_cost(kind, repeats)
        ratio = r["ratio"]
        line([kind, f"{ratio:.2f}", f"{r['normlab']:.0f}", f"{r['torch']:.0f}"])
    header("the norms alone, compiled", ["case", "fwd nl/torch", "fb nl/torch"])
    chosen = [c for c in cases(quick) if c.dtype == "fp32" and not c.channels_last]
    for case in chosen:
        if case.kind in kinds and (not wanted or any(matches(case, w) for w in wanted)):
            r = compiled_ratios(case.kind, case.shape, False, repeats)
            line([case.name, f"{r['fwd']:.2f}", f"{r['fb']:.2f}"])
            torch._dynamo.reset()
    return 0
