"""RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019) and
RMSNorm2d on normlab's operator.

* :class:`RMSNorm`: statistics over the trailing ``normalized_shape`` dims without centering:
  ``normalize(x viewed as (rows, prod(normalized_shape)), num_groups=1, over_batch=False,
  center=False)``. A subclass of ``torch.nn.RMSNorm``: the same constructor (``eps=None``
  meaning the machine epsilon of the input's accumulation dtype, float32's for half input, as
  torch computes it), ``weight`` parameter and state_dict keys.
* :class:`RMSNorm2d`: the same over the channels only, per sample and spatial position, with a
  per-channel weight: :class:`normlab.nn.LayerNorm2d` without the centering (the RMSNorm of
  ConvNeXt-style networks; timm's ``RmsNorm2d``), for NCHW or channels_last input. What
  ``create_norm("rms", C)`` builds.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, fx, nn

from normlab import functional as NLF
from normlab.nn._common import check_count, fx_leaf, not_scriptable, per_position

__all__ = ["RMSNorm", "RMSNorm2d"]


class RMSNorm(nn.RMSNorm):
    r"""Root mean square layer normalization, drop-in for ``torch.nn.RMSNorm``.

    .. math::
        y = \frac{x}{\sqrt{\frac{1}{m}\sum_{i=1}^{m} x_i^2 + \epsilon}} \gamma

    over the last ``len(normalized_shape)`` dims (m elements); no mean is subtracted and there is
    no bias (Zhang & Sennrich, NeurIPS 2019, eq. 4).

    Args:
        normalized_shape: the trailing shape the statistics run over (an int for the last dim).
        eps: added to the mean square; ``None`` (default) means the machine epsilon of each
            input's accumulation dtype, as torch's: ``torch.finfo(x.dtype).eps`` for float32 and
            float64, float32's for float16/bfloat16 (see :func:`normlab.functional.rms_norm`).
        elementwise_affine: learn ``weight`` of ``normalized_shape`` (init 1).

    Shape: input ``(*, *normalized_shape)``; output the same.

    Example::

        >>> import torch
        >>> x = torch.randn(2, 10, 64) + 1
        >>> torch.allclose(RMSNorm(64)(x), torch.nn.RMSNorm(64)(x), atol=1e-6)
        True
    """

    __prepare_scriptable__ = not_scriptable

    def __init__(
        self,
        normalized_shape: Union[int, Sequence[int]],
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else normalized_shape
        try:
            shape = tuple(shape)
        except TypeError:
            raise TypeError(
                f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
            ) from None
        if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in shape):
            raise TypeError(
                f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
            )
        if not shape or any(d < 1 for d in shape):
            raise ValueError(
                f"normalized_shape must be positive ints (at least one), got {normalized_shape!r}"
            )
        if eps is not None:
            NLF.check_eps(eps)
        super().__init__(tuple(int(d) for d in shape), eps, elementwise_affine,
                         device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:  # named x as torch's (``norm(x=...)`` works)
        if isinstance(x, fx.Proxy):
            return fx_leaf(self, x, self._normalize)
        return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        return NLF.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class RMSNorm2d(nn.Module):
    r"""RMSNorm over the channels of a (N, C, *spatial) tensor, per sample and position.

    .. math::
        y_{n,:,h,w} = \frac{x_{n,:,h,w}}{\sqrt{\mathrm{E}_c[x^2] + \epsilon}} \gamma

    No mean is subtracted and there is no bias (Zhang & Sennrich, NeurIPS 2019, eq. 4, taken
    over the C values at each position).

    Args:
        num_channels: C.
        eps: added to the mean square (default 1e-6, as :class:`normlab.nn.LayerNorm2d`'s and
            timm's ``RmsNorm2d``'s).
        affine: a learnable per-channel ``weight`` (init 1).

    Shape: (N, C, H, W) NCHW or channels_last (or any number of spatial dims); the output keeps
    the input's memory format. For channels_last input no copy is made.

    Example::

        >>> norm = RMSNorm2d(96)
        >>> y = norm(torch.randn(2, 96, 14, 14) + 1)
        >>> ms = (y / norm.weight.view(1, -1, 1, 1)).pow(2).mean(1)
        >>> torch.allclose(ms, torch.ones_like(ms), atol=1e-3)
        True
    """

    __prepare_scriptable__ = not_scriptable

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_channels = check_count(num_channels, "num_channels")
        self.eps = NLF.check_eps(eps)
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input)
        y, fmt = per_position(self, input, lambda xt: NLF.rms_norm(
            xt, (self.num_channels,), self.weight, self.eps))
        return y.contiguous(memory_format=fmt)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
