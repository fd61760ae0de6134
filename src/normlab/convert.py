"""convert_norm: replace every BatchNorm of a model by another normalization.

Works on any ``nn.Module``, including models built from torch.nn only. The replacement list is
collected before anything is changed (no module dict is mutated while it is iterated); a module
shared under several names is replaced once and stays shared. Affine weights are carried over;
running statistics too where the target has them (bn, brn, syncbn, frozenbn). BN -> FrozenBN
reproduces the BN's eval output exactly. GroupNorm targets whose requested group count does not
divide C get one by :func:`normlab.factory.resolve_groups`.

timm's norm-act layers (``BatchNormAct2d``, ``SyncBatchNormAct``, ``FrozenBatchNormAct2d``:
BatchNorms that apply their ``drop`` and ``act`` submodules after normalizing; torchvision's
FrozenBatchNorm2d is replaced too) and normlab BatchNorms with a fused
``activation`` stay whole: a ReLU, SiLU or exact GELU after no dropout is fused into the new
norm (``activation=``) where it takes one; any other activation or a dropout stays as the same
``drop`` / ``act`` submodules, run after the new norm by a forward hook (or, for a norm-act
target such as timm's GroupNormAct, in place of its own; the replacement of a plain BatchNorm
by such a target gets an Identity act and drop). The state_dict keys of those layers stay as
they were.

timm's ``SplitBatchNorm2d`` (what ``timm.layers.convert_splitbn_model`` makes of each BatchNorm for
AugMix / AdvProp split-BN training: a BatchNorm2d that, in training, normalizes the first part of
the batch itself and each other part with one of its ``aux_bn`` BatchNorms) is left as it is,
aux BNs included: one new norm in its place would normalize the whole batch together and drop
the aux BNs and their state_dict keys. A warning and the summary's ``left`` name each such
layer; convert the model before ``convert_splitbn_model`` instead.

The returned model carries ``model.normlab_conversion``, a :class:`ConversionSummary` of what was
replaced and what was left.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Any, Optional, Tuple

from torch import Tensor, nn
from torch.nn.utils import parametrize

from normlab.factory import (DEFAULT_NUM_GROUPS, NORMS, NormSpec, canonical_name, create_norm,
                             get_norm_class)
from normlab import functional as NLF
from normlab._trace import HOOK_DICTS, hooks_of
from normlab.nn.batch_renorm import BatchRenorm1d, _BatchRenorm
from normlab.nn.batchnorm import BatchNormXd
from normlab.nn._common import adopt_state, replace_modules, warn_dropped_hooks
from normlab.nn.frozen_bn import FrozenBatchNorm2d
from normlab.nn.syncbn import SyncBatchNorm

__all__ = ["convert_norm", "ConversionSummary", "Replacement"]

_SOURCE_TYPES = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
# torchvision's FrozenBatchNorm2d (timm's too: it re-exports it) and timm's FrozenBatchNormAct2d,
# what timm.layers.freeze_batch_norm_2d makes of BatchNorm2d and BatchNormAct2d
_FOREIGN_FROZEN = {"torchvision.ops.misc": ("FrozenBatchNorm2d",),
                   "timm.layers.norm_act": ("FrozenBatchNormAct2d",)}
_FROZEN_STATE = ("weight", "bias", "running_mean", "running_var")
_SYNC_TYPES = (nn.SyncBatchNorm, SyncBatchNorm)
_CARRIED = ("eps", "momentum", "affine", "track_running_stats")


@dataclasses.dataclass
class Replacement:
    name: str
    old: str
    new: str
    num_channels: int


@dataclasses.dataclass
class ConversionSummary:
    """``replaced``: one :class:`Replacement` per new module (``len()`` counts them);
    ``left``: ``(name, reason)`` for each norm deliberately not converted (timm's
    SplitBatchNorm2d); ``function``: the conversion that made it (``convert_norm`` or
    :func:`normlab.convert_layer_norm`)."""

    target: str
    replaced: list[Replacement] = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    function: str = "convert_norm"

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"{self.function} -> {self.target}: {len(self.replaced)} module(s) replaced"]
        lines += [f"  {r.name or '<root>'}: {r.old} -> {r.new}" for r in self.replaced]
        lines += [f"  left {name or '<root>'}: {why}" for name, why in self.left]
        return "\n".join(lines)


def _dims_of(module: nn.Module) -> int:
    if isinstance(module, (nn.BatchNorm1d, nn.LazyBatchNorm1d, BatchRenorm1d)):
        return 1
    if isinstance(module, (nn.BatchNorm3d, nn.LazyBatchNorm3d)):
        return 3
    name = type(module).__name__
    for d in (1, 3):
        if name.endswith(f"{d}d"):
            return d
    return 2


def _is_source(module: nn.Module) -> bool:
    """A BatchNorm convert_norm replaces: torch's and normlab's, and the frozen ones of
    torchvision and timm (fixed statistics and affine, all four as buffers)."""
    if isinstance(module, _SOURCE_TYPES):
        return True
    cls = type(module)
    return (cls.__name__ in _FOREIGN_FROZEN.get(cls.__module__, ())
            and all(isinstance(getattr(module, a, None), Tensor) for a in _FROZEN_STATE))


def split_batchnorm_class(module: nn.Module) -> Optional[type]:
    """timm's SplitBatchNorm2d class if ``module`` is one (or of a subclass), else None: a
    BatchNorm2d whose training forward splits the batch between itself and its ``aux_bn``
    BatchNorms."""
    return next((c for c in type(module).__mro__ if c.__name__ == "SplitBatchNorm2d"
                 and c.__module__ == "timm.layers.split_batchnorm"), None)


def is_split_batchnorm(module: nn.Module) -> bool:
    return split_batchnorm_class(module) is not None


SPLIT_REASON = ("timm's SplitBatchNorm2d: in training it normalizes each split of the batch with "
                "its own BatchNorm (itself and its aux_bn), which one new norm would not do; left "
                "as it is, aux_bn included")


def split_batchnorms(model: nn.Module) -> Tuple[set, list]:
    """``(ids, names)``: the ids of timm's SplitBatchNorm2d layers in ``model`` and of every
    module inside them (their aux BNs), which the conversions leave; the layers' names."""
    ids, names = set(), []
    for name, module in model.named_modules():
        if is_split_batchnorm(module) and id(module) not in ids:
            names.append(name)
            ids.update(id(m) for m in module.modules())
    return ids, names


