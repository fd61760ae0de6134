"""The recipe: what a :class:`RunConfig` trains with - model, optimizer, schedule, loaders.

Recipe (Wu & He, ECCV 2018, REFERENCE section 1): SGD with momentum and weight decay on all
weights (normalizer-free models: none on gains, biases and SkipInit scalars, REFERENCE section 3),
peak learning rate ``0.1 * N / 32`` for N images per batch, the same number of epochs at
every batch size, cosine or step (lr/10 at fixed fractions) schedule with optional linear warmup.
Optional Adaptive Gradient Clipping (Brock et al. 2021, REFERENCE section 3) on every parameter
except the classifier. bf16 autocast and channels_last on CUDA.

Multi-process: ``batch_size`` is per process, as in the GN paper ("images per GPU"); a run resumed
on another process count keeps its global batch (:func:`per_process_batch`), except for
per-process BN, whose statistics depend on the split. :func:`preflight` builds every distinct
model and loads every distinct dataset of a study once, before anything is written.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
from typing import Callable, Optional

import torch
from torch import nn

from normlab import distributed as nd
from normlab import models
from normlab.factory import canonical_name
from normlab.lab.config import (DATA_DIR_DATASETS, ConfigError, RunConfig, check_model_norm,
                                fits_in_memory)
from normlab.lab.data import DataSplit, TensorLoader, load_dataset
from normlab.lab.progress import literal, say
from normlab.models import is_normalizer_free
from normlab.nn import ScaledStdConv2d, WSConv2d
from normlab.nn.evonorm import EvoNorm2dB0, EvoNorm2dS0
from normlab.nn.groupnorm import GroupNorm
from normlab.nn.syncbn import SyncBatchNorm
from normlab.optim import adaptive_grad_clip_, agc_parameters, classifier_names

__all__ = ["resolve_device", "run_device", "versions", "weight_standardize_", "build_model",
           "build_loaders", "per_process_stat_modules", "per_process_batch", "lr_at",
           "NF_NO_DECAY_NAMES", "no_decay_parameter_names", "build_optimizer", "agc_fn",
           "autocast_fn", "load_data", "preflight"]


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (error if unavailable) or ``auto`` (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no CUDA device",
                          hint="use --device cpu (or auto)")
    return torch.device(name)


def run_device(cfg: RunConfig) -> torch.device:
    """The device this process trains ``cfg`` on: :func:`resolve_device`, and in a multi-process
    CUDA job this rank's GPU."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and nd.is_distributed():
        device = torch.device("cuda", nd.local_rank())
    return device


