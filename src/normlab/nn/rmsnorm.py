"""RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019) on normlab's
operator.

Statistics over the trailing ``normalized_shape`` dims without centering:
``normalize(x viewed as (rows, prod(normalized_shape)), num_groups=1, over_batch=False,
center=False)``. A subclass of ``torch.nn.RMSNorm``: the same constructor (``eps=None`` meaning
the machine epsilon of the input's accumulation dtype, float32's for half input, as torch
computes it), ``weight`` parameter and state_dict keys.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

from torch import Tensor, fx, nn

from normlab import functional as NLF
from normlab.nn._common import fx_leaf, not_scriptable

__all__ = ["RMSNorm"]


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
