"""optimize: put normlab's norms into any model and fuse the activation that follows each norm.

Three steps, each recorded:

1. **replace**: every torch.nn norm (BatchNorm1d/2d/3d, GroupNorm, LayerNorm, InstanceNorm1d/2d/3d,
   RMSNorm), timm norm layer (GroupNorm, GroupNorm1, LayerNorm, LayerNorm2d, RmsNorm, RmsNorm2d and the
   norm-act layers BatchNormAct2d, GroupNormAct, GroupNorm1Act, LayerNormAct, LayerNormAct2d,
   FrozenBatchNormAct2d) and torchvision's FrozenBatchNorm2d (a detector's frozen backbone)
   becomes its normlab twin, in place, holding the same Parameter and buffer objects (same
   state_dict keys, an optimizer built before keeps training them). A norm-act layer's ``act``
   is fused into the new norm (ReLU, SiLU, exact GELU; BatchNorm, SyncBatchNorm, GroupNorm,
   InstanceNorm and FrozenBatchNorm2d take a fused activation, LayerNorm and RMSNorm do not).
2. **nn.Sequential**: a ReLU/SiLU/GELU module right after a normlab norm that takes one is
   fused into it and replaced by ``nn.Identity`` (indices and state_dict keys stay).
3. **torch.fx** (``trace=True``): in a model fx can trace, an activation call on a norm's output
   (``F.relu``/``torch.relu``/``F.silu``/``F.gelu``, ``x.relu()``, or an activation module) that
   is the output's only reader is fused, and so is SiLU written out, ``x * torch.sigmoid(x)``
   (the product and the sigmoid its only readers). One beside another reader (a residual) is
   left, recorded with that reader's node name. A norm called several times (a detection
   head's tower run on every pyramid level) is fused where the same activation is the only
   reader of every call, and recorded as left otherwise. This rewrites the forward, so the result is a new
   ``torch.fx.GraphModule`` (the original model keeps its unfused forward and stays correct; the
   GraphModule holds the same parameters, and fused norms are new modules sharing them). Its
   state_dict has the original's keys, but a module fx traces through becomes a plain
   ``nn.Module`` there: its own ``_load_from_state_dict`` and state_dict hooks (a model that
   renames an old checkpoint's keys as it loads) do not come along, so load such a checkpoint
   into the original model.

Only torch.nn's exact classes and timm's named classes are replaced: a subclass with a forward
of its own is left alone (recorded). A replaced norm keeps the hooks registered on it (the same
hook dicts: their handles still remove them). A fusion happens only where nothing else can see
the norm's output: not where the norm or the activation module has hooks, not where the trace
shows another reader of the norm's output (a loop over the nn.Sequential that keeps it, a slice
``seq[:2]``), and the fx rewrite not where a module it would inline, or the root, has hooks (a
GraphModule runs none of them), nor where the traced forward depends on train/eval mode (a
GraphModule keeps the mode's branch it was traced in). Where fx cannot trace the model, step 2
assumes that each nn.Sequential is run whole (it cannot see otherwise; a subclass with a
forward of its own is not fused into then), and the record says the model was not traced. The
record lists what was left and why.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from normlab import _trace
from normlab import nn as nlnn
from normlab.convert import _fusable_activation
from normlab.nn._common import replace_modules

__all__ = ["optimize", "OptimizeRecord"]


@dataclasses.dataclass
class OptimizeRecord:
    """What :func:`optimize` did. ``replaced``: (name, old class, new module repr);
    ``fused``: (norm name, activation, where: "norm-act", "sequential" or "fx");
    ``skipped``: (name, reason); ``traced``/``trace_error``: whether fx could trace the model
    (``traced`` is None when ``trace=False``)."""

    replaced: list = dataclasses.field(default_factory=list)
    fused: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    traced: Optional[bool] = None
    trace_error: str = ""

    def __str__(self) -> str:
        lines = [f"optimize: {len(self.replaced)} norm(s) replaced, {len(self.fused)} "
                 f"activation(s) fused, {len(self.skipped)} left"]
        if self.traced is False:
            lines.append(f"  (not traceable by torch.fx: {self.trace_error})")
        lines += [f"  {n or '<root>'}: {old} -> {new}" for n, old, new in self.replaced]
        lines += [f"  {n}: fused {act} ({how})" for n, act, how in self.fused]
        lines += [f"  left {n or '<root>'}: {why}" for n, why in self.skipped]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# activations that normlab's norms fuse
# --------------------------------------------------------------------------------------------

_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu", F.gelu: "gelu"}


def _module_activation(m: nn.Module) -> Optional[str]:
    """"relu"/"silu"/"gelu" for a module computing exactly that (convert_norm's rule, plus
    timm's GELU class, which is F.gelu), else None."""
    name = _fusable_activation(m, nn.Identity())
    if isinstance(name, str):
        return name
    cls = type(m)
    if cls.__module__.startswith("timm.") and cls.__name__ == "GELU":
        return "gelu"
    return None


_SIGMOID = (torch.sigmoid, F.sigmoid, torch.special.expit)
_MUL = (operator.mul, torch.mul)


def _sigmoid_of(node: fx.Node, x: fx.Node) -> bool:
    """Whether ``node`` computes ``sigmoid(x)`` alone (``torch.sigmoid``, ``F.sigmoid``,
    ``x.sigmoid()``)."""
    if node.args != (x,) or node.kwargs:
        return False
    return (node.op == "call_function" and node.target in _SIGMOID
            or node.op == "call_method" and node.target == "sigmoid")


def _silu_product(x: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """``(mul, sigmoid)`` where x's readers are exactly ``sigmoid(x)`` and ``x * sigmoid(x)``
    (either order; ``torch.mul`` or ``*``), the sigmoid read by that product alone: SiLU
    written out, as the original latent-diffusion code's ``nonlinearity``. Else None."""
    if len(x.users) != 2:
        return None
    sig = next((u for u in x.users if _sigmoid_of(u, x)), None)
    mul = next((u for u in x.users if u is not sig), None)
    if sig is None or list(sig.users) != [mul] or mul.kwargs:
        return None
    if not (mul.op == "call_function" and mul.target in _MUL or
            mul.op == "call_method" and mul.target == "mul"):
        return None
    return (mul, sig) if set(mul.args) == {x, sig} and len(mul.args) == 2 else None


def _other_readers(node: fx.Node, act_user: fx.Node) -> str:
    """The readers of ``node`` other than ``act_user``, named for the record."""
    return ", ".join(u.name for u in node.users if u is not act_user)


def _call_activation(node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
    """The activation an fx node applies to its first argument alone, or None."""
    if node.op == "call_module":
        return _module_activation(gm.get_submodule(node.target))
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS and len(node.args) == 1:
        kwargs = dict(node.kwargs)
        kwargs.pop("inplace", None)
        if node.target is F.gelu and kwargs.pop("approximate", "none") != "none":
            return None
        return None if kwargs else _ACT_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return "relu"
    return None


# --------------------------------------------------------------------------------------------
# step 1: the replacements
# --------------------------------------------------------------------------------------------

_META = {"device": "meta"}


def _bn(cls):
    return lambda m: cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **_META)


def _in(cls):
    return lambda m: cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **_META)


def _gn(m):
    return nlnn.GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine, **_META)


