"""The trainer: one RunConfig in, per-epoch results and a finished run in the store out.

Recipe (Wu & He, ECCV 2018, REFERENCE section 1): SGD with momentum and weight decay on all
weights (normalizer-free models: none on gains, biases and SkipInit scalars, REFERENCE section 3),
peak learning rate ``0.1 * N / 32`` for N images per batch, the same number of epochs at
every batch size, cosine or step (lr/10 at fixed fractions) schedule with optional linear warmup.
Optional Adaptive Gradient Clipping (Brock et al. 2021, REFERENCE section 3) on every parameter
except the classifier. bf16 autocast and channels_last on CUDA, optional ``torch.compile``.

Resumability: after every epoch the trainer writes a checkpoint (model, optimizer, RNG state,
history) to ``OUT/checkpoints/<run_id>.pt`` through a temporary file and an atomic rename, *then*
upserts that epoch's rows into the store. The data order and augmentation of an epoch depend only
on ``(seed, epoch)``, so a resumed run repeats the interrupted epoch exactly as it would have run.
A SIGKILL at any point loses at most the epoch in progress.

Multi-process (DDP, started by torchrun through ``normlab train/reproduce --nproc-per-node K``):
``batch_size`` is per process, as in the GN paper ("images per GPU"), and the default learning rate
scales with the global batch ``batch_size * world_size``. Every rank builds the model from the
run's seed and wraps it in DistributedDataParallel; the training set is sharded per epoch by a
DistributedSampler (the same global batches at any process count), dropout and augmentation draw
from per-rank seeds, metrics are all-reduced, the test set is split over the ranks and the counts
summed. Only rank 0 writes checkpoints (the inner model's state dict, loadable at any process
count) and the store. A checkpoint resumes on another process count with the run's global batch
kept (:func:`per_process_batch`), except for per-process BN, whose statistics depend on the split.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import time
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from normlab import distributed as nd
from normlab.lab.config import ConfigError, RunConfig, nf_norm_error
from normlab.lab.data import DataSplit, TensorLoader, load_dataset
from normlab.lab.store import Store, heartbeat

__all__ = ["train_run", "run_points", "build_model", "build_loaders", "build_optimizer",
           "is_writer", "resolve_device", "lr_at", "versions", "RunResult", "weight_standardize_",
           "per_process_batch", "per_process_stat_modules", "evaluate", "preflight",
           "no_decay_parameter_names", "NF_NO_DECAY_NAMES"]

# a callback the CLI passes to show progress: (event, info) with event in
# "start" (info: total_steps, epoch), "step" (info: loss, images_per_s), "epoch" (info: epoch row)
ProgressFn = Callable[[str, dict], None]


class RunResult(dict):
    """The run's summary: run_id, status, final metrics, wall_time, images_per_s, resumed_from."""


def is_writer(rank: Optional[int] = None) -> bool:
    """Whether this process writes the store and checkpoints (rank 0 of a multi-process run;
    ``rank`` None: this process's rank)."""
    return (nd.rank() if rank is None else rank) == 0


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (error if unavailable) or ``auto`` (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no CUDA device",
                          hint="use --device cpu (or auto)")
    return torch.device(name)


def versions() -> dict[str, str]:
    """Versions of python, torch, normlab and numpy, and the platform."""
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform()}
    for pkg in ("normlab", "numpy", "triton"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def weight_standardize_(model: nn.Module) -> nn.Module:
    """Replace every plain ``nn.Conv2d`` in ``model`` by a :class:`normlab.nn.WSConv2d` with the
    same weights (GN+WS, Qiao et al. 2019). Collects the targets first, then swaps them."""
    from normlab.nn import ScaledStdConv2d, WSConv2d

    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and not isinstance(m, (WSConv2d, ScaledStdConv2d))]
    for name, m in targets:
        ws = WSConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                      m.groups, m.bias is not None, m.padding_mode)
        ws.load_state_dict(m.state_dict())
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, ws)
    return model


