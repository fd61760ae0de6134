"""Group statistics (GN, IN, LayerNorm over C) of channels_last CPU input, without layout copies.

Why not ATen's kernel: its CPU channels_last group norm sums x and x^2 in one pass, so at an
offset (x = 1000 + randn) the variance cancels away (y off by ~1); fed x minus one element per
group it is accurate, but its backward is 4-100x slower than its NCHW backward (0.4-44 ms where
NCHW takes 0.1-0.5 ms on (8,64,32,32) .. (2,128,64,64), one thread), its forward below 1024
positions per channel is 10-50x slower than NCHW for small groups, and copying to NCHW and back
costs more than the kernel (a channels_last <-> NCHW copy of 1-4 MB takes 0.3-3 ms; the NCHW
kernel is also less accurate at an offset). Measurements: benchmarks/NOTES.md.

What is done instead, on the (N, HW, C) view of channels_last memory (a view, no copy), where a
sum over positions is a reduction along the outer dimension, vectorized over C:

* forward: ``xs = x - shift`` (shift: the first element of each group, detached); per-channel
  sums of xs and xs^2 in the accumulation dtype (float32 for half input), folded into the
  groups; ``var = E[xs^2] - E[xs]^2``: one-pass, as ATen's kernel, but on shifted data, whose
  mean is a few standard deviations at most unless the group's first element is an outlier, so
  few bits cancel; then ``y = xs * (rstd * gamma) + (beta - mean_s * rstd * gamma)`` in one
  pass, and mean = mean_s + shift.
* backward, closed form over a group of M elements, with a = sum(gamma * dy * xs) and
  b = sum(gamma * dy) from per-channel sums: ``dx = rstd * gamma * dy + c2 * xs + c3``,
  ``c2 = (b * mean_s - a) * rstd^3 / M``, ``c3 = -c2 * mean_s - b * rstd / M`` (ATen's formula,
  on xs instead of x: no cancellation at an offset); dgamma = sum((ds - db * mean_s) * rstd),
  dbeta = sum(db) over the batch. xs is recomputed from x (x is what is saved: one activation
  kept, as ATen keeps its input).
* forward-only calls (no input requires grad) with >= 1024 positions per channel go to ATen's
  forward on the shifted input: there its channels_last forward is vectorized over C and
  faster than these sums.
* a backward that is itself recorded (create_graph=True, a gradient penalty) recomputes the
  forward through ATen's differentiable ops on shifted input and differentiates that, so
  higher derivatives are exact, only slower.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from normlab.backends.reference import compute_dtype, output_memory_format


def group_norm_channels_last(
    x: Tensor,  # (N, C, *spatial), channels_last or channels_last_3d
    weight: Optional[Tensor],  # (C,) in the statistics' dtype
    bias: Optional[Tensor],  # (C,)
    num_groups: int,
    eps: float,
    stats_dtype: torch.dtype,  # the dtype ATen would give mean and rstd (weight's, or x's)
) -> Tuple[Tensor, Tensor, Tensor]:
    """(y channels_last, mean (N, G), rstd (N, G)), differentiable in x, weight and bias."""
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if not grad and x[0, 0].numel() >= ATEN_VECTORIZED_POSITIONS:
        return shifted_aten_group_norm(x, weight, bias, num_groups, eps)
    return _ChannelsLastGroupNorm.apply(x, weight, bias, num_groups, eps, stats_dtype)


# From this many positions per channel on, ATen's channels_last forward runs its algorithm
# vectorized over C (aten/src/ATen/native/cpu/group_norm_kernel.cpp, feature_map_threshold),
# 1.7-2x faster than the sums here (forward only); below it, 10-50x slower for small groups.
ATEN_VECTORIZED_POSITIONS = 1024


def shifted_aten_group_norm(x, weight, bias, num_groups: int, eps: float):
    """ATen's group norm on x minus one element of each group (accurate, differentiable to any
    order, slow backward in channels_last): the forward-only path at many positions, and what
    a recorded backward differentiates."""
    n, c = x.shape[0], x.shape[1]
    shift = group_shift(x, num_groups)
    xk = x - _repeat(shift.to(x.dtype), c // num_groups).reshape((n, c) + (1,) * (x.dim() - 2))
    y, mean, rstd = torch.native_group_norm(xk, weight, bias, n, c, x[0, 0].numel(), num_groups,
                                            eps)
    return y, mean + shift.to(mean.dtype), rstd


def group_shift(x: Tensor, num_groups: int) -> Tensor:
    """(N, G): the first element of each group of x (0 where it is not finite), detached."""
    first = x.detach()[(slice(None), slice(None)) + (0,) * (x.dim() - 2)]  # (N, C)
    return torch.nan_to_num(first[:, :: x.shape[1] // num_groups], nan=0.0, posinf=0.0,
                            neginf=0.0)


def _repeat(t: Tensor, cpg: int) -> Tensor:
    """(..., G) -> (..., C): each group's value repeated over its cpg channels."""
    if cpg == 1:
        return t
    return t.unsqueeze(-1).expand(t.shape + (cpg,)).reshape(t.shape[:-1] + (-1,))


