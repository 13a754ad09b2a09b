"""Eager per-call cost on a small input (2×16×8×8): normlab against torch.nn.

On small inputs a call's time is its fixed cost (Python, dispatch, op launches), which
on a GPU would exceed the kernel itself. Each layer and its torch.nn counterpart are
called alternately in one process; the table gives the median of many calls and the
ratio (target: at most 1.3).

    python benchmarks/eager_overhead.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import normlab

SHAPE = (2, 16, 8, 8)


class TorchLayerNorm2d(nn.LayerNorm):
    """The usual LayerNorm2d (timm, ConvNeXt): layer norm over channels of NCHW data."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return super().forward(x).permute(0, 3, 1, 2)


def pairs() -> list[tuple[str, nn.Module, nn.Module]]:
    c = SHAPE[1]
    rest = list(SHAPE[1:])
    out = [
        ("BatchNorm2d train", normlab.BatchNorm2d(c), nn.BatchNorm2d(c)),
        ("BatchNorm2d eval", normlab.BatchNorm2d(c).eval(), nn.BatchNorm2d(c).eval()),
        ("GroupNorm", normlab.GroupNorm(4, c), nn.GroupNorm(4, c)),
        ("InstanceNorm2d", normlab.InstanceNorm2d(c), nn.InstanceNorm2d(c)),
        ("LayerNorm", normlab.LayerNorm(rest), nn.LayerNorm(rest)),
        ("RMSNorm", normlab.RMSNorm(rest), nn.RMSNorm(rest)),
        ("LayerNorm2d", normlab.LayerNorm2d(c), TorchLayerNorm2d(c, eps=1e-6)),
    ]
    return out


def interleaved(fns: list[Callable[[], object]], calls: int) -> tuple[list[float], float]:
    """Median seconds per call of each function, and the median ratio of the first to the
    second, from batches of 10 calls taken in turn (one batch of each, then again).

    The time is this thread's CPU time (one torch thread): on a shared machine, wall time
    also counts the moments other processes hold the core. Taking the batches in turn
    lets a slow moment fall on both sides, and the median ratio of neighbouring batches
    is steadier than a ratio of medians.
    """
    for fn in fns:
        for _ in range(50):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(calls // 10):
        for i, fn in enumerate(fns):
            start = time.thread_time()
            for _ in range(10):
                fn()
            times[i].append((time.thread_time() - start) / 10)
    ratios = [a / b for a, b in zip(times[0], times[1], strict=True)]
    return [statistics.median(t) for t in times], statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: "
        "on a small input a call's time is its fixed cost, not the work)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(SHAPE)
    print("| layer | normlab (µs) | torch.nn (µs) | ratio |")
    print("|---|---|---|---|")
    ratios = []
    for name, ours, theirs in pairs():
        calls = [lambda m=ours: m(x), lambda m=theirs: m(x)]
        (mine, torch_s), ratio = interleaved(calls, args.calls)
        ratios.append(ratio)
        print(f"| {name} | {mine * 1e6:.1f} | {torch_s * 1e6:.1f} | {ratio:.2f} |")
    print(f"\nmedian ratio {statistics.median(ratios):.2f}, max {max(ratios):.2f}")


if __name__ == "__main__":
    main()
