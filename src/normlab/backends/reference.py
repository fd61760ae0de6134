"""The reference backend: the operator written out in plain torch, the spec for every fast path.

For x of shape (N, C, *spatial) split into G groups of C/G channels (Wu & He 2018, section 3.1)::

    xg      = x viewed as (N, G, C/G * prod(spatial))
    S       = dims (1: group contents)          if not over_batch   -> mean, rstd of shape (N, G)
              dims (0: batch, 1: group contents) if over_batch       -> mean, rstd of shape (G,)
    mean    = sum_S xg / m                      (summed as shift + sum_S (xg - shift) / m)
    var     = sum_S (xg - mean)^2 / m           (two passes; biased; never E[x^2] - E[x]^2)
    rstd    = 1 / sqrt(var + eps)
    y       = act(gamma_c * (x - mean) * rstd + beta_c)

With ``center=False`` (RMSNorm, Filter Response Normalization) nothing is subtracted: ``mean`` is
zero and ``var`` is the mean square, ``sum_S xg^2 / m`` (no cancellation, so no shift is needed).

BN is over_batch with G = C, LN (conv form) G = 1, IN G = C, GN G groups. Half-precision inputs
are computed in float32; float64 inputs in float64. Autograd is torch's own.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

FUSED_ACTIVATIONS = ("relu", "silu", "gelu")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_activation(y: Tensor, activation: Optional[str]) -> Tensor:
    """The activations the operator can fuse after its affine (gelu is the exact erf form)."""
    if activation is None:
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    raise ValueError(
        f"unknown activation {activation!r}; expected None or one of {FUSED_ACTIVATIONS}"
    )


def output_memory_format(x: Tensor) -> torch.memory_format:
    """channels_last(_3d) inputs keep their layout; everything else becomes contiguous (so does
    a sample inside ``torch.func.vmap``: :func:`_laid_out_as`)."""
    if x.dim() == 4 and not x.is_contiguous() and _laid_out_as(x, torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and _laid_out_as(x, torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _laid_out_as(x: Tensor, fmt: torch.memory_format) -> bool:
    """``x.is_contiguous(memory_format=fmt)``; False inside ``torch.func.vmap``, where a sample
    has no layout of its own (functorch refuses to answer for any format but the default, and
    to make one): per-sample GN/IN/FRN/LN2d over a channels_last batch (per-sample gradients)
    compute on contiguous samples."""
    if under_torch_func(x) and _inside_vmap():
        return False
    return x.is_contiguous(memory_format=fmt)


_FUNCTORCH_WRAPPED = torch._C._functorch.is_functorch_wrapped_tensor


def under_torch_func(x: Tensor) -> bool:
    """Whether ``x`` is wrapped by a torch.func transform (jvp, grad, vmap). Asked outside
    torch.compile only: TorchDynamo cannot trace the question, and its tensors are never
    functorch's."""
    return not torch.compiler.is_compiling() and _FUNCTORCH_WRAPPED(x)


