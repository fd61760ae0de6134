"""Batch Renormalization (Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models", NeurIPS 2017).

In training, the batch-normalized activation is corrected towards the running statistics::

    x_hat = (x - mu_B) / sigma_B * r + d
    r = stopgrad(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stopgrad(clip((mu_B - mu) / sigma, -d_max, d_max))

with sigma = sqrt(running_var + eps), sigma_B = sqrt(var_B + eps). With r_max = 1, d_max = 0 it is
BatchNorm. The paper's schedule keeps r_max = 1, d_max = 0 for the first 5k steps, then relaxes them
linearly to r_max = 3 (by step 40k) and d_max = 5 (by step 25k); running statistics move with rate
0.01. Inference uses the running statistics, exactly like BatchNorm in eval. The buffers and
state_dict keys are BatchNorm's, so BN checkpoints load into it and back.

One choice differs from the paper on purpose: its Algorithm 1 keeps a moving average of
sigma_B itself (``sigma += rate * (sigma_B - sigma)``, eps inside sigma_B); this layer keeps
BatchNorm's moving average of the unbiased batch variance in ``running_var`` and takes
sigma = sqrt(running_var + eps), which is what makes BN checkpoints interchangeable.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, fx, nn

from normlab import functional as NLF
from normlab.backends.reference import compute_dtype
from normlab.nn._common import (
    channel_view, check_bn_input, count_batch, drop_bias, fx_leaf, not_scriptable, reset_affine,
    running_average_factor)

__all__ = ["BatchRenorm1d", "BatchRenorm2d"]

# the autograd graph task this thread runs (-1 outside backward): a forward inside one is a
# checkpoint's recompute (torch has no public question for it)
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


class _BatchRenorm(nn.modules.batchnorm._BatchNorm):
    __prepare_scriptable__ = not_scriptable

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.01,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        NLF.check_eps(eps)
        if not r_max >= 1.0:
            raise ValueError(f"r_max must be >= 1, got {r_max!r}")
        if not d_max >= 0.0:
            raise ValueError(f"d_max must be >= 0, got {d_max!r}")
        for name, v in (("warmup_steps", warmup_steps), ("r_max_steps", r_max_steps),
                        ("d_max_steps", d_max_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        drop_bias(self, affine, bias)  # BatchNorm's keyword: a BN(bias=False) converts exactly
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.r_max_steps, self.d_max_steps = warmup_steps, r_max_steps, d_max_steps

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def limits(self) -> Tuple[Tensor, Tensor]:
        """(r_max, d_max) at the current step (``num_batches_tracked``), as 0-d tensors: 1 and 0
        until ``warmup_steps``, then linear to ``r_max`` at ``r_max_steps`` and ``d_max`` at
        ``d_max_steps`` (immediately if those are <= ``warmup_steps``). float64 for a float64
        module (its clip bounds are not rounded to float32), float32 otherwise."""
        step = self.num_batches_tracked.to(compute_dtype(self.running_var.dtype))
        after = step - self.warmup_steps

        def ramp(end: int) -> Tensor:
            span = max(end - self.warmup_steps, 0)
            if span == 0:
                return (after > 0).to(step.dtype)
            return (after / span).clamp(0.0, 1.0)

        return 1.0 + (self.r_max - 1.0) * ramp(self.r_max_steps), self.d_max * ramp(self.d_max_steps)

    def _buffer_versions(self) -> Tuple[int, int, int]:
        return (self.running_mean._version, self.running_var._version,
                self.num_batches_tracked._version)

    def _recomputed_inputs(self) -> Optional[Tuple[Tensor, Tensor, Tuple[Tensor, Tensor]]]:
        """The running statistics and limits of the training forward that this call
        recomputes, or None (an ordinary forward).

        torch.utils.checkpoint (reentrant or not) runs the forward again during backward, where
        the buffers have already moved: r and d from them made gradients of another function
        than the forward computed (torch's BatchNorm does not read its buffers in training, so
        only its buffers move twice, as these still do). A recompute is a training forward
        inside a backward pass that finds the buffers as the last training forward left them;
        it takes that forward's r and d inputs. (A module run several times before one
        backward finds them moved and recomputes with the buffers as they are.)"""
        if torch.compiler.is_compiling():
            return None
        last = self.__dict__.get("_last_inputs")
        if (last is None or not torch.is_grad_enabled() or _graph_task_id() == -1
                or last[0] != self._buffer_versions()):
            return None
        return last[1]

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return fx_leaf(self, input)
        check_bn_input(self, input)
        if self.running_mean is None or self.running_var is None:
            missing = [n for n in ("running_mean", "running_var") if getattr(self, n) is None]
            raise RuntimeError(
                f"{type(self).__name__} needs its running statistics (r and d, and eval, use "
                f"them), but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} None "
                "(as torch.func.replace_all_batch_norm_modules_ leaves a BatchNorm); use "
                "BatchNorm or GroupNorm where no running statistics may be kept"
            )
        if not self.training:
            return NLF.normalize_fixed(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        recomputed = self._recomputed_inputs()
        count_batch(self)  # Batch Renorm always tracks: its limits ramp with the batch count
        momentum = running_average_factor(self)
        # r and d use the running statistics from before this batch: the operator moves the
        # buffers (from the batch variance itself, as BN's; an empty batch leaves them alone)
        if recomputed is not None:
            running_mean, running_var, limits = recomputed
        else:
            running_mean, running_var = self.running_mean.clone(), self.running_var.clone()
            limits = self.limits()
        # x_hat and the affine in the accumulation dtype, rounded once (half input: x_hat and
        # the float32 scale and shift rounded to the half type first put y up to hundreds of
        # units in the last place off where the bias cancels; BatchNorm's is within half a unit)
        acc = compute_dtype(input.dtype)
        x_hat, mean, rstd = NLF.normalize(
            input.to(acc), self.num_features, True, eps=self.eps, running_mean=self.running_mean,
            running_var=self.running_var, momentum=momentum, return_stats=True,
        )
        with torch.no_grad():
            sigma_b = 1.0 / rstd
            sigma = torch.sqrt(running_var.to(sigma_b.dtype) + self.eps)
            r_max, d_max = limits
            r = (sigma_b / sigma).clamp(1.0 / r_max, r_max)
            d = ((mean - running_mean.to(mean.dtype)) / sigma).clamp(-d_max, d_max)
        if (recomputed is None and not torch.compiler.is_compiling()
                and not torch.is_inference_mode_enabled()):  # (reentrant: under no_grad)
            self._last_inputs = (self._buffer_versions(), (running_mean, running_var, limits))
        scale, shift = r, d
        if self.weight is not None:
            scale, shift = scale * self.weight, shift * self.weight
            if self.bias is not None:
                shift = shift + self.bias
        y = x_hat * channel_view(scale.to(acc), input.dim())
        return (y + channel_view(shift.to(acc), input.dim())).to(input.dtype)

    def extra_repr(self) -> str:
        # the constructor takes no track_running_stats (Batch Renorm always tracks them): the
        # repr names only what it takes, so it reads as a call that builds the same layer
        base = super().extra_repr().replace(", track_running_stats=True", "")
        return (
            base
            + f", r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
            f"r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}"
        )


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization over (N, C) or (N, C, L); see :class:`BatchRenorm2d`."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization over (N, C, H, W).

    Args: ``num_features``, ``eps=1e-5``, ``momentum=0.01`` (the paper's rate), ``affine=True``,
    ``r_max=3``, ``d_max=5`` (final limits), ``warmup_steps=5000``, ``r_max_steps=40000``,
    ``d_max_steps=25000``, keyword ``bias=True`` (False: no shift, as BatchNorm's). For fixed
    limits from the first step (the GN paper's comparison uses r_max = 1.5, d_max = 0.5) pass
    ``warmup_steps=0, r_max_steps=0, d_max_steps=0``.

    Example::

        >>> brn = BatchRenorm2d(64, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0)
        >>> y = brn(torch.randn(4, 64, 8, 8))
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
