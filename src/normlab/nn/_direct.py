"""Direct routes for the common case of FRN, EvoNorm-B0 and FrozenBN (private).

What these modules compute is unchanged; the routes skip layers and torch's slow backward
formulas where that gives the same output (benchmarks/NOTES.md, "FRN, EvoNorm and FrozenBN:
where the time goes, and direct routes"):

* :func:`maximum` (FRN's TLU, EvoNorm-B0's denominator): ``torch.maximum`` with a backward of
  multiplies instead of torch's ``where`` and ``masked_fill`` on bool masks (10-20x slower on
  the CPU), from :data:`MAXIMUM_MIN_NUMEL` elements. Ties (``a == b``) split the gradient in
  halves, as torch's do.
* :func:`frn_tlu`: FRN + TLU by the op the native backend runs (``torch._fused_rms_norm`` on
  the (N, C, HW) view), without the operator's layers, and with a closed-form backward.
* :func:`frozen_bn`: ``torch.batch_norm`` in eval mode with the backward ``dy * scale``.

Every route is taken only for a :func:`plain_call`: a call that no tracer, compiler, exporter,
torch.func transform or tensor subclass sees, so what those record is the modules' usual code.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import has_torch_function_variadic

from normlab.backends import IS_EXPORTING, native_in_force
from normlab.backends.reference import under_torch_func

#: torch >= 2.8: the op the native backend runs for statistics without centering
_FUSED_RMS = getattr(torch, "_fused_rms_norm", None)
_FLOATS = (torch.float32, torch.float64)
_DEVICES = ("cpu", "cuda")
_IS_TRACING = torch.jit.is_tracing
_IS_COMPILING = torch.compiler.is_compiling


def plain_call(x: Tensor, *params: Optional[Tensor]) -> bool:
    """Whether a module's call on ``x`` with ``params`` may take a direct route: CPU or CUDA
    tensors that no ``__torch_function__`` override sees, outside torch.jit.trace (and the
    TorchScript ONNX exporter), torch.compile, torch.export, torch.func transforms and
    forward-mode AD (the routes' autograd.Functions have no forward-mode formula)."""
    return (not _IS_COMPILING()
            and x.device.type in _DEVICES
            and not has_torch_function_variadic(x, *params)
            and not _IS_TRACING()
            and not (IS_EXPORTING is not None and IS_EXPORTING())
            and not under_torch_func(x)
            and forward_ad._current_level < 0)


def wants_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records a call on ``tensors`` (grad mode on, one of them requires grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # (a loop: any() over a generator costs twice as much here)
        if t is not None and t.requires_grad:
            return True
    return False


def _tie_weights(a: Tensor, b: Tensor) -> Tensor:
    """The share of ``maximum(a, b)``'s gradient that goes to ``a``: 1 where a > b, 1/2 where
    a == b, 0 where a < b (torch's split); ``(sign(a - b) + 1) / 2``, exact in every dtype."""
    return torch.sign(a - b).add_(1.0).mul_(0.5)


def _sum_to(g: Tensor, shape: torch.Size) -> Tensor:
    return g if g.shape == shape else g.sum_to_size(shape)


class _Maximum(torch.autograd.Function):
    """``torch.maximum(a, b)``; backward ``g * w`` and ``g * (1 - w)`` summed to each operand's
    shape, with ``w`` the tie weights (torch: where/masked_fill on bool masks, the same values;
    -0 where torch writes +0). Differentiable again: ``w`` is piecewise constant, as torch's
    masks are."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(_tie_weights(a, b))
        ctx.shapes = (a.shape, b.shape)
        return torch.maximum(a, b)

    @staticmethod
    def backward(ctx, g: Tensor):
        (w,) = ctx.saved_tensors
        shape_a, shape_b = ctx.shapes
        ga = _sum_to(g * w, shape_a) if ctx.needs_input_grad[0] else None
        gb = _sum_to(g * (1.0 - w), shape_b) if ctx.needs_input_grad[1] else None
        return ga, gb


#: :func:`maximum`'s Function only from this many elements (the larger operand): below, its
#: own Python costs more than torch's backward takes (EvoNorm-B0's step on the development CPU,
#: one thread: 1.10x at 2K elements, 1.0x at 16K, 0.85x at 32K, 0.65-0.7x at 64K)
MAXIMUM_MIN_NUMEL = 1 << 14


def maximum(a: Tensor, b: Tensor) -> Tensor:
    """``torch.maximum(a, b)`` (same dtypes); through :class:`_Maximum` where a gradient is
    wanted on a plain call of at least :data:`MAXIMUM_MIN_NUMEL` elements."""
    # plain_call before the size test: under torch.export that would guard a symbolic batch
    if (wants_grad(a, b) and plain_call(a, b)
            and max(a.numel(), b.numel()) >= MAXIMUM_MIN_NUMEL):
        return _Maximum.apply(a, b)
    return torch.maximum(a, b)


def frn_direct(x: Tensor, weight: Tensor, bias: Tensor, tau: Optional[Tensor]) -> bool:
    """Whether FRN's call on a checked (N, C, H, W) ``x`` may run :func:`frn_tlu`: where the
    native backend would run ``_fused_rms_norm`` on x as it is (native in force, a non-empty
    NCHW float32/float64 input, parameters in its dtype) on a plain call."""
    dtype = x.dtype
    # plain_call first: under torch.export a size test on a symbolic batch would guard it
    return (_FUSED_RMS is not None and plain_call(x, weight, bias, tau) and dtype in _FLOATS
            and weight.dtype == dtype and bias.dtype == dtype
            and (tau is None or tau.dtype == dtype) and x.numel() > 0 and x.is_contiguous()
            and native_in_force(None, x))


def _frn_forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """``(y, x_hat, rstd)``: the native backend's ops for FRN on NCHW x (the same bits)."""
    n, c, h, w = x.shape
    yg, rstd = _FUSED_RMS(x.reshape(n, c, h * w), [h * w], None, eps)
    x_hat = yg.reshape(x.shape)
    return x_hat * weight.reshape(1, c, 1, 1) + bias.reshape(1, c, 1, 1), x_hat, rstd


class _FrnTlu(torch.autograd.Function):
    """FRN (+ TLU where tau is given) on NCHW x with the closed-form backward:
    dy = g * w_tlu, dtau = sum g (1 - w_tlu), dbeta = sum dy, dgamma = sum dy x_hat,
    dx = rstd gamma (dy - x_hat mean_HW(dy x_hat)). Under ``create_graph`` (a second derivative
    wanted) the backward differentiates the forward's ops again instead, as autograd did."""

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps):
        y, x_hat, rstd = _frn_forward(x, weight, bias, eps)
        if tau is None:
            z, w_tlu = y, None
        else:
            t = tau.reshape(1, -1, 1, 1)
            z, w_tlu = torch.maximum(y, t), _tie_weights(y, t)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, bias, tau, x_hat, rstd, w_tlu)
        return z

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, tau, x_hat, rstd, w_tlu = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: autograd through the forward's ops
            return _frn_double_backward(ctx, g, x, weight, bias, tau)
        need_x, need_w, need_b, need_t, _ = ctx.needs_input_grad
        dy = g if w_tlu is None else g * w_tlu
        dims = (0, 2, 3)
        dtau = (g * (1.0 - w_tlu)).sum(dims) if need_t else None
        dbias = dy.sum(dims) if need_b else None
        dweight = dx = None
        if need_w or need_x:
            dy_xhat = dy * x_hat
            if need_w:
                dweight = dy_xhat.sum(dims)
            if need_x:
                n, c = x.shape[:2]
                dot = dy_xhat.mean((2, 3), keepdim=True)
                scale = rstd.reshape(n, c, 1, 1) * weight.reshape(1, c, 1, 1)
                dx = (dy - x_hat * dot) * scale
        return dx, dweight, dbias, dtau, None


