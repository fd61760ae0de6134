"""The model registry: ``create(name, ...)``, ``list_models()``, ``register``.

Every builder is called as ``builder(norm=..., num_classes=..., in_chans=..., **kwargs)``. Builders
registered with ``uses_norm=False`` (the normalizer-free ResNets) do not receive ``norm``: for them
only the default ``norm="bn"`` (the registry's default, i.e. "not chosen"), ``None`` and ``"none"``
are accepted, anything else is a ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

__all__ = ["create", "list_models", "register", "model_uses_norm"]


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    uses_norm: bool


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, builder: Optional[Callable[..., nn.Module]] = None, *,
             uses_norm: bool = True):
    """Register ``builder`` under ``name`` (usable as a decorator: ``@register("resnet20")``)."""
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ValueError(f"model names are non-empty lower-case strings, got {name!r}")

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].builder is not fn:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = _Entry(fn, uses_norm)
        return fn

    return add if builder is None else add(builder)


def list_models() -> list[str]:
    """The registered model names, in registration order."""
    return list(_REGISTRY)


def model_uses_norm(name: str) -> bool:
    """Whether model ``name`` takes a ``norm`` (False for the normalizer-free models)."""
    return _lookup(name).uses_norm


def _lookup(name: str) -> _Entry:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}: {name!r}")
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def create(name: str, *, norm: Any = "bn", num_classes: int = 10, in_chans: int = 3,
           **kwargs: Any) -> nn.Module:
    """Build model ``name``.

    Args:
        name: one of :func:`list_models` (case-insensitive).
        norm: a :func:`normlab.create_norm` name, class or partial (ignored-if-default, otherwise
            rejected, for normalizer-free models).
        num_classes: outputs of the classifier (named ``fc`` in every model).
        in_chans: input channels.
        **kwargs: the builder's own options (``width``, ``zero_init_last``, ``norm_kwargs``,
            ``small_input``, ``dropout``, ``alpha``, ``activation``, ...).

    Example::

        >>> model = create("resnet20", norm="gn", num_classes=10)
        >>> nf = create("nf_resnet50", num_classes=1000, stochastic_depth=0.1)
    """
    entry = _lookup(name)
    _check_positive_int(num_classes, "num_classes")
    _check_positive_int(in_chans, "in_chans")
    if entry.uses_norm:
        return entry.builder(norm=norm, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if not (norm is None or (isinstance(norm, str) and norm.strip().lower() in ("bn", "none"))):
        raise ValueError(
            f"model {name!r} is normalizer-free and takes no norm, got norm={norm!r}"
        )
    return entry.builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
