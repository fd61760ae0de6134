"""LayerNorm (Ba, Kiros & Hinton, 2016) and LayerNorm2d on normlab's operator.

* :class:`LayerNorm`: drop-in for ``torch.nn.LayerNorm`` (statistics over the trailing
  ``normalized_shape`` dims, elementwise affine): the operator with G = 1 on the input viewed as
  (rows, prod(normalized_shape)).
* :class:`LayerNorm2d`: statistics over the channels only, per sample and spatial position, with a
  per-channel affine (the LayerNorm of ConvNeXt-style networks) for NCHW or channels_last input.
  The operator runs on the (N*H*W, C) view, which is free for channels_last input.

For the GN paper's conv-net "LN" (statistics over C and spatial) use ``GroupNorm(1, C)``, which is
what ``create_norm("ln", C)`` builds.
"""

from __future__ import annotations


import torch
from torch import Tensor, fx, nn

from normlab import functional as NLF
from normlab.nn._common import check_count, fx_leaf, not_scriptable, per_position

__all__ = ["LayerNorm", "LayerNorm2d"]


class LayerNorm(nn.LayerNorm):
    r"""Layer normalization, drop-in for ``torch.nn.LayerNorm``.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    mean and biased variance over the last ``len(normalized_shape)`` dims; ``weight`` and ``bias``
    have ``normalized_shape``. Args as torch's (``elementwise_affine``, ``bias``, ...).

    Example::

        >>> ln = LayerNorm(768)
        >>> y = ln(torch.randn(4, 197, 768))
    """

    __prepare_scriptable__ = not_scriptable

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        NLF.check_eps(eps)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input, self._normalize)
        return self._normalize(input)

    def _normalize(self, input: Tensor) -> Tensor:
        return NLF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.Module):
    r"""LayerNorm over the channels of a (N, C, *spatial) tensor, per sample and position.

    .. math::
        y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mathrm{E}_c[x]}{\sqrt{\mathrm{Var}_c[x] + \epsilon}}
        \gamma + \beta

    Args:
        num_channels: C.
        eps: added to the variance (default 1e-6, the usual choice for this layer).
        affine: learnable per-channel ``weight`` and ``bias``.
        bias: with ``affine``, whether there is a ``bias`` (False: a weight only, as timm's
            ``LayerNorm2d(C, bias=False)`` and torch's ``LayerNorm(bias=False)``).
        channels_last_output: return the normalized (N, *spatial, C) tensor permuted back to
            (N, C, *spatial) without a copy, whatever the input's memory format, as timm's
            ``LayerNorm2d`` does (so the layers after it run in channels_last). Default False:
            the output keeps the input's memory format. :func:`normlab.optimize` sets it on the
            norms that replace timm's, so a model's layout stays the one timm gave it.

    Shape: (N, C, H, W) NCHW or channels_last (or any number of spatial dims); the output keeps
    the input's memory format (unless ``channels_last_output``). For channels_last input no copy
    is made.

    Example::

        >>> norm = LayerNorm2d(96)
        >>> y = norm(torch.randn(2, 96, 56, 56).to(memory_format=torch.channels_last))
    """

    __prepare_scriptable__ = not_scriptable

    channels_last_output: bool = False

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True,
                 device=None, dtype=None, *, channels_last_output: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        self.num_channels = check_count(num_channels, "num_channels")
        self.eps = NLF.check_eps(eps)
        self.affine = affine
        self.channels_last_output = bool(channels_last_output)
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.empty(num_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input)
        # (layer_norm: the (N*H*W, C) view, or for a DTensor torch's op on (N, *spatial, C))
        y, fmt = per_position(self, input, lambda xt: NLF.layer_norm(
            xt, (self.num_channels,), self.weight, self.bias, self.eps))
        return y if self.channels_last_output else y.contiguous(memory_format=fmt)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
                + (", bias=False" if self.affine and self.bias is None else "")
                + (", channels_last_output=True" if self.channels_last_output else ""))