def _frn_double_backward(ctx, g, x, weight, bias, tau):
    """The gradients as autograd computes them through FRN's ops, in the graph of the saved
    inputs (``create_graph``: a second derivative is wanted)."""
    with torch.enable_grad():
        y = _frn_forward(x, weight, bias, ctx.eps)[0]
        z = y if tau is None else torch.maximum(y, tau.reshape(1, -1, 1, 1))
    needs = ctx.needs_input_grad[:4]
    wanted = [t for t, need in zip((x, weight, bias, tau), needs) if need]
    grads = iter(torch.autograd.grad(z, wanted, g, create_graph=True))
    return tuple(next(grads) if need else None for need in needs) + (None,)


def frn_tlu(x: Tensor, weight: Tensor, bias: Tensor, tau: Optional[Tensor],
            eps: float) -> Tensor:
    """FRN (+ TLU) on a call :func:`frn_direct` accepted: the native backend's ops, and
    :class:`_FrnTlu` where a gradient is wanted. The output has the operator's bits."""
    if wants_grad(x, weight, bias, tau):
        return _FrnTlu.apply(x, weight, bias, tau, eps)
    y = _frn_forward(x, weight, bias, eps)[0]
    return y if tau is None else torch.maximum(y, tau.reshape(1, -1, 1, 1))


