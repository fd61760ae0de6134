"""normlab: every normalization layer as one operator.

BatchNorm, LayerNorm, InstanceNorm and GroupNorm differ only in the set of elements their
statistics run over (Wu & He, ECCV 2018); normlab computes them all with one operator,
:func:`normlab.functional.normalize`, behind drop-in torch.nn modules (:mod:`normlab.nn`), a
factory (:func:`create_norm`), model surgery (:func:`convert_norm`, :func:`convert_layer_norm`,
:func:`optimize`, :func:`fold_batchnorm`, :func:`precise_bn`) and selectable backends
(:func:`use_backend`).

``normlab.optimize`` and ``normlab.precise_bn`` are the functions (their modules are in
``sys.modules`` under those names, importable as ``from normlab.optimize import OptimizeRecord``,
``from normlab.precise_bn import PreciseBNRecord``).
"""

from normlab import distributed, functional, models, nn, optim, spp
from normlab.backends import available_backends, current_backend, use_backend
from normlab.convert import convert_norm
from normlab.convert_ln import convert_layer_norm
from normlab.factory import create_norm, norm_names, resolve_groups
from normlab.fold import fold_batchnorm
from normlab.optimize import optimize
from normlab.precise_bn import precise_bn

__version__ = "0.1.0"

__all__ = [
    "distributed", "functional", "models", "nn", "optim", "spp", "available_backends", "current_backend", "use_backend",
    "convert_norm", "convert_layer_norm", "create_norm", "norm_names", "resolve_groups",
    "fold_batchnorm", "optimize", "precise_bn", "__version__",
]
