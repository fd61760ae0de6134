"""normlab.functional: the one normalization operator and torch-compatible wrappers around it.

Every normalization layer in normlab is :func:`normalize` (Wu & He, "Group Normalization",
ECCV 2018, section 3.1). For ``x`` of shape ``(N, C, *spatial)`` split into ``G`` groups of ``C/G``
channels::

    y = act(gamma_c * (x - mu) / sqrt(sigma^2 + eps) + beta_c)

with ``mu`` and the biased ``sigma^2`` taken over

=================================  =====================  ==========================
layer                              ``num_groups``          ``over_batch``
=================================  =====================  ==========================
BatchNorm                          C                       True   (N, spatial)
LayerNorm (conv form)              1                       False  (C, spatial)
InstanceNorm                       C                       False  (spatial)
GroupNorm                          G                       False  (C/G, spatial)
batch-group norm                   G                       True   (N, C/G, spatial)
=================================  =====================  ==========================

``center=False`` takes the statistics without centering: ``mu = 0`` and ``sigma^2`` the mean
square (RMSNorm, Filter Response Normalization). :func:`moments` returns the operator's
statistics themselves, differentiable (EvoNorm divides by them).

The wrappers :func:`batch_norm`, :func:`layer_norm`, :func:`instance_norm`, :func:`group_norm` and
:func:`rms_norm` take the arguments of their ``torch.nn.functional`` namesakes. All take a keyword ``backend``
(see :mod:`normlab.backends`).

Like torch.nn.functional, every public op here dispatches ``__torch_function__`` on its tensor
arguments: ``torch.fx.symbolic_trace`` records a call as one call_function node (a Proxy
cannot answer the shape checks), and tensor subclasses see the call. ``torch.export`` and
``torch.compile(fullgraph=True)`` trace through them. Under ``torch.onnx.export``'s TorchScript
exporter (``dynamo=False``, torch's default before 2.9) every call is traced as ops that have an
ONNX form (see :func:`_onnx_traced`); the exporter of ``torch.export`` (``dynamo=True``) takes the
backends' ops as they are.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from normlab.backends import IS_EXPORTING, get_backend, native_in_force, resolve_backend
from normlab.backends.reference import (
    FUSED_ACTIVATIONS,
    apply_activation,
    centred_moments,
    channel_view,
    compute_dtype,
    output_memory_format,
)

__all__ = [
    "normalize",
    "normalize_fixed",
    "moments",
    "batch_norm",
    "layer_norm",
    "instance_norm",
    "group_norm",
    "rms_norm",
    "InputShapeError",
    "FUSED_ACTIVATIONS",
]


# --------------------------------------------------------------------------------------------
# argument checks (shared by the modules): every message names the offending value
# --------------------------------------------------------------------------------------------


class InputShapeError(ValueError, RuntimeError):
    """An input (or parameter) whose shape does not fit the call: a ValueError, as normlab's
    input errors are, and also the RuntimeError torch raises for the same input ("Expected
    weight to be a vector of size equal to the number of channels", "Given normalized_shape=...,
    expected input with shape ..."), so code written for torch (``except RuntimeError``) still
    catches it."""


def check_input(x, what: str = "input") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{what} must have a floating-point dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}"
        )
    if x.dim() < 2:
        raise InputShapeError(
            f"{what} must have shape (N, C, *spatial) with at least 2 dims, got shape "
            f"{tuple(x.shape)} ({x.dim()}D)"
        )


def check_eps(eps) -> float:
    if type(eps) is float and 0.0 < eps < math.inf:  # the usual case, cheaply
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):  # numpy scalars too (torch's rule)
        raise TypeError(f"eps must be a positive float, got {eps!r}")
    value = float(eps)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return value


def check_groups(num_groups, num_channels: int, torch_text: str = "") -> int:
    if type(num_groups) is not int:
        if (isinstance(num_groups, Tensor) and num_groups.dim() == 0
                and not num_groups.is_floating_point() and num_groups.dtype != torch.bool):
            # torch.jit.trace hands sizes (BN's and IN's G = x.shape[1]) over as 0-d tensors
            num_groups = int(num_groups)
        elif isinstance(num_groups, torch.SymInt):
            pass  # a symbolic size (torch.export / compile with a dynamic dim): int() would fix it
        elif isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
            raise TypeError(f"num_groups must be an int, got {num_groups!r}")
        else:
            num_groups = int(num_groups)  # a numpy integer, as torch takes it
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if num_channels % num_groups != 0:
        raise InputShapeError(
            f"{torch_text}num_channels={num_channels} is not divisible by num_groups={num_groups}"
        )
    return num_groups


def check_flag(value, what: str) -> bool:
    """A flag of the operator (``over_batch``, ``center``) as a Python bool: a bool, or a numpy
    bool (a config's ``np.bool_``). An int (0/1 too) is refused, as a bool is where an int or a
    float is asked (``num_groups``, ``eps``): a flag that chooses the statistics set is not a
    number; nor is a tensor, None or a string ("yes" was truthy, None falsy, both silently)."""
    if type(value) is bool:
        return value
    numpy = sys.modules.get("numpy")  # (not imported: then the value is no numpy bool)
    if numpy is not None and isinstance(value, numpy.bool_):
        return bool(value)
    raise TypeError(f"{what} must be a bool, got {value!r}")


def check_activation(activation: Optional[str]) -> Optional[str]:
    if activation is None:
        return None
    if not isinstance(activation, str) or activation.lower() not in FUSED_ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; expected None or one of "
            f"{', '.join(FUSED_ACTIVATIONS)}"
        )
    return activation.lower()


def _check_channel_param(p: Optional[Tensor], c: int, what: str) -> None:
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(f"{what} must be a Tensor or None, got {type(p).__name__}")
    if p.numel() != c or p.dim() != 1:
        raise InputShapeError(
            f"{what} must have shape ({c},) to match the {c} channels of the input, "
            f"got shape {tuple(p.shape)}"
        )
    if not p.is_floating_point():  # (int/bool were used as float, complex crashed triton)
        raise TypeError(f"{what} must have a floating-point dtype, got {p.dtype}")


def _running_buffer_error(buf, num_groups: int, name: str) -> None:
    """Raise the error for a running buffer that is not a floating (G,) tensor (a wrong shape:
    torch's RuntimeError too, as for weight and bias)."""
    if not isinstance(buf, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(buf).__name__}")
    if buf.shape != (num_groups,):
        raise InputShapeError(
            f"{name} must have shape ({num_groups},) (one entry per group), got {tuple(buf.shape)}"
        )
    raise TypeError(f"{name} must have a floating-point dtype, got {buf.dtype}")


def _running_buffer_grad_error(name: str) -> None:
    """A running buffer that requires grad, with grad enabled: refused for every backend, as
    torch's batch_norm and instance_norm refuse it (ATen's RuntimeError, the buffer named; the
    reference and triton backends updated it silently, native raised on its batch-norm paths
    only). The running update is in place and outside autograd, so no gradient could follow it.
    Under torch.no_grad() or inference_mode it is updated, as torch does; an empty input, which
    leaves the buffers alone, passes, as in torch's batch_norm."""
    raise RuntimeError(
        f"{name} cannot have requires_grad True while grad is enabled: the running statistics "
        "are updated in place, outside autograd (torch's batch_norm refuses it too); detach it, "
        "or update it under torch.no_grad()"
    )


# torch's fixed texts, which users and libraries match on; the offending values follow
_DIVISIBLE = "Expected number of channels in input to be divisible by num_groups, but "
_ONE_VALUE = "Expected more than 1 value per channel when training"
_ONE_SPATIAL = "Expected more than 1 spatial element when training"


def _check_batch_stat_size(x: Tensor, num_groups: int) -> None:
    """Batch statistics from a single value are undefined (torch raises too)."""
    per_stat = x.numel() // max(num_groups, 1)
    if per_stat <= 1 and x.numel() > 0:
        raise ValueError(
            f"{_ONE_VALUE}, got input of shape {tuple(x.shape)} ({per_stat} value per channel "
            "with batch statistics)"
        )


def _check_group_size(x: Tensor, num_groups: int) -> None:
    """torch's rule for GroupNorm: one value per group over the whole batch (N * C/G * spatial
    = 1) is refused; its statistics would be a single value (ATen returns garbage there)."""
    if x.numel() // num_groups == 1:
        raise ValueError(
            f"{_ONE_VALUE}, got input of shape {tuple(x.shape)} with num_groups={num_groups} "
            "(1 value per group over the batch)"
        )


# --------------------------------------------------------------------------------------------
# the operator
# --------------------------------------------------------------------------------------------


def normalize(
    x: Tensor,
    num_groups: int,
    over_batch: bool,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    backend: Optional[str] = None,
    *,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    momentum: float = 0.1,
    return_stats: bool = False,
    center: bool = True,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """Normalize ``x`` over the statistics set chosen by ``num_groups`` and ``over_batch``.

    Args:
        x: ``(N, C, *spatial)``, contiguous, channels_last or strided; 0 to 3 spatial dims
            reach the backends as they are, more are flattened into one (the statistics sets
            do not change). An empty ``x`` gives an empty ``y`` and leaves running stats alone.
            float16/bfloat16 inputs are accumulated in float32.
        num_groups: G; must divide C. ``C`` for BN/IN, ``1`` for LN, ``G`` for GN.
        over_batch: take the statistics over the batch too (BN, batch-group norm). A bool (a
            numpy bool too); anything else, 0 and 1 included, is a TypeError.
        weight, bias: per-channel affine ``(C,)`` or None.
        eps: added to the biased variance inside the square root; > 0.
        activation: None, ``"relu"``, ``"silu"`` or ``"gelu"`` (exact), applied after the affine.
        backend: ``"reference"``, ``"native"``, ``"triton"``, ``"auto"`` or None (the backend in
            force: :func:`normlab.use_backend`, ``$NORMLAB_BACKEND``, else auto).
        running_mean, running_var: ``(G,)`` buffers updated in place with the batch (or, when not
            over_batch, the batch-averaged per-sample) statistics; the variance is stored unbiased.
            One that requires grad is a RuntimeError while grad is enabled, as in torch.
        momentum: weight of the new statistic in the running update.
        return_stats: also return ``mean`` and ``rstd`` (float32, or float64 for float64 input; a
            bool, as ``over_batch``),
            shape ``(G,)`` if over_batch else ``(N, G)``.
        center: subtract the mean (default). ``False``: ``y = act(gamma_c * x / sqrt(mean(x^2) +
            eps) + beta_c)``, the statistics of RMSNorm and FRN; the returned mean is zeros.
            Not combined with running statistics.

    Returns:
        ``y`` with x's shape, dtype and memory format; ``(y, mean, rstd)`` if return_stats.

    Example::

        >>> x = torch.randn(8, 64, 16, 16)
        >>> y = normalize(x, num_groups=32, over_batch=False)   # GroupNorm, G = 32
        >>> torch.allclose(y, torch.nn.functional.group_norm(x, 32), atol=1e-5)
        True
    """
    if has_torch_function_variadic(x, weight, bias, running_mean, running_var):
        return handle_torch_function(
            normalize, (x, weight, bias, running_mean, running_var), x, num_groups, over_batch,
            weight, bias, eps, activation, backend, running_mean=running_mean,
            running_var=running_var, momentum=momentum, return_stats=return_stats, center=center,
        )
    check_input(x)
    num_groups, eps, activation, over_batch, center, return_stats = _check_operator_args(
        x, num_groups, over_batch, weight, bias, eps, activation, running_mean, running_var,
        momentum, return_stats, center,
    )
    return _dispatch(
        x, num_groups, over_batch, weight, bias, eps, activation, backend, running_mean,
        running_var, momentum, return_stats, center,
    )


def _check_operator_args(x, num_groups, over_batch, weight, bias, eps, activation, running_mean,
                         running_var, momentum, return_stats, center):
    """:func:`normalize`'s checks of its arguments on an input ``x`` that passed
    :func:`check_input` (every message names the offending value): ``(num_groups, eps,
    activation, over_batch, center, return_stats)`` as the operator reads them."""
    c = x.shape[1]
    num_groups = check_groups(num_groups, c, _DIVISIBLE)
    eps = check_eps(eps)
    activation = check_activation(activation)
    _check_channel_param(weight, c, "weight")
    _check_channel_param(bias, c, "bias")
    over_batch = check_flag(over_batch, "over_batch")
    if over_batch:
        _check_batch_stat_size(x, num_groups)
    center = check_flag(center, "center")
    return_stats = check_flag(return_stats, "return_stats")
    if running_mean is not None or running_var is not None:
        if not center:
            raise ValueError(
                "running statistics are kept for centred statistics only: got center=False with "
                "running_mean/running_var"
            )
        for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
            if buf is None:
                continue
            if (
                not isinstance(buf, Tensor)
                or buf.shape != (num_groups,)
                or not buf.is_floating_point()
            ):
                _running_buffer_error(buf, num_groups, name)
            if buf.requires_grad and x.numel() > 0 and torch.is_grad_enabled():
                _running_buffer_grad_error(name)
        if isinstance(momentum, (str, bytes)) or not isinstance(
            momentum, (numbers.Real, Tensor, torch.SymInt, torch.SymFloat)
        ):  # (None, the modules' cumulative average, was a lerp_ or ATen argument error)
            raise TypeError(
                f"momentum must be a float when running statistics are given, got {momentum!r}"
            )
    return num_groups, eps, activation, over_batch, center, return_stats


def _dispatch(
    x: Tensor,
    num_groups: int,
    over_batch: bool,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    activation: Optional[str],
    backend: Optional[str],
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    momentum: float = 0.1,
    return_stats: bool = False,
    center: bool = True,
    *,
    exporting: Optional[bool] = None,
):
    """The operator on arguments that are already checked: pick the backend, run it.

    :func:`normalize` checks and then calls this; wrappers that have checked their own
    arguments (``layer_norm``) call it directly, so a small layer pays for its checks once
    (``exporting``: what :func:`_legacy_onnx_export` told the caller; None: ask it here).
    """
    if x.numel() == 0:
        y, mean, rstd = _normalize_empty(x, num_groups, over_batch, weight, bias, activation)
        if not center:
            mean = torch.zeros_like(mean)
        return (y, mean, rstd) if return_stats else y
    if x.dim() > 5:  # more than 3 spatial dims: the statistics sets are the same over one
        out = _dispatch(
            x.reshape(x.shape[0], x.shape[1], -1), num_groups, over_batch, weight, bias, eps,
            activation, backend, running_mean, running_var, momentum, return_stats, center,
        )
        if return_stats:
            return (out[0].reshape(x.shape),) + tuple(out[1:])
        return out.reshape(x.shape)
    if exporting is None:
        exporting = _legacy_onnx_export()
    if exporting:
        return _onnx_traced(x, num_groups, over_batch, weight, bias, eps, activation, running_mean,
                            running_var, momentum, return_stats, center)
    impl = resolve_backend(backend, x, num_groups, over_batch, activation, center)
    if (over_batch and center and not return_stats and IS_EXPORTING is not None
            and IS_EXPORTING()
            and impl.name == "native"
            and _batch_norm_as_torchs(x, num_groups, weight, bias, running_mean, running_var)):
        y = torch.batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps,
                             False)
        return apply_activation(y, activation)
    if (return_stats and center and x.dtype in _HALF and impl.name == "native"
            and (weight is None or weight.dtype != torch.float32)):
        # ATen's kernels compute half-input statistics in float32 but hand them back in the
        # parameters' dtype (bf16 mean/rstd: 3 digits); float32 parameters keep them float32.
        # Only here, where return_stats is known: without it nobody sees them (the other
        # backends return float32 statistics anyway).
        weight = (
            torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
            if weight is None
            else weight.float()
        )
    if center:  # (a backend without center support is called as before)
        y, mean, rstd = impl.normalize(
            x, num_groups, over_batch, weight, bias, eps, activation, running_mean, running_var,
            momentum,
        )
    else:
        y, mean, rstd = impl.normalize(
            x, num_groups, over_batch, weight, bias, eps, activation, running_mean, running_var,
            momentum, center=False,
        )
    return (y, mean, rstd) if return_stats else y


_HALF = (torch.float16, torch.bfloat16)
#: whether ATen has the fused RMS kernel native runs (torch >= 2.8)
_FUSED_RMS = hasattr(torch.ops.aten, "_fused_rms_norm")


def _legacy_onnx_export() -> bool:
    """Whether ``torch.onnx.export``'s TorchScript exporter (``dynamo=False``) is tracing the
    call. The ATen kernels the native backend calls have no ONNX form there
    (``native_group_norm``, ``_fused_rms_norm``) or need a constant width
    (``native_layer_norm``), and Triton's have none."""
    return _IS_TRACING() and torch.onnx.is_in_onnx_export()


_IS_TRACING = torch.jit.is_tracing  # (looked up once)


def _is_dtensor(x: Tensor) -> bool:
    """Whether ``x`` is a ``DTensor`` (torch.distributed's sharded tensor; its class lives in
    ``torch.distributed._tensor`` before torch 2.5). Not imported here: a DTensor exists only
    where its module is loaded."""
    if type(x) is Tensor:  # the usual case, cheaply
        return False
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None and isinstance(x, cls):
            return True
    return False


def _batch_norm_as_torchs(x, num_groups, weight, bias, running_mean, running_var) -> bool:
    """Whether a centred training call over the batch that torch.export is tracing is one
    ``torch.batch_norm`` computes as native would (G = C, one dtype, both running buffers or
    none). The program then holds ``aten.batch_norm``, the op torch's BatchNorm gives, where
    tools look for it (PT2E QAT's conv-BN fusion and its quantizers' conv-bn-relu patterns;
    native's ``native_batch_norm``, which also returns the statistics, was not matched)."""
    return (num_groups == x.shape[1] and (running_mean is None) == (running_var is None)
            and _same_dtype(x, weight, bias, running_mean, running_var))


def _same_dtype(x: Tensor, *params: Optional[Tensor]) -> bool:
    dtype = x.dtype
    for p in params:  # (a loop: all() over a generator costs twice as much on this hot path)
        if p is not None and p.dtype != dtype:
            return False
    return True


def _onnx_traced(x, num_groups, over_batch, weight, bias, eps, activation, running_mean,
                 running_var, momentum, return_stats, center):
    """The call as the TorchScript ONNX exporter can write it, whatever backend is in force:
    torch's group norm (ONNX InstanceNormalization on the (N, G, rest) view, then the affine)
    for centred statistics per sample, the reference backend's plain tensor ops otherwise
    (statistics over the batch, without centering, statistics returned, mixed dtypes)."""
    if (center and not over_batch and not return_stats and running_mean is None
            and running_var is None and _same_dtype(x, weight, bias)):
        y = torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)
        return apply_activation(y, activation)
    kwargs = {} if center else {"center": False}
    y, mean, rstd = get_backend("reference").normalize(
        x, num_groups, over_batch, weight, bias, eps, activation, running_mean, running_var,
        momentum, **kwargs)
    return (y, mean, rstd) if return_stats else y


def _normalize_empty(x, num_groups, over_batch, weight, bias, activation):
    """An input with no elements (N = 0, or a zero-size spatial dim), as torch.nn treats it:
    an empty output that stays in the autograd graph of x, weight and bias (their gradients are
    zeros), running statistics untouched, statistics of an empty set (NaN) where they have a
    shape."""
    y = x
    if weight is not None:
        y = y * channel_view(weight, x.dim()).to(x.dtype)
    if bias is not None:
        y = y + channel_view(bias, x.dim()).to(x.dtype)
    y = apply_activation(x.clone() if y is x else y, activation)
    y = y.contiguous(memory_format=output_memory_format(x))
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    stat_shape = (num_groups,) if over_batch else (x.shape[0], num_groups)
    mean = torch.full(stat_shape, float("nan"), dtype=stat_dtype, device=x.device)
    return y, mean, mean.clone()


def normalize_fixed(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Per-channel normalization with given statistics (BatchNorm in eval, FrozenBatchNorm).

    ``y = act(weight_c * (x - mean_c) / sqrt(var_c + eps) + bias_c)``; mean, var: ``(C,)``.
    An empty ``x`` gives an empty ``y`` whatever the backend, as :func:`normalize`.
    """
    if has_torch_function_variadic(x, mean, var, weight, bias):
        return handle_torch_function(
            normalize_fixed, (x, mean, var, weight, bias), x, mean, var, weight, bias, eps,
            activation, backend,
        )
    check_input(x)
    c = x.shape[1]
    eps = check_eps(eps)
    activation = check_activation(activation)
    for name, p in (("weight", weight), ("bias", bias), ("running_mean", mean), ("running_var", var)):
        _check_channel_param(p, c, name)
    if mean is None or var is None:
        raise ValueError(
            "normalize_fixed needs the statistics: got "
            f"mean={'None' if mean is None else 'a Tensor'}, var={'None' if var is None else 'a Tensor'}"
        )
    if x.numel() == 0:
        # nothing to compute (normalize takes its empty path before any backend too): the
        # reference arithmetic gives the empty output in the graph of weight and bias, where a
        # kernel backend may refuse an empty launch (and (0, C, -1) is no shape for a reshape)
        return get_backend("reference").normalize_fixed(x, mean, var, weight, bias, eps,
                                                        activation)
    shape = x.shape
    if x.dim() > 5:  # more than 3 spatial dims: per-channel statistics do not see them
        x = x.reshape(shape[0], shape[1], -1)
    # (under torch.onnx.export native: torch.batch_norm, ONNX BatchNormalization)
    impl = resolve_backend(backend, x, c, True, activation)
    y = impl.normalize_fixed(x, mean, var, weight, bias, eps, activation)
    return y.reshape(shape) if y.shape != shape else y


def moments(
    x: Tensor, num_groups: int, over_batch: bool, center: bool = True
) -> Tuple[Tensor, Tensor]:
    """The operator's statistics of ``x``, differentiable: ``(mean, var)``.

    The sets are :func:`normalize`'s (``num_groups`` G, ``over_batch``); ``var`` is the biased
    variance, or with ``center=False`` the mean square (``mean`` then zeros). Computed as the
    reference backend computes them (shifted two-pass sums), in float32 for half input and
    float64 for float64 input; shape ``(G,)`` if over_batch else ``(N, G)``. For layers that
    use the statistics other than as ``(x - mean) / sqrt(var + eps)`` (EvoNorm).

    Example::

        >>> x = torch.randn(4, 8, 5, 5) + 3
        >>> mean, var = moments(x, num_groups=2, over_batch=False)     # GroupNorm's, (N, G)
        >>> torch.allclose(var, x.reshape(4, 2, -1).var(-1, unbiased=False), atol=1e-5)
        True
    """
    if has_torch_function_variadic(x):
        return handle_torch_function(moments, (x,), x, num_groups, over_batch, center)
    check_input(x)
    num_groups = check_groups(num_groups, x.shape[1], _DIVISIBLE)
    over_batch = check_flag(over_batch, "over_batch")
    center = check_flag(center, "center")
    if over_batch:
        _check_batch_stat_size(x, num_groups)
    n = x.shape[0]
    per_group = (x.shape[1] // num_groups) * math.prod(x.shape[2:])  # not -1: N may be 0
    xg = x.to(compute_dtype(x.dtype)).reshape(n, num_groups, per_group)
    _, mean, var = centred_moments(xg, (0, 2) if over_batch else (2,), center)
    shape = (num_groups,) if over_batch else (n, num_groups)
    return mean.reshape(shape), var.reshape(shape)


# --------------------------------------------------------------------------------------------
# torch.nn.functional-compatible wrappers
# --------------------------------------------------------------------------------------------


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Batch normalization, as ``torch.nn.functional.batch_norm``: statistics over (N, *spatial).

    In training the batch statistics are used and the running buffers (if given) move by
    ``momentum``; otherwise the running statistics are used. An input without a channel dim is
    a ValueError naming its shape, except an empty one in training, which returns empty (as
    torch does).
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias), input, running_mean,
            running_var, weight, bias, training, momentum, eps, activation=activation,
            backend=backend,
        )
    if isinstance(input, Tensor) and input.dim() == 1 and input.numel() == 0 and training:
        check_input(input.unsqueeze(0))  # dtype check; an empty 1-D input has no statistics
        return input.clone()
    check_input(input)
    if training:
        return _batch_norm_training(input, running_mean, running_var, weight, bias, momentum,
                                    eps, activation, backend)
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm in eval mode (training=False) needs running_mean and running_var")
    return normalize_fixed(input, running_mean, running_var, weight, bias, eps, activation, backend)


def _batch_norm_training(input: Tensor, running_mean: Optional[Tensor],
                         running_var: Optional[Tensor], weight: Optional[Tensor],
                         bias: Optional[Tensor], momentum: float, eps: float,
                         activation: Optional[str], backend: Optional[str]) -> Tensor:
    """:func:`batch_norm` with batch statistics on a checked input: the operator's checks, then
    ATen's batch-norm op called directly where the native backend would run that op on the
    arguments as they are (:func:`_native_runs_torchs_batch_norm`), else the operator. The
    same kernel on the same data, without the operator's layers (``normalize`` would repeat
    the input checks, ``_dispatch`` and the backend pick native again): a few us a call, two
    calls a step for every ghost-BN layer (benchmarks/NOTES.md, "The lab's training loop")."""
    c = input.shape[1]
    _, eps, activation, _, _, _ = _check_operator_args(
        input, c, True, weight, bias, eps, activation, running_mean, running_var, momentum,
        False, True,
    )
    if (_native_runs_torchs_batch_norm(input, weight, bias, running_mean, running_var)
            and native_in_force(backend, input)):
        y = torch.native_batch_norm(input, weight, bias, running_mean, running_var, True,
                                    momentum, eps)[0]
        return apply_activation(y, activation)
    return _dispatch(input, c, True, weight, bias, eps, activation, backend, running_mean,
                     running_var, momentum)


def _native_runs_torchs_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                   running_mean: Optional[Tensor],
                                   running_var: Optional[Tensor]) -> bool:
    """Whether the operator would hand a checked training batch-norm call to the native
    backend's ``torch.native_batch_norm`` on ``x``, the affine and the running buffers as they
    are (native's usual case): a non-empty input with 0 to 3 spatial dims, everything in x's
    dtype, both running buffers or neither (native updates a lone one from a pass of its own),
    and no torch.export or jit trace (those record ``torch.batch_norm`` or the ONNX form)."""
    return (x.dim() <= 5 and x.numel() > 0 and (running_mean is None) == (running_var is None)
            and _same_dtype(x, weight, bias, running_mean, running_var)
            and not _IS_TRACING() and not (IS_EXPORTING is not None and IS_EXPORTING()))


def instance_norm(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Instance normalization, as ``torch.nn.functional.instance_norm``: statistics over spatial.

    With ``use_input_stats`` the running buffers (if given) receive the batch-averaged instance
    statistics; without it the running statistics normalize every instance. The output is
    contiguous whatever the input's memory format, as torch's.
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            instance_norm, (input, running_mean, running_var, weight, bias), input, running_mean,
            running_var, weight, bias, use_input_stats, momentum, eps, activation=activation,
            backend=backend,
        )
    check_input(input)
    if use_input_stats:
        spatial = math.prod(input.shape[2:])
        if spatial == 1:  # torch's rule: one value is refused, none (an empty input) is not
            raise ValueError(
                f"{_ONE_SPATIAL}, got input of shape {tuple(input.shape)} (use_input_stats=True)"
            )
        if _is_dtensor(input) and _same_dtype(input, weight, bias, running_mean, running_var):
            # torch's own op (a batch norm of the (1, N*C, *spatial) view), which DTensor
            # shards; its rule for the group-norm backward that normlab's backends call fails on
            # sharded input, and it has none for a call without weight
            y = torch.nn.functional.instance_norm(input, running_mean, running_var, weight, bias,
                                                  True, momentum, eps)
            return apply_activation(y, activation).contiguous()
        c = input.shape[1]
        y = normalize(
            input, c, False, weight, bias, eps, activation, backend,
            running_mean=running_mean, running_var=running_var, momentum=momentum,
        )
    elif running_mean is None or running_var is None:
        raise ValueError("instance_norm with use_input_stats=False needs running_mean and running_var")
    else:
        y = normalize_fixed(input, running_mean, running_var, weight, bias, eps, activation,
                            backend)
    return y.contiguous()


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Group normalization, as ``torch.nn.functional.group_norm``: statistics over (C/G, *spatial).

    As torch's, an input whose groups hold one value over the whole batch (N * C/G * spatial
    = 1) is a ValueError.
    """
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(
            group_norm, (input, weight, bias), input, num_groups, weight, bias, eps,
            activation=activation, backend=backend,
        )
    check_input(input)
    c = input.shape[1]
    num_groups = check_groups(num_groups, c, _DIVISIBLE)
    _check_group_size(input, num_groups)
    _check_channel_param(weight, c, "weight")
    _check_channel_param(bias, c, "bias")
    eps = check_eps(eps)
    activation = check_activation(activation)
    if input.dtype in _HALF and _autocasts_to_float32(input, _GROUP_NORM_FP32_AUTOCAST):
        # torch's group_norm runs in float32 under autocast on these devices (CUDA, ...): its
        # output is float32, as a drop-in's must be
        input, weight, bias = _float32(input, weight, bias)
    if _native_runs_torchs_group_norm(input, num_groups, weight, bias) and native_in_force(
            backend, input):
        # what native computes (ATen's group-norm kernel on the input as it is) through torch's
        # own op: no statistics handed back, none of the operator's layers (a few us a call:
        # benchmarks/NOTES.md, "Per-call overhead")
        return apply_activation(torch.group_norm(input, num_groups, weight, bias, eps), activation)
    return _dispatch(input, num_groups, False, weight, bias, eps, activation, backend)


def _native_runs_torchs_group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor],
                                   bias: Optional[Tensor]) -> bool:
    """Whether the native backend would run ``torch.native_group_norm`` on ``x`` as it is, with
    ``weight`` and ``bias`` as they are - what ``torch.group_norm`` runs: a dense NCHW input
    with 0 to 3 spatial dims, more than one value per group and sample, parameters dense and
    in x's dtype, no bias without a weight (see native.py for each other case)."""
    if x.dim() > 5 or not x.is_contiguous():
        return False
    n = x.shape[0]
    if n == 0 or x.numel() // (n * num_groups) <= 1:
        return False
    dtype = x.dtype
    if weight is None:
        return bias is None
    return (weight.dtype == dtype and weight.is_contiguous()
            and (bias is None or (bias.dtype == dtype and bias.is_contiguous())))


def _autocast_fp32_devices(op: str) -> frozenset:
    """The device types on which autocast runs ATen's ``op`` in float32 (its fp32 cast policy),
    read from the dispatcher: on torch 2.13, ``aten::group_norm`` on cuda, xpu, mps, mtia and
    maia, not on cpu. Where the dispatcher cannot be asked, CUDA's (torch's documented list)."""
    keys = {"cuda": "AutocastCUDA", "xpu": "AutocastXPU", "mps": "AutocastMPS",
            "mtia": "AutocastMTIA", "maia": "AutocastMAIA", "cpu": "AutocastCPU"}
    found = set()
    for device, key in keys.items():
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(op, key):
                found.add(device)
        except Exception:  # (a key this torch does not know)
            continue
    return frozenset(found) if found else frozenset({"cuda"})


_GROUP_NORM_FP32_AUTOCAST = _autocast_fp32_devices("aten::group_norm")
_LAYER_NORM_FP32_AUTOCAST = _autocast_fp32_devices("aten::layer_norm")
#: (cuda and xpu on torch 2.13: the kernel registered for rms_norm there is the float32 policy,
#: the one autocast gives the norms)
_RMS_NORM_FP32_AUTOCAST = _autocast_fp32_devices("aten::rms_norm")


def _float32(*tensors: Optional[Tensor]) -> tuple:
    """The tensors in float32 (None stays None): what autocast's float32 policy computes on."""
    return tuple(None if t is None else t.float() for t in tensors)


def _autocasts_to_float32(x: Tensor, devices: frozenset) -> bool:
    """Whether autocast is on for x's device and runs the op of ``devices`` in float32 there."""
    device = x.device.type
    return device in devices and torch.is_autocast_enabled(device)


def _check_elementwise_param(p, shape: tuple, what: str) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"{what} must be a Tensor or None, got {type(p).__name__}")
    if p.shape != shape:
        raise InputShapeError(f"{what} must have shape {shape}, got {tuple(p.shape)}")
    if not p.is_floating_point():
        raise TypeError(f"{what} must have a floating-point dtype, got {p.dtype}")