def _fold(t: Tensor, g: int) -> Tensor:
    """(..., C) per-channel sums -> (..., G) per-group sums."""
    return t.reshape(t.shape[:-1] + (g, -1)).sum(-1)


def _rows(t: Tensor) -> Tensor:
    """(N, C, *spatial) channels_last -> its (N, positions, C) view."""
    return t.movedim(1, -1).reshape(t.shape[0], -1, t.shape[1])


def _from_rows(rows: Tensor, like: Tensor) -> Tensor:
    """(N, positions, C) -> (N, C, *spatial) in channels_last layout (a view)."""
    return rows.reshape((like.shape[0],) + like.shape[2:] + (like.shape[1],)).movedim(-1, 1)


def _shifted_rows(x: Tensor, shift_c: Tensor) -> Tensor:
    """(N, P, C) rows of x minus each channel's group shift (N, C), in shift_c's dtype (half
    input is converted first, then shifted in place: exact where x is near the shift)."""
    rows = _rows(x)
    if rows.dtype == shift_c.dtype:
        return rows - shift_c.unsqueeze(1)
    return rows.to(shift_c.dtype).sub_(shift_c.unsqueeze(1))


class _ChannelsLastGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, g, eps, stats_dtype):
        c = x.shape[1]
        acc = compute_dtype(x.dtype)
        shift = group_shift(x, g).to(acc)
        shift_c = _repeat(shift, c // g)
        xs = _shifted_rows(x, shift_c)  # (N, P, C)
        count = xs.shape[1] * (c // g)
        # E[xs], E[xs^2] per group: (2, N, G)
        moments = _fold(torch.stack((xs.sum(1), (xs * xs).sum(1))), g) / count
        mean_s = moments[0]
        rstd = (moments[1] - mean_s * mean_s).clamp_min_(0).add_(eps).rsqrt_()
        mean_c, rstd_c = _repeat(torch.stack((mean_s, rstd)), c // g)  # (N, C) each
        scale = rstd_c if weight is None else rstd_c * weight.to(acc)
        offset = -mean_c * scale if bias is None else torch.addcmul(bias.to(acc), mean_c, scale,
                                                                      value=-1)
        y = torch.addcmul(offset.unsqueeze(1), xs, scale.unsqueeze(1)).to(x.dtype)
        ctx.save_for_backward(x, weight, bias, shift_c, mean_s, rstd)
        ctx.g, ctx.eps = g, eps
        mean = (mean_s + shift).to(stats_dtype)
        rstd_out = rstd.to(stats_dtype)
        ctx.mark_non_differentiable(mean, rstd_out)
        return _from_rows(y, x), mean, rstd_out

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, shift_c, mean_s, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate a recorded recomputation
            return _recorded_backward(ctx, x, weight, bias, dy) + (None, None, None)
        g, c = ctx.g, x.shape[1]
        cpg = c // g
        xs = _shifted_rows(x, shift_c)
        dyr = _rows(dy.contiguous(memory_format=output_memory_format(x)))
        if dyr.dtype != xs.dtype:  # half dy: converted once (mixed-dtype ops take a slow loop)
            dyr = dyr.to(xs.dtype)
        count = xs.shape[1] * cpg
        db = dyr.sum(1)  # (N, C)
        ds = (dyr * xs).sum(1)  # (N, C): sum of dy * (x - shift)
        gamma = None if weight is None else weight.to(xs.dtype)
        sums = torch.stack((ds, db)) if gamma is None else torch.stack((ds, db)) * gamma
        a, b = _fold(sums, g)  # (N, G): sums of gamma * dy * xs and gamma * dy over the group
        c2 = (b * mean_s - a) * (rstd * rstd * rstd) / count
        c3 = -c2 * mean_s - b * rstd / count
        mean_c, rstd_c, c2, c3 = _repeat(torch.stack((mean_s, rstd, c2, c3)), cpg)  # (N, C)
        dx = dw = dbias = None
        if ctx.needs_input_grad[0]:
            k1 = rstd_c if gamma is None else rstd_c * gamma
            dx = torch.addcmul(c3.unsqueeze(1), xs, c2.unsqueeze(1)).addcmul_(dyr, k1.unsqueeze(1))
            dx = _from_rows(dx.to(x.dtype), x)
        if ctx.needs_input_grad[1]:
            dw = ((ds - db * mean_c) * rstd_c).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            dbias = db.sum(0).to(bias.dtype)
        return dx, dw, dbias, None, None, None


def _recorded_backward(ctx, x, weight, bias, dy):
    inputs = [t for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3]) if need]
    y = shifted_aten_group_norm(x, weight, bias, ctx.g, ctx.eps)[0]
    grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:3])
