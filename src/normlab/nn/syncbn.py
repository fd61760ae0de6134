"""SyncBatchNorm: BatchNorm (Ioffe & Szegedy, ICML 2015) with statistics over every process.

The GN paper (Wu & He, ECCV 2018) measures BN with statistics per device ("images per GPU"),
which is why BN degrades at small per-device batches; synchronized BN, which takes the batch
statistics over the whole process group, is the usual remedy. This module does that on any
device and any torch.distributed backend (gloo on CPU, nccl on CUDA); torch's own
``nn.SyncBatchNorm`` accepts GPU input only.

In training, with an initialized process group of more than one process, each process computes
per channel, over its local ``(N_r, *spatial)`` elements (``n_r`` of them):

    count n_r,    mean m_r,    M2_r = sum (x - m_r)^2           (two-pass, never E[x^2] - E[x]^2)

The ``(n_r, m_r, M2_r)`` of all ranks are all-gathered (float64, ``2C + 1`` numbers per rank) and
combined with the parallel-variance formula of Chan, Golub & LeVeque (1979)::

    n   = sum_r n_r
    mu  = sum_r n_r m_r / n
    M2  = sum_r M2_r + sum_r n_r (m_r - mu)^2
    var = M2 / n          (biased: normalizes)       M2 / (n - 1)   (unbiased: running_var)

which is exact for unequal per-rank batches (a rank may even hold no samples). ``x`` is then
normalized with ``(mu, var)`` by :func:`normlab.functional.normalize_fixed` (the selected
backend). The backward needs two more per-channel sums over all ranks, so it all-reduces
``(sum dy, sum dy * x_hat)`` and computes, with ``n`` the global count,

    dx = gamma * rstd * (dy - sum(dy)/n - x_hat * sum(dy * x_hat)/n)
    dgamma = sum_local(dy * x_hat),   dbeta = sum_local(dy)

(the parameter gradients stay local; DDP averages them across processes as for any parameter).

Without a process group, with a group of one process, or in eval mode there is no communication
and the module is exactly :class:`normlab.nn.BatchNorm2d` (for 2-5D input).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, fx, nn

from normlab import functional as NLF
from normlab.backends.reference import apply_activation, compute_dtype, output_memory_format
from normlab.nn._common import (
    channel_view, check_bn_input, check_count, count_batch, fx_leaf, replace_modules,
    running_average_factor, update_running_stats)
from normlab.nn.batchnorm import _BatchNormForward
from normlab.nn.frozen_bn import FrozenBatchNorm2d

__all__ = ["SyncBatchNorm", "sync_batch_norm", "global_batch_stats"]


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def global_batch_stats(x: Tensor, group: Any = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance and element count of ``x`` over all ranks of ``group``.

    Args:
        x: this rank's ``(N_r, C, *spatial)`` part of the global batch (``N_r`` may be 0).
        group: the process group (None: the default group).

    Returns:
        ``(mean, var, count)``: float64 tensors of shape ``(C,)``, ``(C,)`` and ``()``, identical
        on every rank. Combined with Chan's parallel formula (module docstring): exact for any
        split of the batch.
    """
    c = x.shape[1]
    n_local = x.numel() // c if c else 0
    acc = compute_dtype(x.dtype)
    xd = x.detach()
    if n_local > 0 and xd.is_cpu:
        # two passes, as the module docstring writes them, summed in float64: the mean, then the
        # squared deviations from it. torch.var_mean's CPU kernel took 4-6x as long at one
        # thread (9 ms against 2.6 ms on (8, 256, 28, 28)) and is less accurate than this
        xa = xd.to(acc)
        dims = _reduce_dims(xd)
        mean_l = xa.sum(dim=dims, dtype=torch.float64) / n_local
        m2_l = (xa - channel_view(mean_l.to(acc), xa.dim())).square_().sum(
            dim=dims, dtype=torch.float64)
    elif n_local > 0:  # other devices keep var_mean (one pass; not measured there)
        var_l, mean_l = torch.var_mean(xd.to(acc), dim=_reduce_dims(xd), correction=0)
        m2_l = var_l.to(torch.float64) * n_local
        mean_l = mean_l.to(torch.float64)
    else:  # this rank holds no samples: it contributes nothing, but must join the collective
        mean_l = m2_l = torch.zeros(c, dtype=torch.float64, device=x.device)
    packed = torch.cat([torch.tensor([float(n_local)], dtype=torch.float64, device=x.device),
                        mean_l, m2_l])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    g = torch.stack(gathered)  # (W, 1 + 2C)
    counts, means, m2s = g[:, :1], g[:, 1 : 1 + c], g[:, 1 + c :]
    n = counts.sum()
    if n <= 0:
        return torch.zeros(c, dtype=torch.float64, device=x.device), torch.zeros(
            c, dtype=torch.float64, device=x.device), n
    mean = (counts * means).sum(0) / n
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2 / n, n


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = normalize_fixed(x, global mean, global biased var, weight, bias); backward as in the
    module docstring (one all-reduce of 2C numbers)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        mean64, var64, n64 = global_batch_stats(x, group)
        n = float(n64)
        if n <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training (synchronized batch "
                f"statistics), got {n:g} value(s) per channel over all {dist.get_world_size(group)} "
                f"processes (this process: input of shape {tuple(x.shape)})"
            )
        acc = compute_dtype(x.dtype)
        mean, var = mean64.to(acc), var64.to(acc)
        update_running_stats(running_mean, running_var, mean64, var64, n, momentum)
        # statistics and affine in the accumulation dtype (float32 for half input): ATen's mixed
        # precision batch norm takes float32 parameters with half input
        y = NLF.normalize_fixed(x, mean, var, None if weight is None else weight.to(acc),
                               None if bias is None else bias.to(acc), eps)
        rstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.count = n
        ctx.bias_dtype = bias.dtype if bias is not None else x.dtype
        ctx.group = group
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        acc = mean.dtype
        nd = x.dim()
        dims = _reduce_dims(x)
        xhat = (x.to(acc) - channel_view(mean, nd)) * channel_view(rstd, nd)
        dya = dy.to(acc)
        sum_dy = dya.sum(dims)
        sum_dy_xhat = (dya * xhat).sum(dims)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy, sum_dy_xhat]).to(torch.float64)
            dist.all_reduce(both, group=ctx.group)
            c = x.shape[1]
            mean_dy = (both[:c] / ctx.count).to(acc)
            mean_dy_xhat = (both[c:] / ctx.count).to(acc)
            scale = rstd if weight is None else rstd * weight.to(acc)
            grad_x = (dya - channel_view(mean_dy, nd) - xhat * channel_view(mean_dy_xhat, nd)) * (
                channel_view(scale, nd)
            )
            grad_x = grad_x.to(x.dtype).contiguous(memory_format=output_memory_format(x))
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = sum_dy_xhat.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def sync_batch_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    eps: float = 1e-5,
    momentum: float = 0.1,
    group: Any = None,
) -> Tensor:
    """Batch norm in training with statistics over all processes of ``group`` (always communicates).

    Args:
        x: this rank's ``(N_r, C, *spatial)`` input, 2-5 dims; ``N_r`` may differ across ranks.
        weight, bias: ``(C,)`` or None.
        running_mean, running_var: ``(C,)`` buffers updated in place (global mean, global unbiased
            variance) or None.
        eps, momentum: as in BatchNorm.
        group: the process group (None: the default group). Every rank of the group must call
            this (and the backward) in the same order.

    Returns:
        y with x's shape, dtype and memory format.
    """
    NLF.check_input(x)
    if x.dim() > 5:
        raise ValueError(f"input must have 2 to 5 dims, got shape {tuple(x.shape)}")
    eps = NLF.check_eps(eps)
    return _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, eps,
                                        float(momentum), group)