def _check_trailing(input, normalized_shape) -> tuple:
    """``normalized_shape`` as a tuple, checked against the trailing dims of ``input``."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must have a floating-point dtype, got {input.dtype}")
    if isinstance(normalized_shape, int):
        shape = (normalized_shape,)
    else:
        try:
            shape = tuple(normalized_shape)
        except TypeError:
            raise TypeError(
                f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
            ) from None
    ishape = input.shape
    k, ndim = len(shape), len(ishape)
    if k == 0 or ndim < k or (ishape[-1] != shape[0] if k == 1 else ishape[ndim - k :] != shape):
        raise InputShapeError(
            f"normalized_shape={list(shape)} does not match the trailing dims of the input of "
            f"shape {tuple(ishape)}"
        )
    return shape


def layer_norm(
    input: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Layer normalization, as ``torch.nn.functional.layer_norm``: statistics over the trailing
    ``normalized_shape`` dims, elementwise affine of that shape.

    Implemented as the operator with G = 1 on ``input`` viewed as (rows, prod(normalized_shape)):
    the "channels" of that view are the normalized elements, so the per-channel affine is the
    elementwise one. A ``normalized_shape`` with no elements (or an empty input) gives an empty
    output, as torch's.
    """
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(
            layer_norm, (input, weight, bias), input, normalized_shape, weight, bias, eps,
            activation=activation, backend=backend,
        )
    shape = _check_trailing(input, normalized_shape)
    k, ndim = len(shape), input.dim()
    if weight is not None:
        _check_elementwise_param(weight, shape, "weight")
    if bias is not None:
        _check_elementwise_param(bias, shape, "bias")
    if type(eps) is not float or not 0.0 < eps < math.inf:  # the usual case costs one test
        eps = check_eps(eps)
    if activation is not None:
        activation = check_activation(activation)
    if _is_dtensor(input) and _same_dtype(input, weight, bias):
        # torch's op on the input's own shape, which DTensor shards: the (rows, features) view
        # below has no sharding where a flattened dim is sharded unevenly (a batch of 3 on 2
        # ranks: "Cannot flatten unevenly sharded tensor")
        y = torch.nn.functional.layer_norm(input, shape, weight, bias, eps)
        return apply_activation(y, activation)
    exporting = _legacy_onnx_export()
    if exporting and _same_dtype(input, weight, bias):
        # ONNX LayerNormalization, whose width must be a constant (the exporter traces the
        # input's sizes): normalized_shape is one
        y = torch.nn.functional.layer_norm(input, shape, weight, bias, eps)
        return apply_activation(y, activation)
    if input.dtype in _HALF and _autocasts_to_float32(input, _LAYER_NORM_FP32_AUTOCAST):
        # torch's layer_norm runs in float32 under autocast on these devices (CUDA, ...): its
        # output is float32, as a drop-in's must be
        input, weight, bias = _float32(input, weight, bias)
    if (input.dtype not in _HALF and _same_dtype(input, weight, bias) and input.is_contiguous()
            and input.numel() > 0 and native_in_force(backend, input)):
        # what native computes (ATen's layer-norm kernel on the (rows, features) view) through
        # torch's own op on the input as it is: no views, no statistics handed back (a few us a
        # call: benchmarks/NOTES.md, "Per-call overhead")
        return apply_activation(torch.layer_norm(input, shape, weight, bias, eps), activation)
    if k == 1 and ndim == 2:  # already (rows, features): no reshapes on the hot path
        return _dispatch(input, 1, False, weight, bias, eps, activation, backend,
                         exporting=exporting)
    numel = math.prod(shape)
    if input.numel() == 0:  # nothing to normalize ((rows, 0) has no view): empty, as torch
        y = input if weight is None else input * weight
        y = y.clone() if bias is None else y + bias
        return apply_activation(y, activation)
    if k > 1:
        weight = None if weight is None else weight.reshape(numel)
        bias = None if bias is None else bias.reshape(numel)
    y = _dispatch(input.reshape(-1, numel), 1, False, weight, bias, eps, activation, backend,
                  exporting=exporting)
    return y.reshape(input.shape)


