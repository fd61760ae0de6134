"""One run: RunConfig in, per-epoch results and a finished run in the store out.

:func:`train_run` resumes from the run's checkpoint, trains an epoch (:func:`train_epoch`),
evaluates, checkpoints and writes the epoch to the store, until the last epoch or a non-finite
loss. What the run trains with (model, optimizer, schedule, loaders) is :mod:`normlab.lab.recipe`.

Resumability: after every epoch the loop writes a checkpoint (model, optimizer, history) to
``OUT/checkpoints/<run_id>.pt`` through a temporary file and an atomic rename, *then* upserts that
epoch's rows into the store. Both happen only while this process owns the run: an owner taken
over as stale (silent for ``$NORMLAB_STALE_AFTER`` s: stopped, suspended) raises ``TakenOver``
before its rename. The check and the rename are two steps: an owner suspended for the stale limit
between them (microseconds after a written checkpoint) replaces its successor's checkpoint once
with its own, a whole checkpoint of the same run trained on from a state the run had (the
checkpoint the successor resumed from, or an earlier one), before its store write raises
``TakenOver``; the successor writes its own again at its next epoch, and were it killed first,
the run resumes from that checkpoint (its history goes into the store with it; a run's epochs
depend only on its seed and the epoch): work may be lost or redone, runs are never mixed. The
data order and augmentation of an epoch depend only on ``(seed, epoch)``, so a resumed run
repeats the interrupted epoch exactly as it would have run.
A SIGKILL at any point loses at most the epoch in progress. Checkpoints are read with
``torch.load(weights_only=True)`` (:mod:`normlab.lab.checkpoint`): one that does not load or does
not fit the run (planted, damaged, another recipe's) is moved aside and the run starts over from
epoch 0, and so does a run whose checkpoint was deleted; either is said in a note.

Multi-process (DDP, started by torchrun through ``normlab train/reproduce --nproc-per-node K``):
``batch_size`` is per process, as in the GN paper ("images per GPU"), and the default learning rate
scales with the global batch ``batch_size * world_size``. Every rank builds the model from the
run's seed and wraps it in DistributedDataParallel; the training set is sharded per epoch by a
DistributedSampler (the same global batches at any process count), dropout and augmentation draw
from per-rank seeds, metrics are all-reduced, the test set is split over the ranks and the counts
summed. Only rank 0 writes checkpoints (the inner model's state dict, loadable at any process
count) and the store. A checkpoint resumes on another process count with the run's global batch
kept (:func:`normlab.lab.recipe.per_process_batch`), except for per-process BN, whose statistics
depend on the split.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from normlab import distributed as nd
from normlab.backends import available_backends, current_backend
from normlab.lab import checkpoint
from normlab.lab.config import RunConfig
from normlab.lab.data import TensorLoader
from normlab.lab.memory import PeakMemory
from normlab.lab.recipe import (agc_fn, autocast_fn, build_loaders, build_model, build_optimizer,
                                load_data, lr_at, per_process_batch,
                                resolve_device, run_device, versions)
from normlab.lab.store import Store
from normlab.precise_bn import precise_bn

__all__ = ["train_run", "train_epoch", "evaluate", "is_writer", "RunResult", "ProgressFn",
           "TEST_EXIT_ENV", "TEST_KILL_ENV"]

# a callback the CLI passes to show progress: (event, info) with event in
# "start" (info: total_steps, epoch), "step" (info: loss, images_per_s), "epoch" (info: epoch row),
# "note" (info: message; a checkpoint that could not be used, the run starting over)
ProgressFn = Callable[[str, dict], None]


class RunResult(dict):
    """The run's summary: run_id, status, final metrics, wall_time, images_per_s, resumed_from."""


def is_writer(rank: Optional[int] = None) -> bool:
    """Whether this process writes the store and checkpoints (rank 0 of a multi-process run;
    ``rank`` None: this process's rank)."""
    return (nd.rank() if rank is None else rank) == 0


