"""normlab.distributed: multi-process training on torch.distributed (torchrun + DDP).

The GN paper (Wu & He, ECCV 2018) trains on 8 GPUs with "images per GPU" as its batch size: BN
statistics are per device. normlab keeps that convention:

* **The batch size is per process.** With ``world_size`` processes of ``N`` images each, one
  optimizer step sees ``N * world_size`` images; BN (``bn``) normalizes over each process's N,
  SyncBN (``syncbn``) over all ``N * world_size``, GN/LN/IN are per sample either way.
* **The learning rate scales with the global batch** (the paper's linear rule, 0.1 per 32 images):
  ``lr = 0.1 * N * world_size / 32`` by default, see :func:`scaled_lr`.

A training script becomes distributed with a few calls::

    device = setup()                                   # reads torchrun's env; no-op when alone
    model = wrap_ddp(build_model(), device)            # DDP when distributed
    sampler = make_sampler(train_set, shuffle=True, seed=seed)
    loader = DataLoader(train_set, batch_size=N, sampler=sampler)
    torch.manual_seed(rank_seed(seed))                 # augmentation/dropout differ per rank
    for epoch in range(epochs):
        set_epoch(sampler, epoch)
        ...
        loss_avg = all_reduce_mean(loss.item(), weight=len(batch))
        if is_main_process(): store.write(...)
    cleanup()

and is started with :func:`launch` (``python -m torch.distributed.run`` in a subprocess), e.g.
``launch(["-m", "normlab.lab.cli", "train", ...], nproc_per_node=2)``.

Backends: nccl for CUDA devices, gloo for CPU. Faults: ``launch`` runs torchrun with no restarts;
when a worker dies torchrun stops the others and ``launch`` raises :class:`LaunchError`; a worker
blocked in a collective whose peer hangs gives up after the collective ``timeout`` of
:func:`setup`.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = [
    "DEFAULT_TIMEOUT",
    "LaunchError",
    "die_with_parent",
    "LaunchSpec",
    "ShardSampler",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "default_backend",
    "is_distributed",
    "is_main_process",
    "launch",
    "local_rank",
    "make_eval_sampler",
    "make_sampler",
    "rank",
    "rank_seed",
    "scaled_lr",
    "set_epoch",
    "setup",
    "torchrun_command",
    "unwrap",
    "world_size",
    "wrap_ddp",
]

#: Collective timeout of :func:`setup` (override with ``$NORMLAB_DIST_TIMEOUT`` in seconds).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------------------------
# who am I
# --------------------------------------------------------------------------------------------


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {raw!r}") from None


def is_distributed() -> bool:
    """True when a process group with more than one process is initialized."""
    return _initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank: from the process group, else ``$RANK`` (set by torchrun), else 0."""
    return dist.get_rank() if _initialized() else _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes: from the process group, else ``$WORLD_SIZE``, else 1."""
    return dist.get_world_size() if _initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """Rank within this node (``$LOCAL_RANK``, set by torchrun), else 0. Picks the GPU."""
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """Rank 0: the one process that writes results, checkpoints and progress bars."""
    return rank() == 0


# --------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------


def default_backend(device: Union[str, torch.device, None] = None) -> str:
    """``"nccl"`` for CUDA devices (when nccl is built in), else ``"gloo"``."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    )
    if dev.type == "cuda" and dist.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def _timeout_from_env(timeout: Optional[datetime.timedelta]) -> datetime.timedelta:
    if timeout is not None:
        if not isinstance(timeout, datetime.timedelta) or timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be a positive datetime.timedelta, got {timeout!r}")
        return timeout
    raw = os.environ.get("NORMLAB_DIST_TIMEOUT")
    return _parse_timeout(raw) if raw else DEFAULT_TIMEOUT


def _parse_timeout(raw: str) -> datetime.timedelta:
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"$NORMLAB_DIST_TIMEOUT must be seconds, got {raw!r}") from None
    try:
        if seconds > 0:
            return datetime.timedelta(seconds=seconds)
    except OverflowError:  # inf, 1e30
        pass
    raise ValueError(f"$NORMLAB_DIST_TIMEOUT must be a finite number > 0 of seconds, got {raw!r}")