def warn_split_left(names: list, what: str) -> None:
    """One warning naming the SplitBatchNorm2d layers a conversion left as they were."""
    if not names:
        return
    shown = ", ".join(repr(n or "<root>") for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    warnings.warn(f"{what}: left {len(names)} timm SplitBatchNorm2d layer(s) as they are "
                  f"({shown}{more}): they split the batch between the layer and its aux_bn "
                  "BatchNorms in training, which the replacement would not; convert the model "
                  "before timm's convert_splitbn_model", stacklevel=3)


def _num_features(module: nn.Module) -> int:
    """C of a source norm (torchvision's FrozenBatchNorm2d keeps no num_features)."""
    return getattr(module, "num_features", None) or module.running_mean.numel()


def _is_frozen_target(to: NormSpec) -> bool:
    return inspect.isclass(to) and issubclass(to, FrozenBatchNorm2d)


def _carried_by_signature(module: nn.Module, to: NormSpec, kwargs: dict[str, Any]) -> dict:
    """For a class or partial target: the BatchNorm settings (eps, momentum, affine,
    track_running_stats) that the target's constructor accepts and that neither ``kwargs`` nor
    the partial already give."""
    try:
        params = inspect.signature(to).parameters
    except (TypeError, ValueError):  # a callable without a signature: carry nothing
        return {}
    bound = to.keywords if isinstance(to, functools.partial) else {}
    target = to.func if isinstance(to, functools.partial) else to
    carried = {}
    for name in _CARRIED:
        if name in params and name not in kwargs and name not in bound and hasattr(module, name):
            carried[name] = getattr(module, name)
    if inspect.isclass(target) and issubclass(target, _BatchRenorm):
        carried.pop("momentum", None)  # as for "brn": Batch Renorm keeps its own rate
    if "bias" in params and "bias" not in kwargs and "bias" not in bound and _no_bias(module):
        carried["bias"] = False
    return carried


def _no_bias(module: nn.Module) -> bool:
    """An affine BatchNorm built with ``bias=False`` (torch >= 2.11): weight, no bias."""
    return getattr(module, "affine", False) and getattr(module, "bias", 0) is None


_NOTHING = object()


def _carried_value(module: nn.Module, attr: str) -> Any:
    """The value of one setting a named target carries over from ``module`` (see
    :attr:`normlab.factory.NormEntry.carries`), or _NOTHING where the module has none to carry."""
    if attr == "dims":
        return _dims_of(module)
    if attr == "bias":
        return False if _no_bias(module) else _NOTHING  # a weight without bias stays so
    value = getattr(module, attr, _NOTHING)
    if attr == "process_group" and value is None:
        return _NOTHING  # only a SyncBatchNorm's own group is kept
    return value


def _freeze(module: nn.Module, cls: type, kwargs: dict[str, Any], name: str) -> nn.Module:
    """BN -> FrozenBN: the exact freeze of :meth:`FrozenBatchNorm2d.from_batchnorm`."""
    what = f"{name or '<root>'!r} ({type(module).__name__})"
    extra = sorted(set(kwargs) - {"eps", "activation", "device", "dtype"})
    if extra:
        raise TypeError(
            f"convert_norm to {cls.__name__}: unexpected keyword argument(s) "
            f"{', '.join(map(repr, extra))}; it takes eps, activation"
        )
    if _dims_of(module) != 2:
        raise ValueError(
            f"cannot convert {what} to {cls.__name__}: it takes 4-D (N, C, H, W) input only; "
            "convert the 2-D BatchNorms alone, or give those modules another target"
        )
    if module.running_mean is None or module.running_var is None:
        raise ValueError(
            f"cannot convert {what} to {cls.__name__}: it has track_running_stats=False, so "
            "there are no running statistics to freeze"
        )
    new = cls.from_batchnorm(module)
    if "eps" in kwargs:
        new.eps = NLF.check_eps(kwargs["eps"])
    if "activation" in kwargs:
        new.activation = NLF.check_activation(kwargs["activation"])
    return new.train(module.training)  # the mode of the model it joins, as every other target


def _build(module: nn.Module, to: NormSpec, kwargs: dict[str, Any], name: str = "") -> nn.Module:
    """The replacement of one BatchNorm; a norm-act layer's activation and dropout go along."""
    act, drop = _norm_act_parts(module)
    fused = _fusable_activation(act, drop) if act is not None else _NOTHING
    if fused is not _NOTHING and ("activation" in kwargs or not _takes_activation(to, kwargs)):
        fused = _NOTHING
    new = _build_norm(module, to, kwargs, name, fused)
    # a norm-act target (timm's GroupNormAct, BatchNormAct2d) runs its own drop and act
    runs_its_own = all(isinstance(new._modules.get(k), nn.Module) for k in ("drop", "act"))
    if act is None and runs_its_own:
        # a plain BatchNorm applied no activation: nor does its replacement (timm's default
        # act, ReLU, would otherwise follow every norm, a ResNet's last one before the add too)
        new.drop, new.act = nn.Identity(), nn.Identity()
    if act is not None and fused is _NOTHING:
        new.drop, new.act = drop, act  # the same names as timm's: state_dict keys stay
        if not runs_its_own:  # (there: in its place, not a second time after it)
            new.register_forward_hook(_drop_then_act)
    _carry_feature_hooks(module, new)  # after _drop_then_act: they see the activation's output
    return new


def _build_norm(module: nn.Module, to: NormSpec, kwargs: dict[str, Any], name: str,
                fused: Any) -> nn.Module:
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"cannot convert {name or '<root>'!r} ({type(module).__name__}): its parameters are "
            "not initialized yet, so its channel count is unknown; run one forward pass first"
        )
    c = _num_features(module)
    kw = dict(kwargs)
    key = canonical_name(to) if isinstance(to, str) else None
    if key is None:
        kw.update(_carried_by_signature(module, to, kwargs))
    else:
        for attr in NORMS[key].carries:
            value = _carried_value(module, attr)
            if value is not _NOTHING:
                kw.setdefault(attr, value)
    if key == "frozenbn" or _is_frozen_target(to):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            new = _freeze(module, to if _is_frozen_target(to) else FrozenBatchNorm2d, kwargs, name)
            if fused is not _NOTHING:
                new.activation = fused
            return new
    if fused is not _NOTHING:
        kw["activation"] = fused
    if key == "bn" and "dims" not in kwargs and isinstance(module, _SYNC_TYPES):
        # a SyncBatchNorm may have served (N, C), (N, C, L), ... input: keep any dims allowed
        kw.pop("dims", None)
        new = BatchNormXd(c, **kw)
    else:
        try:
            new = create_norm(to, c, **kw)
        except (TypeError, ValueError) as e:
            if type(e) not in (TypeError, ValueError):
                raise
            # the settings carried over (dims=3 of a BatchNorm3d) are not the caller's: name
            # the module they came from
            raise type(e)(f"cannot convert {name or '<root>'!r} ({type(module).__name__}): "
                          f"{e}") from e
    return adopt_state(module, new)


