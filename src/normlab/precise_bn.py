"""precise_bn: recompute a trained model's running statistics over many batches (PreciseBN).

Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (arXiv 2105.07576, 2021), section 3: the running
statistics BatchNorm keeps during training are an exponential moving average (EMA) of the
statistics of recent batches, taken while the weights were still changing, and can be an
inaccurate estimate of the statistics of the final model's features; PreciseBN fixes the trained
weights, applies the model to many batches and aggregates the batch statistics into population
statistics for inference.

What is aggregated here, per layer and channel, over every value the layer received in the
passes (batches b with n_b values, mean m_b and biased variance v_b each; law of total variance):

    n   = sum_b n_b
    mu  = sum_b n_b m_b / n
    var = (sum_b n_b (v_b + (m_b - mu)^2)) / (n - 1)        (unbiased, as ``running_var`` is)

merged batch by batch in float64 (Chan et al.'s pairwise update), so ``mu`` and ``var`` are the
mean and variance of all those values at once, the spread of the batch means included. (Averaging
the per-batch variances instead, as a cumulative moving average does, leaves that spread out.)

The passes run the model as training does, so each layer sees the features training produced:
the layers being recomputed normalize with their batch statistics; ``train_others=True`` (the
default) also puts every other module in training mode (dropout, stochastic depth), as
``torch.optim.swa_utils.update_bn`` does, ``False`` leaves them in the mode they are in. Every
buffer of the model (running statistics, ``num_batches_tracked``, any other module's state) is
restored after each batch, so each batch sees the model as it was (Batch Renorm's correction
reads its running statistics and its step count), and at the end only the recomputed statistics
have changed. Parameters and training modes are left as they were. Under ``torch.distributed``
the statistics are merged over every process of ``process_group`` (default: the whole job), in
rank order.

Recomputed (``track_running_stats`` with running statistics): torch.nn's and normlab's
BatchNorm1d/2d/3d, SyncBatchNorm, normlab's GhostBatchNorm (statistics over all its values, not
per ghost batch) and BatchRenorm, timm's BatchNormAct2d and SyncBatchNormAct, timm's
SplitBatchNorm2d (itself over the first split of each batch, its ``aux_bn`` over theirs), EvoNorm
B0 (normlab's, and timm's EvoNorm2dB0/B1/B2: ``running_var`` only), and InstanceNorm with running statistics (the mean over instances of
each instance's mean and unbiased variance, which is what its running average estimates). Left
as they are, with the reason in the returned record: frozen BatchNorms (nothing to recompute),
another subclass with a forward of its own (what it normalizes over is unknown), a layer the
batches did not reach, and any other module with a ``running_var`` (a layer of one's own: what
its statistics are taken over is unknown).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from normlab import functional as NLF
from normlab.convert import split_batchnorm_class
from normlab.nn.batch_renorm import _BatchRenorm
from normlab.nn.batchnorm import _BatchNormForward
from normlab.nn.evonorm import EvoNorm2dB0
from normlab.nn.instancenorm import _InstanceNormForward

__all__ = ["precise_bn", "PreciseBNRecord"]

# timm's norm-act layers: BatchNorm over the whole input, then their drop and act; timm's
# batch EvoNorms: running_var, the unbiased variance over (N, H, W) per channel
_TIMM_BATCH = ("BatchNormAct2d", "SyncBatchNormAct", "EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dB2")
_TORCH_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
_TORCH_IN_FORWARDS = (nn.modules.instancenorm._InstanceNorm.forward,)


@dataclasses.dataclass
class PreciseBNRecord:
    """What :func:`precise_bn` did: ``recomputed`` layer names, ``skipped`` (name, reason) for
    each layer with running statistics left as it was, and ``batches`` (this process's)."""

    recomputed: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    batches: int = 0


class _Batch:
    """Per-channel (count, mean, M2) of the values a batch-statistics layer received, float64."""

    def __init__(self, module: nn.Module, first_split: bool = False) -> None:
        self.module, self.first_split = module, first_split
        self.n = self.mean = self.m2 = None

    def add(self, x: Tensor) -> None:
        if self.first_split:  # SplitBatchNorm2d: itself normalizes the first split
            x = x[: x.shape[0] // self.module.num_splits]
        if x.numel() == 0:
            return
        c = x.shape[1]
        mean, var = NLF.moments(x, c, over_batch=True)  # (C,) each, biased; float32 or 64
        n = float(x.numel() // c)
        self._merge(torch.full_like(mean, n, dtype=torch.float64), mean.double(),
                    var.double() * n)

    def _merge(self, n: Tensor, mean: Tensor, m2: Tensor) -> None:
        if self.n is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * n / total)
        self.n = total

    def gather(self, group: Any) -> None:
        local = (torch.stack([self.n, self.mean, self.m2]) if self.n is not None
                 else _nothing(self.module))  # a process the batches did not bring here
        parts = _all_gather(local, group)
        self.n = self.mean = self.m2 = None
        for part in parts:
            if part[0].sum() > 0:
                self._merge(part[0], part[1], part[2])

    def values(self) -> int:
        return 0 if self.n is None else int(self.n[0])

    def statistics(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.m2 / (self.n - 1)


class _Instance:
    """Sums over instances of each (sample, channel)'s mean and unbiased variance, float64."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.count = self.sum_mean = self.sum_var = None

    def add(self, x: Tensor) -> None:
        if x.dim() == self._unbatched_dim():  # one instance: (C, L), (C, H, W), (C, D, H, W)
            x = x.unsqueeze(0)
        if x.numel() == 0:
            return
        n, c = x.shape[:2]
        m = x.numel() // (n * c)
        mean, var = NLF.moments(x, c, over_batch=False)  # (N, C), biased
        unbiased = var.double() * (m / (m - 1)) if m > 1 else var.double()
        parts = (torch.full((c,), float(n), dtype=torch.float64, device=x.device),
                 mean.double().sum(0), unbiased.sum(0))
        if self.count is None:
            self.count, self.sum_mean, self.sum_var = parts
        else:
            self.count, self.sum_mean, self.sum_var = (
                a + b for a, b in zip((self.count, self.sum_mean, self.sum_var), parts))

    def _unbatched_dim(self) -> int:
        """The dimensions of an unbatched input (torch's InstanceNorm1d/2d/3d: 2/3/4)."""
        get = getattr(self.module, "_get_no_batch_dim", None)
        return get() if get is not None else 2

    def gather(self, group: Any) -> None:
        local = (torch.stack([self.count, self.sum_mean, self.sum_var]) if self.count is not None
                 else _nothing(self.module))
        parts = _all_gather(local, group)
        total = parts[0]
        for part in parts[1:]:  # in rank order: the same sums on every process
            total = total + part
        self.count, self.sum_mean, self.sum_var = total[0], total[1], total[2]

    def values(self) -> int:
        return 0 if self.count is None else 2 * int(self.count[0])  # any instance has >= 2

    def statistics(self) -> tuple[Tensor, Tensor]:
        return self.sum_mean / self.count, self.sum_var / self.count


def _nothing(module: nn.Module) -> Tensor:
    """Three rows of zeros: no values, for a layer this process's batches did not reach."""
    return torch.zeros(3, module.running_var.numel(), dtype=torch.float64,
                       device=module.running_var.device)


def _all_gather(t: Tensor, group: Any) -> list[Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _total(batches: int, group: Any, layers: dict) -> int:
    """The batches of every process in ``group`` (a process with none still takes part)."""
    if group is None:
        return batches
    t = torch.tensor([float(batches)], dtype=torch.float64,
                     device=next(iter(layers.values())).module.running_var.device)
    dist.all_reduce(t, group=group)
    return int(t.item())


def _has_running_stats(m: nn.Module) -> bool:
    return (getattr(m, "running_var", None) is not None
            and getattr(m, "track_running_stats", True) is not False)


def _accumulator(m: nn.Module) -> tuple[Optional[Any], str]:
    """The statistics ``m`` keeps, or None and why it is left."""
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        raise ValueError(f"precise_bn: {type(m).__name__} has not been materialized; run one "
                         f"forward pass first (lazy modules take their size from the input)")
    name = type(m).__name__
    if not _has_running_stats(m):
        return None, "no running statistics"
    if split_batchnorm_class(m) is not None:
        return _Batch(m, first_split=True), ""
    if isinstance(m, (_BatchNormForward, _BatchRenorm, EvoNorm2dB0)) or (
            name in _TIMM_BATCH and type(m).__module__.startswith("timm.")):
        return _Batch(m), ""
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward in _TORCH_BN_FORWARDS:
        return _Batch(m), ""
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and (
            isinstance(m, _InstanceNormForward) or type(m).forward in _TORCH_IN_FORWARDS):
        return _Instance(m), ""
    if "Frozen" in name:
        return None, f"{name}: frozen statistics"
    if isinstance(m, (nn.modules.batchnorm._NormBase, EvoNorm2dB0)):
        return None, (f"{type(m).__module__}.{type(m).__qualname__} has a forward of its own: "
                      f"what its statistics are taken over is unknown")
    # any other module with running statistics (a layer of the user's own)
    return None, (f"{type(m).__module__}.{type(m).__qualname__} is not a layer precise_bn "
                  f"knows: what its statistics are taken over is unknown")


class _Buffers:
    """Every buffer of a model, as it is now: :meth:`restore` puts the values back, and the
    tensors too where a forward assigned a new one (``self.ema = ...`` in place of ``.copy_``)."""

    def __init__(self, model: nn.Module) -> None:
        copies: dict[int, Tensor] = {}  # a tensor two modules share: one copy
        self.slots = []
        for m in model.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    if id(b) not in copies:
                        copies[id(b)] = b.detach().clone()
                    self.slots.append((m, name, b, copies[id(b)]))

    def restore(self) -> None:
        for m, name, b, copy in self.slots:
            if m._buffers.get(name) is not b:
                m._buffers[name] = b
            b.copy_(copy)


def _collector(acc: Any) -> Callable:
    """A forward pre-hook handing the layer's input (``input=`` when passed by keyword) on."""
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        acc.add(args[0] if args else kwargs.get("input", next(iter(kwargs.values()))))
    return hook


def _to(batch: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [_to(b, device) for b in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the input; a list or tuple is (input, target, ...); a mapping is keywords."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(f"precise_bn: a batch of type {type(batch).__name__} is not an input it "
                    f"knows (a tensor, a non-empty (input, target, ...) list or tuple, or a "
                    f"mapping of keyword arguments); pass forward=lambda model, batch: ...")


def _check_num_batches(num_batches: Any) -> Optional[int]:
    if num_batches is None:
        return None
    if isinstance(num_batches, bool) or not isinstance(num_batches, int):
        raise TypeError(f"num_batches must be an int or None, got {num_batches!r}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    return num_batches


def _group(process_group: Any) -> Optional[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def precise_bn(
    model: nn.Module,
    batches: Iterable,
    num_batches: Optional[int] = None,
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    device: Optional[torch.device | str] = None,
    train_others: bool = True,
    process_group: Any = None,
) -> PreciseBNRecord:
    """Replace the running statistics of ``model``'s normalization layers by the statistics of
    the values they receive over ``batches`` (PreciseBN, Wu & Johnson 2021); see the module
    docstring for the formula and which layers.

    Args:
        model: a trained model; its parameters, its other buffers and its modes are kept.
        batches: an iterable of batches, e.g. the training DataLoader (training augmentation is
            fine: these are the features training saw).
        num_batches: use at most this many (default: all of ``batches``). Wu & Johnson's point
            is many more values than an EMA effectively averages.
        forward: ``forward(model, batch)`` runs one batch; default: ``model(batch)`` for a
            tensor, ``model(batch[0])`` for an (input, target, ...) tuple or list, and
            ``model(**batch)`` for a mapping. Wrap the call in ``torch.autocast`` for mixed
            precision.
        device: move each batch's tensors there first (as ``torch.optim.swa_utils.update_bn``).
        train_others: True puts every module in training mode during the passes; False only the
            recomputed layers.
        process_group: under ``torch.distributed``, the processes whose values are merged
            (default: all); every process of it must call ``precise_bn`` on the same model.

    Returns:
        a :class:`PreciseBNRecord`.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> batches = [torch.randn(16, 3, 8, 8) + 1 for _ in range(20)]
        >>> precise_bn(model, batches).recomputed
        ['1']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"precise_bn: model must be a torch.nn.Module, got {type(model).__name__}")
    num_batches = _check_num_batches(num_batches)
    call = forward if forward is not None else _default_forward
    device = torch.device(device) if device is not None else None
    record, layers = PreciseBNRecord(), {}
    for name, m in model.named_modules():
        acc, reason = _accumulator(m)
        if acc is not None:
            layers[name] = acc
        elif reason and _has_running_stats(m):
            record.skipped.append((name, reason))
    if not layers:  # nothing to recompute: say so, and run no batch for nothing
        why = f" ({len(record.skipped)} skipped: {record.skipped[0][1]}, ...)" if record.skipped \
            else ""
        warnings.warn(f"precise_bn: {type(model).__name__} has no BatchNorm layer with running "
                      f"statistics to recompute{why}; nothing was changed", stacklevel=2)
        return record
    modes = {m: m.training for m in model.modules()}
    saved = _Buffers(model)
    hooks = [acc.module.register_forward_pre_hook(_collector(acc), with_kwargs=True)
             for acc in layers.values()]
    try:
        if train_others:
            model.train()
        for acc in layers.values():
            acc.module.train()
        with torch.no_grad():
            for batch in itertools.islice(batches, num_batches):
                call(model, _to(batch, device))
                record.batches += 1
                saved.restore()
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            saved.restore()
        for m, training in modes.items():
            m.train(training)
    group = _group(process_group) if layers else None
    if _total(record.batches, group, layers) == 0:
        raise ValueError("precise_bn: batches gave no batch" + (
            "" if group is None else " on any process"))
    with torch.no_grad():
        for name, acc in layers.items():
            if group is not None:
                acc.gather(group)
            if acc.values() < 2:
                record.skipped.append((name, "not reached by the batches" if acc.values() == 0
                                       else "one value per channel: no variance"))
                continue
            mean, var = acc.statistics()
            m = acc.module
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            record.recomputed.append(name)
    return record
