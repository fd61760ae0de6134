"""LazyBatchNorm1d/2d/3d and LazyInstanceNorm1d/2d/3d: the torch.nn lazy modules, becoming
normlab's classes.

Each subclasses its torch.nn namesake (so ``isinstance(m, torch.nn.LazyBatchNorm2d)`` holds
and the constructor, uninitialized parameters and buffers are torch's) with ``cls_to_become``
set to the normlab class: the first forward infers ``num_features`` from ``input.shape[1]``,
materializes the parameters and buffers, turns the module into e.g.
:class:`normlab.nn.BatchNorm2d`, and runs that class's forward (the selected backend).

Example::

    >>> import torch
    >>> bn = LazyBatchNorm2d()
    >>> y = bn(torch.randn(4, 16, 8, 8))
    >>> type(bn).__name__, bn.num_features
    ('BatchNorm2d', 16)
"""

from __future__ import annotations

from torch import nn

from normlab.nn._common import not_scriptable
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

__all__ = [
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
    "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d",
]


class LazyBatchNorm1d(nn.LazyBatchNorm1d):
    """torch.nn.LazyBatchNorm1d that becomes :class:`normlab.nn.BatchNorm1d`."""

    cls_to_become = BatchNorm1d
    __prepare_scriptable__ = not_scriptable


class LazyBatchNorm2d(nn.LazyBatchNorm2d):
    """torch.nn.LazyBatchNorm2d that becomes :class:`normlab.nn.BatchNorm2d`."""

    cls_to_become = BatchNorm2d
    __prepare_scriptable__ = not_scriptable


class LazyBatchNorm3d(nn.LazyBatchNorm3d):
    """torch.nn.LazyBatchNorm3d that becomes :class:`normlab.nn.BatchNorm3d`."""

    cls_to_become = BatchNorm3d
    __prepare_scriptable__ = not_scriptable


class LazyInstanceNorm1d(nn.LazyInstanceNorm1d):
    """torch.nn.LazyInstanceNorm1d that becomes :class:`normlab.nn.InstanceNorm1d`."""

    cls_to_become = InstanceNorm1d
    __prepare_scriptable__ = not_scriptable


class LazyInstanceNorm2d(nn.LazyInstanceNorm2d):
    """torch.nn.LazyInstanceNorm2d that becomes :class:`normlab.nn.InstanceNorm2d`."""

    cls_to_become = InstanceNorm2d
    __prepare_scriptable__ = not_scriptable


class LazyInstanceNorm3d(nn.LazyInstanceNorm3d):
    """torch.nn.LazyInstanceNorm3d that becomes :class:`normlab.nn.InstanceNorm3d`."""

    cls_to_become = InstanceNorm3d
    __prepare_scriptable__ = not_scriptable