@dataclass
class _Run:
    """One run in this process: what it trains with and how far it has come."""

    cfg: RunConfig
    store: Optional[Store]
    device: torch.device
    model: nn.Module          # the inner model (its state dict is the checkpoint's)
    net: nn.Module            # DDP-wrapped when distributed
    forward: Callable         # net, compiled when cfg.compile
    opt: torch.optim.Optimizer
    train_loader: TensorLoader
    test_loader: TensorLoader
    autocast: Callable
    agc: Optional[Callable[[], None]]
    channels_last: bool
    batch: int                # images per process
    ckpt: str                 # the checkpoint path ("" on ranks that write nothing)
    history: list = field(default_factory=list)
    start_epoch: int = 0
    elapsed: float = 0.0
    train_time: float = 0.0
    train_images: int = 0
    memory: Optional[PeakMemory] = None   # measures the first step of every epoch

    @property
    def writer(self) -> bool:
        return is_writer()


@torch.no_grad()
def evaluate(model: nn.Module, loader: TensorLoader, autocast: Callable) -> tuple[float, float]:
    """(mean cross-entropy, error %) over the loader, model in eval mode. In a process group
    every rank evaluates its shard and the sums are all-reduced (every rank must call it)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=loader.x.device)
    wrong = torch.zeros((), dtype=torch.int64, device=loader.x.device)
    n = 0
    for x, y in loader:
        with autocast():
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
        wrong += (out.argmax(1) != y).sum()
        n += len(y)
    total = nd.all_reduce_sum([float(loss_sum), float(wrong), float(n)])
    return float(total[0] / total[2]), 100.0 * float(total[1] / total[2])


def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics, which per-process BN updates
    from each rank's own batch), so evaluation and the checkpoint agree on every rank."""
    if nd.is_distributed():
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)


# ---------------------------------------------------------------------- checkpoints
def _load_checkpoint(cfg: RunConfig, store: Optional[Store]) -> tuple[str, Optional[dict], str]:
    """(checkpoint path, its state or None, a note for the user or ""): read by rank 0 with
    ``weights_only`` (:mod:`normlab.lab.checkpoint`) and broadcast, so other nodes need no shared
    disk. An unusable checkpoint is moved aside and the run starts over, said in the note; so
    is a missing one of a run the store has epochs of."""
    run_id = cfg.run_id()
    state: Optional[dict] = None
    note = ""
    ckpt = str(store.checkpoint_path(run_id)) if store is not None else ""
    if is_writer():
        for stale in store.checkpoint_dir.glob(f"{run_id}.pt.tmp*"):  # a save cut off by a kill
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        state, problem = checkpoint.read(ckpt)
        if problem:
            note = checkpoint.discard(ckpt, problem)
        elif state is None:
            done = (store.run(run_id) or {}).get("epochs_done") or 0
            if done:
                note = (f"checkpoint {ckpt!r} is missing (the store has {done} epoch(s) of this "
                        "run); the run starts over from epoch 0")
    state, note = nd.broadcast_object((state, note))
    return ckpt, state, note


def _restore(run_model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's state into the model and optimizer (RuntimeError, ValueError or
    KeyError when it is another model's or another recipe's)."""
    groups = state["optimizer"].get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        # e.g. written when NF models decayed every parameter (one group): another recipe
        raise ValueError(f"the optimizer has {len(opt.param_groups)} parameter group(s), the "
                         f"checkpoint {len(groups) if isinstance(groups, list) else 'no list of'}")
    run_model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])


def _write_epoch(run: _Run, epoch: int, summary: dict) -> None:
    """Rank 0: the checkpoint, then the epoch's rows in the store. The checkpoint is renamed
    into place only while this process still owns the run (:meth:`Store.check_owner`, asked
    once the file is written, just before the rename): an owner taken over as stale does not
    write its checkpoint over its successor's (it raises :class:`TakenOver` there)."""
    run_id = run.cfg.run_id()
    checkpoint.save(run.ckpt, {
        "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "epoch": epoch,
        "history": run.history, "elapsed": run.elapsed, "train_time": run.train_time,
        "train_images": run.train_images, "run_id": run_id,
        "world_size": nd.world_size(), "batch_per_process": run.batch},
        before_rename=lambda: run.store.check_owner(run_id))
    run.store.record_epochs(run_id, run.history, summary)


