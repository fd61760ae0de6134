"""BatchNorm1d/2d/3d (Ioffe & Szegedy, ICML 2015) on normlab's operator.

Statistics over (N, *spatial) per channel: ``normalize(x, num_groups=C, over_batch=True)``.
Subclasses of the torch.nn classes: the same constructor, parameters (``weight``, ``bias``),
buffers (``running_mean``, ``running_var``, ``num_batches_tracked``), state_dict keys,
``momentum=None`` cumulative averaging and train/eval behaviour, so a torch state_dict loads with
``strict=True`` and ``isinstance(m, torch.nn.BatchNorm2d)`` holds. Only ``forward`` differs: it
runs through :func:`normlab.functional.batch_norm` and the selected backend.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, fx, nn

from normlab import functional as NLF
from normlab.nn._common import (
    check_bn_input, count_batch, drop_bias, fx_leaf, norm_repr, not_scriptable, reset_affine,
    running_average_factor)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormXd"]


class _BatchNormForward:
    """forward() of torch's _BatchNorm, routed through normlab.functional.batch_norm."""

    __prepare_scriptable__ = not_scriptable
    activation: Optional[str] = None  # (a class default: lazy modules become BN without __init__)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
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

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input)
        check_bn_input(self, input)
        count_batch(self)
        factor = running_average_factor(self)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return NLF.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            activation=self.activation,
        )

    def extra_repr(self) -> str:
        return norm_repr(self, super().extra_repr())


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """BatchNorm over a (N, C) or (N, C, L) input; see :class:`BatchNorm2d`."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    r"""Batch normalization over a 4D input (N, C, H, W), drop-in for ``torch.nn.BatchNorm2d``.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma_c + \beta_c

    mean and biased variance over (N, H, W) per channel in training; the running buffers (which
    store the unbiased variance) in eval. Args as torch's: ``num_features``, ``eps=1e-5``,
    ``momentum=0.1`` (None: cumulative average), ``affine=True``, ``track_running_stats=True``,
    ``device``, ``dtype``, keyword ``bias=True``, and keyword ``activation`` (None, "relu",
    "silu" or "gelu": fused after the affine, what timm's BatchNormAct2d computes with those
    activations). ``momentum`` is not validated, as torch's: a value outside [0, 1] is
    used as given in ``running = (1 - momentum) * running + momentum * batch``.

    Shape: input (N, C, H, W) in any memory format; output the same shape and memory format.

    Example::

        >>> import torch
        >>> bn = BatchNorm2d(64)
        >>> y = bn(torch.randn(8, 64, 32, 32))
    """


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """BatchNorm over a (N, C, D, H, W) input; see :class:`BatchNorm2d`."""


class BatchNormXd(_BatchNormForward, nn.modules.batchnorm._BatchNorm):
    """BatchNorm over an input of any dims from (N, C) on: what :func:`normlab.convert_norm`
    turns a SyncBatchNorm into (a SyncBatchNorm does not know whether it served 1-D, 2-D or 3-D
    input). Same arguments, parameters, buffers and state_dict keys as BatchNorm2d."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input with at least 2 dims (N, C, ...), got {input.dim()}D")