def build_model(cfg: RunConfig, num_classes: int, in_chans: int, image_size: int = 32) -> nn.Module:
    """``normlab.models.create(cfg.model, norm=cfg.norm, ...)``, then weight standardization when
    ``cfg.ws``. Normalizer-free models require ``norm="none"`` (what RunConfig records for them)."""
    from normlab import models

    try:
        from normlab.models import model_uses_norm
    except ImportError:  # not re-exported by the package
        from normlab.models.registry import model_uses_norm
    kwargs = dict(cfg.model_kwargs)
    if cfg.model == "bn_dropout_cnn" and "image_size" not in kwargs:
        kwargs["image_size"] = image_size  # its dense layer's size depends on the input size
    if cfg.norm_kwargs:
        kwargs["norm_kwargs"] = dict(cfg.norm_kwargs)
    try:
        uses_norm = model_uses_norm(cfg.model)
        if not uses_norm and cfg.norm != "none":  # RunConfig records "none" for NF models
            raise nf_norm_error(cfg.model, cfg.norm)
        norm = cfg.norm if uses_norm else "none"
        model = models.create(cfg.model, norm=norm, num_classes=num_classes, in_chans=in_chans,
                              **kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot build model {cfg.model!r}: {e}",
                          hint="see `normlab ls --models` and the model's keyword arguments") from None
    if cfg.ws:
        weight_standardize_(model)
    return model


def build_loaders(cfg: RunConfig, data: DataSplit, device: torch.device, rank: int = 0,
                  world_size: int = 1, batch_size: Optional[int] = None
                  ) -> tuple[TensorLoader, TensorLoader]:
    """Training loader (shuffled, last partial batch dropped, augmented per ``cfg.augment``) and
    test loader (in order). With ``world_size`` processes each rank takes its shard of every
    epoch (equal batch counts on every rank) and of the test set (each example on one rank).
    ``batch_size`` is per process (default ``cfg.batch_size``)."""
    batch = cfg.batch_size if batch_size is None else batch_size
    augment = cfg.augment == "on" or (cfg.augment == "auto" and cfg.data in
                                      ("cifar10", "cifar100", "imagefolder"))
    train = TensorLoader(data.x_train, data.y_train, batch, shuffle=True, drop_last=True,
                         augment=augment, seed=cfg.seed, device=device, rank=rank,
                         world_size=world_size)
    if len(train) == 0:
        per_rank = len(data.y_train) // world_size
        raise ConfigError(f"batch_size {batch} is larger than the {per_rank} training examples "
                          f"of each of {world_size} process(es)",
                          hint="lower --set batch_size")
    test = TensorLoader(data.x_test, data.y_test, 500, shuffle=False, drop_last=False,
                        device=device, rank=rank, world_size=world_size)
    return train, test


