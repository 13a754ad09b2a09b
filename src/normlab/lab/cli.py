"""`normlab compare`: train one model with each normalization and compare them.

The default compares batch, group, instance, layer and IBN norm on the embedded digits
(16x16, a 5-conv CNN, batch sizes 1 to 32, 2 seeds; a few minutes on 2 CPU cores):
error vs batch size, accuracy under appearance shifts, training curves. Results go to
DIR (results.json, results.csv, summary.md, report.html, PNG figures, and one JSON per finished run,
so an interrupted sweep resumes where it stopped).

Every argument, the model and the data are checked before any training starts (a bad
one: a one-line message and exit status 2). `--model MODULE:FUNCTION` and
`--data MODULE:FUNCTION` bring the user's own network and data set; `--executor ray`
sends the runs to Ray workers. See `normlab.lab.compare` for the same from Python.

Example:
    $ normlab compare --norms bn gn --batch-sizes 2 32 --epochs 2 --out out
    $ normlab compare --model my_models:resnet_small --norms bn gn --out out
    $ torchrun --nproc-per-node 2 -m normlab compare --norms bn syncbn --batch-sizes 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from normlab.lab.api import DEFAULT_BATCH_SIZES, DEFAULT_NORMS, execute, prepare
from normlab.lab.claims_report import main_records, noise_table
from normlab.lab.models import MODELS
from normlab.lab.noise import DEFAULT_COMPANIONS, DEFAULT_PROBES
from normlab.lab.report import batch_size_table, failed_lines, shift_table
from normlab.lab.sweep import DEFAULT_EXPERIMENTS, EXECUTORS, EXPERIMENTS, reference_batch
from normlab.lab.train import world

DEFAULT_EPOCHS = 3
DEFAULT_SEEDS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `normlab compare`'s options to `parser`."""
    parser.add_argument(
        "--norms",
        nargs="+",
        default=list(DEFAULT_NORMS),
        metavar="NAME",
        help="registry names, e.g. bn gn in ln ln2d rms ibn bin none, or syncbn, ibn-a, "
        f"ibn-b (default: {' '.join(DEFAULT_NORMS)})",
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=list(DEFAULT_BATCH_SIZES),
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
        help="digits (embedded, default), cifar10, a CIFAR-10 .tar.gz, a .npz, a folder of "
        "MNIST idx files, a folder of class sub-folders, or MODULE:FUNCTION returning "
        "(train, test) Datasets of (image tensor, label)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="use at most this many train (and test) images"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="where cifar10 is downloaded (default: ~/.cache/normlab)"
    )
    parser.add_argument(
        "--model",
        default="cnn",
        help=f"{', '.join(MODELS)} (built in; default cnn), or MODULE:FUNCTION returning an "
        "nn.Module (the current directory is importable)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of a MODULE:FUNCTION data set (default: its `classes`, else its labels)",
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
        help="parallel runs with the process pool (default: CPU cores / --cpus-per-run)",
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="process",
        help="process: a local process pool (default); ray: Ray tasks (pip install normlab[ray])",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="with --executor ray: the cluster's address (default: start a local Ray instance)",
    )
    parser.add_argument(
        "--cpus-per-run",
        type=int,
        default=1,
        help="threads of each run (part of its configuration) and CPUs Ray reserves (default 1)",
    )
    parser.add_argument(
        "--gpus-per-run",
        type=float,
        default=0,
        help="GPUs Ray reserves for each run (default 0)",
    )
    parser.add_argument(
        "--data-workers",
        type=int,
        default=0,
        help="DataLoader worker processes per run (default 0; no effect on the numbers)",
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
    """Check every argument, run what is not finished, write the outputs, print the summary.

    Exit status: 0 when every run ended (trained or recorded as failed), 1 when some
    crashed (they are run again on the next call with the same --out).
    """
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: expected a CUDA GPU for --device cuda, found none")
    started = _init_distributed(args.device)
    try:
        rank, world_size = world()
        device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
        sweep = prepare(
            probes=args.probes,
            companions=args.companions,
            model=args.model,
            data=args.data,
            norms=args.norms,
            batch_sizes=args.batch_sizes,
            experiments=args.experiment,
            epochs=args.epochs,
            seeds=args.seeds,
            limit=args.limit,
            width=args.width,
            depth=args.depth,
            lr=args.lr,
            num_classes=args.num_classes,
            cache_dir=args.cache_dir,
            jobs=args.jobs,
            executor=args.executor,
            address=args.address,
            cpus_per_run=args.cpus_per_run,
            gpus_per_run=args.gpus_per_run,
            data_workers=args.data_workers,
            world_size=world_size,
        )
        if rank == 0:
            print(
                f"normlab compare: {len(sweep.configs)} runs ({', '.join(args.experiment)}) "
                f"on {sweep.data_label}, model {sweep.model_label}, {world_size} process(es), "
                f"executor {args.executor} -> {args.out}",
                file=sys.stderr,
            )
        start = time.perf_counter()
        outcome = execute(sweep, args.out, device=device, progress=not args.no_progress)
        if rank != 0:
            return 0
        if outcome.failed:
            print(
                "runs that could not train:\n" + "\n".join(failed_lines(outcome.failed)),
                file=sys.stderr,
            )
        if outcome.crashed:
            print(
                "runs that crashed (run again on the next call with this --out):\n"
                + "\n".join(
                    f"- {r['norm']} at batch {r['batch_size']} seed {r['seed']}: {r['crashed']}"
                    for r in outcome.crashed
                ),
                file=sys.stderr,
            )
        records = outcome.finished
        if not records:
            if outcome.crashed:
                return 1
            raise ValueError(f"every run failed; the first: {outcome.failed[0]['failed']}")
        # tables list the norms in the order asked for; the experiments' own norms last
        order = {norm: i for i, norm in enumerate(args.norms)}
        records = sorted(records, key=lambda r: order.get(r["norm"], len(order)))
        elapsed = time.perf_counter() - start
        print(
            f"{outcome.executed} run(s) executed, {len(sweep.configs) - outcome.executed} "
            f"already finished; {elapsed:.0f} s",
            file=sys.stderr,
        )
        main = main_records(records)
        if "batch-size" in args.experiment:
            print("\nTest error (%) vs batch size")
            print("\n".join(batch_size_table(main)))
        if "shift" in args.experiment:
            ref = reference_batch(args.batch_sizes)
            at_ref = [r for r in main if r["batch_size"] == ref and r["shifted"]]
            if at_ref:
                print(f"\nTest accuracy (%) under appearance shifts (batch {ref})")
                print("\n".join(shift_table(at_ref)))
        if "noise" in args.experiment:
            print("\nBatch noise vs batch size")
            print("\n".join(noise_table(main)))
        print("\nwrote " + ", ".join(str(p) for p in outcome.paths.values()))
        return 1 if outcome.crashed else 0
    finally:
        if started:
            dist.destroy_process_group()
