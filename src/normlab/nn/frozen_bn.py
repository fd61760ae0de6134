"""FrozenBatchNorm2d: BatchNorm with fixed statistics and affine, for fine-tuning detectors whose
per-GPU batch is too small for batch statistics (the "frozen BN" baseline of the GN paper's COCO
experiments).

Everything is a buffer (``weight``, ``bias``, ``running_mean``, ``running_var``): nothing trains and
``train()``/``eval()`` change nothing. The output is computed by the same call as BatchNorm in eval
mode, so it is bit-for-bit the eval output of the BatchNorm it was made from.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, fx, nn

from normlab import functional as NLF
from normlab.backends.reference import apply_activation
from normlab.nn._common import check_count, check_num_channels, fx_leaf, not_scriptable
from normlab.nn._direct import frozen_bn, frozen_bn_direct

__all__ = ["FrozenBatchNorm2d"]


class FrozenBatchNorm2d(nn.Module):
    r"""BatchNorm2d with frozen statistics and affine.

    .. math::
        y = \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon}} \gamma_c + \beta_c

    with the running mean/var and affine of a trained BatchNorm, all buffers.

    Args:
        num_features: C.
        eps: added to the variance; > 0.
        activation: None, "relu", "silu" or "gelu", fused after the affine (keyword).

    Shape: (N, C, H, W), any memory format.

    Example::

        >>> import torch
        >>> trained_bn = torch.nn.BatchNorm2d(64).eval()       # a trained BN layer
        >>> frozen = FrozenBatchNorm2d.from_batchnorm(trained_bn)
    """

    __prepare_scriptable__ = not_scriptable

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None, *,
                 activation: Optional[str] = None) -> None:
        super().__init__()
        self.activation = NLF.check_activation(activation)
        self.num_features = check_count(num_features, "num_features")
        self.eps = NLF.check_eps(eps)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def reset_parameters(self) -> None:
        """The identity of a new module: weight 1, bias 0, mean 0, variance 1 (for a model built
        on the meta device and materialized with ``to_empty``, as FSDP2 users do)."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "FrozenBatchNorm2d":
        """A frozen copy of ``bn`` (its running statistics, affine, eps and, for normlab's
        BatchNorm, its fused ``activation``)."""
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(
                f"from_batchnorm needs a BatchNorm module, got {type(bn).__name__}"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"cannot freeze {type(bn).__name__} with track_running_stats=False: "
                "it has no running statistics"
            )
        ref = bn.running_mean
        act = getattr(bn, "activation", None)  # normlab's BatchNorm: "relu", "silu", "gelu"
        out = cls(bn.num_features, bn.eps, device=ref.device, dtype=ref.dtype,
                  activation=act if isinstance(act, str) else None)
        with torch.no_grad():
            out.running_mean.copy_(bn.running_mean)
            out.running_var.copy_(bn.running_var)
            if bn.weight is not None:  # affine=False: FrozenBN's weight 1, bias 0 stay
                out.weight.copy_(bn.weight)
            if bn.bias is not None:  # BatchNorm(..., bias=False): the bias 0 stays
                out.bias.copy_(bn.bias)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # a BatchNorm state_dict has a counter FrozenBN does not need
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input, self._normalize)
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        NLF.check_input(input)
        check_num_channels(self, input, self.num_features)
        # (each buffer looked up once: nn.Module's attribute lookup is ~0.6 us)
        mean, var, weight, bias = self.running_mean, self.running_var, self.weight, self.bias
        if frozen_bn_direct(input, mean, var, weight, bias):
            # BN's eval output by the ATen call native makes (with a one-multiply backward
            # for large inputs; benchmarks/NOTES.md, "FRN, EvoNorm and FrozenBN")
            return apply_activation(frozen_bn(input, mean, var, weight, bias, self.eps),
                                    self.activation)
        return self._normalize(input)

    def _normalize(self, input: Tensor) -> Tensor:
        return NLF.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                             False, 0.0, self.eps, activation=self.activation)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + (
            f", activation={self.activation!r}" if self.activation else "")
