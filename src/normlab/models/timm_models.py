"""timm's networks as normlab models: ``create("timm:<name>", norm=...)``.

Any model in timm's registry (``timm.list_models()``) that normalizes with BatchNorm can be built
with any normlab norm: the model is built untrained by ``timm.create_model(name,
pretrained=False, num_classes=..., in_chans=..., **kwargs)``, then every BatchNorm in it (timm's
norm-act layers included, their activation kept) is replaced by :func:`normlab.convert_norm`.
``norm="bn"`` replaces them too, by normlab's BatchNorm (the same computation and state_dict
keys), so every series of a study runs normlab's layers.

A model without BatchNorm layers (ConvNeXt, ViT, BiT's ResNetV2, timm's NF-ResNets: they use
LayerNorm, GroupNorm or no norm) is a ValueError: there is nothing the norm could replace, and the
run would train the model's own norm under another name. Pretrained weights are not loaded
(``pretrained``, ``pretrained_cfg``, ``pretrained_cfg_overlay`` and ``checkpoint_path`` are
refused): a normalization comparison trains every norm from the same random start.

timm is imported when such a model is first asked for (it is an optional dependency); importing
it fails when torchvision was built for another torch, which the error then says.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType
from typing import Any, Optional

from torch import nn

from normlab.convert import convert_norm
from normlab.factory import did_you_mean

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
    """``"timm 1.0.31 installed"`` or ``"timm is not installed"`` (without importing it)."""
    try:
        return f"timm {importlib.metadata.version('timm')} installed"
    except importlib.metadata.PackageNotFoundError:
        return "timm is not installed (pip install timm)"


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def create_timm(name: str, *, norm: Any = "bn", num_classes: int = 10, in_chans: int = 3,
                norm_kwargs: Optional[dict] = None, **kwargs: Any) -> nn.Module:
    """timm model ``name`` (``timm:<name>`` or the bare registry name), untrained, with every
    BatchNorm replaced by ``norm`` (a :func:`normlab.create_norm` name, class or partial, built
    with ``norm_kwargs``). ``kwargs`` go to ``timm.create_model`` (e.g. ``drop_rate``).

    Example::

        >>> net = create_timm("timm:resnet18", norm="gn", norm_kwargs={"num_groups": 8})
    """
    key = timm_name(name) if is_timm_name(name) else name.strip().lower()
    refused = sorted(k for k in kwargs if k in _REFUSED)
    if refused:
        raise ValueError(f"model {PREFIX}{key}: {', '.join(refused)} is not taken; normlab builds "
                         "timm models untrained (every norm starts from the same random weights)")
    timm = import_timm()
    if not timm.is_model(key):
        raise ValueError(f"unknown timm model {key!r} (`timm.list_models()` lists them)"
                         f"{did_you_mean(key, timm.list_models())}")
    model = timm.create_model(key, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                              **kwargs)
    if not _has_batchnorm(model):
        raise ValueError(f"timm model {key!r} has no BatchNorm layer for norm {norm!r} to "
                         "replace (it uses another norm or none); pick a model that normalizes "
                         "with BatchNorm, e.g. timm:resnet18, timm:efficientnet_b0, "
                         "timm:regnetx_002")
    return convert_norm(model, norm, **dict(norm_kwargs or {}))
