"""convert_layer_norm: replace every LayerNorm and RMSNorm of a model by LayerNorm, RMSNorm or
no normalization (transformers, MLP-Mixers, ConvNeXt-style nets).

:func:`normlab.convert_norm` replaces a model's BatchNorms by any norm. A transformer's norms
instead work on each token alone, over its features (the trailing ``normalized_shape``: Ba,
Kiros & Hinton 2016; RMSNorm, Zhang & Sennrich, NeurIPS 2019), and a ConvNeXt-style net's on
each position alone, over the channels of NCHW input (timm's ``LayerNorm2d``). Neither form
has a batch or a group to take statistics over, so the choices are the two per-token norms and
none, each in the form of the layer it replaces:

========  ==============================  ==================================================
``to``    a norm over ``normalized_shape``  a norm over the channels of NCHW input
========  ==============================  ==================================================
``ln``    :class:`normlab.nn.LayerNorm`     :class:`normlab.nn.LayerNorm2d`
``rms``   :class:`normlab.nn.RMSNorm`       :class:`normlab.nn.RMSNorm2d`
``none``  ``nn.Identity``                   ``nn.Identity``
========  ==============================  ==================================================

Replaced, by exact class (a subclass may compute something else): torch.nn's LayerNorm and
RMSNorm; timm's LayerNorm, LayerNorm2d, RmsNorm and RmsNorm2d; normlab's LayerNorm,
LayerNorm2d, RMSNorm and RMSNorm2d (one already of the target's class stays). Any other module
of those families (a subclass, timm's norm-act and float32 layers) is left, and named with the
reason in the summary's ``left``.

The new norm keeps the layer's shape, ``eps`` (an RMSNorm's ``eps=None``, the machine epsilon,
becomes LayerNorm's default 1e-5), whether it has a weight and whether a LayerNorm has a bias,
and takes over the layer's ``weight`` Parameter (and a LayerNorm's ``bias`` when the target is
LayerNorm; RMSNorm has no bias, and a LayerNorm made from an RMSNorm starts with a zero bias),
so an optimizer built before keeps training them. Hooks on a replaced layer are not carried
over (a warning names it), as with :func:`normlab.convert_norm`. A LayerNorm2d replacing one of
timm's layers returns channels_last strides, as timm's LayerNorm2d does
(``channels_last_output``). torch's ``nn.TransformerEncoderLayer`` whose norms become RMSNorm
or none runs its unfused path (its fused one computes LayerNorm from the norms' parameters
itself). The returned model carries ``model.normlab_conversion``, a
:class:`normlab.convert.ConversionSummary`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from torch import nn

from normlab import nn as nlnn
from normlab.convert import ConversionSummary, Replacement, _warn_user_hooks, refuse_ddp
from normlab.factory import canonical_name
from normlab.nn._common import replace_modules

__all__ = ["convert_layer_norm", "TARGETS", "layer_norm_kind", "is_layer_norm_family"]

#: the norms a LayerNorm or RMSNorm can become
TARGETS = ("ln", "rms", "none")

_TOKEN, _CHANNEL = "token", "channel"
_NORMLAB = {nlnn.LayerNorm: _TOKEN, nlnn.RMSNorm: _TOKEN, nlnn.LayerNorm2d: _CHANNEL,
            nlnn.RMSNorm2d: _CHANNEL}
_TORCH = {nn.LayerNorm: _TOKEN, nn.RMSNorm: _TOKEN}
_TIMM = {"LayerNorm": _TOKEN, "RmsNorm": _TOKEN, "LayerNorm2d": _CHANNEL,
         "RmsNorm2d": _CHANNEL}
_TARGET_CLASS = {("ln", _TOKEN): nlnn.LayerNorm, ("ln", _CHANNEL): nlnn.LayerNorm2d,
                 ("rms", _TOKEN): nlnn.RMSNorm, ("rms", _CHANNEL): nlnn.RMSNorm2d}


def _is_timm(cls: type) -> bool:
    return cls.__module__.startswith("timm.")


def layer_norm_kind(module: nn.Module) -> Optional[str]:
    """``"token"`` (over the trailing ``normalized_shape``), ``"channel"`` (over the channels
    of NCHW input) for a layer :func:`convert_layer_norm` replaces; None for anything else."""
    cls = type(module)
    if cls in _NORMLAB:
        return _NORMLAB[cls]
    if cls in _TORCH:
        return _TORCH[cls]
    if _is_timm(cls):
        return _TIMM.get(cls.__name__)
    return None


def is_layer_norm_family(module: nn.Module) -> bool:
    """Whether ``module`` is a LayerNorm or RMSNorm of any kind (torch's, timm's, normlab's, a
    subclass, timm's norm-act and float32 layers), replaced or not."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, *_NORMLAB)):
        return True
    name = type(module).__name__
    return _is_timm(type(module)) and ("LayerNorm" in name or "RmsNorm" in name)


def _left_reason(module: nn.Module) -> str:
    return (f"{type(module).__module__}.{type(module).__qualname__} is not one of the layers "
            "convert_layer_norm replaces (torch's, timm's and normlab's LayerNorm, LayerNorm2d, "
            "RMSNorm/RmsNorm and RMSNorm2d/RmsNorm2d, exact classes)")


def _target(to: Any) -> str:
    key = canonical_name(to) if isinstance(to, str) else None
    if key not in TARGETS:
        raise ValueError(f"a LayerNorm or RMSNorm can become {', '.join(map(repr, TARGETS))}, "
                         f"got to={to!r}")
    return key


def _shape(module: nn.Module, kind: str) -> tuple:
    if kind == _CHANNEL and hasattr(module, "num_channels"):  # normlab's LayerNorm2d/RMSNorm2d
        return (module.num_channels,)
    return tuple(module.normalized_shape)


def _affine(module: nn.Module) -> bool:
    return getattr(module, "weight", None) is not None


def _build(module: nn.Module, to: str) -> nn.Module:
    kind = layer_norm_kind(module)
    if to == "none":
        return nn.Identity()
    shape, affine = _shape(module, kind), _affine(module)
    eps = module.eps if module.eps is not None else 1e-5
    weight = getattr(module, "weight", None)
    factory = {} if weight is None else {"device": weight.device, "dtype": weight.dtype}
    cls = _TARGET_CLASS[(to, kind)]
    if cls is nlnn.LayerNorm:
        new = cls(shape, eps, affine, bias=affine and _bias(module) is not False, **factory)
    elif cls is nlnn.RMSNorm:
        new = cls(shape, module.eps, affine, **factory)
    elif cls is nlnn.LayerNorm2d:
        new = cls(shape[0], eps, affine, channels_last_output=_is_timm(type(module)),
                  bias=_bias(module) is not False, **factory)
    else:
        new = cls(shape[0], eps, affine, **factory)
    _take_parameters(module, new)
    new.train(module.training)
    return new


def _bias(module: nn.Module) -> Optional[bool]:
    """False for a LayerNorm (torch's, timm's LayerNorm2d, normlab's LayerNorm2d) with a weight
    but no bias (``bias=False``); None otherwise."""
    if (isinstance(module, (nn.LayerNorm, nlnn.LayerNorm2d))
            and getattr(module, "weight", None) is not None and module.bias is None):
        return False
    return None


def _take_parameters(old: nn.Module, new: nn.Module) -> None:
    for name in ("weight", "bias"):
        mine, theirs = getattr(new, name, None), getattr(old, name, None)
        if isinstance(mine, nn.Parameter) and isinstance(theirs, nn.Parameter):
            new._parameters[name] = theirs


def _slow_path_for_torch_encoder_layers(model: nn.Module) -> None:
    """torch's ``nn.TransformerEncoderLayer`` has a fast path (eval mode, ``batch_first``, ...)
    that does not call ``norm1`` and ``norm2`` but computes LayerNorm itself from their ``eps``,
    ``weight`` and ``bias``: an RMSNorm or Identity there raised an AttributeError (and a norm
    with those attributes would be computed as a LayerNorm). Such a layer is put on its other
    path, which calls the modules, as torch does for an activation it has no fused form of
    (``activation_relu_or_gelu`` 0); a ``nn.TransformerEncoder`` holding one no longer packs
    its input into a nested tensor (``use_nested_tensor``), that path reading the first layer's
    norms the same way."""
    def off(layer: nn.Module) -> bool:
        return isinstance(layer, nn.TransformerEncoderLayer) and not all(
            isinstance(getattr(layer, n, None), nn.LayerNorm) for n in ("norm1", "norm2"))

    for m in model.modules():
        if off(m):
            m.activation_relu_or_gelu = 0
        elif isinstance(m, nn.TransformerEncoder) and any(off(layer) for layer in m.layers):
            m.use_nested_tensor = False


def convert_layer_norm(model: nn.Module, to: Any) -> nn.Module:
    """Replace every LayerNorm and RMSNorm in ``model`` by ``to``: ``"ln"``, ``"rms"`` or
    ``"none"``, each in the form of the layer it replaces (module docstring).

    Args:
        model: any module; changed in place (and returned). If ``model`` itself is such a
            norm, the new module is returned instead.
        to: ``"ln"`` (``"layernorm"``), ``"rms"`` (``"rmsnorm"``) or ``"none"``; any other norm
            is a ValueError (they need a batch or groups of channels a token does not have).

    Returns:
        The model, with ``model.normlab_conversion`` summarising the replacements and naming
        each LayerNorm-like layer left, with the reason.

    Example::

        >>> import torch
        >>> block = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
        >>> block = convert_layer_norm(block, "rms")
        >>> print(block.normlab_conversion)
        convert_layer_norm -> rms: 1 module(s) replaced
          1: LayerNorm -> RMSNorm((64,), eps=1e-05, elementwise_affine=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    target = _target(to)

    def replaced_here(m: nn.Module) -> bool:
        kind = layer_norm_kind(m)
        return kind is not None and type(m) is not _TARGET_CLASS.get((target, kind))

    left = [(name, _left_reason(m)) for name, m in model.named_modules()
            if is_layer_norm_family(m) and layer_norm_kind(m) is None]
    refuse_ddp(model, replaced_here, "convert_layer_norm")
    model, replaced = replace_modules(model, replaced_here, lambda m, name: _build(m, target))
    _slow_path_for_torch_encoder_layers(model)
    _warn_user_hooks(replaced, "convert_layer_norm")
    summary = ConversionSummary(target, function="convert_layer_norm")
    summary.replaced = [Replacement(name, type(old).__name__, repr(new),
                                    math.prod(_shape(old, layer_norm_kind(old))))
                        for name, old, new in replaced]
    summary.left = left
    model.normlab_conversion = summary
    return model
