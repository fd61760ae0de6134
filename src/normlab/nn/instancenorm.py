"""InstanceNorm1d/2d/3d (Ulyanov et al., 2016) on normlab's operator.

Statistics over spatial dims per sample and channel: ``normalize(x, num_groups=C,
over_batch=False)``. Subclasses of the torch.nn classes (same defaults: ``affine=False``,
``track_running_stats=False``; unbatched (C, *spatial) input; state_dict keys); only the
normalization call differs.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, fx, nn

from normlab import functional as NLF
from normlab.nn._common import drop_bias, fx_leaf, norm_repr, not_scriptable, reset_affine

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _InstanceNormForward:
    __prepare_scriptable__ = not_scriptable
    activation: Optional[str] = None  # (a class default: lazy modules become IN without __init__)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: Optional[str] = None,
    ) -> None:
        NLF.check_eps(eps)  # > 0 and finite: at construction, as the other modules check it
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)
        drop_bias(self, affine, bias)
        self.activation = NLF.check_activation(activation)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def extra_repr(self) -> str:
        return norm_repr(self, super().extra_repr())

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input)
        return super().forward(input)  # torch's: unbatched input, num_features checks

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        return NLF.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
            activation=self.activation,
        )


class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    """InstanceNorm over (N, C, L) or unbatched (C, L); see :class:`InstanceNorm2d`."""


class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    r"""Instance normalization, drop-in for ``torch.nn.InstanceNorm2d``.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma_c + \beta_c

    mean and biased variance over (H, W) per sample and channel. Shape: (N, C, H, W) or (C, H, W);
    the output is contiguous whatever the input's memory format (as torch's). Args as torch's;
    ``momentum`` is not validated (as torch's: a value outside [0, 1] is used as given; None
    counts as 0 for the running statistics, as torch's instance_norm call does).

    Example::

        >>> import torch
        >>> norm = InstanceNorm2d(16, affine=True)
        >>> y = norm(torch.randn(4, 16, 32, 32))
    """


class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    """InstanceNorm over (N, C, D, H, W) or unbatched (C, D, H, W); see :class:`InstanceNorm2d`."""
