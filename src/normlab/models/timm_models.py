"""timm's networks as normlab models: ``create("timm:<name>", norm=...)``.

The model is built untrained by ``timm.create_model(name, pretrained=False,
num_classes=..., in_chans=..., **kwargs)``; then its norm layers are replaced, so that every
series of a study runs normlab's layers:

* A model that normalizes with BatchNorm (ResNets, EfficientNets, RegNets, ...; hybrids such as
  CoAtNet and MobileViT too, whose other norms stay) takes any normlab norm: every BatchNorm in
  it (timm's norm-act layers included, their activation kept) is replaced by
  :func:`normlab.convert_norm`. ``norm="bn"`` replaces them too, by normlab's BatchNorm (the
  same computation and state_dict keys).
* A model that normalizes with LayerNorm or RMSNorm only (ViT, DeiT, Swin, MLP-Mixer, CaiT,
  ConvNeXt) takes ``ln``, ``rms`` or ``none``: every such layer is replaced by
  :func:`normlab.convert_layer_norm`, each in its own form (over a token's features, or over
  the channels at each position for ConvNeXt's LayerNorm2d). The norms that need a batch or
  groups of channels are a ValueError there, and so is a model whose LayerNorms come with
  other norm layers (PoolFormer's GroupNorm) or with LayerNorm-like layers the conversion does
  not know: part of its norms would stay the model's own under another norm's name.

A model with neither (BiT's ResNetV2, timm's NF-ResNets: GroupNorm or no norm) is a ValueError:
there is nothing the norm could replace, and the run would train the model's own norm under
another name. Pretrained weights are not loaded
(``pretrained``, ``pretrained_cfg``, ``pretrained_cfg_overlay`` and ``checkpoint_path`` are
refused): a normalization comparison trains every norm from the same random start. A name
with a pretrained tag (``timm:resnet50.a1_in1k``) picks that tag's pretrained config, not its
weights; a tag timm does not have is a ValueError.

timm is imported when such a model is first asked for (it is an optional dependency); importing
it fails when torchvision was built for another torch, which the error then says.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import traceback
from types import ModuleType
from typing import Any, Optional

from torch import nn

from normlab.convert import convert_norm
from normlab.convert_ln import TARGETS as LAYER_NORM_TARGETS
from normlab.convert_ln import convert_layer_norm, is_layer_norm_family
from normlab.factory import canonical_name, did_you_mean

__all__ = ["PREFIX", "is_timm_name", "timm_name", "create_timm", "import_timm", "timm_status"]

#: how a model name says "from timm's registry": ``timm:resnet18``
PREFIX = "timm:"
_REFUSED = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")


def is_timm_name(name: Any) -> bool:
    """Whether ``name`` is a string of the form ``timm:<name>`` (any case, spaces around)."""
    return isinstance(name, str) and name.strip().lower().startswith(PREFIX)


def timm_name(name: str) -> str:
    """The timm registry name in ``timm:<name>`` (stripped, lower-case, as timm's names are);
    a ValueError when it is empty."""
    key = name.strip().lower()[len(PREFIX):].strip()
    if not key:
        raise ValueError(f"model {name!r} names no timm model; write timm:<name>, e.g. "
                         "timm:resnet18")
    return key


def import_timm() -> ModuleType:
    """timm, or an ImportError that says how to get it (or why it does not import)."""
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as e:
        raise ImportError(f"timm models need the timm package ({e}); install it with "
                          "`pip install timm`") from None
    except RuntimeError as e:  # e.g. torchvision's compiled ops built for another torch
        first = (str(e).strip().splitlines() or [""])[0]
        raise ImportError(f"importing timm failed: {first} (timm imports torchvision, which "
                          "must be built for the installed torch)") from None


def timm_status() -> str:
    """``"timm 1.0.31 installed"``, ``"timm is not installed ..."``, or, where the package is
    there but does not import (a torchvision built for another torch), ``"timm 1.0.31 installed
    but not importable: ..."``: what ``--model timm:<name>`` will meet."""
    try:
        version = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        return "timm is not installed (pip install timm)"
    try:
        import_timm()
    except ImportError as e:
        return f"timm {version} installed but not importable: {e}"
    return f"timm {version} installed"


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _check_tag(timm: ModuleType, key: str) -> None:
    """A ValueError when ``key`` (``arch.tag``) names a pretrained tag timm does not have for
    that architecture (timm raises a RuntimeError, which the lab took for an unexpected error).
    A valid tag only picks a pretrained config: the model is built untrained all the same."""
    arch, _, tag = key.partition(".")
    tagged = timm.list_pretrained(f"{arch}.*")
    if tag and tagged and key not in tagged:
        raise ValueError(f"timm model {arch!r} has no pretrained tag {tag!r} (its tags: "
                         f"{', '.join(t.partition('.')[2] for t in tagged)})"
                         f"{did_you_mean(key, tagged)}")


def _build(timm: ModuleType, key: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(key, pretrained=False, **kwargs)``; timm checks its arguments with
    ``assert`` (``output_stride``, ``global_pool``, ...): such a failure is a ValueError naming
    the model, the arguments and the check, not a traceback from the lab."""
    try:
        return timm.create_model(key, pretrained=False, **kwargs)
    except AssertionError as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        why = str(e) or f"{frame.line} ({os.path.basename(frame.filename)}:{frame.lineno})"
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ValueError(f"timm model {key!r} refused its arguments ({args}): {why}") from None


def create_timm(name: str, *, norm: Any = "bn", num_classes: int = 10, in_chans: int = 3,
                norm_kwargs: Optional[dict] = None, **kwargs: Any) -> nn.Module:
    """timm model ``name`` (``timm:<name>`` or the bare registry name), untrained, with every
    BatchNorm replaced by ``norm`` (a :func:`normlab.create_norm` name, class or partial, built
    with ``norm_kwargs``; None is ``"none"``), or, in a LayerNorm model, every LayerNorm and
    RMSNorm by ``ln``, ``rms`` or ``none`` (module docstring). ``kwargs`` go to
    ``timm.create_model`` (e.g. ``drop_rate``).

    Example::

        >>> net = create_timm("timm:resnet18", norm="gn", norm_kwargs={"num_groups": 8})
    """
    key = timm_name(name) if is_timm_name(name) else name.strip().lower()
    if norm is None:  # "no norm", as normlab's own builders (and `spp NAME:norm=none`) mean it
        norm = "none"
    if norm_kwargs is not None and not isinstance(norm_kwargs, dict):
        raise TypeError(f"norm_kwargs must be a dict, got {type(norm_kwargs).__name__}: "
                        f"{norm_kwargs!r}")
    refused = sorted(k for k in kwargs if k in _REFUSED)
    if refused:
        raise ValueError(f"model {PREFIX}{key}: {', '.join(refused)} is not taken; normlab builds "
                         "timm models untrained (every norm starts from the same random weights)")
    timm = import_timm()
    if not timm.is_model(key):
        raise ValueError(f"unknown timm model {key!r} (`timm.list_models()` lists them)"
                         f"{did_you_mean(key, timm.list_models())}")
    _check_tag(timm, key)
    model = _build(timm, key, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if _has_batchnorm(model):
        return convert_norm(model, norm, **dict(norm_kwargs or {}))
    if any(is_layer_norm_family(m) for m in model.modules()):
        return _convert_layer_norms(key, model, norm, norm_kwargs)
    raise ValueError(f"timm model {key!r} has no BatchNorm or LayerNorm layer for norm {norm!r} "
                     "to replace (it uses another norm or none); pick a model that normalizes "
                     "with BatchNorm (e.g. timm:resnet18, timm:efficientnet_b0) or LayerNorm "
                     "(e.g. timm:vit_tiny_patch16_224, timm:convnext_atto)")


def _other_norms(model: nn.Module) -> list[str]:
    """The names of the norm layers that are neither BatchNorm nor LayerNorm/RMSNorm (GroupNorm,
    InstanceNorm): what a LayerNorm model's conversion would leave as they are."""
    kinds = (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def _convert_layer_norms(key: str, model: nn.Module, norm: Any,
                         norm_kwargs: Optional[dict]) -> nn.Module:
    """A LayerNorm model (no BatchNorm) with its LayerNorms and RMSNorms replaced by ``norm``:
    ``ln``, ``rms`` or ``none`` (module docstring); a ValueError for any other norm, for norm
    keywords (those norms take none) and for a model whose norms would not all be replaced."""
    takes = ", ".join(LAYER_NORM_TARGETS)
    target = canonical_name(norm) if isinstance(norm, str) else None
    if target not in LAYER_NORM_TARGETS:
        raise ValueError(f"timm model {key!r} normalizes with LayerNorm (over each token's "
                         f"features or each position's channels), where norm {norm!r} has no "
                         f"form; it takes {takes}")
    if norm_kwargs:
        raise ValueError(f"timm model {key!r}: norm {target!r} in place of its LayerNorms takes "
                         f"no norm_kwargs, got {dict(norm_kwargs)!r}")
    others = _other_norms(model)
    if others:
        raise ValueError(f"timm model {key!r} normalizes with LayerNorm and with other norm "
                         f"layers ({others[0]}: {type(model.get_submodule(others[0])).__name__}"
                         f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}), which "
                         f"norm {target!r} would leave as they are")
    model = convert_layer_norm(model, target)
    left = model.normlab_conversion.left
    if left:
        raise ValueError(f"timm model {key!r}: norm {target!r} cannot replace {left[0][0]}: "
                         f"{left[0][1]}")
    return model
