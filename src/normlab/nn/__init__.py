"""normlab.nn: drop-in normalization modules on normlab's one operator.

=====================  ======================================  ================================
module                 statistics over                          file
=====================  ======================================  ================================
BatchNorm1d/2d/3d/Xd   N, spatial (per channel)                 nn/batchnorm.py
BatchRenorm1d/2d       as BN, corrected towards running stats   nn/batch_renorm.py
FrozenBatchNorm2d      fixed (buffers)                          nn/frozen_bn.py
GhostBatchNorm1d/2d/3d as BN, per slice of virtual_batch        nn/ghost_batchnorm.py
SyncBatchNorm          as BN, over every process                nn/syncbn.py
InstanceNorm1d/2d/3d   spatial (per sample, channel)            nn/instancenorm.py
GroupNorm              C/G channels, spatial (per sample)       nn/groupnorm.py
LayerNorm              trailing normalized_shape                nn/layernorm.py
LayerNorm2d            C (per sample and position)              nn/layernorm.py
LazyBatchNorm1d/2d/3d  as BN; C from the first input           nn/lazy.py
LazyInstanceNorm*d     as IN; C from the first input           nn/lazy.py
RMSNorm                trailing normalized_shape, uncentred     nn/rmsnorm.py
RMSNorm2d              C (per sample and position), uncentred  nn/rmsnorm.py
FilterResponseNorm2d   spatial, uncentred (+ TLU)               nn/frn.py
EvoNorm2dS0            as GN (norm + activation)                nn/evonorm.py
EvoNorm2dB0            as BN and IN (norm + activation)         nn/evonorm.py
WSConv2d               conv weight, over fan-in                 nn/std_conv.py
ScaledStdConv2d        conv weight, scaled (NF-ResNets)         nn/std_conv.py
=====================  ======================================  ================================

``torch.ao.quantization.fuse_modules`` and ``torch.nn.utils.fusion.fuse_conv_bn_eval`` take
normlab's BatchNorm1d/2d/3d as torch's, and eager static quantization (``prepare`` /
``convert``) swaps its BatchNorm2d/3d, GroupNorm, InstanceNorm and LayerNorm as torch's (see
:mod:`normlab.nn.fusion`).

TorchScript: unlike torch.nn's, these modules cannot be compiled by ``torch.jit.script`` (forward
picks a Python backend at call time); scripting a model that holds one raises a TypeError naming
it. ``torch.compile`` (also ``fullgraph=True``) and ``torch.export`` work.

``torch.fx.symbolic_trace`` records a module inside a model as one call_module node (as torch's
own norms). Traced as the root itself, GroupNorm, LayerNorm, RMSNorm, WSConv2d, ScaledStdConv2d
and FrozenBatchNorm2d become their functional call on the parameters (as torch's GroupNorm,
LayerNorm, RMSNorm and Conv2d do); the batch-statistics modules and the other extras raise
torch's ``TraceError`` (torch's BatchNorm and InstanceNorm cannot be the root either).

Where the drop-in modules deliberately differ from torch.nn (everything else, including the
error types, is torch's; ``tests/test_torch_parity.py`` holds both sides to it):

* ``eps`` must be a positive finite number, checked at construction (ValueError); torch accepts
  0, negative and NaN values.
* An input with another channel count than the module's is an error naming the shape, also
  for ``GroupNorm(affine=False)`` (torch's checks only that the groups divide it). The error is
  a ValueError that is also the RuntimeError torch raises for it. InstanceNorm keeps torch's
  own check instead: with ``affine`` torch's ValueError; with running statistics only, the
  error above naming the running buffers' shape; with neither, torch's warning, and the input
  is normalized as it is.
* Parameters and buffers of another floating dtype than the input are used, not refused: the
  statistics and affine run in the input's accumulation dtype and the output has the input's
  dtype (torch's CPU kernels raise "mixed dtype"). An integer input is a TypeError (torch:
  NotImplementedError or RuntimeError, depending on the layer).
* Running buffers that require grad: in training with grad enabled a RuntimeError naming the
  buffer, as torch's; in eval they are used as given statistics and differentiated (torch
  raises there too; :func:`normlab.functional.normalize_fixed` differentiates its statistics).
* An empty batch (N = 0) gives an empty output, as torch's BatchNorm, GroupNorm and LayerNorm
  do; InstanceNorm with ``affine=True`` too (torch's raises IndexError). An input with no
  position (a spatial size 0) gives an empty output in training too, as torch's BatchNorm and
  InstanceNorm (GhostBatchNorm as BatchNorm); the running statistics stay as they were.
  Where torch gives NaN on an empty input (the running statistics of InstanceNorm with
  ``track_running_stats`` after N = 0, GroupNorm's weight gradient with no position), normlab
  leaves the buffers as they were and gives a zero gradient.
* SyncBatchNorm validates ``num_features >= 1`` and ``momentum`` in [0, 1] (torch's, and
  normlab's BatchNorm, use any momentum as given), takes 2-D to 5-D input (torch's: any
  number of spatial dims) and refuses a ``process_group`` this process is not a member of
  (torch's then normalizes over this process's batch alone); RMSNorm needs a non-empty
  ``normalized_shape`` of positive sizes.
* Tools that look modules up by their exact type in a pattern table of their own
  (``torch.fx.experimental.optimization.fuse``, the fusion step of FX-mode quantization's
  ``prepare_fx``) do not match normlab's classes: they leave the BatchNorm unfused, and the
  outputs stay correct. :func:`normlab.fold_batchnorm` folds it, and the eager
  ``torch.ao.quantization.fuse_modules`` takes it (above).
"""

from normlab.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormXd
from normlab.nn.evonorm import EvoNorm2dB0, EvoNorm2dS0
from normlab.nn.frn import FilterResponseNorm2d
from normlab.nn.frozen_bn import FrozenBatchNorm2d
from normlab.nn.ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from normlab.nn.groupnorm import GroupNorm
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.layernorm import LayerNorm, LayerNorm2d
from normlab.nn.lazy import (LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d, LazyInstanceNorm1d,
                             LazyInstanceNorm2d, LazyInstanceNorm3d)
from normlab.nn.rmsnorm import RMSNorm, RMSNorm2d
from normlab.nn.std_conv import ScaledStdConv2d, WSConv2d, standardize_weight
from normlab.nn.syncbn import SyncBatchNorm
from normlab.nn import fusion  # registers normlab's BN with torch.ao.quantization.fuse_modules

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormXd",
    "BatchRenorm1d", "BatchRenorm2d",
    "EvoNorm2dB0", "EvoNorm2dS0",
    "FilterResponseNorm2d",
    "FrozenBatchNorm2d",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "LayerNorm2d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
    "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d",
    "RMSNorm",
    "RMSNorm2d",
    "ScaledStdConv2d", "WSConv2d", "standardize_weight",
    "SyncBatchNorm",
]