def _ln(m):
    return nlnn.LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine, **_META)


def _ln2d(m):
    # timm's LayerNorm2d returns its (N, H, W, C) result permuted, in channels_last strides: the
    # layers after it (ConvNeXt's convs) run channels_last on NCHW input; a copy back to NCHW
    # cost convnext_atto's CPU training step 1.2-1.4x (benchmarks/NOTES.md)
    return nlnn.LayerNorm2d(m.normalized_shape[0], m.eps, m.elementwise_affine,
                            channels_last_output=True, **_META)


def _rms(m):
    return nlnn.RMSNorm(m.normalized_shape, m.eps, m.elementwise_affine, **_META)


def _rms2d(m):
    return nlnn.RMSNorm2d(m.normalized_shape[0], m.eps, m.elementwise_affine, **_META)


# torch.nn's classes, exactly (a subclass may compute something else)
_TORCH = {
    nn.BatchNorm1d: _bn(nlnn.BatchNorm1d), nn.BatchNorm2d: _bn(nlnn.BatchNorm2d),
    nn.BatchNorm3d: _bn(nlnn.BatchNorm3d), nn.GroupNorm: _gn, nn.LayerNorm: _ln,
    nn.InstanceNorm1d: _in(nlnn.InstanceNorm1d), nn.InstanceNorm2d: _in(nlnn.InstanceNorm2d),
    nn.InstanceNorm3d: _in(nlnn.InstanceNorm3d), nn.RMSNorm: _rms,
}
def _frozen(m):
    return nlnn.FrozenBatchNorm2d(m.weight.shape[0], m.eps, **_META)