def setup(
    backend: Optional[str] = None,
    timeout: Optional[datetime.timedelta] = None,
    device: Union[str, torch.device, None] = None,
) -> torch.device:
    """Join the process group described by torchrun's environment; return this rank's device.

    Args:
        backend: ``"nccl"``, ``"gloo"``, ... or None: nccl when the device is CUDA, else gloo.
        timeout: collective timeout (default :data:`DEFAULT_TIMEOUT` or
            ``$NORMLAB_DIST_TIMEOUT`` seconds): a rank blocked in a collective whose peer hangs
            raises after this long instead of hanging.
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). With CUDA each process
            takes GPU ``LOCAL_RANK``.

    Returns:
        The device this process should use (``cuda:LOCAL_RANK`` or ``cpu``).

    Started alone (no ``$WORLD_SIZE``, or ``WORLD_SIZE=1``) it initializes nothing, so the same
    script runs with and without torchrun. Calling it again is a no-op.
    """
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {str(device)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
        index = local_rank() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={index} but only {torch.cuda.device_count()} CUDA device(s) are "
                "visible: use --nproc-per-node <= the number of GPUs"
            )
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    timeout = _timeout_from_env(timeout)
    if _initialized():
        return dev
    if world_size() <= 1:
        return dev
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: die with torchrun
        die_with_parent(signal.SIGTERM)
    missing = [k for k in _TORCHRUN_ENV if not os.environ.get(k)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size()} but {', '.join('$' + m for m in missing)} not set: start "
            "the job with normlab.distributed.launch or torchrun"
        )
    backend = default_backend(dev) if backend is None else backend
    if not isinstance(backend, str) or not dist.is_backend_available(backend):
        raise ValueError(f"torch.distributed backend {backend!r} is not available here")
    dist.init_process_group(backend=backend, timeout=timeout)
    return dev


def cleanup() -> None:
    """Leave the process group (no-op when none)."""
    if _initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_distributed():
        if dist.get_backend() == "nccl":  # without device_ids nccl guesses the GPU (and warns)
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Union[float, Sequence[float], torch.Tensor]) -> torch.Tensor:
    """Sum of ``values`` (a number, a list of numbers or a tensor) over all processes, as a
    float64 CPU tensor (the values themselves when not distributed). For metrics such as
    ``(correct, seen)`` counts."""
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu().clone()
    if is_distributed():
        dev = _comm_device()
        tt = t.to(dev)
        dist.all_reduce(tt)
        t = tt.cpu()
    return t


def all_reduce_mean(value: Union[float, torch.Tensor], weight: Optional[float] = None) -> float:
    """Mean of a scalar metric over processes, weighted by ``weight`` (e.g. the number of samples
    behind ``value``; unweighted when None); a process with weight 0 contributes nothing, its
    value ignored (the NaN mean of an empty batch). Every process must call it. Returns a float."""
    v = float(value)
    w = 1.0 if weight is None else float(weight)
    if w < 0 or not math.isfinite(w):  # checked alone too: the same call fails the same way
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if not is_distributed():
        return v
    # a weight of 0 contributes nothing, whatever the value: a rank without samples reports the
    # NaN mean of nothing (NaN * 0 is NaN, which made the mean NaN on every rank)
    total = all_reduce_sum([v * w if w > 0 else 0.0, w])
    if total[1] <= 0:
        raise ValueError("all_reduce_mean: the weights sum to 0 over all processes")
    return float(total[0] / total[1])


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every process (picklable objects; e.g. a run id, a path)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------
# model, data, learning rate
# --------------------------------------------------------------------------------------------


