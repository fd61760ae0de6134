"""The model registry: ``create(name, ...)``, ``list_models()``, ``register``.

Every builder is called as ``builder(norm=..., num_classes=..., in_chans=..., **kwargs)``. Builders
registered with ``uses_norm=False`` (the normalizer-free ResNets) do not receive ``norm``: for them
``norm`` may be left out, ``None`` or ``"none"``; any other value, ``"bn"`` included, is a
ValueError (a model asked for with a norm must not silently come without one). Models that take a
norm get ``norm="bn"`` when it is left out.

A builder registered with ``options=`` (every normlab model) lists its keyword arguments: any
other keyword is a TypeError naming the model, the keyword and the ones it takes.

``timm:<name>`` names a model of timm's registry, built by :mod:`normlab.models.timm_models`
with its BatchNorms replaced by ``norm``; its other keywords go to ``timm.create_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
import inspect
from typing import Any, Callable, Iterable, Optional

from torch import nn

from normlab.models.timm_models import PREFIX, create_timm, is_timm_name

__all__ = ["create", "list_models", "register", "model_uses_norm", "is_normalizer_free",
           "check_norm", "keyword_names", "canonical_model", "normalizer_free_counterpart",
           "registered_in"]


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    uses_norm: bool
    options: Optional[frozenset[str]]


class _Unset:
    """The default of ``create(norm=...)``: "not chosen" (``"bn"`` for models that take a norm)."""

    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()


def keyword_names(fn: Callable[..., Any], exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """The parameters of ``fn`` that can be passed by keyword, minus ``exclude`` (for
    ``register(options=...)``)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    drop = set(exclude) | {"self"}
    return tuple(n for n, p in inspect.signature(fn).parameters.items()
                 if p.kind in kinds and n not in drop)


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, builder: Optional[Callable[..., nn.Module]] = None, *,
             uses_norm: bool = True, options: Optional[Iterable[str]] = None):
    """Register ``builder`` under ``name`` (usable as a decorator: ``@register("resnet20")``).

    ``options``: the builder's own keyword arguments (besides ``norm``, ``num_classes`` and
    ``in_chans``); when given, :func:`create` rejects any other keyword with a TypeError that
    names the model and lists them (see :func:`keyword_names`).
    """
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ValueError(f"model names are non-empty lower-case strings, got {name!r}")
    opts = None if options is None else frozenset(options)

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].builder is not fn:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = _Entry(fn, uses_norm, opts)
        return fn

    return add if builder is None else add(builder)


def list_models() -> list[str]:
    """The registered model names, in registration order."""
    return list(_REGISTRY)


def registered_in(module: str) -> list[str]:
    """The models whose builder was defined in module ``module`` (``"__main__"``: by the script
    being run, which the lab's torchrun workers must then run too)."""
    return [n for n, e in _REGISTRY.items() if getattr(e.builder, "__module__", None) == module]


def canonical_model(name: Any) -> Any:
    """The one spelling of a model name: stripped and lower-case (``timm:<name>`` too), so
    ``ResNet20`` and ``resnet20`` are one model; a non-string is returned as it is (and reported
    where the model is built).

    >>> canonical_model(" ResNet20 "), canonical_model("TIMM: resnet18")
    ('resnet20', 'timm:resnet18')
    """
    if not isinstance(name, str):
        return name
    key = name.strip().lower()
    return PREFIX + key[len(PREFIX):].strip() if key.startswith(PREFIX) else key


def model_uses_norm(name: str) -> bool:
    """Whether model ``name`` takes a ``norm`` (False for the normalizer-free models; True for
    ``timm:<name>``, whose BatchNorms the norm replaces); an unknown name is a ValueError."""
    if is_timm_name(name):
        return True
    return _lookup(name).uses_norm


def is_normalizer_free(name: Any) -> bool:
    """Whether ``name`` is a registered normalizer-free model. Unlike :func:`model_uses_norm` an
    unknown name (or a non-string) is not an error here: False, and it is reported where the model
    is built."""
    return isinstance(name, str) and name.strip().lower() in _REGISTRY and not _lookup(name).uses_norm


