"""Weight-standardized convolutions.

* :class:`WSConv2d`: Weight Standardization (Qiao et al., "Micro-Batch Training with Batch-Channel
  Normalization and Weight Standardization", 2019): each output channel's weights are normalized
  to zero mean and unit variance over their fan-in before the convolution; meant to be followed by
  GroupNorm.
* :class:`ScaledStdConv2d`: Scaled Weight Standardization of normalizer-free ResNets (Brock, De &
  Smith, ICLR 2021): ``W_hat = gain * gamma * (W - mu) / (sigma * sqrt(fan_in))`` with a learnable
  per-output-channel ``gain`` (init 1) and the activation's ``gamma`` (1.7139 for ReLU), which
  makes conv + activation variance-preserving at initialization.

Standardizing a weight is the normalization operator on the weight viewed as
(1, out_channels, fan_in): statistics per output channel over its fan-in (an InstanceNorm of the
weight), with eps inside the square root. For ScaledStdConv2d the per-channel scale
``gain * gamma / sqrt(fan_in)`` is the operator's affine weight.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, fx, nn

from normlab import functional as NLF
from normlab.nn._common import fx_leaf, not_scriptable

__all__ = ["WSConv2d", "ScaledStdConv2d", "standardize_weight"]


def standardize_weight(weight: Tensor, eps: float, scale: Optional[Tensor] = None) -> Tensor:
    """``scale_o * (W_o - mean(W_o)) / sqrt(var(W_o) + eps)`` per output channel o over its fan-in
    (biased variance). ``weight``: (out, in/groups, *kernel); ``scale``: (out,) or None."""
    out = weight.shape[0]
    w = NLF.normalize(weight.reshape(1, out, -1), out, False, scale, None, eps)
    return w.reshape(weight.shape)


class WSConv2d(nn.Conv2d):
    r"""Conv2d with Weight Standardization, drop-in for ``torch.nn.Conv2d`` (same arguments and
    state_dict keys, plus ``eps``).

    .. math::
        \hat W_{o} = \frac{W_{o} - \mathrm{mean}(W_{o})}{\sqrt{\mathrm{Var}(W_{o}) + \epsilon}}

    over the fan-in ``in_channels/groups * kh * kw`` of output channel o (biased variance).

    eps sits inside the square root, as in the paper's equation (and timm's ``StdConv2d``). The
    authors' released code writes ``(W - mean) / (std + eps)`` instead (with the unbiased std);
    the two agree to within ``eps / (2 var)`` relative, about 0.6% for a He-initialized 3x3x256
    kernel at the default eps = 1e-5: lower ``eps`` to come closer.
    The inside form keeps the gradient finite for a constant row (a fan-in of 1).
    The weight is standardized again at every call (train and eval), so it never goes stale.

    Example::

        >>> conv = WSConv2d(64, 128, 3, padding=1, bias=False)
        >>> y = conv(torch.randn(2, 64, 32, 32))
    """

    __prepare_scriptable__ = not_scriptable

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, eps: float = 1e-5) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device=device, dtype=dtype)
        self.eps = NLF.check_eps(eps)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input, self._standardized_conv)
        return self._standardized_conv(input)

    def _standardized_conv(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, standardize_weight(self.weight, self.eps), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


class ScaledStdConv2d(nn.Conv2d):
    r"""Conv2d with Scaled Weight Standardization (NF-ResNets).

    .. math::
        \hat W_{o} = g_o \, \gamma \, \frac{W_{o} - \mu_o}{\sqrt{N}\sqrt{\sigma_o^2 + \epsilon}}

    with N = fan-in = ``in_channels/groups * kh * kw``, mu and the biased sigma^2 over the fan-in,
    ``gain`` g (shape (out, 1, 1, 1), init ``gain_init``) learnable, and ``gamma`` the activation's
    variance-restoring constant (Brock, De & Smith, ICLR 2021: relu 1.7139588594, silu
    1.7881293297, ...; :data:`normlab.models.nf_resnet.GAMMAS`).

    Args: those of ``torch.nn.Conv2d``, plus ``gamma=1.0``, ``eps=1e-6`` and ``gain_init=1.0``.

    The paper's formula has no eps; this layer puts it inside the square root, as timm's
    ``ScaledStdConv2d`` (same default). The authors' released code (deepmind-research ``nfnets``)
    writes ``rsqrt(max(N * sigma^2, 1e-4))`` instead, and applies ``gamma`` after the
    activation rather than in the weight; the two eps forms agree unless ``N * sigma^2`` is
    near 1e-4.

    Example::

        >>> conv = ScaledStdConv2d(64, 64, 3, padding=1, gamma=1.7139588594)
        >>> y = torch.relu(conv(torch.randn(2, 64, 16, 16)))
    """

    __prepare_scriptable__ = not_scriptable

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, gamma: float = 1.0, eps: float = 1e-6,
                 gain_init: float = 1.0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device=device, dtype=dtype)
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
        self.gamma = float(gamma)
        self.eps = NLF.check_eps(eps)
        self.gain_init = float(gain_init)
        self.gain = nn.Parameter(
            torch.full((out_channels, 1, 1, 1), self.gain_init, device=device, dtype=dtype)
        )
        self.fan_in = math.prod(self.weight.shape[1:])  # (out_channels may be 0, as torch allows)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "gain"):
            nn.init.constant_(self.gain, self.gain_init)

    def standardized_weight(self) -> Tensor:
        scale = self.gain.reshape(-1) * (self.gamma / math.sqrt(self.fan_in))
        return standardize_weight(self.weight, self.eps, scale)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input, self._standardized_conv)
        return self._standardized_conv(input)

    def _standardized_conv(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        gain = f", gain_init={self.gain_init}" if self.gain_init != 1.0 else ""
        return super().extra_repr() + f", gamma={self.gamma}, eps={self.eps}{gain}"