# timm's classes by name: (builder, whether it is a norm-act layer with ``drop`` and ``act``)
_TIMM = {
    "FrozenBatchNormAct2d": (_frozen, True),
    "BatchNormAct2d": (_bn(nlnn.BatchNorm2d), True), "GroupNorm": (_gn, False),
    "GroupNorm1": (_gn, False), "GroupNormAct": (_gn, True), "GroupNorm1Act": (_gn, True),
    "LayerNorm": (_ln, False), "LayerNormAct": (_ln, True), "LayerNorm2d": (_ln2d, False),
    "LayerNormAct2d": (_ln2d, True), "RmsNorm": (_rms, False), "RmsNorm2d": (_rms2d, False),
}


def _builder(m: nn.Module) -> Tuple[Optional[Callable], bool]:
    cls = type(m)
    if cls in _TORCH:
        return _TORCH[cls], False
    if (cls.__module__, cls.__name__) == ("torchvision.ops.misc", "FrozenBatchNorm2d"):
        return _frozen, False  # torchvision's (timm's FrozenBatchNorm2d is this class too)
    if cls.__module__.startswith("timm.") and cls.__name__ in _TIMM:
        return _TIMM[cls.__name__]
    return None, False


def _share(old: nn.Module, new: nn.Module) -> Optional[str]:
    """Give ``new`` (built on the meta device) ``old``'s Parameter and buffer objects; the
    reason it cannot (their state_dict keys differ), or None."""
    own = lambda m: set(m._parameters) | {b for b in m._buffers if b not in m._non_persistent_buffers_set}
    if own(old) != own(new):
        return f"state_dict keys differ: {sorted(own(old))} vs normlab's {sorted(own(new))}"
    for name in new._parameters:
        new._parameters[name] = old._parameters.get(name)
    for name in new._buffers:
        new._buffers[name] = old._buffers.get(name)
    for attr in _trace.HOOK_DICTS:  # the same dicts: hooks run, their handles still remove them
        if attr in old.__dict__:
            new.__dict__[attr] = old.__dict__[attr]
    new.train(old.training)
    return None


def _subclass_left(m: nn.Module) -> str:
    """Why a subclass of one of torch's norms (not normlab's own, not a timm class in the
    table) is left: only the exact classes are known to compute what the replacement does.
    "" for anything else."""
    cls = type(m)
    base = next((b for b in _TORCH if isinstance(m, b)), None)
    if base is None or cls.__module__.startswith("normlab."):
        return ""
    own = "with a forward of its own" if cls.forward is not base.forward else "of its own class"
    return (f"{cls.__name__} is a subclass of torch.nn.{base.__name__} {own}: only torch's "
            "exact classes and timm's known ones are replaced")


def _replacement(m: nn.Module) -> Tuple[Optional[nn.Module], Optional[str], str]:
    """(new module, fused activation, "") or (None, None, reason) for a known norm class;
    (None, None, "") for anything else."""
    build, norm_act = _builder(m)
    if build is None:
        return None, None, _subclass_left(m)
    if getattr(m, "_fast_norm", False):
        return None, None, "timm's fast-norm path (apex kernels) is on"
    act = None
    if norm_act:
        hooked = [part for part in ("drop", "act") if _trace.hooks_of(getattr(m, part))]
        if hooked:
            return None, None, f"its {hooked[0]} module has hooks, which fusing would drop"
        if not isinstance(m.drop, nn.Identity):
            return None, None, f"its drop layer ({type(m.drop).__name__}) would run between norm and act"
        if not isinstance(m.act, nn.Identity):
            act = _module_activation(m.act)
            if act is None:
                return None, None, f"its activation {type(m.act).__name__} is not relu/silu/exact gelu"
    new = build(m)
    if act is not None and not _takes_activation(new):
        return None, None, f"normlab's {type(new).__name__} takes no fused activation ({act})"
    reason = _share(m, new)
    if reason is not None:
        return None, None, reason
    if act is not None:
        new.activation = act
    return new, act, ""


