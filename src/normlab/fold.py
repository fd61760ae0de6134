"""fold_batchnorm: fold inference-mode BatchNorms into the Conv or Linear before them.

A BatchNorm with fixed statistics is a per-channel affine map,
``y = gamma_c * (z - mu_c) / sqrt(var_c + eps) + beta_c``, and when its input ``z`` is
``conv(x) = W * x + b`` and nothing else reads ``z``, the two are one convolution with

    W'_c = W_c * s_c,    b'_c = (b_c - mu_c) * s_c + beta_c,    s_c = gamma_c / sqrt(var_c + eps)

(the batch normalization folding of inference exporters; described e.g. by Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
CVPR 2018); for a ConvTranspose, whose weight holds the output channels in its second dimension
(per group), the same scale applies there. Folded: eval-mode ``torch.nn`` BatchNorm1d/2d/3d and
SyncBatchNorm with running statistics, normlab's BatchNorm (its fused activation stays, as an
activation module), BatchRenorm (eval mode uses the running statistics), FrozenBatchNorm2d
(normlab's, torchvision's), timm's BatchNormAct2d, SyncBatchNormAct and FrozenBatchNormAct2d
(their ``drop`` and ``act`` stay, as they do for the norms :func:`normlab.convert_norm` built
from those layers), and timm's SplitBatchNorm2d (AugMix split BN: in eval mode it is its main
BatchNorm, then its ``drop`` and ``act`` where it has them; its training-only ``aux_bn`` goes
with it). Another subclass of a torch BatchNorm with a forward of its own is left (named in
the record).

Left in place, with the reason: a pair where the conv or the norm has hooks (they would see the
folded output, or no longer run: a conv's forward pre-hook such as the old ``weight_norm``
recomputes the weight), a conv whose weight is a parametrization or is shared with another
module (tied: folding would change the other), a Linear pair unless ``example_inputs`` show the
norm a 2-D input (else dim 1, which the norm normalizes, is not the Linear's output features),
and, without a trace, a conv or norm that sits in the model under more than one name.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from normlab import _trace
from normlab.convert import (_ACT_MODULES, _drop_then_act, is_split_batchnorm,
                             split_batchnorm_class)
from normlab.nn._common import replace_modules
from normlab.nn.batch_renorm import _BatchRenorm
from normlab.nn.batchnorm import _BatchNormForward
from normlab.nn.frozen_bn import FrozenBatchNorm2d

__all__ = ["fold_batchnorm", "FoldRecord"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
          nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# norm-act layers of timm whose forward is the BN's affine, then ``drop``, then ``act``
_TIMM_NORM_ACT = ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
_FROZEN_NAMES = ("FrozenBatchNorm2d",)  # torchvision's, timm's re-export


@dataclasses.dataclass
class FoldRecord:
    """What :func:`fold_batchnorm` did: ``folded`` (conv name, norm name) pairs, and
    ``skipped`` (norm name, reason) for each BatchNorm left in place."""

    folded: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    traced: bool = True
    trace_error: str = ""
    #: where the model does not trace: the submodules that were traced instead
    traced_parts: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        parts = ""
        if self.traced_parts:
            shown = ", ".join(self.traced_parts[:5])
            more = f" and {len(self.traced_parts) - 5} more" if len(self.traced_parts) > 5 else ""
            parts = f"submodules traced instead: {shown}{more}; elsewhere "
        how = "traced with torch.fx" if self.traced else f"not traceable ({self.trace_error}); " \
              f"{parts}nn.Sequential neighbours only"
        lines = [f"fold_batchnorm: {len(self.folded)} folded, {len(self.skipped)} left ({how})"]
        lines += [f"  {norm} folded into {conv}" for conv, norm in self.folded]
        lines += [f"  left {norm}: {why}" for norm, why in self.skipped]
        return "\n".join(lines)


def _after(norm: nn.Module) -> Optional[list]:
    """The modules that must still run after the folded affine (activation, dropout), or None
    when ``norm`` is not a BatchNorm this pass knows how to fold."""
    after = _after_own(norm)
    if after is not None and _converted_norm_act(norm):  # timm's drop and act, as the hook ran them
        after += [m for m in (norm.drop, norm.act) if not isinstance(m, nn.Identity)]
    return after


def _after_own(norm: nn.Module) -> Optional[list]:
    cls = type(norm)
    if cls.__module__.startswith("timm.") and cls.__name__ in _TIMM_NORM_ACT:
        return [m for m in (norm.drop, norm.act) if not isinstance(m, nn.Identity)]
    if is_split_batchnorm(norm):
        return _split_after(norm)
    if isinstance(norm, (_BatchNormForward, _BatchRenorm, FrozenBatchNorm2d)):
        act = getattr(norm, "activation", None)  # normlab's fused activation stays
        return [_ACT_MODULES[act]()] if act else []
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):  # torch's forward: nothing after
        return [] if cls.forward in (nn.modules.batchnorm._BatchNorm.forward,
                                     nn.SyncBatchNorm.forward) else None
    if cls.__name__ in _FROZEN_NAMES and all(
        isinstance(getattr(norm, a, None), torch.Tensor)
        for a in ("weight", "bias", "running_mean", "running_var")
    ):
        return []
    return None


def _split_after(norm: nn.Module) -> Optional[list]:
    """timm's SplitBatchNorm2d in eval mode: the main BatchNorm, then ``drop`` and ``act`` if it
    has them (convert_splitbn_model gives them to the layer made of a BatchNormAct2d). A subclass
    with a forward of its own: None."""
    if type(norm).forward is not split_batchnorm_class(norm).forward:
        return None
    after = []
    for part in ("drop", "act"):
        if hasattr(norm, part):
            module = getattr(norm, part)
            if not isinstance(module, nn.Module):
                return None
            if not isinstance(module, nn.Identity):
                after.append(module)
    return after


def _converted_norm_act(norm: nn.Module) -> bool:
    """A norm that :func:`normlab.convert_norm` built for a timm norm-act layer whose ``drop``
    and ``act`` it could not fuse: they run in its one forward hook, and nothing else hooks it."""
    return (list(norm._forward_hooks.values()) == [_drop_then_act]
            and _trace.hooks_of(norm) == ["forward_hooks"])


def _is_norm(m: nn.Module) -> bool:
    return _after(m) is not None


def _is_conv(m: nn.Module) -> bool:
    """A Conv/Linear whose forward is torch's own (a subclass that transforms its weight in
    forward, such as weight standardization, cannot take a folded weight)."""
    return isinstance(m, _CONVS) and any(type(m).forward is c.forward for c in _CONVS)


def _reason_not_foldable(conv_name: str, conv: nn.Module, norm: nn.Module,
                         tied: set, ranks: Optional[dict]) -> Optional[str]:
    """Why the pair cannot be folded, or None. ``ranks``: id(norm) -> the ranks of its inputs
    on the example inputs, None without them."""
    if not isinstance(getattr(norm, "running_mean", None), torch.Tensor) or not isinstance(
        getattr(norm, "running_var", None), torch.Tensor
    ):
        return "no running statistics (track_running_stats=False normalizes with batch statistics)"
    for what, module in (("it", norm), (repr(conv_name), conv)):
        if nn.modules.lazy.LazyModuleMixin.has_uninitialized_params(module):
            return (f"{what} is a lazy module not initialized yet (its size is unknown); run one "
                    "forward pass first")
    if norm.running_mean.numel() != _out_features(conv):
        return (f"{norm.running_mean.numel()} features, but {conv_name!r} has "
                f"{_out_features(conv)} outputs")
    reason = _reason_of_rank(conv_name, conv, norm, ranks)
    if reason is not None:
        return reason
    for what, module in (("it", norm), (repr(conv_name), conv)):
        if _trace.hooks_of(module) and not (module is norm and _converted_norm_act(norm)):
            return (f"{what} has {', '.join(_trace.hooks_of(module))}, which would see the folded "
                    "output or no longer run")
    if parametrize.is_parametrized(conv):
        return f"the weight of {conv_name!r} is computed by a parametrization"
    if any(id(p) in tied for p in (conv.weight, conv.bias) if p is not None):
        return f"a parameter of {conv_name!r} is shared with another module (tied)"
    return None


def _reason_of_rank(conv_name: str, conv: nn.Module, norm: nn.Module,
                    ranks: Optional[dict]) -> Optional[str]:
    """A norm normalizes dim 1 of its input. That dim holds the conv's output channels on
    batched input, whose rank is the conv weight's (a Linear's: 2, ``(N, C)``); on a Linear's
    ``(N, L, C)`` output, or an unbatched conv's, it is another dim, which the folded weight
    would not scale. With example inputs the rank seen there decides; without them a Linear
    pair is left (3-D input is common there) and a conv pair folded (batched input assumed)."""
    want = conv.weight.dim()
    if ranks is None:
        if isinstance(conv, nn.Linear):
            return (f"{conv_name!r} is a Linear: the norm normalizes dim 1, which holds its "
                    "output features only on 2-D (N, C) output (on (N, L, C), L), and without "
                    "example_inputs the rank is unknown; pass example_inputs= to check and fold")
        return None
    seen = sorted(ranks.get(id(norm), ()))
    if not seen:
        return "not run on example_inputs, so the rank of its input is unknown"
    if seen != [want]:
        return (f"its input on example_inputs is {'-D, '.join(map(str, seen))}-D: dim 1, which "
                f"it normalizes, holds the outputs of {conv_name!r} only on {want}-D input")
    return None


@torch.no_grad()
def _input_ranks(model: nn.Module, norms: list, args: tuple) -> dict:
    """id(norm) -> the set of ranks of the tensors each of ``norms`` gets when ``model`` runs
    on ``args`` (once, in eval mode, without autograd)."""
    ranks: dict = {id(n): set() for n in norms}

    def record(module: nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            ranks[id(module)].add(inputs[0].dim())

    handles = [n.register_forward_pre_hook(record) for n in {id(n): n for n in norms}.values()]
    try:
        model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return ranks


def _example_args(example_inputs) -> Optional[tuple]:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a Tensor or a tuple of the model's positional "
                    f"inputs, got {type(example_inputs).__name__}")


@torch.no_grad()
def _fold(conv: nn.Module, norm: nn.Module) -> None:
    mean = norm.running_mean.double()
    var = norm.running_var.double()
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + norm.eps)
    w = conv.weight
    w.copy_(_scaled(conv, w.double(), scale))
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    new_bias = ((b - mean) * scale + beta).to(w.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(w.device), requires_grad=w.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def _scaled(conv: nn.Module, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight with output channel c scaled by ``scale[c]``: dim 0 of a Conv or Linear
    weight; of a ConvTranspose's ``(in, out / groups, *kernel)`` weight, dim 1 within each
    group."""
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        g = conv.groups
        grouped = w.reshape((g, w.shape[0] // g) + tuple(w.shape[1:]))
        return (grouped * scale.reshape((g, 1, -1) + (1,) * (w.dim() - 2))).reshape(w.shape)
    return w * scale.reshape((-1,) + (1,) * (w.dim() - 1))


def _out_features(conv: nn.Module) -> int:
    return conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels


_SHARED_UNTRACED = ("the conv or the norm sits in the model under more than one name (the "
                    "model could not be traced to see how each is called)")


def _pairs_from_graph(gm: fx.GraphModule, record: FoldRecord, prefix: str = "",
                      paths: Optional[dict] = None) -> list:
    """The foldable pairs of a trace: of the model, or (``prefix``: its name) of a submodule
    traced alone, where ``paths`` counts the names each module has in the whole model."""
    counts = _trace.call_counts(gm)
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_norm(gm.get_submodule(node.target)):
            continue
        norm = gm.get_submodule(node.target)
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        conv = gm.get_submodule(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        name = prefix + node.target
        if conv is None or not _is_conv(conv):
            record.skipped.append((name, "its input is not the output of a Conv or Linear"))
        elif len(src.users) != 1:
            record.skipped.append((name, f"the output of {prefix + src.target!r} is read elsewhere too"))
        elif paths is not None and (paths[id(conv)] > 1 or paths[id(norm)] > 1):
            record.skipped.append((name, _SHARED_UNTRACED))
        elif counts[id(conv)] != 1 or counts[id(norm)] != 1:
            record.skipped.append((name, "the conv or the norm is called more than once"))
        else:
            pairs.append((prefix + src.target, conv, name, norm))
    return pairs


def _traced_parts(model: nn.Module) -> list:
    """``(name, module, graph_module)`` for the largest submodules of an untraceable ``model``
    that trace (and hold a BatchNorm): a FeatureHookNet's hooked stages, a detector's backbone
    under a forward with data-dependent control flow. Each is assumed to be called through its
    own forward only, as an untraced nn.Sequential is assumed to be run whole."""
    parts, seen = [], set()

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if id(child) in seen or _is_norm(child) or _is_conv(child):
                continue
            seen.add(id(child))
            if not any(_is_norm(m) for m in child.modules()):
                continue
            gm, _ = _trace.trace(child, lambda m: _is_norm(m) or _is_conv(m))
            if gm is not None:
                parts.append((prefix + name, child, gm))
            else:
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    return parts


def _pairs_untraced(model: nn.Module, record: FoldRecord) -> list:
    """The pairs of a model torch.fx cannot trace: from the traces of its submodules that
    trace, and elsewhere from nn.Sequential neighbours."""
    pairs = []
    paths = _trace.paths_count(model.named_modules(remove_duplicate=False))
    inside = set()  # the modules of the traced parts
    for name, part, gm in _traced_parts(model):
        record.traced_parts.append(name)
        pairs += _pairs_from_graph(gm, record, f"{name}.", paths)
        inside.update(id(m) for m in part.modules())
    return pairs + _pairs_from_sequentials(model, record, inside)


def _pairs_from_sequentials(model: nn.Module, record: FoldRecord, inside: set) -> list:
    pairs, seen = [], set()
    paths = _trace.paths_count(model.named_modules(remove_duplicate=False))
    for name, module in model.named_modules():
        if not _trace.plain_sequential(module) or id(module) in inside:
            continue
        children = list(module.named_children())
        for (cname, conv), (nname, norm) in zip(children, children[1:]):
            if _is_conv(conv) and _is_norm(norm) and id(norm) not in seen:
                prefix = f"{name}." if name else ""
                seen.add(id(norm))
                if paths[id(conv)] > 1 or paths[id(norm)] > 1:
                    record.skipped.append((prefix + nname, _SHARED_UNTRACED))
                    continue
                pairs.append((prefix + cname, conv, prefix + nname, norm))
    inner = {id(sub) for m in model.modules() if _is_norm(m) for sub in m.modules() if sub is not m}
    for name, module in model.named_modules():
        if (_is_norm(module) and id(module) not in seen and id(module) not in inner  # (an aux BN)
                and id(module) not in inside):  # (listed from its part's trace)
            record.skipped.append((name, "not after a Conv or Linear in an nn.Sequential (the "
                                         "model could not be traced)"))
    return pairs


def fold_batchnorm(model: nn.Module, *, example_inputs=None):
    """Fold every eval-mode BatchNorm that directly follows a Conv, ConvTranspose or Linear into
    it, in place.

    ``model`` must be in eval mode. Its data flow is read with a torch.fx trace (BatchNorm
    layers as leaves); a BatchNorm is folded when its only input is a Conv/Linear module's
    output that nothing else reads, and each of the two is called once. Pairs with hooks, a
    parametrized or tied conv weight are left (see the module docstring). A BatchNorm
    normalizes dim 1 of its input, which holds a Linear's output features only when that output
    is 2-D ``(N, C)``: on ``(N, L, C)`` a BatchNorm1d normalizes over L, and no trace shows
    which. So a Linear + BatchNorm pair is folded only when ``example_inputs`` are given and
    the norm's input is 2-D on them; without them it is left, with the reason. With them, a
    conv pair is checked the same way (a conv on unbatched input has its channels in dim 0);
    without them a conv's input is taken to be batched. The BatchNorm is then
    replaced by ``nn.Identity`` (or by what must still run after it: a norm-act layer's dropout
    and activation, normlab's fused activation), and the conv gets the folded weight and bias (a
    bias is added where it had none). In a model torch.fx cannot trace, the largest submodules
    that trace are traced alone and folded as above (assuming each is called through its own
    forward: a FeatureHookNet's hooked stages, a detector's backbone), and elsewhere a BatchNorm
    is folded where it follows a Conv/Linear in an ``nn.Sequential`` (assuming the Sequential is
    run whole); neither can be checked without a trace. Everything else is left and listed.

    Args:
        model: any module, in eval mode.
        example_inputs: (keyword) a Tensor, or a tuple of the model's positional inputs, of the
            input ranks the model will see: the model is run on them once (no autograd) to see
            the rank of each BatchNorm's input. Needed to fold a Linear + BatchNorm pair.

    Returns:
        ``(model, record)``: the same model object, and a :class:`FoldRecord` naming each folded
        pair and each BatchNorm left with the reason.

    Raises:
        ValueError: if the model, or a BatchNorm in it, is in training mode (its output then
            depends on the batch, which no folded weight can reproduce).

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
        ...                             torch.nn.ReLU()).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> before = model(x)
        >>> model, record = fold_batchnorm(model)
        >>> print(record)
        fold_batchnorm: 1 folded, 0 left (traced with torch.fx)
          1 folded into 0
        >>> torch.allclose(model(x), before, atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    example = _example_args(example_inputs)
    # a frozen BatchNorm's output does not depend on the mode; every other one uses batch
    # statistics in training
    training = [n or "<root>" for n, m in model.named_modules()
                if (m is model or isinstance(m, nn.modules.batchnorm._BatchNorm)) and m.training]
    if training:
        raise ValueError(
            f"fold_batchnorm needs a model in eval mode; in training mode: {', '.join(training[:5])}"
            f"{' ...' if len(training) > 5 else ''}. Call model.eval() first"
        )
    record = FoldRecord()
    gm, error = _trace.trace(model, lambda m: _is_norm(m) or _is_conv(m))
    if gm is None:
        record.traced, record.trace_error = False, error
        pairs = _pairs_untraced(model, record)
    else:
        pairs = _pairs_from_graph(gm, record)
    for name, module in model.named_modules():  # (neither a leaf of the trace nor listed above)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not _is_norm(module):
            record.skipped.append((name, f"{type(module).__name__} subclasses a torch BatchNorm "
                                         "with a forward of its own, which a fold cannot know"))
    tied = {key for key, n in _trace.paths_count(
        model.named_parameters(remove_duplicate=False)).items() if n > 1}  # tied parameters
    ranks = None
    if example is not None:  # (before anything changes: an error there leaves the model)
        ranks = _input_ranks(model, [norm for *_, norm in pairs], example) if pairs else {}
    for conv_name, conv, norm_name, norm in pairs:
        reason = _reason_not_foldable(conv_name, conv, norm, tied, ranks)
        if reason is not None:
            record.skipped.append((norm_name, reason))
            continue
        _fold(conv, norm)
        after = _after(norm)
        new = nn.Sequential(*after) if len(after) > 1 else (after[0] if after else nn.Identity())
        model, _ = replace_modules(model, lambda m, norm=norm: m is norm, lambda m, _, new=new: new)
        record.folded.append((conv_name, norm_name))
    return model, record