def wrap_ddp(model: nn.Module, device: Union[str, torch.device, None] = None, **ddp_kwargs: Any
             ) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it in DistributedDataParallel when distributed.

    DDP broadcasts rank 0's parameters and buffers at construction (so all ranks start equal)
    and averages gradients in ``backward``; with the per-process mean loss that is the gradient
    of the mean loss over the global batch. ``ddp_kwargs`` go to DDP. Returns the model itself
    when not distributed; :func:`unwrap` gives the inner model either way.

    Use normlab's ``syncbn`` (``convert_norm(model, "syncbn")``) for synchronized BN: torch's
    ``nn.SyncBatchNorm`` is rejected on CPU, by DDP and here.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    dev = torch.device(device) if device is not None else None
    if dev is not None:
        model = model.to(dev)
    if not is_distributed():
        return model
    if dev is None:
        ref = next(iter(model.parameters()), None)
        dev = ref.device if ref is not None else torch.device("cpu")
    if dev.type != "cuda":
        for name, m in model.named_modules():
            if isinstance(m, nn.SyncBatchNorm):
                raise ValueError(
                    f"module {name or '<root>'!r} is torch.nn.SyncBatchNorm, which works on GPU "
                    "only; use normlab's: convert_norm(model, 'syncbn')"
                )
    if dev.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [dev.index])
        ddp_kwargs.setdefault("output_device", dev.index)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (for state_dicts that load at any process count)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def scaled_lr(batch_per_process: int, world: Optional[int] = None, base_lr: float = 0.1,
              base_batch: int = 32) -> float:
    """The linear scaling rule of the GN paper: ``base_lr * batch_per_process * world / base_batch``.

    >>> scaled_lr(32, 1), scaled_lr(4, 2), scaled_lr(2, 8)
    (0.1, 0.025, 0.05)
    """
    world = world_size() if world is None else world
    for name, v in (("batch_per_process", batch_per_process), ("world", world),
                    ("base_batch", base_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not (
            0 < base_lr < math.inf):
        raise ValueError(f"base_lr must be a finite number > 0, got {base_lr!r}")
    return base_lr * batch_per_process * world / base_batch


def rank_seed(seed: int, this_rank: Optional[int] = None) -> int:
    """A per-rank seed (``seed + 1009 * rank``) for augmentation and dropout, so processes do not
    draw identical random numbers. Build the model with the plain ``seed`` (DDP also broadcasts
    rank 0's weights)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    r = rank() if this_rank is None else this_rank
    return seed + 1009 * r


def make_sampler(dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 *, num_replicas: Optional[int] = None, this_rank: Optional[int] = None
                 ) -> DistributedSampler:
    """The training sampler: a DistributedSampler over all processes (also with one process).

    Epoch ``e`` uses the permutation of ``seed + e`` (call :func:`set_epoch` each epoch) and rank
    ``r`` of ``W`` takes positions ``r, r + W, ...`` of it, so the *global* batches are the same
    for any process count: batch b of 2 processes x 4 images holds exactly the 8 images of batch
    b of 1 process x 8. Resuming at an epoch reproduces its order, at any process count. Without
    ``drop_last`` the permutation is padded with its first items to a multiple of W.

    ``num_replicas``/``this_rank`` override the process group (tests, planning).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    w = world_size() if num_replicas is None else num_replicas
    r = rank() if this_rank is None else this_rank
    if not 0 <= r < w:
        raise ValueError(f"rank must be in [0, {w}), got {r}")
    return DistributedSampler(dataset, num_replicas=w, rank=r, shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


class ShardSampler(Sampler[int]):
    """Items ``rank, rank + W, rank + 2W, ...`` of the dataset, in order, without padding: every
    item is seen exactly once over all ranks (ranks may get one item more than others)."""

    def __init__(self, dataset: Dataset, num_replicas: int, this_rank: int) -> None:
        if not 0 <= this_rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {this_rank}")
        self.n = len(dataset)  # type: ignore[arg-type]
        self.num_replicas, self.rank = num_replicas, this_rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


def make_eval_sampler(dataset: Dataset, *, num_replicas: Optional[int] = None,
                      this_rank: Optional[int] = None) -> ShardSampler:
    """The evaluation sampler: each item on exactly one rank. Evaluate ``unwrap(model)`` under
    ``torch.no_grad()`` (no collectives, so unequal shard sizes are fine), then combine counts
    with :func:`all_reduce_sum` for exact metrics."""
    w = world_size() if num_replicas is None else num_replicas
    r = rank() if this_rank is None else this_rank
    return ShardSampler(dataset, w, r)


def set_epoch(sampler: Any, epoch: int) -> None:
    """``sampler.set_epoch(epoch)`` when the sampler has it (DistributedSampler), else nothing."""
    fn = getattr(sampler, "set_epoch", None)
    if callable(fn):
        fn(epoch)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


class LaunchError(RuntimeError):
    """A distributed job launched by :func:`launch` failed (a worker died or timed out).
    ``log``: the file holding the job's stderr (torchrun's and every worker's), or None."""

    def __init__(self, message: str, returncode: int, log: Optional[str] = None) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.log = log


# ---------------------------------------------------------------------- process lifetime
_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a process gets when its parent dies


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the OS to send this process ``sig`` when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``; kept across exec). False where it cannot (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _tied_to(parent: int) -> Any:
    """A ``preexec_fn``: the child dies with ``parent`` (SIGTERM, which torchrun turns into
    stopping its workers); if ``parent`` is already gone, at once."""
    def preexec() -> None:
        die_with_parent(signal.SIGTERM)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)
    return preexec


def _failure_line(log_text: str) -> Optional[str]:
    """From torchrun's report (its "Root Cause (first observed failure)" block) and the ranks'
    own ``error: rank R: ...`` lines: which rank died first and how, in one line; None when the
    log has no such report."""
    _, found, block = log_text.partition("Root Cause (first observed failure)")
    m_rank = re.search(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)", block)
    m_code = re.search(r"exitcode\s*:\s*(-?\d+)", block)
    if not found or m_rank is None or m_code is None:
        return None
    m_host = re.search(r"host\s*:\s*(\S+)", block)
    r, local, code = m_rank.group(1), m_rank.group(2), int(m_code.group(1))
    how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in
           signal.valid_signals() else f"exited with status {code}")
    where = f"local rank {local}" + (f" on {m_host.group(1)}" if m_host else "")
    own = re.search(rf"^error: rank {r}: (.+)$", log_text, re.MULTILINE)
    return f"rank {r} ({where}) died first: it {how}" + (f" ({own.group(1)})" if own else "")


def _check_pos_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return v


@dataclass(frozen=True)
class LaunchSpec:
    """The process layout of a torchrun job: processes per node and the rendezvous.

    Rendezvous: ``rdzv_endpoint="host:port"`` -> c10d rendezvous (elastic, multi-node; node
    ranks are assigned, so ``master_port``/``node_rank`` must be left out); else a single node
    without ``master_port`` -> ``--standalone`` (a free local port); else static rendezvous at
    ``master_addr:master_port`` with ``node_rank``. Run the same job on every node.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None
    rdzv_endpoint: Optional[str] = None

    @property
    def world_size(self) -> int:
        """Processes of the job: ``nproc_per_node * nnodes``."""
        return self.nproc_per_node * self.nnodes

    def check_counts(self) -> "LaunchSpec":
        """Check the process counts and the node rank (ValueError naming the field)."""
        _check_pos_int("nproc_per_node", self.nproc_per_node)
        _check_pos_int("nnodes", self.nnodes)
        n, r = self.nnodes, self.node_rank
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < n:
            raise ValueError(f"node_rank must be an int in [0, nnodes={n}), got {r!r}")
        return self

    def check(self) -> "LaunchSpec":
        """Check every field, the rendezvous included (ValueError naming the offending field)."""
        self.check_counts()
        n, port = self.nnodes, self.master_port
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 1 <= port <= 65535):
            raise ValueError(f"master_port must be an int in [1, 65535], got {port!r}")
        if not isinstance(self.master_addr, str) or not self.master_addr:
            raise ValueError(f"master_addr must be a non-empty host name, got {self.master_addr!r}")
        if self.rdzv_endpoint is not None:
            self._check_rdzv()
        elif n > 1 and port is None:
            raise ValueError(f"nnodes={n} needs master_port (or rdzv_endpoint)")
        return self

    def _check_rdzv(self) -> None:
        ep = self.rdzv_endpoint
        if not isinstance(ep, str):
            raise ValueError(f"rdzv_endpoint must be a 'host:port' string, got {ep!r}")
        host, _, port = ep.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"rdzv_endpoint must be 'host:port' with a port in [1, 65535], got "
                             f"{ep!r}")
        # the c10d rendezvous assigns node ranks and hosts its own store: a static master
        # address would be silently ignored
        static = [f"{k} {v!r}" for k, v, unset in (("master_port", self.master_port, None),
                                                     ("node_rank", self.node_rank, 0)) if v != unset]
        if static:
            raise ValueError(
                f"rdzv_endpoint {ep!r} does not combine with {' and '.join(static)}: "
                "give either rdzv_endpoint (c10d rendezvous, node ranks assigned) or master_addr, "
                "master_port and node_rank (static rendezvous)")

    def rendezvous_args(self) -> list[str]:
        """torchrun's rendezvous options for this spec (checked)."""
        self.check()
        if self.rdzv_endpoint is not None:
            return ["--rdzv-backend", "c10d", "--rdzv-endpoint", self.rdzv_endpoint,
                    "--rdzv-id", os.environ.get("NORMLAB_RDZV_ID", "normlab")]
        if self.nnodes == 1 and self.master_port is None:
            return ["--standalone"]
        return ["--node-rank", str(self.node_rank), "--master-addr", self.master_addr,
                "--master-port", str(self.master_port)]


def _spec(nproc_per_node: Union[int, LaunchSpec], rendezvous: dict[str, Any]) -> LaunchSpec:
    """``nproc_per_node`` and the rendezvous keywords (the other :class:`LaunchSpec` fields) as
    one spec, or the spec given in their place."""
    if isinstance(nproc_per_node, LaunchSpec):
        if rendezvous:
            raise TypeError(f"give a LaunchSpec or its fields, not both: {sorted(rendezvous)}")
        return nproc_per_node
    return LaunchSpec(nproc_per_node, **rendezvous)


def torchrun_command(argv: Sequence[str], nproc_per_node: Union[int, LaunchSpec] = 1, *,
                     python: str = sys.executable, monitor_interval: float = 0.5,
                     **rendezvous: Any) -> list[str]:
    """The ``python -m torch.distributed.run ...`` command line that :func:`launch` runs.

    ``nproc_per_node`` and ``rendezvous`` (``nnodes``, ``node_rank``, ``master_addr``,
    ``master_port``, ``rdzv_endpoint``) are the fields of a :class:`LaunchSpec` (see it for the
    rendezvous rules), or ``nproc_per_node`` is the spec itself. ``argv`` is the program:
    ``["-m", "package.module", args...]`` or ``["script.py", args...]``.
    """
    spec = _spec(nproc_per_node, rendezvous)
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence) or not argv:
        raise TypeError(f"argv must be a non-empty list of strings, got {argv!r}")
    if not all(isinstance(a, str) for a in argv):
        raise TypeError(f"argv must contain only strings, got {list(argv)!r}")
    if argv[0] == "-m" and len(argv) < 2:
        raise ValueError(f"argv {list(argv)!r}: '-m' needs a module name")
    cmd = [python, "-m", "torch.distributed.run", "--nnodes", str(spec.nnodes),
           "--nproc-per-node", str(spec.nproc_per_node), "--max-restarts", "0",
           "--monitor-interval", str(monitor_interval), *spec.rendezvous_args()]
    return cmd + (["-m", *argv[1:]] if argv[0] == "-m" else list(argv))