def per_process_stat_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose training output depends on how the batch is split over
    processes: BatchNorm and Batch Renorm with per-process statistics (normlab's SyncBatchNorm,
    GN, LN, IN and frozen BN do not)."""
    from normlab.nn.syncbn import SyncBatchNorm

    return [name or "<root>" for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, SyncBatchNorm)]


def per_process_batch(cfg: RunConfig, world: int, model: Optional[nn.Module] = None) -> int:
    """Images per process when the run ``cfg`` (defined for ``cfg.world_size`` processes of
    ``cfg.batch_size`` images) trains on ``world`` processes: the global batch is kept, so it is
    ``cfg.batch_size * cfg.world_size / world``. Raises ConfigError when ``world`` does not divide
    the global batch, or when ``model`` has per-process batch statistics (BN: on another process
    count it would normalize over a different number of images, a different run).

    >>> per_process_batch(RunConfig(norm="gn", batch_size=4, world_size=2), 1)
    8
    """
    if world == cfg.world_size:
        return cfg.batch_size
    g = cfg.global_batch
    if g % world:
        raise ConfigError(
            f"run {cfg.run_id()} is defined for {cfg.world_size} process(es) x {cfg.batch_size} "
            f"images (global batch {g}); {world} processes cannot split {g} images evenly",
            hint=f"launch it with --nproc-per-node x --nnodes dividing {g}")
    if model is not None:
        bn = per_process_stat_modules(model)
        if bn:
            raise ConfigError(
                f"run {cfg.run_id()} ({cfg.norm}) is defined for {cfg.world_size} process(es) x "
                f"{cfg.batch_size} images and normalizes over each process's batch ({bn[0]}); on "
                f"{world} process(es) it would normalize over {g // world} images, another run",
                hint=f"launch it on {cfg.world_size} process(es) (norm syncbn or gn resumes on any "
                     "process count)")
    return g // world


def lr_at(cfg: RunConfig, t: float) -> float:
    """Learning rate at ``t`` epochs into training (fractional): linear warmup over
    ``warmup_epochs``, then cosine to 0, step (x0.1 at each milestone fraction) or constant."""
    peak = cfg.effective_lr()
    w = cfg.warmup_epochs
    if t < w:
        return peak * (t + 1e-3) / w
    if cfg.schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - w) / (cfg.epochs - w))))
    if cfg.schedule == "step":
        return peak * 0.1 ** sum(t >= m * cfg.epochs for m in cfg.milestones)
    return peak


#: Parameter names (last component) that normalizer-free models keep out of weight decay, besides
#: every parameter with ``dim() <= 1``: the Scaled-WS conv gains (shape (C, 1, 1, 1)) and the
#: SkipInit scalars of :mod:`normlab.models.nf_resnet`.
NF_NO_DECAY_NAMES = ("gain", "skip_gain")


def no_decay_parameter_names(cfg: RunConfig, model: nn.Module) -> list[str]:
    """Names of the parameters trained without weight decay: none for models with a norm (the
    GN paper decays all weights, gamma and beta included, REFERENCE section 1); for
    normalizer-free models (REFERENCE section 3: no weight decay on gains, biases or SkipInit
    scalars) every parameter with ``dim() <= 1`` (biases, SkipInit scalars) and those named in
    :data:`NF_NO_DECAY_NAMES` (Scaled-WS gains)."""
    from normlab.lab.config import model_takes_norm

    if model_takes_norm(cfg.model) is not False:
        return []
    return [n for n, p in model.named_parameters()
            if p.dim() <= 1 or n.rpartition(".")[2] in NF_NO_DECAY_NAMES]


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD(lr=peak lr, momentum, weight decay). Models with a norm: decay on every parameter, as
    in the GN paper. Normalizer-free models: two groups, the parameters of
    :func:`no_decay_parameter_names` with ``weight_decay=0`` after the decayed ones."""
    no_decay = set(no_decay_parameter_names(cfg, model))
    params = list(model.named_parameters())
    groups = [{"params": [p for n, p in params if n not in no_decay],
               "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": [p for n, p in params if n in no_decay], "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=cfg.effective_lr(), momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def _agc_fn(cfg: RunConfig, model: nn.Module) -> Optional[Callable[[], None]]:
    """The clipping step of Adaptive Gradient Clipping (lambda ``cfg.agc``) on every parameter
    but the classifier ``fc`` (:func:`normlab.optim.agc_parameters`; a model without ``fc`` is
    a ConfigError rather than a silently clipped classifier)."""
    if cfg.agc is None:
        return None
    from normlab.optim import adaptive_grad_clip_, agc_parameters

    try:
        params = agc_parameters(model, ("fc",))  # never clip the classifier
    except ValueError as e:
        raise ConfigError(f"agc: model {cfg.model!r} has no classifier named 'fc' to leave "
                          f"unclipped ({e})", hint="drop --set agc=... for this model") from None
    return lambda: adaptive_grad_clip_(params, cfg.agc, 1e-3)


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


def _save_checkpoint(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a reader sees the old or the new checkpoint, never half


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


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The global RNG seed of an epoch (dropout): depends only on (seed, rank, epoch), so a
    resumed epoch draws what it would have drawn, at any process count."""
    return nd.rank_seed(seed, rank) * 100_003 + epoch + 3_333_333


def _run_device(cfg: RunConfig) -> torch.device:
    device = resolve_device(cfg.device)
    if device.type == "cuda" and nd.is_distributed():
        device = torch.device("cuda", nd.local_rank())
    return device


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
    run_id = cfg.run_id()
    nd.setup(device=resolve_device(cfg.device))
    rank, world = nd.rank(), nd.world_size()
    writer = is_writer(rank)
    if writer and store is None:
        raise ValueError("train_run: rank 0 writes the results, it needs the store")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _run_device(cfg)
    data = load_dataset(cfg.data, cfg.data_dir, train_limit=cfg.train_limit,
                        test_limit=cfg.test_limit, **cfg.data_kwargs)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP broadcasts too)
    model = build_model(cfg, data.num_classes, data.in_chans, data.image_size).to(device)
    batch = per_process_batch(cfg, world, model)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    state: Optional[dict] = None
    ckpt = str(store.checkpoint_path(run_id)) if store is not None else ""
    if writer:
        for stale in store.checkpoint_dir.glob(f"{run_id}.pt.tmp*"):  # a save cut off by a kill
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        if os.path.isfile(ckpt):
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = nd.broadcast_object(state)
    groups = 1 + bool(no_decay_parameter_names(cfg, model))
    if state is not None and len(state["optimizer"]["param_groups"]) != groups:
        # written by an older trainer (NF models decayed every parameter, one group): another
        # recipe, so the run starts over rather than failing on every re-run
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
    net = nd.wrap_ddp(model, device)  # the state dict is the inner model's at any process count
    opt = build_optimizer(cfg, model)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    train_loader, test_loader = build_loaders(cfg, data, device, rank, world, batch_size=batch)
    use_bf16 = device.type == "cuda" and cfg.amp in ("auto", "bf16")
    if cfg.amp == "bf16" and device.type != "cuda":
        use_bf16 = True  # explicit request: CPU bf16 autocast
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16
                else contextlib.nullcontext)
    forward = torch.compile(net) if cfg.compile else net
    agc = _agc_fn(cfg, model)

    history: list[dict[str, Any]] = []
    start_epoch, elapsed, train_time, train_images = 0, 0.0, 0.0, 0
    if state is not None:
        history = state["history"]
        start_epoch = state["epoch"] + 1
        elapsed, train_time, train_images = state["elapsed"], state["train_time"], state["train_images"]
    resumed_from = start_epoch
    steps = len(train_loader)
    summary = {"device": _device_name(device, world), "versions": versions()}
    diverged: Optional[str] = None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        if progress:
            progress("start", {"epoch": epoch, "total_steps": steps})
        torch.manual_seed(_epoch_seed(cfg.seed, rank, epoch))
        net.train()
        train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        wrong = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        lr = cfg.effective_lr()
        for i, (x, y) in enumerate(train_loader):
            lr = lr_at(cfg, epoch + i / steps)
            for group in opt.param_groups:
                group["lr"] = lr
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                out = forward(x)
            loss = F.cross_entropy(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP: gradients averaged over ranks = gradient of the global batch
            if agc is not None:
                agc()
            opt.step()
            _test_fault_hook()
            loss_sum += loss.detach().double() * len(y)
            wrong += (out.detach().argmax(1) != y).sum()
            seen += len(y)
            if progress and (i % 10 == 9 or i == steps - 1):
                dt = time.perf_counter() - t0
                progress("step", {"advance": 10 if i % 10 == 9 else (i % 10) + 1,
                                  "loss": float(loss.detach()),
                                  "images_per_s": seen * world / max(dt, 1e-9)})
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_train = time.perf_counter() - t0
        loss_total, wrong_total, seen_total = nd.all_reduce_sum(
            [float(loss_sum), float(wrong), float(seen)]).tolist()
        train_loss = loss_total / seen_total
        _sync_buffers(model)
        test_loss, test_error = evaluate(model, test_loader, autocast)
        dt = time.perf_counter() - t0
        elapsed += dt
        train_time += t_train
        train_images += int(seen_total)
        row = {"epoch": epoch, "train_loss": train_loss,
               "train_error": 100.0 * wrong_total / seen_total, "test_loss": test_loss,
               "test_error": test_error, "lr": lr, "wall_time": elapsed,
               "images_per_s": seen_total / t_train}
        history.append(row)
        if not math.isfinite(train_loss):  # the same all-reduced value on every rank
            diverged = f"diverged: non-finite training loss in epoch {epoch}"
        summary.update(wall_time=elapsed, images_per_s=train_images / max(train_time, 1e-9))
        if writer:
            _save_checkpoint(ckpt, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                "history": history, "elapsed": elapsed, "train_time": train_time,
                "train_images": train_images, "run_id": run_id, "world_size": world,
                "batch_per_process": batch})
            store.record_epochs(run_id, history, summary)
        if progress:
            progress("epoch", row)
        if diverged:
            break
    if writer:
        store.record_epochs(run_id, history, summary)
        store.finish(run_id, "done", diverged)
        with contextlib.suppress(FileNotFoundError):
            os.remove(ckpt)
    nd.barrier()  # the run is done in the store before any rank moves on
    last = history[-1] if history else {}
    return RunResult(run_id=run_id, status="done", error=diverged, resumed_from=resumed_from,
                     final_test_error=last.get("test_error"), final_test_loss=last.get("test_loss"),
                     final_train_error=last.get("train_error"), world_size=world,
                     batch_per_process=batch, **summary)


def _device_name(device: torch.device, world: int = 1) -> str:
    procs = f", {world} processes" if world > 1 else ""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}{procs}"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads{procs})"


def run_points(points: list, store: Optional[Store], *,
               on_run: Optional[Callable[[Any, str, Any], None]] = None,
               progress_for: Optional[Callable[[Any], Optional[ProgressFn]]] = None,
               poll_s: float = 2.0,
               on_wait: Optional[Callable[[Any, Optional[str]], None]] = None) -> dict[str, int]:
    """Run every point (objects with ``.cfg``, ``.label``) not yet done in ``store``.

    Finished runs are skipped, interrupted ones resume from their checkpoint, runs that another
    live process is training are waited for (polling every ``poll_s`` seconds) and taken over if
    that process dies. ``on_run(point, outcome, result)`` is called with outcome in "skipped",
    "trained", "failed"; ``on_wait(point, owner)`` once per run found owned by another live
    process (``owner``: its ``host:pid``). Returns the counts of each outcome.

    Interrupted (KeyboardInterrupt, or SystemExit such as the CLI raises on SIGTERM), the run in
    progress is released (:meth:`Store.release`) and the exception goes on.

    Multi-process: every rank calls it with the same points; rank 0 (the only one that needs
    ``store``) claims each run and broadcasts the decision. A run that raises on any rank is
    recorded ``failed`` (rank 0) and ends the job, since the other ranks would wait for that
    rank in a collective; re-running resumes it from its last checkpoint.
    """
    counts = {"skipped": 0, "trained": 0, "failed": 0}
    if points:
        nd.setup(device=resolve_device(points[0].cfg.device))
    writer = is_writer(nd.rank())
    if writer and store is None:
        raise ValueError("run_points: rank 0 writes the results, it needs the store")
    pending = list(points)
    seen: set[str] = set()
    told: set[str] = set()  # runs on_wait was called for
    while pending:
        waiting = []
        for p in pending:
            rid = p.cfg.run_id()
            if rid in seen:  # the same config twice in one study (e.g. shared baselines)
                continue
            state = nd.broadcast_object(store.claim(rid, p.cfg.to_dict()) if writer else None)
            if state == "busy":
                if on_wait and rid not in told:
                    told.add(rid)
                    on_wait(p, (store.run(rid) or {}).get("owner") if store is not None else None)
                waiting.append(p)
                continue
            seen.add(rid)
            if state == "done":
                counts["skipped"] += 1
                if on_run:
                    on_run(p, "skipped", store.run(rid) if store is not None else None)
                continue
            try:
                # the owner's heartbeat: owners on other hosts are judged by it (store.py)
                with heartbeat(store.dir, rid) if writer else contextlib.nullcontext():
                    res = train_run(p.cfg, store,
                                    progress=progress_for(p) if progress_for else None)
            except ConfigError:
                if writer:
                    store.finish(rid, "failed", "configuration error")
                raise
            except Exception as e:  # noqa: BLE001 - record, report and go on with the study
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                if nd.is_distributed():
                    if writer:  # often a peer's death seen through the collective that failed
                        store.finish(rid, "failed", f"multi-process job stopped: {msg}")
                    raise
                store.finish(rid, "failed", msg)
                counts["failed"] += 1
                if on_run:
                    on_run(p, "failed", {"error": msg})
                continue
            except BaseException:  # Ctrl-C, SIGTERM (SystemExit): resumable, by anyone
                if writer:
                    with contextlib.suppress(Exception):
                        store.release(rid)
                raise
            counts["trained"] += 1
            if on_run:
                on_run(p, "trained", res)
        pending = waiting
        if pending:
            time.sleep(poll_s)
    return counts


def preflight(configs: list[RunConfig], world: Optional[int] = None) -> None:
    """Fail fast, before anything is written: load every distinct dataset and build every
    distinct model once (on the CPU), so a missing data directory or an unknown model/norm is
    one clear ConfigError instead of a study full of failed runs. ``world``: the number of
    processes the runs will train on, checked against each run's own (:func:`per_process_batch`:
    a BN run defined for 2 processes cannot train on 1)."""
    seen_data: set = set()
    seen_model: dict[tuple, Optional[nn.Module]] = {}
    for cfg in configs:
        resolve_device(cfg.device)
        dkey = (cfg.data, cfg.data_dir, repr(sorted(cfg.data_kwargs.items())))
        data = load_dataset(cfg.data, cfg.data_dir, train_limit=cfg.train_limit,
                            test_limit=cfg.test_limit, **cfg.data_kwargs)
        seen_data.add(dkey)
        if cfg.global_batch > len(data.y_train):
            procs = f" x {cfg.world_size} processes" if cfg.world_size > 1 else ""
            raise ConfigError(f"batch_size {cfg.batch_size}{procs} is larger than the "
                              f"{len(data.y_train)} training examples of {cfg.data}",
                              hint="lower the batch size")
        mkey = (cfg.model, cfg.norm, repr(cfg.norm_kwargs), repr(cfg.model_kwargs), cfg.ws,
                cfg.agc is not None, data.num_classes, data.in_chans, data.image_size)
        if mkey not in seen_model:
            try:
                model = build_model(cfg, data.num_classes, data.in_chans, data.image_size)
                _agc_fn(cfg, model)  # with agc: the model must have a classifier to leave unclipped
            except ConfigError as e:
                if len({c.label for c in configs}) < 2:
                    raise
                # a study: say which series, and that the overrides reach every series
                raise ConfigError(f"series {cfg.label!r}: {e}",
                                  hint=f"{e.hint}; --set and --config apply to every series "
                                       "(--variants picks series)") from None
            # kept only where the process count matters to it (per-process BN statistics)
            seen_model[mkey] = model if per_process_stat_modules(model) else None
        if world is not None:
            per_process_batch(cfg, world, seen_model[mkey])
