"""timm for the tests that check normlab against timm's own models and layers.

timm imports torchvision (``torchvision.ops.misc.FrozenBatchNorm2d``). The torchvision wheel on
the package registry is built against the CUDA torch, so on this CPU torch its compiled ops do
not load and ``torchvision._meta_registrations`` raises "operator torchvision::nms does not
exist" at import. Only there is that module replaced by an empty one (it registers fake kernels
for those missing ops, which nothing here calls); the rest of torchvision and all of timm are
the real ones. Without timm or torchvision installed the tests skip, saying how to install them
(``pip install -e .[test]`` and ``scripts/bootstrap.sh``).
"""

import importlib
import sys
import types

import pytest

HOW = "install with scripts/bootstrap.sh (timm and torchvision with --no-deps)"


def _import_torchvision():
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations")
    return importlib.import_module("torchvision")


def import_timm():
    """timm, or a skip that says what is missing."""
    try:
        _import_torchvision()
    except ModuleNotFoundError:
        pytest.skip(f"torchvision is not installed; {HOW}")
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as e:
        pytest.skip(f"timm is not installed ({e}); {HOW}")