#: FrozenBN's Function only from this many elements: below, its own Python (~25 us a call) costs
#: more than it saves on ATen's eval-mode backward (measured on the development CPU, one
#: thread: 1.17x at 65K elements, 0.97x at 131K, 0.49x at 262K; benchmarks/NOTES.md)
FROZEN_BN_MIN_NUMEL = 1 << 18


def frozen_bn_direct(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """Whether FrozenBN's call on a checked ``x`` may run :func:`frozen_bn`: where the native
    backend runs ``torch.batch_norm`` on the arguments as they are (native in force, a
    non-empty input, buffers in x's dtype, statistics that do not require grad), on a plain
    call."""
    dtype = x.dtype
    # plain_call before the size test: under torch.export that would guard a symbolic batch
    return (plain_call(x, mean, var, weight, bias) and mean.dtype == dtype
            and var.dtype == dtype and weight.dtype == dtype and bias.dtype == dtype
            and not (mean.requires_grad or var.requires_grad) and x.numel() > 0
            and native_in_force(None, x))


class _FrozenBatchNorm(torch.autograd.Function):
    """``torch.batch_norm`` in eval mode (its output bits); backward ``dy * scale`` with
    ``scale = gamma / sqrt(var + eps)`` per channel, one multiply (ATen's eval-mode backward
    takes ~6x as long on the CPU). Linear in dy: differentiable again."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):
        ctx.save_for_backward(var, weight)
        ctx.eps = eps
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)

    @staticmethod
    def backward(ctx, g):
        var, weight = ctx.saved_tensors
        scale = weight * torch.rsqrt(var + ctx.eps)
        return g * scale.reshape((1, -1) + (1,) * (g.dim() - 2)), None, None, None, None, None


def frozen_bn(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
              eps: float) -> Tensor:
    """FrozenBN's normalization (before any activation) on a call :func:`frozen_bn_direct`
    accepted: ``torch.batch_norm`` in eval mode, the op native runs (the same bits, without
    ``batch_norm``'s and ``normalize_fixed``'s layers); through :class:`_FrozenBatchNorm` where
    a gradient is wanted for a float32/float64 x alone of at least
    :data:`FROZEN_BN_MIN_NUMEL` elements."""
    if (wants_grad(x) and x.dtype in _FLOATS and x.numel() >= FROZEN_BN_MIN_NUMEL
            and not (weight.requires_grad or bias.requires_grad)):
        return _FrozenBatchNorm.apply(x, mean, var, weight, bias, eps)
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
