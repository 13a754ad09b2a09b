"""`normlab compare`: train one model with each normalization and compare them.

The default compares batch, group, instance, layer and IBN norm on the embedded digits
(16x16, a 5-conv CNN, batch sizes 1 to 32, 2 seeds; a few minutes on 2 CPU cores):
error vs batch size, accuracy under appearance shifts, training curves. Results go to
DIR (results.json, results.csv, summary.md, PNG figures, and one JSON per finished run,
so an interrupted sweep resumes where it stopped).

Example:
    $ normlab compare --norms bn gn --batch-sizes 2 32 --epochs 2 --out out
    $ torchrun --nproc-per-node 2 -m normlab compare --norms bn syncbn --batch-sizes 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from normlab.lab.claims_report import main_records, noise_table
from normlab.lab.models import MODELS
from normlab.lab.noise import DEFAULT_COMPANIONS, DEFAULT_PROBES
from normlab.lab.report import batch_size_table, failed_lines, shift_table, write_outputs
from normlab.lab.sweep import (
    DEFAULT_EXPERIMENTS,
    EXPERIMENTS,
    DataSpec,
    plan_runs,
    reference_batch,
    run_sweep,
)
from normlab.lab.train import world

DEFAULT_NORMS = ["bn", "gn", "in", "ln", "ibn"]
DEFAULT_BATCH_SIZES = [1, 2, 4, 8, 32]
DEFAULT_EPOCHS = 3
DEFAULT_SEEDS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `normlab compare`'s options to `parser`."""
    parser.add_argument(
        "--norms",
        nargs="+",
        default=DEFAULT_NORMS,
        metavar="NAME",
        help="registry names, e.g. bn gn in ln ln2d rms ibn bin none, or syncbn "
        f"(default: {' '.join(DEFAULT_NORMS)})",
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=DEFAULT_BATCH_SIZES,
        metavar="B",
        help=f"global batch sizes (default: {' '.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"epochs per run, the same for every batch size (default: {DEFAULT_EPOCHS})",
    )
    parser.add_argument(
        "--experiment",
        nargs="+",
        choices=EXPERIMENTS,
        default=list(DEFAULT_EXPERIMENTS),
        help=f"which experiments (default: {' '.join(DEFAULT_EXPERIMENTS)}); noise: batch noise "
        "per norm and batch size; ghost: ghost batch norm at the reference batch; in-depth: "
        "instance norm in the first k norm layers, batch norm after (cnn, resnet)",
    )
    parser.add_argument(
        "--probes",
        type=int,
        default=DEFAULT_PROBES,
        help=f"noise, ghost: probe test images (default {DEFAULT_PROBES})",
    )
    parser.add_argument(
        "--companions",
        type=int,
        default=DEFAULT_COMPANIONS,
        help=f"noise, ghost: random batches per probe (default {DEFAULT_COMPANIONS})",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=DEFAULT_SEEDS,
        help=f"repeat every run with seeds 0..N-1 (default: {DEFAULT_SEEDS})",
    )
    parser.add_argument(
        "--data",
        default="digits",
        help="digits (embedded, default), cifar10, a CIFAR-10 .tar.gz, a .npz, "
        "a folder of MNIST idx files, or a folder of class sub-folders",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="use at most this many train (and test) images"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="where cifar10 is downloaded (default: ~/.cache/normlab)"
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="cnn",
        help="cnn (default), resnet, or rnn (reads images row by row)",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="channels of the first stage (cnn 16, resnet 16) or hidden size (rnn 64)",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=None,
        help="conv layers (cnn, default 5) or blocks per stage (resnet, default 1)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=0.1,
        help="learning rate at batch 32, scaled linearly with batch (default 0.1)",
    )
    parser.add_argument("--out", default="compare-out", help="output folder (default: compare-out)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="parallel runs on CPU (default: the number of CPU cores)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _init_distributed(device: str) -> bool:
    """Join the process group torchrun describes in the environment; True if we did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return True


def run(args: argparse.Namespace) -> int:
    """Plan the runs, run what is not finished, write the outputs, print the summary."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: expected a CUDA GPU for --device cuda, found none")
    started = _init_distributed(args.device)
    try:
        rank, world_size = world()
        device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
        configs = plan_runs(
            args.norms,
            args.batch_sizes,
            args.experiment,
            seeds=args.seeds,
            epochs=args.epochs,
            probes=args.probes,
            companions=args.companions,
            model=args.model,
            data=args.data,
            limit=args.limit,
            width=args.width,
            depth=args.depth,
            base_lr=args.lr,
            world_size=world_size,
        )
        jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
        if rank == 0:
            print(
                f"normlab compare: {len(configs)} runs ({', '.join(args.experiment)}) "
                f"on {args.data}, model {args.model}, {world_size} process(es) -> {args.out}",
                file=sys.stderr,
            )
        start = time.perf_counter()
        data = DataSpec(args.data, args.limit, args.cache_dir)
        records, executed = run_sweep(
            configs, args.out, data, device=device, jobs=jobs, progress=not args.no_progress
        )
        if rank != 0:
            return 0
        failed = [r for r in records if "failed" in r]
        # tables list the norms in the order asked for, even when a norm's first run failed
        order = {norm: i for i, norm in enumerate(args.norms)}  # experiments' own norms last
        records = sorted(
            (r for r in records if "failed" not in r),
            key=lambda r: order.get(r["norm"], len(order)),
        )
        if not records:
            raise ValueError(f"every run failed; the first: {failed[0]['failed']}")
        paths = write_outputs(
            records,
            args.out,
            args.experiment,
            header=f"{args.data}, {args.model}, {args.epochs} epochs",
            failed=failed,
        )
        if failed:
            print("runs that could not train:\n" + "\n".join(failed_lines(failed)), file=sys.stderr)
        elapsed = time.perf_counter() - start
        print(
            f"{executed} run(s) executed, {len(configs) - executed} already finished; "
            f"{elapsed:.0f} s",
            file=sys.stderr,
        )
        main = main_records(records)
        if "batch-size" in args.experiment:
            print("\nTest error (%) vs batch size")
            print("\n".join(batch_size_table(main)))
        if "shift" in args.experiment:
            ref = reference_batch(args.batch_sizes)
            print(f"\nTest accuracy (%) under appearance shifts (batch {ref})")
            print("\n".join(shift_table([r for r in main if r["batch_size"] == ref])))
        if "noise" in args.experiment:
            print("\nBatch noise vs batch size")
            print("\n".join(noise_table(main)))
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    finally:
        if started:
            dist.destroy_process_group()
