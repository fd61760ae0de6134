"""LazyBatchNorm1d/2d/3d and LazyInstanceNorm1d/2d/3d: the torch.nn lazy modules, becoming
normlab's classes.

Each subclasses its torch.nn namesake (so ``isinstance(m, torch.nn.LazyBatchNorm2d)`` holds
and the constructor, uninitialized parameters and buffers are torch's) with ``cls_to_become``
set to the normlab class: the first forward infers ``num_features`` from ``input.shape[1]``,
materializes the parameters and buffers, turns the module into e.g.
:class:`normlab.nn.BatchNorm2d`, and runs that class's forward (the selected backend), the
first call included. ``num_features`` is set also where torch's leaves it 0 (nothing to
materialize, or state loaded before the first call), since normlab's forward checks the channels.

Example::

    >>> import torch
    >>> bn = LazyBatchNorm2d()
    >>> y = bn(torch.randn(4, 16, 8, 8))
    >>> type(bn).__name__, bn.num_features
    ('BatchNorm2d', 16)
"""

from __future__ import annotations

from torch import Tensor, nn

from normlab.nn._common import not_scriptable
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

__all__ = [
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
    "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d",
]


class _LazyNorm:
    """What normlab's lazy classes add to torch's (a mixin placed before the torch.nn class)."""

    __prepare_scriptable__ = not_scriptable

    def initialize_parameters(self, input: Tensor) -> None:
        """torch's, then ``num_features`` where torch leaves it 0: a module with nothing to
        materialize (``affine=False, track_running_stats=False``), or one whose state_dict was
        loaded first (loading materializes without setting it). Taken from the loaded tensors,
        else from the input."""
        super().initialize_parameters(input)
        if self.num_features == 0:
            loaded = self.weight if self.weight is not None else self.running_mean
            self.num_features = input.shape[1] if loaded is None else loaded.shape[0]


class LazyBatchNorm1d(_LazyNorm, nn.LazyBatchNorm1d):
    """torch.nn.LazyBatchNorm1d that becomes :class:`normlab.nn.BatchNorm1d`."""

    cls_to_become = BatchNorm1d
    forward = BatchNorm1d.forward  # the first call: torch's hook has switched the class already


class LazyBatchNorm2d(_LazyNorm, nn.LazyBatchNorm2d):
    """torch.nn.LazyBatchNorm2d that becomes :class:`normlab.nn.BatchNorm2d`."""

    cls_to_become = BatchNorm2d
    forward = BatchNorm2d.forward  # the first call: torch's hook has switched the class already


class LazyBatchNorm3d(_LazyNorm, nn.LazyBatchNorm3d):
    """torch.nn.LazyBatchNorm3d that becomes :class:`normlab.nn.BatchNorm3d`."""

    cls_to_become = BatchNorm3d
    forward = BatchNorm3d.forward  # the first call: torch's hook has switched the class already


class LazyInstanceNorm1d(_LazyNorm, nn.LazyInstanceNorm1d):
    """torch.nn.LazyInstanceNorm1d that becomes :class:`normlab.nn.InstanceNorm1d`."""

    cls_to_become = InstanceNorm1d
    forward = InstanceNorm1d.forward  # the first call: torch's hook has switched the class already


class LazyInstanceNorm2d(_LazyNorm, nn.LazyInstanceNorm2d):
    """torch.nn.LazyInstanceNorm2d that becomes :class:`normlab.nn.InstanceNorm2d`."""

    cls_to_become = InstanceNorm2d
    forward = InstanceNorm2d.forward  # the first call: torch's hook has switched the class already


class LazyInstanceNorm3d(_LazyNorm, nn.LazyInstanceNorm3d):
    """torch.nn.LazyInstanceNorm3d that becomes :class:`normlab.nn.InstanceNorm3d`."""

    cls_to_become = InstanceNorm3d
    forward = InstanceNorm3d.forward  # the first call: torch's hook has switched the class already