_MACHINE_EPS: dict = {}


def _machine_eps(dtype: torch.dtype) -> float:
    """``torch.finfo`` of the dtype ``dtype`` is accumulated in (float32 for half), cached."""
    eps = _MACHINE_EPS.get(dtype)
    if eps is None:
        eps = _MACHINE_EPS[dtype] = torch.finfo(compute_dtype(dtype)).eps
    return eps


def rms_norm(
    input: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """RMS normalization (Zhang & Sennrich, NeurIPS 2019), as ``torch.nn.functional.rms_norm``:
    ``y = x / sqrt(mean(x^2) + eps) * weight`` over the trailing ``normalized_shape`` dims, no
    centering and no bias. ``eps=None`` means the machine epsilon of the dtype the statistics
    are accumulated in, as torch computes it: ``torch.finfo(input.dtype).eps`` for float32 and
    float64 input, float32's (1.19e-7) for float16/bfloat16 input (torch's documentation says
    the input dtype's; its kernels use the accumulation dtype's, measured on torch 2.13).

    The operator with G = 1 and ``center=False`` on ``input`` viewed as
    (rows, prod(normalized_shape)), as :func:`layer_norm` is.

    Example::

        >>> x = torch.randn(2, 5, 16)
        >>> torch.allclose(rms_norm(x, [16]), torch.nn.functional.rms_norm(x, [16]), atol=1e-6)
        True
    """
    if has_torch_function_variadic(input, weight):
        return handle_torch_function(
            rms_norm, (input, weight), input, normalized_shape, weight, eps, backend=backend,
        )
    shape = _check_trailing(input, normalized_shape)
    if weight is not None:
        _check_elementwise_param(weight, shape, "weight")
    if input.dtype in _HALF and _autocasts_to_float32(input, _RMS_NORM_FP32_AUTOCAST):
        # as layer_norm: torch's rms_norm runs in float32 under autocast on these devices
        input, weight = _float32(input, weight)
    eps = _machine_eps(input.dtype) if eps is None else check_eps(eps)
    if _is_dtensor(input) and _same_dtype(input, weight):
        # torch's op on the input's own shape, which DTensor shards (see layer_norm)
        return torch.nn.functional.rms_norm(input, shape, weight, eps)
    if (_FUSED_RMS and input.dtype not in _HALF and _same_dtype(input, weight)
            and input.is_contiguous() and input.numel() > 0 and native_in_force(backend, input)
            and not _legacy_onnx_export()):
        # what native computes (ATen's fused RMS kernel on the (rows, features) view, torch >=
        # 2.8) through torch's own op on the input as it is (as layer_norm). Not under the
        # TorchScript ONNX exporter, which has no form for aten::rms_norm (_dispatch writes
        # the reference's ops there)
        return torch.rms_norm(input, shape, weight, eps)
    numel = math.prod(shape)
    if input.numel() == 0:  # nothing to normalize ((rows, 0) has no view): empty, as torch
        return input.clone() if weight is None else input * weight
    if len(shape) == 1 and input.dim() == 2:  # already (rows, features): no reshapes
        return _dispatch(input, 1, False, weight, None, eps, None, backend, center=False)
    w = None if weight is None else weight.reshape(numel)
    y = _dispatch(input.reshape(-1, numel), 1, False, w, None, eps, None, backend, center=False)
    y = y.reshape(input.shape)
    if input.dim() >= 4:  # channels_last(_3d) input gives channels_last output, as torch's
        y = y.contiguous(memory_format=output_memory_format(input))
    return y
