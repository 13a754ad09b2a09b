"""Every CUDA path against the reference path (correctness) and torch.nn and a copy (speed).

For the day a GPU is lent: each family (batch, instance, group, layer, RMS norm,
LayerNorm2d, per-activation batch norm) × float32/bfloat16 × NCHW/channels_last, on
each CUDA backend that accepts it (ATen's kernels, normlab's Triton kernels), forward
and backward:

* correctness: output, input and affine gradients against the float64 reference path;
* speed: forward+backward time (``torch.cuda.Event``, median of repeats) as a ratio to
  the torch.nn counterpart (where one exists) and to a plain copy of the input.

Prints a markdown table; finishes in well under 3 minutes on one GPU. Without a CUDA
device, ``--dry-run`` (the default there) prints the cases and the path the dispatcher
would choose for each (``explain_dispatch(..., device="cuda")``), checking the script's
CPU-side logic.

    python benchmarks/cuda_paths.py [--dry-run] [--repeats 20] [--shape 32 64 56 56]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import normlab
from normlab.kernels import explain_dispatch, use_backend, use_reference
from normlab.kernels.backends import BACKENDS, Call
from normlab.normalize import affine_view
from normlab.pattern import plan


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str
    sizes: dict
    center: bool
    torch_nn: Callable[[int, tuple[int, ...]], Callable[..., torch.Tensor]] | None


def _ln2d(c: int, shape: tuple[int, ...]) -> Callable[..., torch.Tensor]:
    def f(x, w, b):  # noqa: ANN001, ANN202
        return nn.functional.layer_norm(x.permute(0, 2, 3, 1), (c,), w, b).permute(0, 3, 1, 2)

    return f


FAMILIES = [
    Family("batch norm", "n c h w -> c", {}, True,
           lambda c, s: lambda x, w, b: nn.functional.batch_norm(x, None, None, w, b, True)),
    Family("instance norm", "n c h w -> n c", {}, True,
           lambda c, s: lambda x, w, b: nn.functional.group_norm(x, c, w, b)),
    Family("group norm", "n (g k) h w -> n g", {"g": 32}, True,
           lambda c, s: lambda x, w, b: nn.functional.group_norm(x, 32, w, b)),
    Family("layer norm (C,H,W)", "n c h w -> n", {}, True,
           lambda c, s: lambda x, w, b: nn.functional.group_norm(x, 1, w, b)),
    Family("LayerNorm2d", "n c h w -> n h w", {}, True, _ln2d),
    Family("RMS norm (C,H,W)", "n c h w -> n", {}, False, None),
    Family("per-activation batch norm", "n c h w -> c h w", {}, True, None),
]  # fmt: skip
DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = (None, torch.channels_last)


def make(shape, dtype, layout, device):  # noqa: ANN001, ANN201
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 1).to(device=device, dtype=dtype)
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    c = shape[1]
    w = (1 + 0.3 * torch.randn(c, generator=g)).to(device)
    b = (0.3 * torch.randn(c, generator=g)).to(device)
    return x, w, b


def accepting(fam: Family, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> list[str]:
    """The CUDA backends that take this call (ATen, Triton, and always the reference path),
    checked without running it."""
    p = plan(fam.pattern, x.shape, **fam.sizes)
    wv, bv = affine_view(w, x, p, "weight"), affine_view(b, x, p, "bias")
    call = Call(x, p, wv, bv, 1e-5, fam.center, grad=True, device="cuda", forced=True)
    names = [
        name for name in ("aten", "triton") if not isinstance(BACKENDS[name].accept(call), str)
    ]
    return [*names, "reference"]


def run(fam: Family, x, w, b, backend):  # noqa: ANN001, ANN201
    """Output and gradients (x, w, b) of one forward+backward on `backend`."""
    xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ctx = use_reference() if backend == "reference" else use_backend(backend)
    with ctx:
        y = normlab.normalize(xi, fam.pattern, weight=wi, bias=bi, center=fam.center, **fam.sizes)
    g = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=torch.float32).reshape(y.shape)
    y.backward(g.to(y.dtype))
    return y, xi.grad, wi.grad, bi.grad


def max_error(fam: Family, x, w, b, backend) -> float:  # noqa: ANN001
    """Largest error relative to the float64 reference's scale, over y and the gradients."""
    got = run(fam, x, w, b, backend)
    want = run(fam, x.double(), w.double(), b.double(), "reference")
    return max(
        ((a.double() - e).abs().max() / (e.abs().max() + 1)).item()
        for a, e in zip(got, want, strict=True)
    )


