"""Ghost (virtual-batch) BatchNorm: batch statistics per slice of the batch (Hoffer, Hubara &
Soudry, "Train longer, generalize better", NeurIPS 2017).

A training batch of ``B = K * n`` samples is cut into ``K`` slices of ``n = virtual_batch``
samples, each normalized with its own per-channel mean and biased variance over
``(n, *spatial)``. That is what ``K`` processes of DistributedDataParallel with per-process
BatchNorm compute when process ``k`` holds slice ``k`` of the global batch: the GN paper's
"images per GPU" (Wu & He, ECCV 2018; its BN statistics are per GPU of 8), emulated on one
device. Slice ``k`` is samples ``k*n .. k*n + n - 1`` (consecutive, the default), or with
``interleaved=True`` samples ``k, k + K, k + 2K, ...``: how a DistributedSampler deals an
epoch's permutation out to ``K`` ranks, so rank ``k``'s batch is slice ``k`` of the global
batch (the lab's emulated devices use it). Interleaved slices of a contiguous (NCHW) input are
a view of ``x`` as ``(n, K * C, *spatial)``, one BatchNorm call over ``K * C`` channels with
no copy, and the layer costs about what BatchNorm does; consecutive slices (and channels_last
input) are copied into that layout and back.

The running statistics follow slice 0 only, as rank 0 of such a DDP job keeps them: DDP
broadcasts rank 0's buffers to every process before each forward (``broadcast_buffers=True``,
its default), so rank 0's running averages see rank 0's slices and nothing else, and rank 0
writes the checkpoint. ``num_batches_tracked`` counts one per forward, as on every rank.
This differs on purpose from a ghost-batch layer that folds the statistics of every slice of
the step into the running averages.

The affine parameters are shared by every slice; their gradient is the sum over slices, which,
for a loss that is the mean over the whole batch, is what DDP's gradient averaging of the
per-process mean losses gives.

In eval (running statistics) the module is exactly :class:`normlab.nn.BatchNorm2d`; with
``K = 1`` (a batch of ``virtual_batch`` samples) it is exactly BatchNorm in training too.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, fx

from normlab import functional as NLF
from normlab.backends.reference import output_memory_format
from normlab.nn._common import check_bn_input, count_batch, fx_leaf, running_average_factor
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormForward

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_batch_norm"]


def _check_virtual_batch(virtual_batch: Any) -> int:
    if isinstance(virtual_batch, bool) or not isinstance(virtual_batch, int) or virtual_batch < 1:
        raise ValueError(f"virtual_batch must be a positive int, got {virtual_batch!r}")
    return virtual_batch


def ghost_batch_norm(
    x: Tensor,
    virtual_batch: int,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    interleaved: bool = False,
) -> Tensor:
    """Batch norm with training statistics per slice of ``virtual_batch`` samples.

    Args:
        x: ``(K * virtual_batch, C, *spatial)``; the batch must be a multiple of
            ``virtual_batch``.
        virtual_batch: samples per slice (n).
        running_mean, running_var: ``(C,)`` buffers moved by slice 0's statistics (mean and
            unbiased variance), or None.
        weight, bias: ``(C,)`` affine shared by all slices, or None.
        momentum, eps: as in BatchNorm.
        activation: None, "relu", "silu" or "gelu", fused after the affine (as BatchNorm's).
        interleaved: slice ``k`` is samples ``k, k + K, ...`` (False: ``k*n .. k*n + n - 1``).

    Returns:
        y with x's shape, dtype and memory format.

    The K slices are normalized in one call of the operator: ``x`` is viewed as
    ``(n, K * C, *spatial)`` (slice k's channel c becomes channel ``k * C + c``), which is
    BatchNorm over ``K * C`` channels; the running buffers are moved first by BatchNorm's
    update on slice 0 alone (a detached pass over ``1/K`` of the batch). Interleaved slices of
    a contiguous ``x`` are that view as they are; consecutive ones are a transposed copy.
    """
    virtual_batch = _check_virtual_batch(virtual_batch)
    b, c = x.shape[0], x.shape[1]
    if b % virtual_batch:
        raise ValueError(
            f"the batch ({b} samples, input of shape {tuple(x.shape)}) is not a multiple of "
            f"virtual_batch={virtual_batch}; drop the last partial batch (drop_last=True) or "
            "pick a batch size that the virtual batch divides"
        )
    k = b // virtual_batch
    spatial = tuple(x.shape[2:])
    if x.numel() == 0:  # no sample or no position: what BatchNorm does (an empty output)
        return NLF.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps,
                              activation=activation)
    if virtual_batch * math.prod(spatial) <= 1:
        raise ValueError(
            f"virtual_batch={virtual_batch} gives 1 value per channel and slice for input of "
            f"shape {tuple(x.shape)}; batch statistics need more than 1"
        )
    if k == 1:
        return NLF.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps,
                              activation=activation)
    # (K*n, C, *S) -> (n, K*C, *S): slice k's channel c is channel k*C + c; interleaved, x is
    # already in that order (sample i*K + k is slice k's i-th): a view of contiguous x
    xs = (x.reshape((virtual_batch, k * c) + spatial) if interleaved else
          x.reshape((k, virtual_batch, c) + spatial).transpose(0, 1).reshape(
              (virtual_batch, k * c) + spatial))
    if running_mean is not None or running_var is not None:
        # slice 0's statistics move the buffers first, by BatchNorm's own update on slice 0
        # (detached: no graph, and no torch.no_grad() block, which torch.export records as a
        # node that torch.export.load refuses). Before the normalizing call, not copied back
        # after it: non-reentrant torch.utils.checkpoint stops its recompute at the last
        # tensor saved for backward, which a copy-back after that call never reached (the
        # buffers moved once while num_batches_tracked counted twice; torch's BatchNorm, the
        # rank-0 module this layer stands for, moves them on the recompute too)
        slice0 = x[::k] if interleaved else x[:virtual_batch]
        NLF.batch_norm(slice0.detach(), running_mean, running_var, None, None, True, momentum,
                       eps)
    w = None if weight is None else weight.repeat(k)
    bb = None if bias is None else bias.repeat(k)
    ys = NLF.batch_norm(xs, None, None, w, bb, True, momentum, eps, activation=activation)
    if interleaved:
        y = ys.reshape(x.shape)
    else:
        y = ys.reshape((virtual_batch, k, c) + spatial).transpose(0, 1).reshape(x.shape)
    return y.contiguous(memory_format=output_memory_format(x))


class _GhostBatchNorm(_BatchNormForward):
    """forward() and constructor shared by GhostBatchNorm1d/2d/3d (mixed into normlab's
    BatchNorm classes: same parameters, buffers and state_dict keys)."""

    def __init__(
        self,
        num_features: int,
        virtual_batch: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        activation: Optional[str] = None,
        interleaved: bool = False,
    ) -> None:
        virtual_batch = _check_virtual_batch(virtual_batch)  # before any allocation
        if not isinstance(interleaved, bool):
            raise TypeError(f"interleaved must be a bool, got {interleaved!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias, activation=activation)
        self.virtual_batch = virtual_batch
        self.interleaved = interleaved

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input)
        check_bn_input(self, input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            return super().forward(input)
        count_batch(self)
        factor = running_average_factor(self)
        track = self.training and self.track_running_stats
        return ghost_batch_norm(
            input, self.virtual_batch,
            self.running_mean if track else None, self.running_var if track else None,
            self.weight, self.bias, factor, self.eps, self.activation, self.interleaved,
        )

    def extra_repr(self) -> str:
        extra = ", interleaved=True" if self.interleaved else ""
        return f"{super().extra_repr()}, virtual_batch={self.virtual_batch}{extra}"


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    """Ghost BatchNorm over a (N, C) or (N, C, L) input; see :class:`GhostBatchNorm2d`."""


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    r"""BatchNorm with training statistics per slice of ``virtual_batch`` images (ghost batches).

    For a training batch of ``K * n`` images (``n = virtual_batch``), slice ``k`` (images
    ``k*n .. k*n + n - 1``; ``interleaved=True``: images ``k, k + K, k + 2K, ...``, how a
    DistributedSampler deals a global batch out to ``K`` ranks, and on NCHW input a view of it,
    as cheap as one BatchNorm call) is normalized with its own statistics:

    .. math::
        y = \frac{x - \mathrm{E}_k[x]}{\sqrt{\mathrm{Var}_k[x] + \epsilon}} \gamma_c + \beta_c

    with the mean and biased variance over ``(n, H, W)`` of slice ``k``, per channel: exactly
    ``K``-process DDP with per-process BatchNorm, process ``k`` holding slice ``k``. Running
    statistics follow slice 0 (what rank 0 keeps and checkpoints); eval uses them and is
    exactly :class:`BatchNorm2d`. Args as BatchNorm2d (``activation`` included) plus
    ``virtual_batch`` (a positive int; a training batch must be a multiple of it) and
    ``interleaved`` (a bool, default False). Parameters, buffers and state_dict keys are
    BatchNorm2d's, so checkpoints load both ways.

    Shape: input (K * virtual_batch, C, H, W), any memory format; output the same.

    Example::

        >>> import torch
        >>> gbn = GhostBatchNorm2d(16, virtual_batch=4)
        >>> x = torch.randn(32, 16, 8, 8)
        >>> y = gbn(x)                                  # 8 slices of 4 images
        >>> slice_1 = torch.nn.functional.batch_norm(x[4:8], None, None, training=True)
        >>> torch.allclose(y[4:8], slice_1, atol=1e-5)
        True
        >>> gbn.eval()(torch.randn(3, 16, 8, 8)).shape  # eval: running stats, any batch
        torch.Size([3, 16, 8, 8])
    """


class GhostBatchNorm3d(_GhostBatchNorm, BatchNorm3d):
    """Ghost BatchNorm over a (N, C, D, H, W) input; see :class:`GhostBatchNorm2d`."""
