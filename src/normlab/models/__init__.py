"""normlab.models: the networks of the normalization studies, by name.

==============================  ===========================================================
names                           model
==============================  ===========================================================
resnet20/32/56/110              CIFAR-style ResNet (6n+2), post-activation    (resnet.py)
preact_resnet20/32/56/110       CIFAR-style pre-activation ResNet             (resnet.py)
resnet18/34/50/101              ImageNet-style ResNet (``small_input=``, ``preact=``)
bn_dropout_cnn                  the BN + dropout ablation CNN         (bn_dropout_cnn.py)
nf_resnet20/32/56/110           CIFAR-style normalizer-free ResNet       (nf_resnet.py)
nf_resnet18/34/50/101           ImageNet-style normalizer-free ResNet    (nf_resnet.py)
timm:<name>                     a timm model with BatchNorms, any norm   (timm_models.py)
==============================  ===========================================================

Example::

    >>> from normlab import models
    >>> net = models.create("resnet20", norm="gn", zero_init_last=True)
    >>> nf = models.create("nf_resnet50", num_classes=1000, skipinit=True)
    >>> "bn_dropout_cnn" in models.list_models()
    True

Every residual block subclasses :class:`ResidualBlock` (found by :mod:`normlab.spp`); every
classifier is named ``fc`` (excluded by name from adaptive gradient clipping).
"""

from normlab.models.registry import (canonical_model, check_norm, create, is_normalizer_free,
                                     list_models, model_uses_norm, normalizer_free_counterpart,
                                     register, takes_options)
from normlab.models.residual import DropPath, ResidualBlock, residual_blocks
from normlab.models import resnet as _resnet  # noqa: F401  (registers the ResNets)
from normlab.models import bn_dropout_cnn as _bn_dropout_cnn  # noqa: F401
from normlab.models import nf_resnet as _nf_resnet  # noqa: F401
from normlab.models.nf_resnet import NFResNet, activation_gamma
from normlab.models.resnet import ResNet
from normlab.models.bn_dropout_cnn import BNDropoutCNN

__all__ = [
    "create", "list_models", "register", "model_uses_norm", "is_normalizer_free", "check_norm",
    "canonical_model", "normalizer_free_counterpart", "takes_options",
    "ResidualBlock", "DropPath",
    "residual_blocks", "ResNet", "NFResNet", "BNDropoutCNN", "activation_gamma",
]