# test-only fault injection: "RANK:STEPS" makes that rank os._exit(17) after STEPS optimizer steps
# of this process (tests/lab/test_distributed_lab.py kills a rank mid-run with it)
TEST_EXIT_ENV = "NORMLAB_TEST_EXIT_AFTER_STEPS"
_steps_done = 0


def _test_fault_hook() -> None:
    global _steps_done
    _steps_done += 1
    spec = os.environ.get(TEST_EXIT_ENV)
    if not spec:
        return
    r, _, n = spec.partition(":")
    if int(r) == nd.rank() and _steps_done >= int(n):
        print(f"[{TEST_EXIT_ENV}] rank {r} exits after {n} steps (test hook)", flush=True)
        os._exit(17)


# test-only fault injection: a point's name makes rank 0 os._exit(17) there, as a SIGKILL would
# end it (tests/lab/test_loop_faults.py): "before-done" (the last epoch is checkpointed and in the
# store, the run not yet done), "before-checkpoint-delete" (done, its checkpoint not yet deleted)
TEST_KILL_ENV = "NORMLAB_TEST_KILL_AT"


def _test_kill_point(name: str) -> None:
    if os.environ.get(TEST_KILL_ENV) == name and is_writer():
        print(f"[{TEST_KILL_ENV}] killed at {name} (test hook)", flush=True)
        os._exit(17)


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The global RNG seed of an epoch (dropout): depends only on (seed, rank, epoch), so a
    resumed epoch draws what it would have drawn, at any process count."""
    return nd.rank_seed(seed, rank) * 100_003 + epoch + 3_333_333


def _device_name(device: torch.device, world: int = 1) -> str:
    procs = f", {world} processes" if world > 1 else ""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}{procs}"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads{procs})"


def _backend_name(device: torch.device) -> str:
    """The normalization backend the run's layers use on ``device``: the one named by
    ``use_backend`` / $NORMLAB_BACKEND, else what "auto" picks first there (on the CPU always
    native; on CUDA triton where it is installed, for the calls it supports, else native)."""
    name = current_backend()
    if name != "auto":
        return name
    if device.type != "cuda":
        return "native"
    return "triton" if "triton" in available_backends() else "native"


# ---------------------------------------------------------------------- the run
def _prepare(cfg: RunConfig, store: Optional[Store]) -> tuple[_Run, str]:
    """Everything the run trains with, resumed from its checkpoint when there is one; and a
    note for the user ("" when there is nothing to say) when a checkpoint could not be used."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = run_device(cfg)
    data = load_data(cfg)
    ckpt, state, note = _load_checkpoint(cfg, store)
    model, opt = _model_and_optimizer(cfg, data, device)
    if state is not None:
        try:
            _restore(model, opt, state)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:  # the same on every rank
            why = f"does not fit this run ({_first_line(e)})"
            note = checkpoint.discard(ckpt, why) if is_writer() else why
            state = None
            model, opt = _model_and_optimizer(cfg, data, device)  # unspoiled by the partial load
    batch = per_process_batch(cfg, nd.world_size(), model)
    net = nd.wrap_ddp(model, device)  # the state dict is the inner model's at any process count
    train_loader, test_loader = build_loaders(cfg, data, device, nd.rank(), nd.world_size(),
                                              batch_size=batch)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    run = _Run(cfg, store, device, model, net, torch.compile(net) if cfg.compile else net, opt,
               train_loader, test_loader, autocast_fn(cfg, device), agc_fn(cfg, model),
               channels_last, batch, ckpt)
    if state is not None:
        run.history, run.start_epoch = state["history"], state["epoch"] + 1
        run.elapsed, run.train_time = state["elapsed"], state["train_time"]
        run.train_images = state["train_images"]
    return run, note