def versions() -> dict[str, str]:
    """Versions of python, torch, normlab and numpy, and the platform."""
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform()}
    for pkg in ("normlab", "numpy", "triton", "timm"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def weight_standardize_(model: nn.Module) -> nn.Module:
    """Replace every plain ``nn.Conv2d`` in ``model`` by a :class:`normlab.nn.WSConv2d` with the
    same weights (GN+WS, Qiao et al. 2019). Collects the targets first, then swaps them. Another
    Conv2d subclass (timm's Conv2dSame, StdConv2d, ...) computes something a WSConv2d would not
    keep (its padding, its own standardization): a ConfigError naming it."""
    targets = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or isinstance(m, (WSConv2d, ScaledStdConv2d)):
            continue
        if type(m) is not nn.Conv2d:
            raise ConfigError(f"ws: cannot weight-standardize {name!r} ({type(m).__module__}."
                              f"{type(m).__qualname__}), only plain torch.nn.Conv2d layers",
                              hint="drop ws (the GN+WS series) or pick a model built of plain "
                                   "Conv2d layers")
        targets.append((name, m))
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
    check_model_norm(cfg.model, cfg.norm)
    kwargs = dict(cfg.model_kwargs)
    if cfg.model == "bn_dropout_cnn" and "image_size" not in kwargs:
        kwargs["image_size"] = image_size  # its dense layer's size depends on the input size
    if cfg.norm_kwargs:
        kwargs["norm_kwargs"] = dict(cfg.norm_kwargs)
    with fits_in_memory(f"model {cfg.model!r} with model_kwargs {cfg.model_kwargs}",
                        "lower model_kwargs (e.g. width)"):
        try:
            model = models.create(cfg.model, norm=cfg.norm, num_classes=num_classes,
                                  in_chans=in_chans, **kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"cannot build model {cfg.model!r}: {e}", hint="see `normlab ls "
                              "--models` and the model's keyword arguments") from None
        except ImportError as e:  # timm:<name> without a working timm
            raise ConfigError(f"cannot build model {cfg.model!r}: {e}",
                              hint="install timm (and a torchvision built for this torch), or "
                                   "pick a normlab model (`normlab ls --models`)") from None
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
    augment = cfg.augment == "on" or (cfg.augment == "auto" and cfg.data in DATA_DIR_DATASETS)
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
    processes: BatchNorm, Batch Renorm and EvoNorm-B0 (its batch variance) with per-process
    statistics (normlab's SyncBatchNorm, GN, LN, IN, FRN, EvoNorm-S0 and frozen BN do not)."""
    return [name or "<root>" for name, m in model.named_modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, EvoNorm2dB0))
            and not isinstance(m, SyncBatchNorm)]


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
    ``warmup_epochs`` (from ``peak * 1e-3 / warmup_epochs``, never above the peak), then cosine
    to 0, step (x0.1 at each milestone fraction) or constant."""
    peak = cfg.effective_lr()
    w = cfg.warmup_epochs
    if t < w:
        return peak * min(1.0, (t + 1e-3) / w)
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
    if not is_normalizer_free(cfg.model):
        return []
    return [n for n, p in model.named_parameters()
            if p.dim() <= 1 or n.rpartition(".")[2] in NF_NO_DECAY_NAMES]


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD(lr=peak lr, momentum, weight decay), or AdamW(lr=peak lr, weight decay) with
    ``optimizer="adamw"``. Models with a norm: decay on every parameter, as in the GN paper.
    Normalizer-free models: two groups, the parameters of :func:`no_decay_parameter_names`
    with ``weight_decay=0`` after the decayed ones."""
    no_decay = set(no_decay_parameter_names(cfg, model))
    params = list(model.named_parameters())
    groups = [{"params": [p for n, p in params if n not in no_decay],
               "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": [p for n, p in params if n in no_decay], "weight_decay": 0.0})
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.effective_lr(), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.effective_lr(), momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def agc_fn(cfg: RunConfig, model: nn.Module) -> Optional[Callable[[], None]]:
    """The clipping step of Adaptive Gradient Clipping (lambda ``cfg.agc``) on every parameter
    but the classifier's (:func:`normlab.optim.classifier_names`: timm's ``get_classifier()``,
    normlab's ``fc``, a Sequential's last Linear); a model whose classifier it cannot tell is a
    ConfigError naming the model rather than a silently clipped classifier."""
    if cfg.agc is None:
        return None
    try:
        params = agc_parameters(model, classifier_names(model))  # never clip the classifier
    except ValueError as e:
        raise ConfigError(f"agc: cannot tell which layer of model {cfg.model!r} is the "
                          f"classifier to leave unclipped ({e})",
                          hint="give the model a get_classifier() method returning its final "
                               "layer (timm's convention) or name that layer fc; or drop "
                               "--set agc=... for this model") from None
    return lambda: adaptive_grad_clip_(params, cfg.agc, 1e-3)