def cuda_time(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(fn: Callable[..., torch.Tensor], x, w, b) -> Callable[[], object]:  # noqa: ANN001
    xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
    g = torch.ones_like(x)

    def step() -> None:
        y = fn(xi, wi, bi)
        torch.autograd.grad(y, (xi, wi, bi), g)

    return step


def cases(shape: tuple[int, ...], device: str):  # noqa: ANN201
    for fam in FAMILIES:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                yield fam, dtype, layout, make(shape, dtype, layout, device)


def dry_run(shape: tuple[int, ...]) -> None:
    print("| family | dtype | layout | CUDA path (first choice) | backends accepting |")
    print("|---|---|---|---|---|")
    for fam, dtype, layout, (x, w, b) in cases(shape, "cpu"):
        path = explain_dispatch(
            x.requires_grad_(), fam.pattern, weight=w, center=fam.center, device="cuda", **fam.sizes
        ).splitlines()[0]
        lay = "channels_last" if layout else "NCHW"
        names = ", ".join(accepting(fam, x, w, b)) or "none (reference)"
        print(f"| {fam.name} | {str(dtype)[6:]} | {lay} | {path} | {names} |")


def measure(shape: tuple[int, ...], repeats: int) -> None:
    print("| family | dtype | layout | backend | max rel. error | ms | vs torch.nn | vs copy |")
    print("|---|---|---|---|---|---|---|---|")
    for fam, dtype, layout, (x, w, b) in cases(shape, "cuda"):
        lay = "channels_last" if layout else "NCHW"
        copy = cuda_time(lambda x=x: x.clone(), repeats)
        theirs = None
        if fam.torch_nn is not None:
            ref_fn = fam.torch_nn(shape[1], shape)
            theirs = cuda_time(fwd_bwd(ref_fn, x, w.to(dtype), b.to(dtype)), repeats)
        for backend in accepting(fam, x, w, b):
            try:
                err = max_error(fam, x, w, b, backend)

                def mine(xi, wi, bi, backend=backend, fam=fam):  # noqa: ANN001, ANN202
                    with use_reference() if backend == "reference" else use_backend(backend):
                        return normlab.normalize(
                            xi, fam.pattern, weight=wi, bias=bi, center=fam.center, **fam.sizes
                        )

                ms = cuda_time(fwd_bwd(mine, x, w, b), repeats)
            except Exception as e:  # noqa: BLE001  (a failing path is a row of the table)
                print(f"| {fam.name} | {str(dtype)[6:]} | {lay} | {backend} | FAILED: {e} | | | |")
                continue
            vs_nn = f"{ms / theirs:.2f}" if theirs else "–"
            print(
                f"| {fam.name} | {str(dtype)[6:]} | {lay} | {backend} | {err:.1e} | {ms:.3f} | "
                f"{vs_nn} | {ms / copy:.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the paths, run nothing")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 56, 56])
    args = parser.parse_args()
    shape = tuple(args.shape)
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("no CUDA device: listing the paths only (--dry-run)\n")
        dry_run(shape)
        return
    print(f"{torch.cuda.get_device_name()}, input {shape}, forward+backward\n")
    measure(shape, args.repeats)


if __name__ == "__main__":
    main()
