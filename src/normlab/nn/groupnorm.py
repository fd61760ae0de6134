"""GroupNorm (Wu & He, "Group Normalization", ECCV 2018) with optional fused activation.

Statistics over (C/G, *spatial) per sample and group: ``normalize(x, num_groups=G,
over_batch=False)``. A subclass of ``torch.nn.GroupNorm`` (same positional arguments, ``weight``
and ``bias`` parameters, state_dict keys), plus:

* ``group_size=``: give the channels per group instead of the number of groups;
* ``activation=``: "relu", "silu" or "gelu" applied after the affine, fused where the backend
  can (GN + SiLU is the block of every diffusion U-Net).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, fx, nn

from normlab import functional as NLF
from normlab.nn._common import (
    check_count, check_num_channels, drop_bias, fx_leaf, norm_repr, not_scriptable,
    reset_affine)

__all__ = ["GroupNorm"]


class GroupNorm(nn.GroupNorm):
    r"""Group normalization, drop-in for ``torch.nn.GroupNorm``.

    .. math::
        y = \mathrm{act}\left(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}
            \gamma_c + \beta_c\right)

    mean and biased variance over the C/G channels of a group and all spatial positions, per
    sample. G = 1 is LayerNorm over (C, *spatial); G = C is InstanceNorm.

    Args:
        num_groups: G, which must divide ``num_channels``. Give either this or ``group_size``.
        num_channels: C.
        eps: added to the variance; > 0.
        affine: learnable per-channel ``weight`` (init 1) and ``bias`` (init 0).
        bias: with ``affine``, whether to learn the bias (``False`` registers ``bias = None``).
        group_size: channels per group (C/G), an alternative to ``num_groups``.
        activation: None, "relu", "silu" or "gelu", applied after the affine.

    Shape: input (N, C, *spatial) with any number of spatial dims, any memory format; output the
    same.
    C must be ``num_channels`` also with ``affine=False`` (torch's then takes any C that G
    divides). Under autocast on a device where torch runs group_norm in float32 (CUDA, not the
    CPU) half input is computed in float32 and the output is float32, as torch's.

    Example::

        >>> import torch
        >>> gn = GroupNorm(32, 256, activation="silu")
        >>> y = gn(torch.randn(2, 256, 64, 64))
        >>> GroupNorm(num_channels=256, group_size=16).num_groups
        16
    """

    __prepare_scriptable__ = not_scriptable

    def __init__(
        self,
        num_groups: Optional[int] = None,
        num_channels: Optional[int] = None,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        group_size: Optional[int] = None,
        activation: Optional[str] = None,
    ) -> None:
        if num_channels is None:
            raise TypeError("GroupNorm() missing required argument: 'num_channels'")
        num_channels = check_count(num_channels, "num_channels")
        if num_groups is None and group_size is None:
            raise TypeError(
                "GroupNorm() missing required argument: 'num_groups' (or give group_size)")
        if num_groups is not None and group_size is not None:
            raise ValueError(
                "give exactly one of num_groups and group_size, got "
                f"num_groups={num_groups!r}, group_size={group_size!r}"
            )
        if group_size is not None:
            group_size = check_count(group_size, "group_size")
            if num_channels % group_size != 0:
                raise ValueError(
                    f"num_channels={num_channels} is not divisible by group_size={group_size}"
                )
            num_groups = num_channels // group_size
        NLF.check_groups(num_groups, num_channels)
        NLF.check_eps(eps)
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        drop_bias(self, affine, bias)
        self.activation = NLF.check_activation(activation)

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input, self._normalize)
        NLF.check_input(input)
        check_num_channels(self, input, self.num_channels)
        return self._normalize(input)

    def _normalize(self, input: Tensor) -> Tensor:
        return NLF.group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation
        )

    def extra_repr(self) -> str:
        return norm_repr(self, super().extra_repr())