def autocast_fn(cfg: RunConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast context of the run's forward passes: bf16 on CUDA when ``cfg.amp`` is "auto"
    or "bf16", bf16 on the CPU only when asked for ("bf16"), else none."""
    use_bf16 = device.type == "cuda" and cfg.amp in ("auto", "bf16")
    if cfg.amp == "bf16" and device.type != "cuda":
        use_bf16 = True  # explicit request: CPU bf16 autocast
    return ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16
            else contextlib.nullcontext)


def load_data(cfg: RunConfig) -> DataSplit:
    """The run's dataset (:func:`normlab.lab.data.load_dataset` with the run's limits)."""
    return load_dataset(cfg.data, cfg.data_dir, train_limit=cfg.train_limit,
                        test_limit=cfg.test_limit, **cfg.data_kwargs)


def _check_threads(threads: Optional[int]) -> None:
    """At most one torch thread per core of this machine: more only slows a run down, and far
    more (``threads=100000``) crashed the training process inside OpenMP."""
    cores = os.cpu_count() or 1
    if threads is not None and threads > cores:
        raise ConfigError(f"threads {threads} is more than the {cores} CPU cores of this machine",
                          hint=f"use --set threads={cores} or fewer (or leave it unset)")


def _train_forward(model: nn.Module, x: torch.Tensor) -> None:
    """Run ``model`` in training mode on ``x`` (no grad). An exception goes on up with the
    innermost module whose forward was running when it was raised, ``(name, its input shape)``,
    as its ``layer`` attribute."""
    stack: list[tuple[str, Optional[tuple]]] = []

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            first = args[0] if args else None
            stack.append((name, tuple(first.shape) if isinstance(first, torch.Tensor) else None))
        return hook

    def post(module: nn.Module, args: tuple, out: object) -> None:
        stack.pop()

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(name or "<root>")))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            model.train()(x)
    except Exception as e:
        e.layer = stack[-1] if stack else (None, None)  # type: ignore[attr-defined]
        raise
    finally:
        for h in handles:
            h.remove()


def _statistics_batch(cfg: RunConfig) -> int:
    """The images a run's batch statistics see at most per slice, for :func:`_train_step_check`:
    an emulated device's ``virtual_batch`` (ghost batches), else 2 of the batch (1 at
    ``batch_size`` 1): per-sample statistics (IN) fail on any batch, batch statistics over a
    1x1 map need 2 images."""
    vb = cfg.norm_kwargs.get("virtual_batch") if isinstance(cfg.norm_kwargs, dict) else None
    if isinstance(vb, int) and not isinstance(vb, bool) and 1 <= vb <= cfg.batch_size:
        return vb
    return min(cfg.batch_size, 2)


def _train_step_check(cfg: RunConfig, model: nn.Module, data: DataSplit) -> None:
    """A ConfigError when a norm layer of ``model`` cannot take its statistics in training on
    ``data`` (a map too small: InstanceNorm over a 1x1 map, BN over 1 image of 1x1 maps), which
    the run's first training step would raise after the study's other runs had trained. One
    training-mode forward of the images one statistics slice sees (:func:`_statistics_batch`);
    the error names the model, norm, layer and its map size. Any other error of that forward is
    left to the run, which records it (the probe runs on the CPU, the run maybe not)."""
    n = _statistics_batch(cfg)
    try:
        _train_forward(model, data.x_train[:n])
    except ValueError as e:
        name, shape = getattr(e, "layer", (None, None))
        cause = str(e).strip().splitlines()[0]
        size = "x".join(str(d) for d in shape[2:]) if shape and len(shape) > 2 else None
        kind = type(model.get_submodule("" if name == "<root>" else name)).__name__ if name else ""
        where = f"layer {name!r} ({kind})" if name else "a layer"
        maps = f" normalizes {size} feature maps" if size else ""
        per_sample = "spatial element" in cause
        imgs = f"{data.image_size}x{data.image_size} images of {cfg.data}"
        batch = "" if per_sample else f", {n} image{'s' if n > 1 else ''} per statistics batch"
        msg = (f"model {cfg.model!r} with norm {cfg.norm!r} cannot train on {imgs}{batch}: "
               f"{where}{maps} ({cause})")
        if per_sample:
            hint = ("per-sample statistics need more than 1 value per map: use larger images "
                    "(--set data_kwargs.image_size=..., or other data) or leave this norm out "
                    "(--variants)")
        else:
            hint = ("use a batch size >= 2, larger images (--set data_kwargs.image_size=..., "
                    "or other data), or leave this series out (--variants)")
        raise ConfigError(msg, hint=hint) from None


def _say_notes(data: DataSplit, said: set[str]) -> None:
    """Rank 0 says each note of the dataset's reader (``info["notes"]``: how an imagefolder was
    read) once, on stdout; ``said`` holds those said already."""
    for note in data.info.get("notes", ()):
        if note not in said and nd.is_main_process():
            say(literal(f"note: {note}"))
        said.add(note)


def _grouped_layers(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(name, channels, groups)`` of each layer the group rule built: normlab's GroupNorm and
    EvoNorm-S0 (what create_norm builds for ``gn`` and ``evonorm_s0``)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, GroupNorm):
            out.append((name, m.num_channels, m.num_groups))
        elif isinstance(m, EvoNorm2dS0):
            out.append((name, m.num_features, m.num_groups))
    return out


def _check_group_counts(cfg: RunConfig, model: nn.Module) -> None:
    """A ConfigError when the groups the run asks for (``norm_kwargs.num_groups``, or
    ``group_size`` channels per group) are fewer than a layer's channels and do not divide
    them: the group rule (:func:`normlab.resolve_groups`) would train another count there than
    the run's config, its label and the report name (``num_groups=3`` on 16 channels trains 2
    groups). A request at or above a layer's channels gives it one channel per group
    (``num_groups``) or one group (``group_size``), as the groups study's G = 64 and C/G = 64 do
    on ResNet-20's 16 channels. Without either key the norm's default (32 groups) goes through
    the group rule as create_norm documents it (48 channels get 24 groups)."""
    if canonical_name(cfg.norm) not in ("gn", "evonorm_s0"):
        return
    key = next((k for k in ("group_size", "num_groups") if k in cfg.norm_kwargs), None)
    if key is None or not isinstance(cfg.norm_kwargs[key], int):
        return  # the default, or a value create_norm names as bad
    asked = cfg.norm_kwargs[key]
    layers = _grouped_layers(model)
    for name, c, groups in layers:
        if 0 < asked < c and c % asked:
            got = (f"{groups} groups" if key == "num_groups"
                   else f"{c // groups} channels per group")
            counts = sorted({ch for _, ch, _ in layers})
            fit = [d for d in range(1, min(counts) + 1) if all(ch % d == 0 for ch in counts)]
            raise ConfigError(
                f"norm_kwargs.{key}={asked} does not divide the {c} channels of layer {name!r} "
                f"of model {cfg.model!r}: the group rule would train {got} there, not the "
                f"{asked} the run is recorded and reported with",
                hint=f"its {cfg.norm} layers have {', '.join(map(str, counts))} channels: give "
                     f"a {key} that divides them ({', '.join(map(str, fit))}), or one at or "
                     "above a layer's channels (" + ("one channel per group there: InstanceNorm)"
                                                    if key == "num_groups" else
                                                    "one group there: LayerNorm)"))


def preflight(configs: list[RunConfig], world: Optional[int] = None) -> None:
    """Fail fast, before anything is written: load every distinct dataset and build every
    distinct model once (on the CPU), so a missing data directory or an unknown model/norm is
    one clear ConfigError instead of a study full of failed runs; the data's notes (how an
    imagefolder was read) are said once. ``world``: the number of
    processes the runs will train on, checked against each run's own (:func:`per_process_batch`:
    a BN run defined for 2 processes cannot train on 1)."""
    seen_model: dict[tuple, Optional[nn.Module]] = {}
    said: set[str] = set()
    for cfg in configs:
        resolve_device(cfg.device)
        _check_threads(cfg.threads)
        data = load_data(cfg)
        _say_notes(data, said)
        if cfg.global_batch > len(data.y_train):
            procs = f" x {cfg.world_size} processes" if cfg.world_size > 1 else ""
            raise ConfigError(f"batch_size {cfg.batch_size}{procs} is larger than the "
                              f"{len(data.y_train)} training examples of {cfg.data}",
                              hint="in a study the SGD batch is the emulated devices x the "
                                   "images per device: use fewer devices (--devices K), or more "
                                   "training data (train_limit, another dataset); for one run, "
                                   "lower --batch-size")
        mkey = (cfg.model, cfg.norm, repr(cfg.norm_kwargs), repr(cfg.model_kwargs), cfg.ws,
                cfg.agc is not None, data.num_classes, data.in_chans, data.image_size)
        if mkey not in seen_model:
            try:
                model = build_model(cfg, data.num_classes, data.in_chans, data.image_size)
                agc_fn(cfg, model)  # with agc: the model must have a classifier to leave unclipped
                _check_group_counts(cfg, model)
                # a statistic over 1 value (IN on 1x1 maps; BN on 1 image of them) fails at
                _train_step_check(cfg, model, data)  # the first step of the run: said now
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