def _inside_vmap() -> bool:
    """Whether a ``torch.func.vmap`` transform is active (on functorch's interpreter stack)."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def channel_view(t: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ..., 1) broadcastable against an ndim-dimensional (N, C, *spatial) tensor."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


class ReferenceBackend:
    name = "reference"
    supports_uncentered = True  # takes center=False (see normlab.backends.Backend)

    def available(self) -> bool:
        return True

    def unsupported_reason(self, x, num_groups, over_batch, activation):
        return None

    def normalize(
        self,
        x: Tensor,  # (N, C, *spatial)
        num_groups: int,
        over_batch: bool,
        weight: Optional[Tensor],  # (C,)
        bias: Optional[Tensor],  # (C,)
        eps: float,
        activation: Optional[str],
        running_mean: Optional[Tensor] = None,  # (G,)
        running_var: Optional[Tensor] = None,  # (G,)
        momentum: float = 0.1,
        *,
        center: bool = True,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        n = x.shape[0]
        g = num_groups
        acc = compute_dtype(x.dtype)
        xg = x.to(acc).reshape(n, g, -1)  # (N, G, C/G * spatial)
        dims = (0, 2) if over_batch else (2,)
        m = xg.shape[2] * (n if over_batch else 1)  # elements per statistic
        centred, mean, var = centred_moments(xg, dims, center)
        rstd = torch.rsqrt(var + eps)
        stat_shape = (g,) if over_batch else (n, g)
        running = running_mean is not None or running_var is not None
        if running and over_batch:
            # before the tensors y's backward saves: a non-reentrant checkpoint recomputes up to
            # the last of them, so BN's buffers move again there, as torch's BatchNorm's do (its
            # InstanceNorm's move once: the update after them, below)
            update_running_stats(running_mean, running_var, mean.detach().reshape(stat_shape),
                                 var.detach().reshape(stat_shape), m, momentum)
        y = (centred * rstd).reshape(x.shape)

        if weight is not None:
            y = y * channel_view(weight.to(acc), x.dim())
        if bias is not None:
            y = y + channel_view(bias.to(acc), x.dim())
        y = apply_activation(y, activation)
        y = y.to(x.dtype).contiguous(memory_format=output_memory_format(x))

        mean_out = mean.detach().reshape(stat_shape)
        rstd_out = rstd.detach().reshape(stat_shape)
        if running and not over_batch:
            update_running_stats(
                running_mean, running_var, mean_out, var.detach().reshape(stat_shape), m, momentum
            )
        return y, mean_out, rstd_out

    def normalize_fixed(
        self,
        x: Tensor,  # (N, C, *spatial)
        mean: Tensor,  # (C,)
        var: Tensor,  # (C,)
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        eps: float,
        activation: Optional[str],
    ) -> Tensor:
        acc = compute_dtype(x.dtype)
        rstd = torch.rsqrt(var.to(acc) + eps)
        y = (x.to(acc) - channel_view(mean.to(acc), x.dim())) * channel_view(rstd, x.dim())
        if weight is not None:
            y = y * channel_view(weight.to(acc), x.dim())
        if bias is not None:
            y = y + channel_view(bias.to(acc), x.dim())
        y = apply_activation(y, activation)
        return y.to(x.dtype).contiguous(memory_format=output_memory_format(x))


def centred_moments(
    xg: Tensor, dims: Tuple[int, ...], center: bool = True
) -> Tuple[Tensor, Tensor, Tensor]:
    """The operator's reductions: ``(xg - mean, mean, var)`` over ``dims`` (kept as size 1),
    differentiable, in ``xg``'s dtype (the caller has cast it to the accumulation dtype).

    ``var`` is biased. With ``center=False`` nothing is subtracted: ``mean`` is zeros and ``var``
    the mean square. Centred moments are summed over shifted data: one element of each
    statistic's set is subtracted first. The result does not depend on the shift, ``x - shift``
    is exact when the two are close, and the sums then run over small numbers, so float32 keeps
    full accuracy even when |mean| >> std (e.g. 1e4 + 0.1 * randn). The variance takes a second
    pass over the centred data, never ``E[x^2] - E[x]^2``; the centred data is returned as it was
    summed (``(x - shift) - mean_s``, not ``x - mean``, which would round ``mean`` first).
    """
    if not center:
        ms = xg.square().mean(dim=dims, keepdim=True)
        return xg, torch.zeros_like(ms), ms
    index = [slice(None)] * xg.dim()
    for d in dims:
        index[d] = slice(0, 1)
    shift = xg[tuple(index)].detach()
    shift = torch.where(shift.isfinite(), shift, 0.0)  # an inf shift would make inf - inf
    xs = xg - shift
    mean_s = xs.mean(dim=dims, keepdim=True)
    centred = xs - mean_s
    var = centred.square().mean(dim=dims, keepdim=True)  # biased, second pass
    return centred, mean_s + shift, var


def update_running_stats(
    running_mean: Optional[Tensor],  # (G,)
    running_var: Optional[Tensor],  # (G,)
    batch_mean: Tensor,  # (G,) or (N, G): per-sample statistics are averaged over N
    batch_var: Tensor,  # biased, same shape as batch_mean
    count: int,  # elements behind each statistic
    momentum: float,
) -> None:
    """running <- (1 - momentum) * running + momentum * batch; the variance stored is unbiased.
    One ``lerp_`` per buffer (that formula, one kernel), plus the unbiasing scale.

    Outside autograd through detached statistics, with a ``torch.no_grad()`` block only where a
    buffer requires grad: torch.export records a no_grad block that only mutates buffers as a
    node that ``torch.export.load`` refuses ("wrap_with_set_grad_enabled is missing val")."""
    batch_mean, batch_var = batch_mean.detach(), batch_var.detach()
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (running_mean, running_var)):
        with torch.no_grad():
            return update_running_stats(running_mean, running_var, batch_mean, batch_var,
                                        count, momentum)
    unbiased = batch_var * (count / (count - 1)) if count > 1 else batch_var
    if batch_mean.dim() == 2:  # per-sample statistics (InstanceNorm with running stats)
        batch_mean, unbiased = batch_mean.mean(0), unbiased.mean(0)
    if running_mean is not None:
        running_mean.lerp_(batch_mean.to(running_mean.dtype), momentum)
    if running_var is not None:
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)


BACKEND = ReferenceBackend()