def normalizer_free_counterpart(name: Any) -> Optional[str]:
    """The registered normalizer-free model of the same depth and kind as ``name``:
    ``nf_resnet56`` for ``resnet56`` and ``preact_resnet56`` (NF-ResNets are pre-activation
    ResNets), ``nf_resnet50`` for ``resnet50``; ``name`` itself when it is normalizer-free; None
    when there is none (``bn_dropout_cnn``, ``timm:<name>``, unknown names).

    >>> normalizer_free_counterpart("preact_resnet56"), normalizer_free_counterpart("bn_dropout_cnn")
    ('nf_resnet56', None)
    """
    if not isinstance(name, str) or is_timm_name(name):
        return None
    key = canonical_model(name)
    if is_normalizer_free(key):
        return key
    nf = "nf_" + key.removeprefix("preact_")
    return nf if is_normalizer_free(nf) else None


def takes_options(name: Any, keys: Iterable[str]) -> bool:
    """Whether model ``name`` takes every keyword of ``keys`` (its registered ``options``). False
    for ``timm:<name>`` (its keywords go to timm's builder, which takes none of normlab's model
    options) and for unknown names; True for a registered model that declared no options.

    >>> takes_options("bn_dropout_cnn", ["dropout"]), takes_options("resnet20", ["dropout"])
    (True, False)
    """
    if not isinstance(name, str) or is_timm_name(name):
        return False
    entry = _REGISTRY.get(canonical_model(name))
    if entry is None:
        return False
    return entry.options is None or set(keys) <= entry.options


def check_norm(name: str, norm: Any) -> None:
    """The rule "normalizer-free models take no norm", written once: for a normalizer-free model
    ``norm`` must be left out, ``None`` or ``"none"``; any other value, ``"bn"`` included, is a
    ValueError naming the model and the norm (a model asked for with a norm must not silently come
    without one). Models that take a norm, and unknown names, pass."""
    if is_normalizer_free(name) and not (
            norm is _UNSET or norm is None or (isinstance(norm, str) and norm.strip().lower() == "none")):
        raise ValueError(f"model {name!r} is normalizer-free and takes no norm, got norm={norm!r}")


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


def create(name: str, *, norm: Any = _UNSET, num_classes: int = 10, in_chans: int = 3,
           **kwargs: Any) -> nn.Module:
    """Build model ``name``.

    Args:
        name: one of :func:`list_models` (case-insensitive), or ``timm:<name>`` for a timm
            model whose BatchNorms ``norm`` replaces (:mod:`normlab.models.timm_models`).
        norm: a :func:`normlab.create_norm` name, class or partial; default "bn". Normalizer-free
            models take only ``None``/``"none"`` (or no ``norm``).
        num_classes: outputs of the classifier (named ``fc`` in every normlab model).
        in_chans: input channels.
        **kwargs: the builder's own options (``width``, ``zero_init_last``, ``norm_kwargs``,
            ``small_input``, ``dropout``, ``alpha``, ``activation``, ...).

    Example::

        >>> model = create("resnet20", norm="gn", num_classes=10)
        >>> nf = create("nf_resnet50", num_classes=1000, stochastic_depth=0.1)
    """
    _check_positive_int(num_classes, "num_classes")
    _check_positive_int(in_chans, "in_chans")
    if is_timm_name(name):
        return create_timm(name, norm="bn" if norm is _UNSET else norm,
                           num_classes=num_classes, in_chans=in_chans, **kwargs)
    entry = _lookup(name)
    if entry.options is not None:
        bad = sorted(k for k in kwargs if k not in entry.options)
        if bad:
            common = "norm, num_classes, in_chans" if entry.uses_norm else "num_classes, in_chans"
            raise TypeError(
                f"model {name!r} got unexpected keyword argument(s) {', '.join(map(repr, bad))}; "
                f"it takes {common} and {', '.join(sorted(entry.options))}"
            )
    if entry.uses_norm:
        return entry.builder(norm="bn" if norm is _UNSET else norm, num_classes=num_classes,
                             in_chans=in_chans, **kwargs)
    check_norm(name, norm)
    return entry.builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
