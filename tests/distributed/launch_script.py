"""A tiny resumable "training" job run by torchrun in tests/distributed/test_launch.py.

usage: launch_script.py OUT_DIR MODE STEPS

Each step all-reduces a number (the collective a training step would do); rank 0 checkpoints
the step count to OUT_DIR/ckpt.txt after every step and a run resumes from it. MODE:

``ok``        run to the end; every rank writes OUT_DIR/rank<r>.txt with what it saw.
``die-once``  if OUT_DIR/died does not exist: rank 1 creates it and calls os._exit(3) after
              step 2 while rank 0 goes on into the next collective (a crash mid-run). Else as ok.
``hang``      rank 1 sleeps forever after step 1 (alive, silent); rank 0 blocks in the next
              collective until the collective timeout (NORMLAB_DIST_TIMEOUT) makes it fail.
``forever``   every rank writes its pid to OUT_DIR/pid<r>.txt, then all-reduces every 0.1 s
              until it is killed (STEPS is ignored).
"""

from __future__ import annotations

import os
import sys
import time

import torch

import normlab.distributed as nd


def main() -> None:
    out, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    device = nd.setup()
    if mode == "forever":
        with open(os.path.join(out, f"pid{nd.rank()}.txt.tmp"), "w") as f:
            f.write(str(os.getpid()))
        os.replace(os.path.join(out, f"pid{nd.rank()}.txt.tmp"),
                   os.path.join(out, f"pid{nd.rank()}.txt"))
        while True:
            nd.all_reduce_sum([1.0])
            time.sleep(0.1)
    ckpt = os.path.join(out, "ckpt.txt")
    start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    start = nd.broadcast_object(start)
    crash = mode == "die-once" and not os.path.exists(os.path.join(out, "died"))
    total = 0.0
    for step in range(start, steps):
        total += nd.all_reduce_sum([float(nd.rank() + 1)])[0].item()
        if nd.is_main_process():
            with open(ckpt + ".tmp", "w") as f:
                f.write(str(step + 1))
            os.replace(ckpt + ".tmp", ckpt)
        nd.barrier()
        if crash and nd.rank() == 1 and step == start + 1:
            open(os.path.join(out, "died"), "w").close()
            os._exit(3)
        if mode == "hang" and nd.rank() == 1 and step == start:
            time.sleep(3600)
    mean = nd.all_reduce_mean(float(nd.rank()), weight=nd.rank() + 1)
    with open(os.path.join(out, f"rank{nd.rank()}.txt"), "w") as f:
        f.write(f"{nd.rank()} {nd.world_size()} {nd.local_rank()} {int(nd.is_distributed())} "
                f"{device.type} {start} {total} {mean}\n")
    nd.cleanup()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
