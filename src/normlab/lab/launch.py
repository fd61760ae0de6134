"""The process layout of a lab command: one :class:`normlab.distributed.LaunchSpec` from
``--nproc-per-node``, ``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port`` and
``--rdzv-endpoint``; whether this process must re-run the command through torchrun, and doing so.

The checks are LaunchSpec's; their errors come back as ConfigErrors that name the command-line
flags (``master_port`` -> ``--master-port``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from typing import Iterator, Optional

import torch

from normlab import distributed as nd
from normlab.distributed import LaunchSpec
from normlab.lab.config import ConfigError
from normlab.lab.progress import say
from normlab.models.registry import registered_in

__all__ = ["LaunchSpec", "LAUNCH_FIELDS", "CLI_MODULE", "in_worker", "check_launch",
           "job_world_size", "must_relaunch", "relaunch", "worker_program"]

LAUNCH_FIELDS = tuple(f.name for f in dataclasses.fields(LaunchSpec))
CLI_MODULE = "normlab.lab.cli"  # what torchrun workers run (but see worker_program)
_HINT = ("--nproc-per-node K on one node; on several: --nnodes M --node-rank R --master-addr HOST "
         "--master-port P (or --rdzv-endpoint HOST:PORT), the same command on every node")


def in_worker() -> bool:
    """Whether this process is a worker started by torchrun (``$LOCAL_RANK`` is set)."""
    return "LOCAL_RANK" in os.environ


@contextlib.contextmanager
def launcher_flags() -> Iterator[None]:
    """normlab.distributed's ValueErrors as ConfigErrors that name the command-line flags."""
    try:
        yield
    except ValueError as e:
        msg = re.sub(r"\b(" + "|".join(LAUNCH_FIELDS) + r")\b",
                     lambda m: "--" + m.group(1).replace("_", "-"), str(e))
        raise ConfigError(msg, hint=_HINT) from None


def job_world_size(spec: LaunchSpec) -> int:
    """Processes of the job: torchrun's $WORLD_SIZE inside a worker, else the spec's K x M."""
    return nd.world_size() if in_worker() else spec.world_size


def must_relaunch(spec: LaunchSpec) -> bool:
    """Whether this (parent) process must start the job through torchrun."""
    return not in_worker() and spec.world_size > 1


def check_launch(spec: LaunchSpec) -> None:
    """The counts always; the rendezvous too when this process will launch the job (the
    launcher's checks, port range and endpoint, before anything starts)."""
    with launcher_flags():
        spec.check_counts()
        if must_relaunch(spec):
            spec.check()


def _check_gpus(spec: LaunchSpec, device: Optional[torch.device]) -> None:
    """One GPU per process: said here, not by every rank that finds none."""
    if device is None or device.type != "cuda":
        return
    gpus = torch.cuda.device_count()
    if spec.nproc_per_node > gpus:
        raise ConfigError(f"--nproc-per-node {spec.nproc_per_node} needs one GPU per "
                          f"process, but {gpus} CUDA device(s) are visible",
                          hint=f"use --nproc-per-node {gpus} or fewer on each node (or "
                               "--device cpu)")


def worker_program() -> list[str]:
    """What each torchrun worker runs: ``-m normlab.lab.cli``; or, when the script being run
    registered a model (a user's own model, README "Your own model in the lab"), that script,
    which registers it again in every worker before it runs the CLI."""
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    if script and registered_in("__main__"):
        return [os.path.abspath(script)]
    return ["-m", CLI_MODULE]


def relaunch(spec: LaunchSpec, argv: list[str], device: Optional[torch.device]) -> None:
    """Re-run the command ``argv`` (``[subcommand, options...]``) on the spec's processes through
    torchrun; :class:`normlab.distributed.LaunchError` when the job fails."""
    _check_gpus(spec, device)
    say(f"launching {spec.nproc_per_node} process(es) per node x {spec.nnodes} "
        f"node(s) (torch.distributed.run)")
    with launcher_flags():  # a --master-port already in use: one error line
        nd.launch([*worker_program(), *argv], **dataclasses.asdict(spec))