def _check_port_free(port: int) -> None:
    """Raise ValueError naming ``port`` when this host cannot listen on it (another job's
    rendezvous or any server holds it): torchrun would fail with a traceback instead."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # as the TCPStore server binds: a port in TIME_WAIT from a finished job is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("", port))
    except OSError as e:
        why = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise ValueError(
            f"master_port {port} cannot be used on this host (node rank 0 hosts the rendezvous "
            f"there): {why}; pick another port, or leave it out on a single node for a free one"
        ) from None
    finally:
        probe.close()


def _check_resolvable(host: str, what: str) -> None:
    """Raise ValueError naming ``host`` when it does not resolve: torchrun would retry the
    connection until its rendezvous timeout (many minutes) instead of failing."""
    try:
        socket.getaddrinfo(host.strip("[]"), None)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"{what} {host!r} is not a known host name or address here: "
                         f"{getattr(e, 'strerror', None) or e}") from None


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the launcher's process group, then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _check_reachable(spec: LaunchSpec) -> None:
    """The rendezvous host resolves and (static rendezvous, node rank 0) its port is free."""
    if spec.rdzv_endpoint is not None:
        _check_resolvable(spec.rdzv_endpoint.rpartition(":")[0], "the host of rdzv_endpoint")
    elif spec.master_port is not None:  # static rendezvous: every node connects to master_addr
        _check_resolvable(spec.master_addr, "master_addr")
        if spec.node_rank == 0:
            _check_port_free(spec.master_port)  # this node hosts the rendezvous's store


def _child_env(env: Optional[dict[str, str]], nproc_per_node: int) -> dict[str, str]:
    """The workers' environment: ours, OMP_NUM_THREADS = cores / processes unless set, ``env``."""
    child_env = dict(os.environ)
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        child_env.update({str(k): str(v) for k, v in env.items()})
    if child_env.get("NORMLAB_DIST_TIMEOUT"):  # else every worker fails on it, one by one
        _parse_timeout(child_env["NORMLAB_DIST_TIMEOUT"])
    return child_env