def _replace_all(model: nn.Module, record: OptimizeRecord) -> nn.Module:
    plans = {}
    for name, m in model.named_modules():
        new, act, reason = _replacement(m)
        if reason:
            record.skipped.append((name, reason))
        elif new is not None:
            plans[id(m)] = (new, act)
    model, replaced = replace_modules(model, lambda m: id(m) in plans, lambda m, _: plans[id(m)][0])
    for name, old, new in replaced:
        record.replaced.append((name, type(old).__name__, repr(new)))
        if plans[id(old)][1]:
            record.fused.append((name, plans[id(old)][1], "norm-act"))
    return model


# --------------------------------------------------------------------------------------------
# steps 2 and 3: fusing the activation after a norm
# --------------------------------------------------------------------------------------------


def _takes_activation(m: nn.Module) -> bool:
    """normlab's norms with a fused ``activation`` (BatchNorm, SyncBatchNorm, GroupNorm,
    InstanceNorm, FrozenBatchNorm2d and their lazy forms)."""
    return type(m).__module__.startswith("normlab.nn.") and hasattr(m, "activation")


def _fusable_norm(m: nn.Module) -> bool:
    return _takes_activation(m) and getattr(m, "activation", None) is None


def _hooks_in_the_way(norm: nn.Module, act_module: Optional[nn.Module]) -> str:
    """Why hooks forbid fusing (a hook on the norm would see the activation's output, one on
    the activation module would no longer run), or ""."""
    for what, module in (("the norm", norm), ("the activation", act_module)):
        if module is not None and _trace.hooks_of(module):
            return f"not fused: {what} has {', '.join(_trace.hooks_of(module))}"
    return ""


def _only_reader(gm: fx.GraphModule, counts: dict, norm: nn.Module, act_module: nn.Module) -> bool:
    """Whether the trace shows ``act_module`` as the only reader of ``norm``'s output, each of
    the two called once."""
    if counts.get(id(norm)) != 1 or counts.get(id(act_module)) != 1:
        return False
    for node in gm.graph.nodes:
        if node.op == "call_module" and gm.get_submodule(node.target) is norm:
            users = list(node.users)
            return (len(users) == 1 and users[0].op == "call_module"
                    and gm.get_submodule(users[0].target) is act_module
                    and users[0].args[:1] == (node,))
    return False


def _left(record: OptimizeRecord, name: str, reason: str) -> None:
    """Record a norm left unfused, once (steps 2 and 3 may both find it)."""
    if (name, reason) not in record.skipped:
        record.skipped.append((name, reason))


def _fuse_sequentials(model: nn.Module, record: OptimizeRecord,
                      gm: Optional[fx.GraphModule]) -> None:
    """Step 2. With a trace (``gm``), only where it shows the activation module as the norm
    output's only reader; without one, each nn.Sequential is assumed to be run whole."""
    counts = _trace.call_counts(gm) if gm is not None else {}
    paths = _trace.paths_count(model.named_modules(remove_duplicate=False))
    for name, seq in model.named_modules():
        if not (_trace.plain_sequential(seq) or gm is not None and isinstance(seq, nn.Sequential)):
            continue
        keys = list(seq._modules)
        for k, k_next in zip(keys, keys[1:]):
            norm, act_module = seq._modules[k], seq._modules[k_next]
            act = _module_activation(act_module) if act_module is not None else None
            if not (act and _fusable_norm(norm)) or paths[id(norm)] != 1:  # shared: left
                continue
            full = f"{name}.{k}" if name else k
            hooks = _hooks_in_the_way(norm, act_module)
            if hooks:
                _left(record, full, hooks)
            elif gm is None or _only_reader(gm, counts, norm, act_module):
                norm.activation = act
                seq._modules[k_next] = nn.Identity()
                record.fused.append((full, act, "sequential"))


