"""What normlab's nn modules share: input checks, FX and TorchScript hooks, the running
statistics, and swapping modules of a model (private; the modules' files import from here).

``channel_view`` and ``update_running_stats`` are the operator's own (defined with the reference
backend, which every backend follows) and are re-exported here for the modules.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, fx, nn
from torch.fx.proxy import TraceError

from normlab import functional as NLF
from normlab._trace import HOOK_DICTS, hooks_of
from normlab.functional import InputShapeError  # noqa: F401 (re-exported for the modules)
from normlab.backends.reference import channel_view, output_memory_format, update_running_stats

__all__ = [
    "channel_view", "update_running_stats", "InputShapeError", "check_count", "check_num_channels",
    "check_bn_input", "fx_leaf", "not_scriptable", "count_batch", "running_average_factor",
    "adopt_state", "replace_modules", "drop_bias", "reset_affine", "norm_repr", "per_position",
]


def check_count(value, name: str) -> int:
    """A count argument of a constructor (``num_features``, ``num_channels``, ``group_size``):
    an int (a numpy integer too, not a bool) of at least 1. Another type is a TypeError, as
    torch's constructors raise for it (``BatchNorm2d(3.0)``); a value below 1 a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def per_position(module: nn.Module, input: Tensor, normalize: Callable[[Tensor], Tensor]
                 ) -> Tuple[Tensor, torch.memory_format]:
    """A norm over the channels at each position (LayerNorm2d, RMSNorm2d): ``input`` (N, C,
    *spatial) checked against ``module.num_channels``, ``normalize`` applied to its (N,
    *spatial, C) view (free for channels_last input), and the result permuted back to (N, C,
    *spatial), in channels_last strides; with it, the memory format the output should keep."""
    NLF.check_input(input)
    check_num_channels(module, input, module.num_channels)
    y = normalize(input.permute((0,) + tuple(range(2, input.dim())) + (1,)))
    return y.permute((0, input.dim() - 1) + tuple(range(1, input.dim() - 1))), \
        output_memory_format(input)


def check_num_channels(module: nn.Module, x: Tensor, expected: int, channel_dim: int = 1) -> None:
    if x.dim() > channel_dim and x.shape[channel_dim] != expected:
        raise InputShapeError(
            f"{type(module).__name__} expects {expected} channels (dim {channel_dim}), got input of "
            f"shape {tuple(x.shape)} with {x.shape[channel_dim]} channels"
        )


def check_bn_input(module: nn.Module, x: Tensor) -> None:
    """The checks every BatchNorm-like module runs on its input first: torch's dimension check
    (``_check_input_dim``), a tensor of a floating dtype, and ``num_features`` channels."""
    module._check_input_dim(x)
    NLF.check_input(x)
    check_num_channels(module, x, module.num_features)


def drop_bias(module: nn.Module, affine: bool, bias: bool) -> None:
    """``bias=False`` with ``affine`` on every torch: normlab's BatchNorm, InstanceNorm and
    GroupNorm build torch's module with a bias and drop it here (torch < 2.11 has no ``bias=``
    argument; from 2.11 torch's modules derive everything from ``bias is None``, as here)."""
    if affine and not bias:
        module.register_parameter("bias", None)


def reset_affine(module: nn.Module) -> None:
    """weight 1 and bias 0 where the module has them (torch < 2.11's ``reset_parameters``
    assumes a bias with ``affine``)."""
    if module.affine:
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def norm_repr(module: nn.Module, torch_repr: str) -> str:
    """torch's ``extra_repr`` of a BatchNorm, InstanceNorm or GroupNorm, with ``bias=`` after
    ``affine=`` where that torch leaves it out (< 2.11: normlab's modules take ``bias`` on every
    torch) and normlab's ``activation`` last."""
    if "bias=" not in torch_repr:
        affine = f"affine={module.affine}"
        torch_repr = torch_repr.replace(affine, f"{affine}, bias={module.bias is not None}", 1)
    return torch_repr + (f", activation={module.activation!r}" if module.activation else "")


def fx_leaf(
    module: nn.Module,
    input: "fx.Proxy",
    root_forward: Optional[Callable[["fx.Proxy"], "fx.Proxy"]] = None,
) -> "fx.Proxy":
    """Under ``torch.fx.symbolic_trace`` (input is a Proxy): record ``module`` as one call_module
    node, as FX does for torch.nn's own norms (leaves by their module path), instead of tracing
    into checks on the input's shape that a Proxy cannot answer. The graph then runs the module
    itself: same output, same buffer updates.

    A module traced as the root of the trace (``symbolic_trace(module)``) has no path to call;
    there ``root_forward(input)``, the module's normlab.functional call without the checks, is
    traced instead (call_function nodes on the parameters, as torch's GroupNorm, LayerNorm,
    RMSNorm and Conv2d trace). A module without one (the batch-statistics modules, whose
    running-statistics update FX cannot record, as torch's BatchNorm and InstanceNorm cannot be
    the root either) raises torch's TraceError naming it.

    A module with forward (pre-)hooks is the exception: the trace runs them on the proxies (a
    module it goes through), so their ops are in the graph, and a call_module node would run
    them again; its node calls the module's forward alone instead."""
    tracer = input.tracer
    path = tracer.path_of_module(module)
    if path and (module._forward_pre_hooks or module._forward_hooks):
        # the trace runs this call's forward (pre-)hooks on the proxies, so the graph holds
        # their ops already; a call_module node would run them a second time: the forward alone
        mod = tracer.create_proxy("get_attr", path, (), {})
        return tracer.create_proxy("call_function", _forward_only, (mod, input), {})
    if path:
        return tracer.create_proxy("call_module", path, (input,), {})
    if root_forward is None:
        raise TraceError(
            f"{type(module).__name__} cannot be the root of torch.fx.symbolic_trace (neither can "
            "torch.nn's BatchNorm and InstanceNorm); trace a model that holds it, where it is "
            "recorded as one call_module node, e.g. symbolic_trace(torch.nn.Sequential(module))"
        )
    return root_forward(input)


