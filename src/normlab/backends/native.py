"""The native backend: the operator mapped onto ATen's fused normalization kernels.

Every case of the operator is one of two ATen ops (both return the statistics, both have
autograd formulas, both keep channels_last):

* not over_batch, G groups  -> ``aten::native_group_norm`` (LN: G = 1, IN: G = C, GN: G); a
  2-D float32/float64 input with G = 1 (LayerNorm over features) ->
  ``aten::native_layer_norm``. Channels_last CPU input does not go to ATen's kernel as it is
  (wrong at an offset, its backward 4-100x slower than NCHW for narrow groups):
  ``native_channels_last`` computes it from per-channel sums of x minus one element per group
  on the (N, positions, C) view, with a closed-form backward, no layout copies - or, for small
  inputs and wide groups (its size rule), runs ATen's kernel on x minus one element per group.
* over_batch, G = C (BN)     -> ``aten::native_batch_norm`` with the running statistics.
* over_batch, 1 <= G < C     -> ``aten::native_batch_norm`` on x viewed as (N, G, C/G * spatial),
  then the per-channel affine (batch-group norm has no ATen kernel of its own).

ATen's CPU kernels take weight, bias and statistics all in x's dtype, or all float32 with half
input; other mixes (float32 buffers of a bf16 model, float64 buffers with float32 input, one
running buffer alone) are converted here or, for running buffers, updated from a pass of their
own, so that native accepts what the reference accepts. Given statistics that require grad go
through the reference formula (ATen does not differentiate them).

Statistics without centering (``center=False``: RMSNorm, FRN) not over the batch go to
``aten::_fused_rms_norm`` on the (N, G, rest) view (float32 statistics for half input, as the
reference), then the per-channel affine; where that op is missing (torch < 2.8) or the
statistics run over the batch, the reference computes them.

The activation is applied after ATen's affine (not fused). Both ATen kernels compute their
statistics in float32 for half-precision input and use a stable (two-pass / Welford) variance;
the tests check that claim on a large-offset input. One exception is left as ATen has it: the
CPU batch-norm kernel on channels_last input sums the mean plainly in float32, so at a large
offset its error grows with the count per channel (relative 1e-3 to 5e-3 on (64, 8, 112, 112)
at an offset of 3 to 30, against 1e-6 for NCHW; torch.nn's BatchNorm2d is the same there).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from normlab.backends.reference import (
    BACKEND as _REFERENCE,
    apply_activation,
    channel_view,
    compute_dtype,
    output_memory_format,
    under_torch_func,
    update_running_stats,
)
from normlab.backends.native_channels_last import group_norm_channels_last


class NativeBackend:
    name = "native"
    supports_uncentered = True  # takes center=False (see normlab.backends.Backend)

    def available(self) -> bool:
        return True

    def unsupported_reason(self, x, num_groups, over_batch, activation):
        return None

    def normalize(
        self,
        x: Tensor,  # (N, C, *spatial)
        num_groups: int,
        over_batch: bool,
        weight: Optional[Tensor],  # (C,)
        bias: Optional[Tensor],  # (C,)
        eps: float,
        activation: Optional[str],
        running_mean: Optional[Tensor] = None,  # (G,)
        running_var: Optional[Tensor] = None,  # (G,)
        momentum: float = 0.1,
        *,
        center: bool = True,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        if not center:
            return _uncentered(x, num_groups, over_batch, weight, bias, eps, activation,
                               running_mean, running_var, momentum)
        weight, bias, pdt, aten_running = _params(x, weight, bias, running_mean, running_var)
        if not over_batch:
            return _per_sample(x, num_groups, weight, bias, eps, activation, running_mean,
                               running_var, momentum, pdt)
        if num_groups == x.shape[1]:
            return _batch(x, weight, bias, eps, activation, running_mean, running_var, momentum,
                          aten_running)
        return _batch_group(x, num_groups, weight, bias, eps, activation, running_mean,
                            running_var, momentum, aten_running)

    def normalize_fixed(
        self,
        x: Tensor,  # (N, C, *spatial)
        mean: Tensor,  # (C,)
        var: Tensor,  # (C,)
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        eps: float,
        activation: Optional[str],
    ) -> Tensor:
        if (mean.requires_grad or var.requires_grad) and torch.is_grad_enabled():
            # ATen's batch norm does not differentiate through given statistics; the written-out
            # formula does
            return _REFERENCE.normalize_fixed(x, mean, var, weight, bias, eps, activation)
        xdt = x.dtype
        if not (
            mean.dtype is xdt
            and var.dtype is xdt
            and (weight is None or weight.dtype is xdt)
            and (bias is None or bias.dtype is xdt)
        ):
            pdt = _param_dtype(x, weight, bias, mean, var)
            weight, bias = _cast(weight, pdt), _cast(bias, pdt)
            mean, var = _cast(mean, pdt), _cast(var, pdt)
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        return apply_activation(y, activation)


_HALF = (torch.float16, torch.bfloat16)
# torch >= 2.8; through torch.ops (torch._fused_rms_norm is 3 us faster, but dynamo cannot
# trace that binding)
_FUSED_RMS = getattr(torch.ops.aten, "_fused_rms_norm", None)


def _uncentered(x, num_groups, over_batch, weight, bias, eps, activation, running_mean,
                running_var, momentum):
    """``center=False``: y = act(gamma_c * x / sqrt(mean_S(x^2) + eps) + beta_c) (see the
    module docstring for which op computes it)."""
    n, g = x.shape[0], num_groups
    width = x.shape[1] // g * math.prod(x.shape[2:])  # the elements of one statistic
    if (over_batch or _FUSED_RMS is None or running_mean is not None or running_var is not None
            or type(width) is not int or (x.dim() > 2 and torch.compiler.is_compiling())):
        # (a symbolic width - torch.export or torch.compile with dynamic spatial sizes - would
        # be specialized by the op's int[] normalized_shape: the export fails, compile recompiles.
        # TorchDynamo shows a SymInt to type() as an int, so under torch.compile and strict
        # export a width over spatial dims, which may be symbolic, takes the reference's ops,
        # which Inductor fuses: FRN recompiled for every new H*W, strict export failed)
        return _REFERENCE.normalize(x, num_groups, over_batch, weight, bias, eps, activation,
                                    running_mean, running_var, momentum, center=False)
    if (g == 1 and x.dim() == 2 and bias is None and activation is None
            and x.dtype not in _HALF and (weight is None or weight.dtype is x.dtype)):
        # RMSNorm over the features of (rows, C): the weight is the op's elementwise one, applied
        # in the same pass (a separate multiply made a (256, 512) forward 1.7x torch's)
        y, rstd = _FUSED_RMS(x, [width], weight, eps)  # rstd: (rows, 1), x's dtype
        return y, torch.zeros_like(rstd), rstd
    fmt = output_memory_format(x)
    xg = x.reshape(n, g, width)
    plain = weight is None and bias is None and activation is None
    # with an affine or activation after it, half input is normalized in float32 and rounded once
    yg, rstd = _FUSED_RMS(xg if plain else xg.to(compute_dtype(x.dtype)), [width], None, eps)
    y = yg.reshape(x.shape)
    if not plain:
        if weight is not None:
            y = y * channel_view(weight.to(y.dtype), x.dim())
        if bias is not None:
            y = y + channel_view(bias.to(y.dtype), x.dim())
        y = apply_activation(y, activation).to(x.dtype)
    rstd = rstd.reshape(n, g).to(compute_dtype(x.dtype))
    return y.contiguous(memory_format=fmt), torch.zeros_like(rstd), rstd


def _param_dtype(x: Tensor, *params: Optional[Tensor]) -> torch.dtype:
    """The one dtype ATen's CPU normalization kernels take for all of weight, bias and the
    statistics: x's dtype, or float32 for half input (their mixed mode) as soon as one of them
    is not in x's dtype (float32 parameters with bf16 input under autocast, float32 running
    buffers of a bf16 model). float64 parameters with float32 input are used in float32, as
    the reference computes float32 input."""
    xdt = x.dtype
    for p in params:
        if p is not None and p.dtype != xdt:
            return torch.float32 if xdt in _HALF else xdt
    return xdt


def _cast(p: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return p if p is None or p.dtype == dtype else p.to(dtype)


def _update_from_pass(
    xg: Tensor,  # x viewed with the statistics' sets along `dims`
    dims: Tuple[int, ...],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
) -> None:
    """Running statistics from a var_mean pass over x (ATen's kernels did not update them);
    outside autograd through the detached x (no ``torch.no_grad()`` block: see
    ``update_running_stats``)."""
    xg = xg.detach().to(compute_dtype(xg.dtype))
    # the mean as a plain sum (var_mean's gives NaN where a set holds an inf; torch's running
    # mean is inf there), the variance two-pass
    mu = xg.mean(dim=dims)
    var = torch.var(xg, dim=dims, correction=0)
    count = 1
    for d in dims:  # (a loop: dynamo's fullgraph does not take a generator here)
        count *= xg.shape[d]
    update_running_stats(running_mean, running_var, mu, var, count, momentum)


def _params(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            running_mean: Optional[Tensor], running_var: Optional[Tensor]
            ) -> Tuple[Optional[Tensor], Optional[Tensor], torch.dtype, bool]:
    """``(weight, bias, pdt, aten_running)``: the affine in the dtype ATen takes with ``x``
    (``pdt``), and whether ATen updates the running buffers itself. It does only when both are
    there in that dtype (torch.batch_norm's rule); otherwise they are updated from a var_mean
    pass (one buffer alone, float64 buffers with float32 input, half buffers with float32
    params)."""
    xdt = x.dtype
    if (
        (weight is None or weight.dtype is xdt)
        and (bias is None or bias.dtype is xdt)
        and (running_mean is None or running_mean.dtype is xdt)
        and (running_var is None or running_var.dtype is xdt)
    ):  # the usual case: everything in x's dtype, nothing to convert
        return weight, bias, xdt, running_mean is not None and running_var is not None
    pdt = _param_dtype(x, weight, bias, running_mean, running_var)
    aten_running = (running_mean is not None and running_var is not None
                    and running_mean.dtype == pdt and running_var.dtype == pdt)
    return _cast(weight, pdt), _cast(bias, pdt), pdt, aten_running


def _per_sample(x: Tensor, g: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                activation: Optional[str], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], momentum: float, pdt: torch.dtype
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """LN, IN, GN (statistics per sample and group): ATen's layer-norm or group-norm kernels,
    or :func:`group_norm_channels_last` for channels_last on the CPU."""
    n, c = x.shape[0], x.shape[1]
    running = running_mean is not None or running_var is not None
    if g == 1 and x.dim() == 2 and not running and x.dtype not in _HALF:
        # LayerNorm over the features of a 2-D input: ATen's own layer-norm kernel (not for
        # half input: its weight and bias gradients are accumulated in half, 5-15x less
        # accurate than the group-norm kernel's)
        y, mean, rstd = torch.native_layer_norm(x, [c], weight, bias, eps)
        return apply_activation(y, activation), mean, rstd
    # ATen's group-norm kernel reads weight and bias as dense vectors (F.group_norm makes
    # them contiguous first): a strided or expanded one read the wrong elements
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if weight is None and bias is not None:
        # ATen's group-norm backward fails for a bias without weight ("tensor does not
        # have a device", torch's F.group_norm too): a unit weight, no gradient
        weight = torch.ones_like(bias)
    hxw = math.prod(x.shape[2:])
    if c // g * hxw == 1:
        # one value per group: ATen's kernel returns garbage at large values (1e6: errors
        # of 100); the reference's shifted sums give the exact answer, y = beta
        return _REFERENCE.normalize(x, g, False, weight, bias, eps, activation,
                                    running_mean, running_var, momentum)
    fmt = output_memory_format(x)
    if fmt != torch.contiguous_format and under_torch_func(x):
        # under torch.func (jvp, grad) on NCHW data: ATen's forward-AD formula for a
        # channels_last group norm fails on a view ("view size is not compatible"),
        # torch.nn's GroupNorm too (inside vmap, fmt is already contiguous)
        y, mean, rstd = torch.native_group_norm(x.contiguous(), weight, bias, n, c, hxw, g, eps)
        y = y.contiguous(memory_format=fmt)
    elif fmt != torch.contiguous_format and x.is_cpu:
        # ATen's CPU channels_last group-norm kernel is inaccurate at an offset and
        # slow (its backward 4-100x its NCHW one); see native_channels_last
        y, mean, rstd = group_norm_channels_last(x, weight, bias, g, eps, pdt)
    else:  # ATen GN needs a dense layout (NCHW or channels_last)
        xk = x if x.is_contiguous() else x.contiguous(memory_format=fmt)
        y, mean, rstd = torch.native_group_norm(xk, weight, bias, n, c, hxw, g, eps)
    if running:
        _update_from_pass(x.reshape(n, g, -1), (2,), running_mean, running_var, momentum)
    return apply_activation(y, activation), mean, rstd


def _batch(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
           activation: Optional[str], running_mean: Optional[Tensor],
           running_var: Optional[Tensor], momentum: float, aten_running: bool
           ) -> Tuple[Tensor, Tensor, Tensor]:
    """BN (statistics per channel over the batch): ATen's batch-norm kernel."""
    y, mean, rstd = torch.native_batch_norm(
        x, weight, bias, *((running_mean, running_var) if aten_running else (None, None)),
        True, momentum, eps,
    )
    if (running_mean is not None or running_var is not None) and not aten_running:
        _update_from_pass(x.transpose(0, 1).reshape(x.shape[1], -1), (1,), running_mean,
                          running_var, momentum)
    return apply_activation(y, activation), mean, rstd


def _batch_group(x: Tensor, g: int, weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float, activation: Optional[str], running_mean: Optional[Tensor],
                 running_var: Optional[Tensor], momentum: float, aten_running: bool
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch-group norm: BN over the groups of a (N, G, rest) view, then the channel affine."""
    fmt = output_memory_format(x)
    xg = x.reshape(x.shape[0], g, -1)
    # unit affine in float32 so that half inputs get float32 statistics (ATen's mixed mode);
    # running buffers in another dtype are updated from a pass of their own
    acc = compute_dtype(x.dtype)
    aten_running = aten_running and running_mean.dtype == acc
    if xg.dtype != acc and not (weight is None and bias is None and activation is None):
        # with an affine or activation after it, half input is normalized in float32 and
        # rounded once (as _uncentered): ATen's half yg, then the affine, rounded twice (up
        # to 35 units in the last place where the bias cancels; torch's BN: half of one)
        xg = xg.to(acc)
    one = torch.ones(g, device=x.device, dtype=acc)
    yg, mean, rstd = torch.native_batch_norm(
        xg, one, torch.zeros_like(one),
        *((running_mean, running_var) if aten_running else (None, None)),
        True, momentum, eps,
    )
    if (running_mean is not None or running_var is not None) and not aten_running:
        _update_from_pass(xg, (0, 2), running_mean, running_var, momentum)
    y = yg.reshape(x.shape)
    if weight is not None or bias is not None or activation is not None:
        y = y.to(compute_dtype(x.dtype))
        if weight is not None:
            y = y * channel_view(weight.to(y.dtype), x.dim())
        if bias is not None:
            y = y + channel_view(bias.to(y.dtype), x.dim())
        y = apply_activation(y, activation).to(x.dtype)
    return y.contiguous(memory_format=fmt), mean, rstd


BACKEND = NativeBackend()