def launch(
    argv: Sequence[str],
    nproc_per_node: Union[int, LaunchSpec] = 1,
    *,
    timeout: Optional[float] = None,
    env: Optional[dict[str, str]] = None,
    check: bool = True,
    python: str = sys.executable,
    **rendezvous: Any,
) -> int:
    """Run ``argv`` on ``nproc_per_node`` processes (per node) through ``torch.distributed.run``.

    Args:
        argv: the program, ``["-m", "normlab.lab.cli", "train", ...]`` or ``["script.py", ...]``.
        nproc_per_node: processes on this node (one per GPU on CUDA), or a :class:`LaunchSpec`.
        **rendezvous: ``nnodes``, ``node_rank``, ``master_addr``, ``master_port``,
            ``rdzv_endpoint``: the other :class:`LaunchSpec` fields (multi-node rendezvous, as
            torchrun's options); run ``launch`` on every node.
        timeout: seconds after which the whole job is stopped (None: no limit).
        env: extra environment variables for the workers.
        check: raise :class:`LaunchError` on failure (else return the exit code).
        python: the interpreter.

    Returns:
        The exit code (0 on success).

    Raises:
        ValueError: a bad argument, a rendezvous host name that does not resolve, or (static
            rendezvous, node rank 0) a ``master_port`` this host cannot listen on, e.g. one
            already in use: before anything is started.
        LaunchError: the job failed (``check=True``).

    Faults: torchrun runs with ``--max-restarts 0``; when any worker exits with an error or is
    killed, torchrun terminates the other workers (SIGTERM, then SIGKILL) and exits non-zero,
    within a few seconds. The job's stderr (torchrun's report, every rank's errors) goes to a
    log file: copied to this process's stderr when the job succeeds (or ``check=False``); on
    failure the LaunchError says in one line which rank died first and how (its own error line
    when it printed one) and names the log (``LaunchError.log``), which is kept. torchrun is tied
    to this process (Linux: ``PR_SET_PDEATHSIG``) and the workers to torchrun (:func:`setup`),
    so killing this process outright (SIGKILL) stops the whole job. Workers blocked in a collective on a *hung* (not dead) peer fail after
    the collective timeout of :func:`setup`. ``OMP_NUM_THREADS`` defaults to the CPU count
    divided by the processes on the node.
    """
    spec = _spec(nproc_per_node, rendezvous)
    nproc_per_node = spec.nproc_per_node
    cmd = torchrun_command(argv, spec, python=python)
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    _check_reachable(spec)
    child_env = _child_env(env, nproc_per_node)
    start = time.monotonic()
    with tempfile.NamedTemporaryFile("w+", prefix="normlab-torchrun-", suffix=".log",
                                     delete=False) as log:
        # its own session (Ctrl-C reaches this process, which stops the job) but tied to this
        # process: killed outright, it takes torchrun, and torchrun its workers, down with it
        proc = subprocess.Popen(cmd, env=child_env, start_new_session=True, stderr=log,
                                preexec_fn=_tied_to(os.getpid()))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, grace=10.0)
            rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
            if check:  # the job's stderr stays in the log the error names
                raise LaunchError(
                    f"distributed job stopped after the {timeout:g} s time limit "
                    f"({nproc_per_node} process(es) per node): {' '.join(argv)}", rc,
                    log.name) from None
            return _replay(log.name, rc)
        except BaseException:  # KeyboardInterrupt: take the workers down with us
            _kill_group(proc, grace=10.0)
            _replay(log.name, 0)
            raise
    if rc == 0 or not check:
        return _replay(log.name, rc)
    with open(log.name, errors="replace") as f:
        first = _failure_line(f.read())
    raise LaunchError(
        f"distributed job failed (exit code {rc}) after {time.monotonic() - start:.1f} s: "
        + (f"{first}; torchrun stopped the others" if first else
           "a worker exited with an error or was killed and torchrun stopped the others"),
        rc, log.name)


def _replay(log: str, rc: int) -> int:
    """Copy the job's stderr, held in ``log``, to ours and delete the file; return ``rc``."""
    with open(log, errors="replace") as f:
        for chunk in iter(lambda: f.read(1 << 16), ""):
            sys.stderr.write(chunk)
    sys.stderr.flush()
    os.unlink(log)
    return rc