# timm's norm-act layers (BatchNormAct2d, SyncBatchNormAct: BatchNorms that run their ``drop``
# and ``act`` submodules after the normalization) and the activations normlab fuses
_FUSED_NAMES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu", nn.Identity: None}
_ACT_MODULES = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


def _norm_act_parts(module: nn.Module) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """``(act, drop)`` of a norm-act layer, ``(None, None)`` for a plain BatchNorm. A normlab
    BatchNorm's fused ``activation`` counts as its act (it goes along too)."""
    fused = getattr(module, "activation", None)
    if isinstance(fused, str) and fused in _ACT_MODULES:
        return _ACT_MODULES[fused](), nn.Identity()
    act, drop = module._modules.get("act"), module._modules.get("drop")
    if isinstance(act, nn.Module) and isinstance(drop, nn.Module):
        return act, drop
    return None, None


def _fusable_activation(act: nn.Module, drop: nn.Module) -> Any:
    """The ``activation=`` name that computes ``act(drop(y))`` (None: nothing to apply), or
    _NOTHING where normlab cannot fuse it (another activation, a real dropout)."""
    if type(drop) is not nn.Identity:
        return _NOTHING
    if type(act) is nn.GELU and act.approximate != "none":
        return _NOTHING  # normlab fuses the exact (erf) GELU only
    return _FUSED_NAMES.get(type(act), _NOTHING)


