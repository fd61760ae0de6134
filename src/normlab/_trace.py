"""Tracing a model's data flow with torch.fx, for the model passes (fold.py, optimize.py).

The passes change modules in place and need to know only who reads what: which module's output
a norm takes, and whether anything else reads it. A symbolic trace with the given module types
as leaves answers that. A model that torch.fx cannot trace (data-dependent control flow,
unsupported calls) gives None and the reason; the passes then fall back to what needs no trace
(neighbours in an ``nn.Sequential``).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from torch import fx, nn


def trace(model: nn.Module, is_leaf: Callable[[nn.Module], bool]) -> Tuple[Optional[fx.GraphModule], str]:
    """``(graph_module, "")`` or ``(None, reason)``. Modules for which ``is_leaf`` holds (and
    torch.nn's own, as usual) are single call_module nodes."""

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return is_leaf(m) or super().is_leaf_module(m, qualname)

    try:
        return fx.GraphModule(model, _Tracer().trace(model)), ""
    except Exception as e:  # anything fx cannot trace: the caller falls back
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()


def call_counts(gm: fx.GraphModule) -> dict:
    """id(module) -> how many call_module nodes run it (a module shared or called twice)."""
    counts: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            key = id(gm.get_submodule(node.target))
            counts[key] = counts.get(key, 0) + 1
    return counts


def parents_of(model: nn.Module, target: nn.Module) -> list:
    """Every (parent, attribute name) under which ``target`` sits in ``model`` (shared modules
    have several)."""
    found = []
    for module in model.modules():
        for name, child in module._modules.items():
            if child is target:
                found.append((module, name))
    return found

