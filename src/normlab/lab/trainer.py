"""The trainer: one RunConfig in, per-epoch results and a finished run in the store out.

Recipe (Wu & He, ECCV 2018, REFERENCE section 1): SGD with momentum and weight decay on all
weights, peak learning rate ``0.1 * N / 32`` for N images per batch, the same number of epochs at
every batch size, cosine or step (lr/10 at fixed fractions) schedule with optional linear warmup.
Optional Adaptive Gradient Clipping (Brock et al. 2021, REFERENCE section 3) on every parameter
except the classifier. bf16 autocast and channels_last on CUDA, optional ``torch.compile``.

Resumability: after every epoch the trainer writes a checkpoint (model, optimizer, RNG state,
history) to ``OUT/checkpoints/<run_id>.pt`` through a temporary file and an atomic rename, *then*
upserts that epoch's rows into the store. The data order and augmentation of an epoch depend only
on ``(seed, epoch)``, so a resumed run repeats the interrupted epoch exactly as it would have run.
A SIGKILL at any point loses at most the epoch in progress.

The pieces a multi-process (DDP) trainer needs to change are separate small functions:
:func:`build_model`, :func:`build_loaders` (takes ``rank``/``world_size``), :func:`is_writer`
(only rank 0 writes the store and checkpoints) and :func:`resolve_device`.
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

from normlab.lab.config import ConfigError, RunConfig
from normlab.lab.data import DataSplit, TensorLoader, load_dataset
from normlab.lab.store import Store

__all__ = ["train_run", "build_model", "build_loaders", "build_optimizer", "is_writer",
           "resolve_device", "lr_at", "versions", "RunResult", "weight_standardize_"]

# a callback the CLI passes to show progress: (event, info) with event in
# "start" (info: total_steps, epoch), "step" (info: loss, images_per_s), "epoch" (info: epoch row)
ProgressFn = Callable[[str, dict], None]


class RunResult(dict):
    """The run's summary: run_id, status, final metrics, wall_time, images_per_s, resumed_from."""