class SyncBatchNorm(_BatchNormForward, nn.modules.batchnorm._BatchNorm):
    r"""BatchNorm whose training statistics run over all processes, on CPU (gloo) or CUDA (nccl).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma_c + \beta_c

    with E and the biased Var per channel over (N, *spatial) of the *global* batch (all processes
    of ``process_group``, default the whole job) in training; the running statistics in eval (no
    communication; with ``track_running_stats=False``, this process's own batch, as torch's).

    Without an initialized process group (a plain single-process script), or with a group of one
    process, it is exactly :class:`normlab.nn.BatchNorm2d` (any 2-5D input): the same model runs
    with and without torchrun. Every process of the group must run each training forward (and
    backward) of the module in the same order, as for any collective; a process may bring an
    empty batch (it joins the collectives), but all of them together need more than one value
    per channel.

    A drop-in for ``torch.nn.SyncBatchNorm``: the same constructor (``num_features``, ``eps``,
    ``momentum``, ``affine``, ``track_running_stats``, ``process_group``, ``device``, ``dtype``,
    keyword ``bias``),
    the parameters and buffers of BatchNorm (so BN state_dicts load with ``strict=True`` both
    ways) and ``convert_sync_batchnorm``. It is deliberately *not* a subclass of
    ``torch.nn.SyncBatchNorm``: DDP refuses every CPU model holding an instance of that class
    ("SyncBatchNorm layers only work with GPU modules"), and synchronizing BN on CPU/gloo is
    what this class is for. ``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)`` holds, and
    code that finds BN state by buffer name (timm's ``distribute_bn``) sees it.

    Shape: input ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``, any memory
    format; output the same. N may differ between processes.

    Example::

        >>> import torch, normlab
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64))
        >>> model = normlab.convert_norm(model, "syncbn")     # or create_norm("syncbn", 64)
        >>> model = normlab.distributed.wrap_ddp(model, "cpu")  # DDP when torch.distributed is set up
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        activation: Optional[str] = None,
    ) -> None:
        num_features = check_count(num_features, "num_features")
        NLF.check_eps(eps)
        if momentum is not None and (  # numbers.Real: numpy scalars (a config's np.float32) too
            isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)
            or not 0.0 <= momentum <= 1.0
        ):
            raise ValueError(f"momentum must be None or a number in [0, 1], got {momentum!r}")
        _check_membership(process_group)
        if process_group is not None and not (
            dist.is_available() and isinstance(process_group, dist.ProcessGroup)
        ):
            raise TypeError(
                "process_group must be None or a torch.distributed.ProcessGroup, got "
                f"{type(process_group).__name__}"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias, activation=activation)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if not 2 <= input.dim() <= 5:
            raise ValueError(
                f"SyncBatchNorm expects 2D to 5D input (N, C, *spatial), got shape "
                f"{tuple(input.shape)} ({input.dim()}D)"
            )

    def _sync_group(self) -> Tuple[Any, int]:
        """(group, size) to synchronize over in this forward; size 1 means no communication."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None, 1
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group, dist.get_world_size(group)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input)
        check_bn_input(self, input)
        group, world = self._sync_group()
        if world <= 1:  # no process group, a group of one, or eval: plain BatchNorm
            return super().forward(input)
        count_batch(self)
        factor = running_average_factor(self)
        track = self.track_running_stats
        y = sync_batch_norm(
            input, self.weight, self.bias,
            self.running_mean if track else None, self.running_var if track else None,
            self.eps, factor, group,
        )
        return apply_activation(y, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            ", process_group=<custom>" if self.process_group is not None else ""
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every BatchNorm in ``module`` (torch's or normlab's, FrozenBatchNorm2d
        included) by this class, as torch's classmethod: the same Parameter and buffer objects
        (see :func:`normlab.nn._common.adopt_state`), eps, momentum, affine, bias and
        track_running_stats carried over, and a ``qconfig`` as torch's classmethod carries it.
        A fused activation (normlab's ``activation``, timm's BatchNormAct2d ``act``) stays, as
        convert_norm keeps it (torch's classmethod drops timm's).
        :func:`normlab.convert_norm` with ``"syncbn"`` makes the same replacement (the
        ``qconfig`` left behind) and reports what it replaced. timm's SplitBatchNorm2d layers
        are left as they are, aux BNs included, with a warning naming them (as convert_norm
        leaves them; torch's and timm's functions make each one SyncBatchNorm that normalizes
        the whole batch, its aux BNs kept but never called)."""
        # (convert imports this module)
        from normlab.convert import _build, _warn_user_hooks, split_batchnorms, warn_split_left

        split, split_names = split_batchnorms(module)
        module, replaced = replace_modules(
            module,
            lambda m: _is_batchnorm(m) and type(m) is not cls and id(m) not in split,
            lambda m, name: _keep_qconfig(
                m, _build(m, cls, {"process_group": process_group}, name)),
        )
        _warn_user_hooks(replaced, "convert_sync_batchnorm")
        warn_split_left(split_names, "convert_sync_batchnorm")
        return module


def _keep_qconfig(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` with ``old``'s quantization config, if it has one (torch's
    ``convert_sync_batchnorm`` carries it over, so eager-mode QAT prepares the new module)."""
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def _check_membership(process_group: Any) -> None:
    """``new_group(ranks)`` returns, on a process outside ``ranks``, torch's placeholder
    ``GroupMember.NON_GROUP_MEMBER`` (an int) instead of a group. torch's SyncBatchNorm then
    silently normalizes per process; here it is a ValueError that says so."""
    if (type(process_group) is int and dist.is_available() and dist.is_initialized()
            and process_group == dist.GroupMember.NON_GROUP_MEMBER):
        raise ValueError(
            f"this process (rank {dist.get_rank()}) is not a member of process_group (got "
            f"{process_group!r}, torch.distributed.GroupMember.NON_GROUP_MEMBER, what new_group "
            "returns to a process outside its ranks); give each process a group it belongs to")


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))
