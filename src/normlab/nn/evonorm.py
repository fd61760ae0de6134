"""EvoNorm-S0 and EvoNorm-B0 (Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation
Layers", NeurIPS 2020, arXiv 2004.02967): normalization and activation in one layer, found by
search.

The statistics are the operator's reductions, :func:`normlab.functional.moments`: S0 divides by
GroupNorm's standard deviation (``num_groups=G, over_batch=False``); B0 by the larger of
BatchNorm's (``num_groups=C, over_batch=True``, running average in eval) and ``v * x`` plus
InstanceNorm's (``num_groups=C, over_batch=False``). Parameter and buffer names (``weight``,
``bias``, ``v``, ``running_var``) are those of timm's ``EvoNorm2dS0`` / ``EvoNorm2dB0``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, fx, nn

from normlab import functional as NLF
from normlab.backends.reference import compute_dtype, output_memory_format
from normlab.nn._common import (channel_view, check_count, fx_leaf, not_scriptable,
                                update_running_stats)
from normlab.nn._direct import maximum
from normlab.nn.frn import check_4d

__all__ = ["EvoNorm2dS0", "EvoNorm2dB0"]


class _EvoNorm(nn.Module):
    """weight (gamma, init 1), bias (beta, init 0), v (init 1), all (C,)."""

    __prepare_scriptable__ = not_scriptable

    def __init__(self, num_features: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = check_count(num_features, "num_features")
        self.eps = NLF.check_eps(eps)
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        self.v = nn.Parameter(torch.empty(num_features, **factory))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.v)

    def _affine(self, z: Tensor, x: Tensor) -> Tensor:
        """gamma * z + beta, computed in z's (accumulation) dtype, returned in x's."""
        y = z * channel_view(self.weight, 4).to(z.dtype) + channel_view(self.bias, 4).to(z.dtype)
        return y.to(x.dtype)


class EvoNorm2dS0(_EvoNorm):
    r"""EvoNorm-S0: a batch-independent normalization-activation layer.

    .. math::
        y = \frac{x \cdot \sigma(v_c x)}{\sqrt{s^2_{w,h,c/g}(x) + \epsilon}} \gamma_c + \beta_c

    with :math:`\sigma` the sigmoid and :math:`s^2_{w,h,c/g}` the biased variance over the
    C/G channels of a group and all positions, per sample (GroupNorm's statistics; Liu et al.,
    NeurIPS 2020, Table 1). The numerator is not centred. It replaces a norm and the activation
    after it.

    Args:
        num_features: C.
        num_groups: G, which must divide C (default 32, the paper's); or give ``group_size``.
        eps: added to the variance; > 0 (default 1e-5, the paper's reference code's).
        group_size: channels per group (C/G), an alternative to ``num_groups``.

    Shape: input (N, C, H, W), any memory format; output the same.

    Example::

        >>> import torch
        >>> norm = EvoNorm2dS0(64, num_groups=8)
        >>> y = norm(torch.randn(2, 64, 8, 8))
    """

    def __init__(self, num_features: int, num_groups: Optional[int] = 32, eps: float = 1e-5,
                 device=None, dtype=None, *, group_size: Optional[int] = None) -> None:
        super().__init__(num_features, eps, device, dtype)
        if group_size is not None:
            group_size = check_count(group_size, "group_size")
            if num_features % group_size:
                raise ValueError(
                    f"num_features={num_features} is not divisible by group_size={group_size}"
                )
            num_groups = num_features // group_size
        self.num_groups = NLF.check_groups(num_groups, num_features)
        self.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input)
        check_4d(self, input, self.num_features)
        n, c = input.shape[:2]
        _, var = NLF.moments(input, self.num_groups, False)  # (N, G), differentiable
        rstd = torch.rsqrt(var + self.eps).repeat_interleave(c // self.num_groups, dim=1)
        x = input.to(var.dtype)
        z = x * torch.sigmoid(channel_view(self.v, 4).to(x.dtype) * x) * rstd.reshape(n, c, 1, 1)
        return self._affine(z, input).contiguous(memory_format=output_memory_format(input))

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}"


class EvoNorm2dB0(_EvoNorm):
    r"""EvoNorm-B0: a normalization-activation layer with batch statistics.

    .. math::
        y = \frac{x}{\max\left(\sqrt{s^2_{b,w,h}(x) + \epsilon},\;
            v_c x + \sqrt{s^2_{w,h}(x) + \epsilon}\right)} \gamma_c + \beta_c

    with :math:`s^2_{b,w,h}` the biased variance over the batch and positions per channel
    (BatchNorm's; in eval mode the running average ``running_var``) and :math:`s^2_{w,h}` over
    the positions per sample and channel (InstanceNorm's) (Liu et al., NeurIPS 2020, Table 1).
    The maximum is taken elementwise. It replaces a norm and the activation after it.

    Args:
        num_features: C.
        eps: added to both variances; > 0 (default 1e-5, the paper's reference code's).
        momentum: weight of the batch variance in the running average (default 0.1; the
            reference code's decay 0.9). The running variance stores the unbiased batch variance.

    Buffers: ``running_var`` (C,), init 1.

    Shape: input (N, C, H, W), any memory format; output the same.

    Example::

        >>> import torch
        >>> norm = EvoNorm2dB0(64)
        >>> y = norm(torch.randn(4, 64, 8, 8))      # train mode: batch variance, running update
        >>> y = norm.eval()(torch.randn(1, 64, 8, 8))   # eval: the running variance
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, device, dtype)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
            0.0 <= momentum <= 1.0
        ):
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_var.fill_(1.0)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.reset_running_stats()

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input)
        check_4d(self, input, self.num_features)
        n, c = input.shape[:2]
        acc = compute_dtype(input.dtype)
        if self.training and n > 0:  # an empty batch has no statistics: no update (as BN)
            mean_b, var_b = NLF.moments(input, c, True)  # (C,), differentiable
            update_running_stats(None, self.running_var, mean_b.detach(), var_b.detach(),
                                 input.numel() // c, self.momentum)
        else:
            var_b = self.running_var.to(acc)
        _, var_i = NLF.moments(input, c, False)  # (N, C)
        x = input.to(acc)
        left = torch.sqrt(var_b + self.eps).reshape(1, c, 1, 1)
        right = channel_view(self.v, 4).to(acc) * x + torch.sqrt(var_i + self.eps).reshape(n, c, 1, 1)
        z = x / maximum(left, right)  # (its backward: benchmarks/NOTES.md, "FRN, EvoNorm")
        return self._affine(z, input).contiguous(memory_format=output_memory_format(input))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