def _forward_only(module: nn.Module, input: Tensor) -> Tensor:
    """A module's forward without its hooks (see :func:`fx_leaf`)."""
    return module.forward(input)


def not_scriptable(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of every normlab module: ``torch.jit.script`` calls it on each
    module of the model before compiling. normlab's forward() chooses among Python backends at
    call time, which TorchScript cannot compile (it failed deep inside torch.fx's Proxy with
    "import statements aren't supported"): one clear TypeError naming the module instead."""
    raise TypeError(
        f"{type(module).__module__}.{type(module).__name__} cannot be compiled by "
        "torch.jit.script: its forward dispatches to normlab's Python backends. Use "
        "torch.compile, torch.export, torch.jit.trace or torch.onnx.export instead (all "
        "supported), or script a model built from torch.nn layers"
    )


def _counts_batches(module: nn.Module) -> bool:
    return (module.training and module.track_running_stats
            and module.num_batches_tracked is not None)


def count_batch(module: nn.Module) -> None:
    """A training batch of a BatchNorm-like module with running statistics:
    ``num_batches_tracked += 1`` (what torch's _BatchNorm.forward does first)."""
    if _counts_batches(module):
        module.num_batches_tracked.add_(1)


def running_average_factor(module: nn.Module) -> float:
    """The weight of this batch's statistics in the running average: ``momentum``, or for
    ``momentum=None`` the cumulative ``1 / num_batches_tracked`` (call :func:`count_batch`
    first; 0.0 where nothing is tracked)."""
    if module.momentum is not None:
        return module.momentum
    return 1.0 / float(module.num_batches_tracked) if _counts_batches(module) else 0.0


@torch.no_grad()
def adopt_state(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` (which replaces ``old``) ``old``'s device, dtype, affine, running statistics,
    batch count and train/eval mode; returns ``new`` (moved).

    Where shape, kind, dtype and device agree, ``new`` takes the *same* tensor objects, as
    torch's ``convert_sync_batchnorm``: an optimizer built before the swap keeps updating the
    model's parameters, and a frozen affine stays frozen. Otherwise the values are copied."""
    ref = next(iter(list(old.parameters()) + list(old.buffers())), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        src, dst = getattr(old, attr, None), getattr(new, attr, None)
        if not (isinstance(src, Tensor) and isinstance(dst, Tensor) and src.shape == dst.shape):
            continue
        if (isinstance(src, nn.Parameter) == isinstance(dst, nn.Parameter)
                and src.dtype == dst.dtype and src.device == dst.device):
            setattr(new, attr, src)
        else:
            dst.copy_(src)
            if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
                dst.requires_grad_(src.requires_grad)
    src_n = getattr(old, "num_batches_tracked", None)
    dst_n = getattr(new, "num_batches_tracked", None)
    if isinstance(src_n, Tensor) and isinstance(dst_n, Tensor):
        dst_n.copy_(src_n)
    new.train(old.training)
    return new


Replaced = List[Tuple[str, nn.Module, nn.Module]]


def replace_modules(
    model: nn.Module,
    match: Callable[[nn.Module], bool],
    build: Callable[[nn.Module, str], nn.Module],
) -> Tuple[nn.Module, Replaced]:
    """Replace every submodule ``m`` of ``model`` with ``match(m)`` (``model`` itself included)
    by ``build(m, full_name)``.

    Everything is built before anything is assigned, so an error leaves the model untouched;
    no module dict is mutated while iterated; a module shared under several names is built once
    and stays shared. Returns ``(model or its replacement, [(name, old, new), ...])``, the
    root ("" as its name) last.
    """
    todo = []
    for name, module in model.named_modules(remove_duplicate=False):
        for child_name, child in list(module._modules.items()):  # every name, shared ones too
            if child is not None and match(child):
                full = f"{name}.{child_name}" if name else child_name
                todo.append((module, child_name, child, full))
    built: dict[int, nn.Module] = {}
    replaced: Replaced = []
    for _, _, child, full in todo:
        if id(child) not in built:
            built[id(child)] = build(child, full)
            replaced.append((full, child, built[id(child)]))
    root = build(model, "") if match(model) else None
    for parent, child_name, child, _ in todo:
        setattr(parent, child_name, built[id(child)])
    if root is None:
        return model, replaced
    return root, replaced + [("", model, root)]


def warn_dropped_hooks(replaced: Replaced, what: str) -> None:
    """A warning for each replaced module that had hooks (forward, backward, state_dict): its
    replacement, another kind of norm, does not take them over (torch's
    ``convert_sync_batchnorm`` drops them without a word)."""
    for name, old, _ in replaced:
        kinds = hooks_of(old, HOOK_DICTS)
        if kinds:
            warnings.warn(f"{what}: the hooks of {name or 'the model'!r} ({type(old).__name__}: "
                          f"{', '.join(kinds)}) are not carried over to its replacement; "
                          "register them on the new module", stacklevel=3)