def _model_and_optimizer(cfg: RunConfig, data: Any, device: torch.device
                         ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The run's initial model (from its seed: the same on every rank; DDP broadcasts too) and
    optimizer."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.num_classes, data.in_chans, data.image_size).to(device)
    if cfg.channels_last if cfg.channels_last is not None else device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, build_optimizer(cfg, model)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _step(run: _Run, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step at learning rate ``lr``: (loss, output)."""
    for group in run.opt.param_groups:
        group["lr"] = lr
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with run.autocast():
        out = run.forward(x)
    loss = F.cross_entropy(out.float(), y)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()  # DDP: gradients averaged over ranks = gradient of the global batch
    if run.agc is not None:
        run.agc()
    run.opt.step()
    _test_fault_hook()
    return loss, out


def train_epoch(run: _Run, epoch: int, progress: Optional[ProgressFn]) -> dict[str, Any]:
    """Train one epoch; its row of the history (train and test metrics, lr, wall time)."""
    t0 = time.perf_counter()
    steps = len(run.train_loader)
    if progress:
        progress("start", {"epoch": epoch, "total_steps": steps})
    torch.manual_seed(_epoch_seed(run.cfg.seed, nd.rank(), epoch))
    run.net.train()
    run.train_loader.set_epoch(epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    wrong = torch.zeros((), dtype=torch.int64, device=run.device)
    seen = 0
    lr = run.cfg.effective_lr()
    for i, (x, y) in enumerate(run.train_loader):
        lr = lr_at(run.cfg, epoch + i / steps)
        # tensor bytes of the epoch's first step (CPU; CUDA reads its allocator); not compiled
        measure = run.memory is not None and i == 0 and not run.cfg.compile
        with run.memory.step(run.model, run.opt) if measure else contextlib.nullcontext():
            loss, out = _step(run, x, y, lr)
        loss_sum += loss.detach().double() * len(y)
        wrong += (out.detach().argmax(1) != y).sum()
        seen += len(y)
        if progress and (i % 10 == 9 or i == steps - 1):
            progress("step", {"advance": 10 if i % 10 == 9 else (i % 10) + 1,
                              "loss": float(loss.detach()),
                              "images_per_s": seen * nd.world_size() / max(
                                  time.perf_counter() - t0, 1e-9)})
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    t_train = time.perf_counter() - t0
    return _end_epoch(run, epoch, [float(loss_sum), float(wrong), float(seen)], lr, t0, t_train)


def _end_epoch(run: _Run, epoch: int, sums: list[float], lr: float, t0: float,
               t_train: float) -> dict[str, Any]:
    """All-reduce the epoch's training sums, evaluate, and add the epoch's row to the history."""
    loss_total, wrong_total, seen_total = nd.all_reduce_sum(sums).tolist()
    _sync_buffers(run.model)
    tested = _with_precise_statistics(run) if run.cfg.precise_bn else run.model
    test_loss, test_error = evaluate(tested, run.test_loader, run.autocast)
    run.elapsed += time.perf_counter() - t0
    run.train_time += t_train
    run.train_images += int(seen_total)
    row = {"epoch": epoch, "train_loss": loss_total / seen_total,
           "train_error": 100.0 * wrong_total / seen_total, "test_loss": test_loss,
           "test_error": test_error, "lr": lr, "wall_time": run.elapsed,
           "images_per_s": seen_total / t_train}
    run.history.append(row)
    return row


def _with_precise_statistics(run: _Run) -> nn.Module:
    """A copy of the model whose running statistics :func:`normlab.precise_bn` recomputed over
    ``cfg.precise_bn`` training batches, as training runs them (layout, autocast; every process
    its shard, merged); the model that trains on keeps its moving averages."""
    model = copy.deepcopy(run.model)

    def forward(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = batch[0]
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with run.autocast():
            return m(x)

    with warnings.catch_warnings():  # a model without BatchNorm (GN, LN, NF): nothing to do,
        warnings.filterwarnings("ignore", message="precise_bn: .* has no BatchNorm")  # as meant
        precise_bn(model, run.train_loader, run.cfg.precise_bn, forward=forward)
    return model


def train_run(cfg: RunConfig, store: Optional[Store], *, progress: Optional[ProgressFn] = None
              ) -> RunResult:
    """Train (or resume) the run ``cfg`` and record it in ``store``. The caller has claimed the run
    (:meth:`Store.claim`); this marks it done at the end. Returns the run's summary.

    Multi-process (started by torchrun; :func:`normlab.distributed.setup` is called here): every
    rank calls it with the same ``cfg``; the model is built from ``cfg.seed`` and wrapped in DDP,
    each rank trains on its shard of every global batch (``per_process_batch`` images), metrics
    are all-reduced, and only rank 0 (which alone needs ``store``) reads and writes checkpoints
    and the store; the checkpoint it reads is broadcast, so other nodes need no shared disk.
    """
    cfg.validate()
    nd.setup(device=resolve_device(cfg.device))
    if is_writer() and store is None:
        raise ValueError("train_run: rank 0 writes the results, it needs the store")
    run, note = _prepare(cfg, store)
    if note:
        if progress:
            progress("note", {"message": note})
        elif is_writer():
            warnings.warn(note, RuntimeWarning, stacklevel=2)
    resumed_from = run.start_epoch
    # a run killed after its last checkpoint resumes with no epoch left: its sums are the summary
    summary = {"device": _device_name(run.device, nd.world_size()), "versions": versions(),
               "wall_time": run.elapsed,
               "images_per_s": run.train_images / max(run.train_time, 1e-9),
               "backend": _backend_name(run.device)}
    diverged: Optional[str] = None
    # rank 0's peak memory over the training (resumed: since the resume), the report's cost
    with PeakMemory(run.device) as run.memory:
        for epoch in range(run.start_epoch, cfg.epochs):
            row = train_epoch(run, epoch, progress)
            if not math.isfinite(row["train_loss"]):  # the same all-reduced value on every rank
                diverged = f"diverged: non-finite training loss in epoch {epoch}"
            summary.update(wall_time=run.elapsed,
                           images_per_s=run.train_images / max(run.train_time, 1e-9),
                           peak_memory_mb=run.memory.peak_mib())
            if run.writer:
                _write_epoch(run, epoch, summary)
            if progress:
                progress("epoch", row)
            if diverged:
                break
    return _finish(run, summary, diverged, resumed_from, note)


def _finish(run: _Run, summary: dict, diverged: Optional[str], resumed_from: int,
            note: str = "") -> RunResult:
    """Mark the run done in the store (rank 0), drop its checkpoint, and sum it up."""
    run_id = run.cfg.run_id()
    if run.writer:
        run.store.record_epochs(run_id, run.history, summary)
        _test_kill_point("before-done")
        run.store.finish(run_id, "done", diverged)
        _test_kill_point("before-checkpoint-delete")
        with contextlib.suppress(FileNotFoundError):
            os.remove(run.ckpt)
    nd.barrier()  # the run is done in the store before any rank moves on
    last = run.history[-1] if run.history else {}
    return RunResult(run_id=run_id, status="done", error=diverged, resumed_from=resumed_from,
                     note=note,
                     final_test_error=last.get("test_error"), final_test_loss=last.get("test_loss"),
                     final_train_error=last.get("train_error"), world_size=nd.world_size(),
                     batch_per_process=run.batch, **summary)