def _with_activation(norm: nn.Module, act: str) -> nn.Module:
    """A new module computing ``norm`` then ``act``: a shallow copy holding the same Parameter
    and buffer objects (its own dicts of them, and of hooks, so nothing else of ``norm``
    changes: a hook registered on the one is not run by, or on the state_dict of, the other)."""
    new = copy.copy(norm)
    for attr in ("_parameters", "_buffers", "_modules"):
        new.__dict__[attr] = dict(norm.__dict__[attr])
    for attr in _trace.HOOK_DICTS + ("_non_persistent_buffers_set",):
        if attr in norm.__dict__:
            new.__dict__[attr] = copy.copy(norm.__dict__[attr])
    new.activation = act
    return new


def _drop_identities(gm: fx.GraphModule) -> None:
    """Take ``nn.Identity`` calls out of the graph (a placeholder such as timm's disabled
    drop_block between a norm and its activation would hide the pair); one with hooks stays."""
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if type(module) is nn.Identity and not _trace.hooks_of(module):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _same_in_both_modes(model: nn.Module, code: str) -> bool:
    """Whether a trace of ``model`` with every module in the other mode (train/eval) gives the
    same ``code`` as its trace in its own mode: fx runs a traced-through forward's
    ``if self.training`` once, so a GraphModule would keep that branch after ``.train()`` /
    ``.eval()``."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(not model.training)
        other, _ = _trace.trace(model, _takes_activation)
    finally:
        for m, mode in modes:
            m.training = mode
    return other is not None and other.code == code


def _activation_after(node: fx.Node, gm: fx.GraphModule) -> Any:
    """For one call of a norm: ``(user, activation, nodes to erase)`` when an activation is the
    only reader of its output (SiLU written out as ``x * sigmoid(x)`` included); ``""`` when no
    activation follows it; else why it cannot be fused (the activation shares the output)."""
    product = _silu_product(node)
    if product is not None:  # x * sigmoid(x): the product is the activation's output
        return product[0], "silu", product
    acts = [(u, _call_activation(u, gm)) for u in node.users if u.args[:1] == (node,)]
    user, act = next(((u, a) for u, a in acts if a is not None), (None, None))
    if act is None:
        return ""
    if len(node.users) != 1:  # a residual reads the norm's output
        return (f"not fused: the {act} is not the only reader of the norm's output "
                f"(also read by {_other_readers(node, user)})")
    return user, act, (user,)


def _fuse_traced(model: nn.Module, record: OptimizeRecord) -> Optional[fx.GraphModule]:
    gm, error = _trace.trace(model, _takes_activation)
    record.traced, record.trace_error = gm is not None, error
    if gm is None:
        return None
    if _trace.hooks_of(model):
        record.skipped.append(("", f"activation calls not fused: the model has "
                                   f"{', '.join(_trace.hooks_of(model))}, which the GraphModule "
                                   "that fusing them returns would not run"))
        return None
    code = gm.code
    _drop_identities(gm)
    calls: dict = {}  # id(norm) -> its call nodes, in graph order (a shared head: several)
    for node in gm.graph.nodes:
        if node.op == "call_module" and _fusable_norm(gm.get_submodule(node.target)):
            calls.setdefault(id(gm.get_submodule(node.target)), []).append(node)
    fused = 0
    for nodes in calls.values():
        name, norm = nodes[0].target, gm.get_submodule(nodes[0].target)
        found = [_activation_after(n, gm) for n in nodes]
        reason = next((f for f in found if isinstance(f, str) and f), None)
        fusable = [f for f in found if not isinstance(f, str)]
        acts = sorted({f[1] for f in fusable})
        if reason is None and fusable and len(fusable) < len(nodes):
            reason = (f"not fused: the norm is called {len(nodes)} times, and the {acts[0]} "
                      f"follows {len(fusable)} of them")
        elif reason is None and len(acts) > 1:
            reason = (f"not fused: the norm's {len(nodes)} calls are followed by different "
                      f"activations ({', '.join(acts)})")
        if reason is not None:
            _left(record, name, reason)
            continue
        if not fusable:
            continue
        act = acts[0]
        hooks = ""
        for user, _, _ in fusable:
            act_module = gm.get_submodule(user.target) if user.op == "call_module" else None
            hooks = hooks or _hooks_in_the_way(norm, act_module)
        if hooks:
            _left(record, name, hooks)
            continue
        if not fused and not _same_in_both_modes(model, code):  # before the first rewrite
            record.skipped.append(("", "activation calls not fused: the traced forward depends "
                                       "on train/eval mode (timm's DropPath, a norm-act layer "
                                       "left in place), which a GraphModule keeps as traced"))
            return None
        fused_norm = _with_activation(norm, act)
        replace_modules(gm, lambda m, norm=norm: m is norm, lambda m, _, new=fused_norm: new)
        for node, (user, _, erase) in zip(nodes, fusable):
            user.replace_all_uses_with(node)
            for n in erase:
                gm.graph.erase_node(n)
        record.fused.append((name, act, "fx"))
        fused += 1
    if not fused:
        return None
    gm.graph.lint()
    gm.recompile()
    _keep_state_dict(model, gm)
    return gm


def _keep_state_dict(original: nn.Module, copy_of: nn.Module) -> None:
    """Give ``copy_of`` (the GraphModule, or one of the plain ``nn.Module`` shells fx builds
    along a traced-through path) ``original``'s state_dict keys. fx copies only the attributes
    its graph reads, and each tensor it reads as a persistent buffer: a module no call reaches
    would lose its keys, and a non-persistent buffer (a model's input mean) or a plain tensor
    attribute would gain one. The missing parameters, buffers and modules are added (the same
    objects, as the GraphModule's leaves are the model's own); a buffer that is not in
    ``original``'s state_dict is kept out of the copy's."""
    for name, p in original._parameters.items():
        if name not in copy_of._parameters:
            copy_of.register_parameter(name, p)
    for name, b in original._buffers.items():
        if name not in copy_of._buffers:
            copy_of.register_buffer(name, b)
    persistent = set(original._buffers) - original._non_persistent_buffers_set
    copy_of._non_persistent_buffers_set.update(set(copy_of._buffers) - persistent)
    for name, child in original._modules.items():
        mine = copy_of._modules.get(name)
        if name not in copy_of._modules:
            copy_of.add_module(name, child)
        elif type(mine) is nn.Module and mine is not child:  # a shell fx built: fill it in
            _keep_state_dict(child, mine)


def optimize(model: nn.Module, *, trace: bool = True):
    """Replace the norms of ``model`` by normlab's and fuse the activations that follow them.

    See the module docstring for the three steps. Outputs are those of the model before (the
    same ATen kernels on CPU, up to float rounding), in training and in eval mode; the
    state_dict keys and tensors are the model's own, so a state_dict saved before loads after,
    and the other way round. On CUDA the fused norms run normlab's Triton kernels.

    Args:
        model: any module; changed in place (if ``model`` itself is a norm, its replacement
            is returned).
        trace: also fuse activation calls found by a torch.fx trace (step 3); then a
            GraphModule is returned when something was fused that way.

    Returns:
        ``(model, record)``: the model (the same object, its replacement, or a GraphModule, see
        above) and an :class:`OptimizeRecord`.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.GroupNorm(8, 32),
        ...                             torch.nn.SiLU())
        >>> x = torch.randn(2, 3, 8, 8)
        >>> before = model(x)
        >>> model, record = optimize(model)
        >>> print(record)
        optimize: 1 norm(s) replaced, 1 activation(s) fused, 0 left
          1: GroupNorm -> GroupNorm(8, 32, eps=1e-05, affine=True, bias=True)
          1: fused silu (sequential)
        >>> model[1], model[2]
        (GroupNorm(8, 32, eps=1e-05, affine=True, bias=True, activation='silu'), Identity())
        >>> torch.allclose(model(x), before, rtol=1e-6, atol=1e-6)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(trace, bool):
        raise TypeError(f"trace must be a bool, got {trace!r}")
    record = OptimizeRecord()
    model = _replace_all(model, record)
    gm, error = _trace.trace(model, _takes_activation)
    record.traced, record.trace_error = (gm is not None, error) if trace else (None, "")
    _fuse_sequentials(model, record, gm)
    if trace:
        gm = _fuse_traced(model, record)
        if gm is not None:
            model = gm
    return model, record
