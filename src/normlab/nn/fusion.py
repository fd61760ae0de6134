"""Conv/Linear + normlab BatchNorm in torch's fusion utilities.

``torch.nn.utils.fusion.fuse_conv_bn_eval`` (and ``fuse_linear_bn_eval``) read only the BN's
``running_mean``, ``running_var``, ``eps``, ``weight`` and ``bias``: normlab's BatchNorm1d/2d/3d
subclass torch's and work there as they are.

``torch.ao.quantization.fuse_modules`` (and ``fuse_modules_qat``) instead look the *exact* types
of the modules up in a table (``(nn.Conv2d, nn.BatchNorm2d) -> fuse_conv_bn``, ...), so a
subclass is "did not find fuser method". Subclassing cannot reach an exact-type lookup, and
asking every user to pass ``fuse_custom_config_dict`` is not drop-in, so normlab registers
itself: importing normlab adds, for every entry of torch's table that names a torch BatchNorm
class, the same entry with normlab's class in its place (torch's own entries are untouched).
Its fuser first turns the normlab BN into the torch BN it subclasses, holding the same
Parameter and buffer objects, then calls torch's fuser: the fused result is exactly what torch
builds from its own BN (a folded Conv2d in eval; torch's ConvBn2d / BNReLU2d for QAT, which
accept torch's BN class only). A BN with a fused ``activation`` is refused (folding it into the
conv would drop the activation). ``fuse_conv_bn_eval`` cannot be reached that way: given a BN
with a fused ``activation`` it folds the affine and drops the activation with no error, so fold
such a BN with :func:`normlab.fold_batchnorm`, which keeps it.

``torch.ao.quantization.convert`` (eager-mode static quantization) swaps modules by the same
kind of exact-type table (``nn.BatchNorm2d -> nnq.BatchNorm2d``, GroupNorm, InstanceNorm,
LayerNorm), and ``prepare`` observes only the types in it: a normlab norm left unfused was
neither observed nor swapped, and the converted model fed it a quantized tensor (TypeError).
Importing normlab also adds its subclasses of those torch classes to that table; ``convert``
gives torch's quantized module for them (one with a fused ``activation`` is refused by name).
"""

from __future__ import annotations

from typing import Callable

from torch import nn
from torch.ao.quantization import fuser_method_mappings, quantization_mappings

from normlab.nn._common import adopt_state
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.groupnorm import GroupNorm
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.layernorm import LayerNorm

__all__ = ["as_torch_batchnorm", "register_fusers", "register_quantized"]

_TORCH_OF = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d, BatchNorm3d: nn.BatchNorm3d}


def as_torch_batchnorm(module: nn.Module) -> nn.Module:
    """A normlab BatchNorm1d/2d/3d as the torch.nn class it subclasses, with the same Parameter
    and buffer objects, settings and mode; any other module is returned as it is."""
    torch_cls = _TORCH_OF.get(type(module))
    if torch_cls is None:
        return module
    if getattr(module, "activation", None) is not None:
        raise ValueError(
            f"cannot fuse {type(module).__name__} with activation={module.activation!r}: the "
            "fused module would drop the activation; fuse a BatchNorm without activation"
        )
    bn = torch_cls(module.num_features, module.eps, module.momentum, module.affine,
                   module.track_running_stats)
    if module.affine and module.bias is None:
        bn.register_parameter("bias", None)
    return adopt_state(module, bn)


def _on_torch_bn(fuser: Callable) -> Callable:
    def fuse(is_qat, *mods):
        return fuser(is_qat, *(as_torch_batchnorm(m) for m in mods))

    fuse.__name__ = f"normlab_{getattr(fuser, '__name__', 'fuser')}"
    return fuse


def register_fusers() -> None:
    """Add normlab's BatchNorm classes to torch.ao.quantization's fuser table (idempotent)."""
    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    torch_to_ours = {t: o for o, t in _TORCH_OF.items()}
    for types, fuser in list(table.items()):
        if not any(t in torch_to_ours for t in types):
            continue
        ours = tuple(torch_to_ours.get(t, t) for t in types)
        if ours not in table:
            table[ours] = _on_torch_bn(fuser)


# normlab's subclasses of the torch.nn norms that eager static quantization swaps
_SUBCLASSES = (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d, InstanceNorm2d,
               InstanceNorm3d, LayerNorm)


def _check_no_activation(module: nn.Module) -> None:
    if getattr(module, "activation", None) is not None:
        raise ValueError(
            f"cannot quantize {type(module).__name__} with activation={module.activation!r}: "
            "torch's quantized module would drop the activation; quantize a norm without one"
        )


def _from_normlab(qcls: type) -> type:
    """``qcls`` (torch's quantized module) whose ``from_float`` also takes normlab's module:
    refuses a fused activation, then builds ``qcls`` itself, as for torch's float module."""

    class FromNormlab(qcls):
        @classmethod
        def from_float(cls, mod, use_precomputed_fake_quant=False):
            _check_no_activation(mod)
            return qcls.from_float(mod, use_precomputed_fake_quant=use_precomputed_fake_quant)

    FromNormlab.__name__ = FromNormlab.__qualname__ = f"Normlab{qcls.__name__}"
    return FromNormlab


def register_quantized() -> None:
    """Add normlab's norms to torch.ao.quantization's static-quantization table next to the
    torch.nn class each subclasses (idempotent; torch's own entries are untouched)."""
    table = quantization_mappings.DEFAULT_STATIC_QUANT_MODULE_MAPPINGS
    for ours in _SUBCLASSES:
        theirs = next((t for t in ours.__mro__[1:] if t in table), None)
        if theirs is not None and ours not in table:
            table[ours] = _from_normlab(table[theirs])


register_fusers()
register_quantized()
