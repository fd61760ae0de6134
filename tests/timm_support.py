"""Import timm for the tests that compare with it (models built with pretrained=False: nothing
is downloaded).

timm imports torchvision at import time (``torchvision.ops.misc.FrozenBatchNorm2d`` and the
data transforms). Where torchvision is missing (it is not a dependency of normlab, and a
torchvision wheel must match the installed torch build exactly), a stand-in package is put in
``sys.modules`` first: every name it is asked for is an inert placeholder, and its
FrozenBatchNorm2d a module class no model uses. The tests use timm's models and layers only,
never its data pipeline. Without timm itself the tests that need it are skipped.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
from torch import nn

_STUBBED = (
    "torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
    "torchvision.transforms.functional", "torchvision.datasets", "torchvision.utils",
)


class _Placeholder:
    """Stands for any torchvision name timm touches at import time (classes, enums, functions)."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return _Placeholder()

    def __call__(self, *args, **kwargs):
        return _Placeholder()

    def __mro_entries__(self, bases):  # used as a base class
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder()


class _UnusedFrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d stand-in (timm only checks isinstance against it)."""


def _stub_torchvision() -> None:
    for name in _STUBBED:
        module = _StubModule(name)
        module.__path__ = []
        sys.modules[name] = module
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = _UnusedFrozenBatchNorm2d


def import_timm():
    """timm, with the torchvision stand-in if needed; skips the calling test without timm."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception:  # missing, or a build that does not match torch
            _stub_torchvision()
    import timm

    return timm
