"""Under torch.compile: ATen's kernel, the normlab:: custom operator, or the decomposition?

A conv → norm → ReLU block at 8×32×32×32 float32, forward and backward, on the CPU,
compiled once per path in one process: the norm as ATen's own kernel where one computes
the pattern (``native_batch_norm``/``native_group_norm``/``native_layer_norm``/
``rms_norm``, what torch.nn's layers hand Inductor), as the reference decomposition
(which Inductor fuses with its neighbours), and as the ``normlab::batch_forward``
operator (opaque to Inductor). Prints the median time of each (interleaved repeated
runs) and the ratios to the decomposition; the dispatcher's compile path
(:func:`normlab.kernels.dispatch.compile_kernel`) follows these figures.

    python benchmarks/compile_path.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from normlab.kernels import dispatch, ops
from normlab.pattern import Plan, plan

SHAPE = (8, 32, 32, 32)
CASES = [  # name, pattern, sizes, center
    ("batch norm", "n c h w -> c", {}, True),
    ("group norm", "n (g k) h w -> n g", {"g": 8}, True),
    ("instance norm", "n c h w -> n c", {}, True),
    ("layer norm (C,H,W)", "n c h w -> n", {}, True),
    ("LayerNorm2d", "n c h w -> n h w", {}, True),
    ("RMS norm (C,H,W)", "n c h w -> n", {}, False),
]


def decomposition(
    x: torch.Tensor, p: Plan, w: torch.Tensor, b: torch.Tensor, eps: float, center: bool
) -> torch.Tensor:
    """The reference path's operations (``kernels/reference.py`` with ``moments``), written
    out for a static plan: what the dispatcher's decomposition hands Inductor."""
    xe = x.reshape(p.expanded_shape)
    if center:
        var, mean = torch.var_mean(xe, list(p.reduced), correction=0, keepdim=True)
    else:
        mean, var = torch.zeros((), dtype=x.dtype), xe.square().mean(list(p.reduced), keepdim=True)
    y = ((xe - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    return y * w + b


class Block(nn.Module):
    def __init__(self, pattern: str, sizes: dict, center: bool, path: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.weight = nn.Parameter(torch.ones(32))
        self.bias = nn.Parameter(torch.zeros(32))
        # the plan of the (static) shape, made once: this measures the norm's path only
        self.p = plan(pattern, SHAPE, **sizes)
        self.spec, self.center, self.path = ops.plan_spec(self.p), center, path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        p = self.p
        shape = [1] * 4
        shape[1] = 32
        w, b = self.weight.reshape(shape), self.bias.reshape(shape)
        if self.path == "operator":
            y = torch.ops.normlab.batch_forward(h, w, b, self.spec, 1e-5, self.center, "numba")[0]
        elif self.path == "aten":
            passes = dispatch.compile_kernel(h, p, w, b, self.center)
            y = passes.forward(h, 1e-5, self.center, False)[0]
        else:
            y = decomposition(h, p, w, b, 1e-5, self.center)
        return torch.relu(y)


def measure(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of one forward+backward of each model, runs interleaved (so that
    the machine's load falls on both alike)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(repeats + 3):
        for name, model in models.items():
            xi = x.detach().requires_grad_()
            start = time.perf_counter()
            model(xi).sum().backward()
            if i >= 3:  # warm-up (compilation) excluded
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(SHAPE)
    print("| norm | decomposition (ms) | aten / decomposition | operator / decomposition |")
    print("|---|---|---|---|")
    for name, pattern, sizes, center in CASES:
        paths = ["reference", "operator"]
        if dispatch.compile_kernel(x, plan(pattern, SHAPE, **sizes), None, None, center):
            paths.append("aten")
        models = {
            path: torch.compile(Block(pattern, sizes, center, path), fullgraph=True)
            for path in paths
        }
        got = measure(models, x, args.repeats)
        ref = got["reference"]
        aten = f"{got['aten'] / ref:.2f}" if "aten" in got else "no ATen kernel"
        print(f"| {name} | {ref * 1e3:.2f} | {aten} | {got['operator'] / ref:.2f} |")


if __name__ == "__main__":
    main()
