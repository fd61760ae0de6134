"""Run a test function on W local processes joined in a gloo process group (CPU).

Processes are started with the "spawn" method; the group is initialized through a FileStore in
a temporary folder (no port to pick, no race). A worker that raises writes its traceback to
``<out>/error_rank<r>.txt``; ``run_workers`` raises with it. The whole run has a deadline after
which every worker is killed, so a test can fail but never hang.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def _entry(fn: Callable, rank: int, world: int, store: str, out: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world)
        fn(rank, world, out, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    # done, and every result written: skip the interpreter's teardown, where a library's
    # background thread once aborted a finished worker ("terminate called without an active
    # exception", seen after the DCP checks of test_sharding.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(fn: Callable, world: int, out: str, *args: Any, timeout: float = 60.0) -> None:
    """Call ``fn(rank, world, out, *args)`` in ``world`` gloo processes; raise if any fails."""
    os.makedirs(out, exist_ok=True)
    store = os.path.join(out, "filestore")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, store, out, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers still running after {timeout} s")
            if any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(2.0)  # give the peers a moment to report their own error
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    errors = []
    for r, p in enumerate(procs):
        path = os.path.join(out, f"error_rank{r}.txt")
        if os.path.exists(path):
            errors.append(f"--- rank {r} ---\n" + open(path).read())
        elif p.exitcode != 0:
            errors.append(f"--- rank {r} --- exit code {p.exitcode}")
    if errors:
        raise AssertionError("distributed workers failed:\n" + "\n".join(errors))
