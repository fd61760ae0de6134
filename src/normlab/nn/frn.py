"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan, "Filter
Response Normalization Layer: Eliminating Batch Dependence in the Training of Deep Neural
Networks", CVPR 2020, arXiv 1911.09737).

Statistics per sample and channel over the spatial positions, without centering:
``normalize(x, num_groups=C, over_batch=False, center=False)``, then the TLU ``max(y, tau)``.
Parameter names (``weight``, ``bias``, ``tau``) are those of timm's ``FilterResponseNormTlu2d``.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from normlab import functional as NLF
from normlab.nn._common import (channel_view, check_count, check_num_channels, fx_leaf,
                                not_scriptable)
from normlab.nn._direct import frn_direct, frn_tlu, maximum

__all__ = ["FilterResponseNorm2d"]


def check_4d(module: nn.Module, x: Tensor, num_features: int) -> None:
    """The checks of a 2d layer's input: a floating (N, C, H, W) tensor with C channels."""
    NLF.check_input(x)
    if x.dim() != 4:
        raise ValueError(
            f"{type(module).__name__} expects 4-D input (N, C, H, W), got shape {tuple(x.shape)}"
        )
    check_num_channels(module, x, num_features)


class FilterResponseNorm2d(nn.Module):
    r"""Filter Response Normalization followed by a Thresholded Linear Unit (FRN + TLU).

    .. math::
        \nu^2_{n,c} = \frac{1}{HW} \sum_{h,w} x_{n,c,h,w}^2, \qquad
        y = \gamma_c \frac{x}{\sqrt{\nu^2_{n,c} + \epsilon}} + \beta_c, \qquad
        z = \max(y, \tau_c)

    (Singh & Krishnan, CVPR 2020, eqs. 1-3). No mean is subtracted and no batch statistic is
    used, so the layer behaves the same at every batch size and in train and eval mode. The TLU
    replaces the ReLU that would follow the norm: with ``tau = 0`` it is a ReLU.

    Args:
        num_features: C.
        eps: added to the mean square; > 0. Default 1e-6, the paper's choice for spatial
            feature maps (it suggests a learned eps for 1x1 maps, which this layer does not do).
        tlu: learn the threshold ``tau`` (init 0) and apply ``max(y, tau)``; ``False``
            registers ``tau = None`` and returns ``y``.

    Shape: input (N, C, H, W), any memory format; output the same.

    Example::

        >>> import torch
        >>> frn = FilterResponseNorm2d(64)
        >>> z = frn(torch.randn(2, 64, 8, 8))
        >>> bool((z >= 0).all())          # tau = 0 at init: a ReLU after the normalization
        True
    """

    __prepare_scriptable__ = not_scriptable

    def __init__(self, num_features: int, eps: float = 1e-6, tlu: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = check_count(num_features, "num_features")
        self.eps = NLF.check_eps(eps)
        if not isinstance(tlu, bool):
            raise TypeError(f"tlu must be a bool, got {tlu!r}")
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        if tlu:
            self.tau = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("tau", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.tau is not None:
            nn.init.zeros_(self.tau)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input)
        check_4d(self, input, self.num_features)
        # (each parameter looked up once: nn.Module's attribute lookup is ~0.6 us)
        weight, bias, tau = self.weight, self.bias, self.tau
        if frn_direct(input, weight, bias, tau):
            # the ops native runs, without the operator's layers (the same output bits), and
            # a closed-form backward (benchmarks/NOTES.md, "FRN, EvoNorm and FrozenBN")
            return frn_tlu(input, weight, bias, tau, self.eps)
        y = NLF.normalize(input, self.num_features, False, weight, bias, self.eps, center=False)
        if tau is None:
            return y
        return maximum(y, channel_view(tau, 4).to(y.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, tlu={self.tau is not None}"
