"""Run a test's worker on several gloo processes on this machine, bounded in time.

The worker is called as ``worker(rank, world, init_file, out_dir)``, initializes
torch.distributed from ``file://init_file`` and pickles its result to
``out_dir/rank{rank}.pkl``; :func:`spawn` returns those results in rank order.
"""

import os
import pickle
import tempfile
import time

import pytest
import torch.multiprocessing as mp


def spawn(worker, world, deadline=180.0):
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            worker,
            args=(world, os.path.join(tmp, "init"), tmp),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        start = time.monotonic()
        while not context.join(timeout=1):
            if time.monotonic() - start > deadline:
                for process in context.processes:
                    process.terminate()
                pytest.fail(f"{world} gloo processes did not finish within {deadline} s")
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
