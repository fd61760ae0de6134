"""The native backend: the operator mapped onto ATen's fused normalization kernels.

Every case of the operator is one of two ATen ops (both return the statistics, both have
autograd formulas, both keep channels_last):

* not over_batch, G groups  -> ``aten::native_group_norm`` (LN: G = 1, IN: G = C, GN: G);
  a 2-D input with G = 1 (LayerNorm over features) -> ``aten::native_layer_norm``.
* over_batch, G = C (BN)     -> ``aten::native_batch_norm`` with the running statistics.
* over_batch, 1 <= G < C     -> ``aten::native_batch_norm`` on x viewed as (N, G, C/G * spatial),
  then the per-channel affine (batch-group norm has no ATen kernel of its own).

The activation is applied after ATen's affine (not fused). Both ATen kernels compute their
statistics in float32 for half-precision input and use a stable (two-pass / Welford) variance;
the tests check that claim on a large-offset input.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from normlab.backends.reference import (
    _channel_view,
    apply_activation,
    compute_dtype,
    output_memory_format,
    update_running_stats,
)


class NativeBackend:
    name = "native"

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
    ) -> Tuple[Tensor, Tensor, Tensor]:
        n, c = x.shape[0], x.shape[1]
        g = num_groups
        weight, bias = _match_param_dtype(x, weight), _match_param_dtype(x, bias)
        if not over_batch and g == 1 and x.dim() == 2 and running_mean is None:
            # LayerNorm over the features of a 2-D input: ATen's own layer-norm kernel
            y, mean, rstd = torch.native_layer_norm(x, [c], weight, bias, eps)
            return apply_activation(y, activation), mean, rstd
        if not over_batch:
            hxw = math.prod(x.shape[2:])
            if not x.is_contiguous():  # ATen GN needs a dense layout (NCHW or channels_last)
                x = x.contiguous(memory_format=output_memory_format(x))
            y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hxw, g, eps)
            if running_mean is not None or running_var is not None:
                with torch.no_grad():
                    var, mu = torch.var_mean(
                        x.detach().to(compute_dtype(x.dtype)).reshape(n, g, -1), dim=2, correction=0
                    )
                update_running_stats(running_mean, running_var, mu, var, hxw * c // g, momentum)
            return apply_activation(y, activation), mean, rstd

        if g == c:
            y, mean, rstd = torch.native_batch_norm(
                x, weight, bias, running_mean, running_var, True, momentum, eps
            )
            return apply_activation(y, activation), mean, rstd

        # batch-group norm: BN over the groups of a (N, G, rest) view, then the channel affine
        fmt = output_memory_format(x)
        xg = x.reshape(n, g, -1)
        # unit affine in float32 so that half inputs get float32 statistics (ATen's mixed mode)
        one = torch.ones(g, device=x.device, dtype=compute_dtype(x.dtype))
        yg, mean, rstd = torch.native_batch_norm(
            xg, one, torch.zeros_like(one), running_mean, running_var, True, momentum, eps
        )
        y = yg.reshape(x.shape)
        if weight is not None or bias is not None or activation is not None:
            y = y.to(compute_dtype(x.dtype))
            if weight is not None:
                y = y * _channel_view(weight.to(y.dtype), x.dim())
            if bias is not None:
                y = y + _channel_view(bias.to(y.dtype), x.dim())
            y = apply_activation(y, activation).to(x.dtype)
        return y.contiguous(memory_format=fmt), mean, rstd

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
        weight, bias = _match_param_dtype(x, weight), _match_param_dtype(x, bias)
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        return apply_activation(y, activation)


def _match_param_dtype(x: Tensor, p: Optional[Tensor]) -> Optional[Tensor]:
    """ATen takes float32 parameters with half input (mixed precision) or parameters of x's dtype."""
    if p is None or p.dtype == x.dtype:
        return p
    if x.dtype in (torch.float16, torch.bfloat16) and p.dtype == torch.float32:
        return p
    return p.to(x.dtype)


BACKEND = NativeBackend()