def is_writer(rank: int = 0) -> bool:
    """Whether this process writes the store and checkpoints (rank 0 of a multi-process run)."""
    return rank == 0


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
    ``cfg.ws``. Normalizer-free models require ``norm="none"``."""
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
        if not uses_norm and cfg.norm not in ("none", "bn"):
            raise ConfigError(f"model {cfg.model!r} is normalizer-free; it takes norm='none', "
                              f"got norm={cfg.norm!r}", hint="drop --set norm=... for NF models")
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
                  world_size: int = 1) -> tuple[TensorLoader, TensorLoader]:
    """Training loader (shuffled, last partial batch dropped, augmented per ``cfg.augment``) and
    test loader (in order, all examples; every process evaluates the whole test set)."""
    augment = cfg.augment == "on" or (cfg.augment == "auto" and cfg.data in
                                      ("cifar10", "cifar100", "imagefolder"))
    train = TensorLoader(data.x_train, data.y_train, cfg.batch_size, shuffle=True, drop_last=True,
                         augment=augment, seed=cfg.seed, device=device, rank=rank,
                         world_size=world_size)
    if len(train) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(data.y_train)} "
                          f"training examples of this process", hint="lower --set batch_size")
    test = TensorLoader(data.x_test, data.y_test, 500, shuffle=False, drop_last=False, device=device)
    return train, test


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD(lr=peak lr, momentum, weight decay on every parameter, as in the GN paper)."""
    return torch.optim.SGD(model.parameters(), lr=cfg.effective_lr(), momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


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


def _agc_fn(cfg: RunConfig, model: nn.Module) -> Optional[Callable[[], None]]:
    if cfg.agc is None:
        return None
    try:
        from normlab.optim import adaptive_grad_clip_
    except ImportError as e:
        raise ConfigError(f"agc needs normlab.optim.adaptive_grad_clip_, not available: {e}") from None
    head = model.get_submodule("fc") if hasattr(model, "fc") else None
    skip = {id(p) for p in head.parameters()} if head is not None else set()
    params = [p for p in model.parameters() if id(p) not in skip]  # never clip the classifier
    return lambda: adaptive_grad_clip_(params, cfg.agc, 1e-3)


@torch.no_grad()
def evaluate(model: nn.Module, loader: TensorLoader, autocast: Callable) -> tuple[float, float]:
    """(mean cross-entropy, error %) over the loader, model in eval mode."""
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
    return float(loss_sum) / n, 100.0 * float(wrong) / n


def _save_checkpoint(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a reader sees the old or the new checkpoint, never half


def train_run(cfg: RunConfig, store: Store, *, progress: Optional[ProgressFn] = None,
              rank: int = 0, world_size: int = 1) -> RunResult:
    """Train (or resume) the run ``cfg`` and record it in ``store``. The caller has claimed the run
    (:meth:`Store.claim`); this marks it done at the end. Returns the run's summary."""
    cfg.validate()
    run_id = cfg.run_id()
    writer = is_writer(rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data, cfg.data_dir, train_limit=cfg.train_limit,
                        test_limit=cfg.test_limit, **cfg.data_kwargs)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.num_classes, data.in_chans, data.image_size).to(device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model)
    train_loader, test_loader = build_loaders(cfg, data, device, rank, world_size)
    use_bf16 = device.type == "cuda" and cfg.amp in ("auto", "bf16")
    if cfg.amp == "bf16" and device.type != "cuda":
        use_bf16 = True  # explicit request: CPU bf16 autocast
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16
                else contextlib.nullcontext)
    forward = torch.compile(model) if cfg.compile else model
    agc = _agc_fn(cfg, model)

    history: list[dict[str, Any]] = []
    start_epoch, elapsed, train_time, train_images = 0, 0.0, 0.0, 0
    ckpt = str(store.checkpoint_path(run_id))
    for stale in store.checkpoint_dir.glob(f"{run_id}.pt.tmp*"):  # a save cut off by a kill
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    if os.path.isfile(ckpt):
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        elapsed, train_time, train_images = state["elapsed"], state["train_time"], state["train_images"]
    resumed_from = start_epoch
    steps = len(train_loader)
    summary = {"device": _device_name(device), "versions": versions()}
    diverged: Optional[str] = None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        if progress:
            progress("start", {"epoch": epoch, "total_steps": steps})
        model.train()
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
            loss.backward()
            if agc is not None:
                agc()
            opt.step()
            loss_sum += loss.detach().double() * len(y)
            wrong += (out.detach().argmax(1) != y).sum()
            seen += len(y)
            if progress and (i % 10 == 9 or i == steps - 1):
                dt = time.perf_counter() - t0
                progress("step", {"advance": 10 if i % 10 == 9 else (i % 10) + 1,
                                  "loss": float(loss.detach()), "images_per_s": seen / max(dt, 1e-9)})
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_train = time.perf_counter() - t0
        train_loss = float(loss_sum) / seen
        test_loss, test_error = evaluate(model, test_loader, autocast)
        dt = time.perf_counter() - t0
        elapsed += dt
        train_time += t_train
        train_images += seen
        row = {"epoch": epoch, "train_loss": train_loss, "train_error": 100.0 * float(wrong) / seen,
               "test_loss": test_loss, "test_error": test_error, "lr": lr, "wall_time": elapsed,
               "images_per_s": seen / t_train}
        history.append(row)
        if not math.isfinite(train_loss):
            diverged = f"diverged: non-finite training loss in epoch {epoch}"
        summary.update(wall_time=elapsed, images_per_s=train_images / max(train_time, 1e-9))
        if writer:
            _save_checkpoint(ckpt, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                "history": history, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                "elapsed": elapsed, "train_time": train_time, "train_images": train_images,
                "run_id": run_id})
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
    last = history[-1] if history else {}
    return RunResult(run_id=run_id, status="done", error=diverged, resumed_from=resumed_from,
                     final_test_error=last.get("test_error"), final_test_loss=last.get("test_loss"),
                     final_train_error=last.get("train_error"), **summary)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def run_points(points: list, store: Store, *, on_run: Optional[Callable[[Any, str, Any], None]] = None,
               progress_for: Optional[Callable[[Any], Optional[ProgressFn]]] = None,
               poll_s: float = 2.0, rank: int = 0, world_size: int = 1) -> dict[str, int]:
    """Run every point (objects with ``.cfg``, ``.label``) not yet done in ``store``.

    Finished runs are skipped, interrupted ones resume from their checkpoint, runs that another
    live process is training are waited for (polling every ``poll_s`` seconds) and taken over if
    that process dies. ``on_run(point, outcome, result)`` is called with outcome in "skipped",
    "trained", "failed". Returns the counts of each outcome.
    """
    counts = {"skipped": 0, "trained": 0, "failed": 0}
    pending = list(points)
    seen: set[str] = set()
    while pending:
        waiting = []
        for p in pending:
            rid = p.cfg.run_id()
            if rid in seen:  # the same config twice in one study (e.g. shared baselines)
                continue
            state = store.claim(rid, p.cfg.to_dict()) if is_writer(rank) else "claimed"
            if state == "busy":
                waiting.append(p)
                continue
            seen.add(rid)
            if state == "done":
                counts["skipped"] += 1
                if on_run:
                    on_run(p, "skipped", store.run(rid))
                continue
            try:
                res = train_run(p.cfg, store, progress=progress_for(p) if progress_for else None,
                                rank=rank, world_size=world_size)
            except ConfigError:
                store.finish(rid, "failed", "configuration error")
                raise
            except Exception as e:  # noqa: BLE001 - record, report and go on with the study
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                store.finish(rid, "failed", msg)
                counts["failed"] += 1
                if on_run:
                    on_run(p, "failed", {"error": msg})
                continue
            counts["trained"] += 1
            if on_run:
                on_run(p, "trained", res)
        pending = waiting
        if pending:
            time.sleep(poll_s)
    return counts


def preflight(configs: list[RunConfig]) -> None:
    """Fail fast, before anything is written: load every distinct dataset and build every
    distinct model once (on the CPU), so a missing data directory or an unknown model/norm is
    one clear ConfigError instead of a study full of failed runs."""
    seen_data, seen_model = set(), set()
    for cfg in configs:
        resolve_device(cfg.device)
        dkey = (cfg.data, cfg.data_dir, repr(sorted(cfg.data_kwargs.items())))
        data = load_dataset(cfg.data, cfg.data_dir, train_limit=cfg.train_limit,
                            test_limit=cfg.test_limit, **cfg.data_kwargs)
        seen_data.add(dkey)
        if cfg.batch_size > len(data.y_train):
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(data.y_train)} "
                              f"training examples of {cfg.data}", hint="lower the batch size")
        mkey = (cfg.model, cfg.norm, repr(cfg.norm_kwargs), repr(cfg.model_kwargs), cfg.ws,
                data.num_classes, data.in_chans, data.image_size)
        if mkey not in seen_model:
            seen_model.add(mkey)
            build_model(cfg, data.num_classes, data.in_chans, data.image_size)
            if cfg.agc is not None:
                _agc_fn(cfg, nn.Linear(1, 1))
