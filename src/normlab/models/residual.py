"""The residual-block marker that signal propagation plots find, and stochastic depth.

Residual networks (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) compute
``x_{l+1} = shortcut(x_l) + scale * f_l(x_l)``. Every residual block in :mod:`normlab.models`
subclasses :class:`ResidualBlock` and passes its branch output ``f_l(x_l)`` through
``self.branch_out`` (an ``nn.Identity``) *before* it is scaled (NF-ResNets: alpha, SkipInit gain)
and added to the shortcut. ``branch_out`` is therefore a forward-hook point: :mod:`normlab.spp`
hooks it to measure the residual branch's variance (Brock, De & Smith, ICLR 2021, section 4).

:class:`DropPath` is stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", ECCV
2016) in its per-sample form: in training each sample's branch is zeroed with probability p and the
kept ones are scaled by 1/(1-p), so the expectation is unchanged; in eval it is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ResidualBlock", "DropPath", "residual_blocks"]


class ResidualBlock(nn.Module):
    """Base class of every residual block in normlab.models.

    Subclasses set ``self.branch_out = nn.Identity()`` (done here) and call
    ``r = self.branch_out(r)`` on the residual branch output before scaling and adding it.
    ``has_projection`` says whether the shortcut is a (1x1) convolution rather than the identity,
    i.e. whether the block is a transition.
    """

    has_projection: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.branch_out = nn.Identity()


def residual_blocks(model: nn.Module) -> list[tuple[str, ResidualBlock]]:
    """``(name, block)`` for every :class:`ResidualBlock` in ``model``, in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ResidualBlock)]


class DropPath(nn.Module):
    r"""Stochastic depth per sample.

    .. math::
        y_n = x_n \cdot b_n / (1 - p), \quad b_n \sim \mathrm{Bernoulli}(1 - p)

    in training; ``y = x`` in eval or when ``p = 0``. Shape: (N, ...) -> same.

    Example::

        >>> dp = DropPath(0.1)
        >>> y = dp(torch.randn(8, 64, 4, 4))
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
        return x * mask.bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"