def _takes_activation(to: NormSpec, kwargs: dict[str, Any]) -> bool:
    if isinstance(to, str):
        key = canonical_name(to)
        if key == "frozenbn":
            return True
        try:
            target = get_norm_class(key, kwargs.get("dims", 2))
        except ValueError:
            return False
    else:
        target = to.func if isinstance(to, functools.partial) else to
    try:
        return "activation" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _drop_then_act(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook of a converted norm-act layer whose activation or dropout normlab does not
    fuse: ``act(drop(y))`` after the new norm, as timm's layer computed it. A norm that returns
    its input (``"none"``: nn.Identity) gets a copy first: timm's act and drop work in place
    (``ReLU(inplace=True)``) and must not change the tensor its caller still holds (a
    pre-activation block's shortcut)."""
    if any(output is a for a in args):
        output = output.clone()
    return module.act(module.drop(output))


# the hook dicts timm's FeatureHooks registers in, with the flags torch keeps beside each
_FEATURE_HOOK_DICTS = {"_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
                       "_forward_hooks": ("_forward_hooks_with_kwargs",
                                          "_forward_hooks_always_called")}


def _is_feature_hook(hook: Any) -> bool:
    """Whether ``hook`` is one of timm's feature-extraction hooks: ``FeatureHooks`` (what
    ``features_only=True`` models with ``feature_cls="hook"``, FeatureHookNet, or
    ``feature_location="expansion"`` register on the module whose output, or input, is a
    feature map) records the tensor and nothing else."""
    func = getattr(hook, "func", None)
    owner = getattr(func, "__self__", None)
    return (isinstance(hook, functools.partial)
            and getattr(func, "__name__", None) == "_collect_output_hook"
            and type(owner).__name__ == "FeatureHooks"
            and type(owner).__module__.split(".")[0] == "timm")


def _carry_feature_hooks(old: nn.Module, new: nn.Module) -> None:
    """Register on ``new``, under their ids, the timm feature-extraction hooks of ``old``: the
    model would otherwise return fewer feature maps, silently. They only record what the norm
    (with its activation) computes, which the replacement computes in its place. ``old`` keeps
    them too (its hook handles, which timm never removes, still refer to it)."""
    for attr, flags in _FEATURE_HOOK_DICTS.items():
        for hook_id, hook in getattr(old, attr).items():
            if _is_feature_hook(hook):
                getattr(new, attr)[hook_id] = hook
                for flag in flags:
                    if hook_id in getattr(old, flag):
                        getattr(new, flag)[hook_id] = getattr(old, flag)[hook_id]


def _only_carried_hooks(module: nn.Module) -> bool:
    """Whether every hook of ``module`` is one a conversion carries over: the forward hook
    :func:`_build` registers for a kept drop and act (the replacement gets them again) and
    timm's feature-extraction hooks."""
    kinds = hooks_of(module, HOOK_DICTS)
    return (set(kinds) <= {"forward_hooks", "forward_pre_hooks"}
            and all(h is _drop_then_act or _is_feature_hook(h)
                    for attr in _FEATURE_HOOK_DICTS for h in getattr(module, attr).values()))


def _warn_user_hooks(replaced: list, what: str) -> None:
    """The dropped-hooks warning for the replaced modules with hooks of the user's (not for
    those :func:`_only_carried_hooks` accepts)."""
    warn_dropped_hooks([r for r in replaced if not _only_carried_hooks(r[1])], what)
    for name, old, _ in replaced:  # torch.nn.utils.parametrize: the replacement holds values
        if parametrize.is_parametrized(old):
            warnings.warn(
                f"{what}: the parametrizations of {name or 'the model'!r} "
                f"({type(old).__name__}: {', '.join(old.parametrizations)}) are not carried "
                "over: its replacement holds their current values as plain tensors (and the "
                "parametrization's original parameters leave the model); register them on the "
                "new module", stacklevel=3)


def refuse_ddp(model: nn.Module, match: Any, what: str) -> None:
    """A ValueError, before anything changes, where a module the conversion would replace lies
    inside a DistributedDataParallel: DDP registered the parameters and buffers when it was
    built, so it would go on reducing and broadcasting the old norm's (the next forward or
    backward fails: an unused parameter, an internal assert in its buffer broadcast)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.parallel.DistributedDataParallel) and any(
                match(x) for x in m.module.modules()):
            raise ValueError(
                f"{what}: {name or 'the model'!r} is a DistributedDataParallel, which registered "
                "its parameters and buffers when it was built, and would not see the new norms'; "
                f"convert the module before wrapping it ({what}(model.module, ...), then wrap "
                "that in a new DistributedDataParallel)"
            )


def _already(module: nn.Module, target: str, target_cls: Optional[type]) -> bool:
    """Whether ``module`` is already what a conversion to ``target`` would build (left alone, with
    its own settings: a BatchRenorm1d's r_max/d_max survive a conversion to "brn")."""
    if target == "brn":
        return isinstance(module, _BatchRenorm)
    return target_cls is not None and type(module) is target_cls


def _warn_instance_norm_groups(replaced: list, kwargs: dict[str, Any]) -> None:
    """For ``"gn"``: a warning naming the GroupNorms that the group rule (:func:`resolve_groups`)
    reduced to one channel per group, i.e. InstanceNorm (the GN paper's worst setting: 28.4
    against 24.1 at 32 groups): a layer with no more channels than the groups asked for."""
    if "group_size" in kwargs:
        return
    asked = kwargs.get("num_groups", DEFAULT_NUM_GROUPS)
    small = [(name, new.num_channels) for name, _, new in replaced
             if isinstance(new, nn.GroupNorm) and new.num_groups == new.num_channels > 1
             and isinstance(asked, int) and asked > new.num_channels]
    if small:
        shown = ", ".join(f"{name or '<root>'} ({c})" for name, c in small[:8])
        more = f" and {len(small) - 8} more" if len(small) > 8 else ""
        warnings.warn(f"convert_norm: {len(small)} layer(s) have no more channels than the "
                      f"{asked} groups asked for and got one channel per group, which is "
                      f"InstanceNorm: {shown}{more}; give num_groups or group_size to keep "
                      "several channels per group", stacklevel=3)


def convert_norm(model: nn.Module, to: NormSpec, **kwargs: Any) -> nn.Module:
    """Replace every BatchNorm (torch's or normlab's, SyncBatchNorm and FrozenBatchNorm2d
    included, and torchvision's FrozenBatchNorm2d and timm's FrozenBatchNormAct2d) in ``model``
    by ``create_norm(to, C, **kwargs)``. timm's SplitBatchNorm2d layers are left as they are
    (see the module docstring), named in a warning and in the summary's ``left``.

    Args:
        model: any module; changed in place (and returned). If ``model`` itself is a BatchNorm,
            the new module is returned instead.
        to: a create_norm name ("gn", "frozenbn", "bn", ...), class or partial.
        **kwargs: for the new modules (e.g. ``num_groups=16``); eps, momentum and affine are
            carried over from each BatchNorm unless given (for a class or partial target: those
            of eps, momentum, affine and track_running_stats its constructor names and the
            partial does not bind). A FrozenBatchNorm2d class target freezes exactly, as
            ``"frozenbn"`` does.

    The new module takes over the BatchNorm's ``weight`` and ``bias`` Parameter objects and
    its running buffers where shapes and dtypes agree (as torch's ``convert_sync_batchnorm``
    does), so an optimizer built before the conversion keeps training the model; otherwise
    (FrozenBatchNorm2d's buffers, a dtype change) the values are copied. Hooks registered on a
    replaced BatchNorm are not carried over (as with torch's ``convert_sync_batchnorm``: the new
    module is another kind of norm), and a warning names each such module; register them on
    the new module. So are parametrizations (``torch.nn.utils.parametrize``): the new module
    holds their current values, and a warning names them. A model whose BatchNorms lie inside
    a DistributedDataParallel is refused (ValueError, nothing changed): convert it before
    wrapping it.

    Returns:
        The model, with ``model.normlab_conversion`` summarising the replacements.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64))
        >>> model = convert_norm(model, "gn", num_groups=32)
        >>> print(model.normlab_conversion)
        convert_norm -> gn: 1 module(s) replaced
          1: BatchNorm2d -> GroupNorm(32, 64, eps=1e-05, affine=True, bias=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    target = canonical_name(to) if isinstance(to, str) else getattr(to, "__name__", repr(to))
    target_cls: Optional[type] = get_norm_class(to) if isinstance(to, str) and target != "bn" else None
    summary = ConversionSummary(str(target))
    split, split_names = split_batchnorms(model)

    def match(m: nn.Module) -> bool:
        return _is_source(m) and not _already(m, target, target_cls) and id(m) not in split

    refuse_ddp(model, match, "convert_norm")
    model, replaced = replace_modules(model, match, lambda m, name: _build(m, to, kwargs, name))
    _warn_user_hooks(replaced, "convert_norm")
    warn_split_left(split_names, "convert_norm")
    if target == "gn":
        _warn_instance_norm_groups(replaced, kwargs)
    summary.replaced = [Replacement(name, type(old).__name__, repr(new), _num_features(old))
                        for name, old, new in replaced]
    summary.left = [(name, SPLIT_REASON) for name in split_names]
    model.normlab_conversion = summary
    return model
