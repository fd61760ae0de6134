"""Tracing a model's data flow with torch.fx, for the model passes (fold.py, optimize.py).

The passes change modules in place and need to know only who reads what: which module's output
a norm takes, and whether anything else reads it. A symbolic trace with the given module types
as leaves answers that. A module that is not installed in the model but only traced through
(``self.features[:2](x)``: nn.Sequential's slice is a new container of the model's own modules)
is traced through as well, so the graph shows every read of those modules' outputs. A model that
torch.fx cannot trace (data-dependent control flow, unsupported calls) gives None and the reason;
the passes then fall back to what needs no trace (neighbours in an ``nn.Sequential``). So does a
model with hooks on a module that the trace would go through: fx would run those hooks on
proxies, and a hook reads outputs the graph cannot show.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import fx, nn

# the hook dicts of torch.nn.Module that change or observe a module's call
_HOOK_KINDS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
# everything nn.Module keeps its hooks in (forward, backward, state_dict): what a module that
# takes another's place takes over
HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")


def hooks_of(module: nn.Module, kinds: tuple[str, ...] = _HOOK_KINDS) -> list:
    """The kinds of hooks registered on ``module`` ("forward_hooks", ...), empty if none;
    ``kinds``: the hook dicts looked at (by default those that change or observe a call)."""
    return [kind.lstrip("_") for kind in kinds if getattr(module, kind, None)]


def _tracer(is_leaf: Callable[[nn.Module], bool]) -> fx.Tracer:
    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return is_leaf(m) or super().is_leaf_module(m, qualname)

        def path_of_module(self, mod: nn.Module) -> str:
            try:
                return super().path_of_module(mod)
            except NameError:
                if self.is_leaf_module(mod, ""):
                    raise  # a leaf needs a path to be called from the graph
                return f"<{type(mod).__name__} not installed in the model>"

    return _Tracer()


def hooked_inner_modules(model: nn.Module, tracer: fx.Tracer) -> list:
    """``(name, hook kinds)`` of the modules below the root that a trace goes through (not
    leaves, not inside leaves) and that have hooks."""
    found = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if tracer.is_leaf_module(child, full):
                continue
            if hooks_of(child):
                found.append((full, hooks_of(child)))
            walk(child, full + ".")

    walk(model, "")
    return found


def trace(model: nn.Module, is_leaf: Callable[[nn.Module], bool]) -> Tuple[Optional[fx.GraphModule], str]:
    """``(graph_module, "")`` or ``(None, reason)``. Modules for which ``is_leaf`` holds (and
    torch.nn's own, as usual) are single call_module nodes. The root's own hooks are not run by
    the trace (the caller decides about them). Buffers are not proxied by fx: an in-place op on
    one in a traced-through forward (timm's BatchNormAct2d counts ``num_batches_tracked`` in
    training) really runs, so each buffer the trace changed gets its value back."""
    tracer = _tracer(is_leaf)
    hooked = hooked_inner_modules(model, tracer)
    if hooked:
        name, kinds = hooked[0]
        return None, (f"module {name!r} has {', '.join(kinds)}, which a torch.fx trace would run "
                      "on proxies (what they read is not in the graph)")
    # (an uninitialized lazy buffer, torch's LazyBatchNorm before its first forward, and a
    # buffer on the meta device, a model built there to load its weights later, hold no value
    # to restore; cloning the one and comparing the other raise)
    saved = [(b, b.clone()) for b in model.buffers()
             if not (nn.parameter.is_lazy(b) or b.is_meta)]
    try:
        return fx.GraphModule(model, tracer.trace(model)), ""
    except Exception as e:  # anything fx cannot trace: the caller falls back
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    finally:
        with torch.no_grad():
            for b, value in saved:
                if not torch.equal(b, value):  # (NaN too: copied back, unchanged)
                    b.copy_(value)


def call_counts(gm: fx.GraphModule) -> dict:
    """id(module) -> how many call_module nodes run it (a module shared or called twice)."""
    counts: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            key = id(gm.get_submodule(node.target))
            counts[key] = counts.get(key, 0) + 1
    return counts


def plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential whose forward is nn.Sequential's own (runs its children in order; a
    subclass with another forward may return what it likes)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def paths_count(named) -> dict:
    """id(x) -> under how many names x sits, from ``(name, x)`` pairs such as
    ``model.named_modules(remove_duplicate=False)`` (2 or more: shared, or tied parameters)."""
    counts: dict = {}
    for _, x in named:
        counts[id(x)] = counts.get(id(x), 0) + 1
    return counts
