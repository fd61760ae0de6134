"""create_norm: any normalization layer by name, class or partial (a timm-style factory).

==========  ==========================================  ===============================
name        module                                      notes
==========  ==========================================  ===============================
bn          BatchNorm{1,2,3}d                           ``dims=`` picks 1/2/3 (default 2)
syncbn      SyncBatchNorm                               statistics across processes
frozenbn    FrozenBatchNorm2d                           fixed statistics and affine
brn         BatchRenorm{1,2}d                           Batch Renormalization
gn          GroupNorm(G, C)                             G = 32 by default (rule below)
ln          GroupNorm(1, C)                             the GN paper's conv-net LayerNorm
ln2d        LayerNorm2d                                 over channels per position
in          InstanceNorm{1,2,3}d(affine=True)           ``dims=`` as for bn
none        nn.Identity                                 no normalization
==========  ==========================================  ===============================

The group rule: when ``num_groups`` (or ``group_size``) does not divide C, GroupNorm gets the
largest divisor of C not above the requested number of groups (or channels per group): see
:func:`resolve_groups`. The GroupNorm module itself stays strict, like torch's.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Optional, Union

from torch import nn

from normlab import nn as nlnn

__all__ = ["create_norm", "resolve_groups", "norm_names", "get_norm_class"]

NormSpec = Union[str, type, Callable[..., nn.Module]]

_ALIASES = {
    "batchnorm": "bn", "batch_norm": "bn", "syncbatchnorm": "syncbn", "sync_bn": "syncbn",
    "frozen_bn": "frozenbn", "frozenbatchnorm": "frozenbn", "batchrenorm": "brn",
    "batch_renorm": "brn", "groupnorm": "gn", "group_norm": "gn", "layernorm": "ln",
    "layer_norm": "ln", "layernorm2d": "ln2d", "instancenorm": "in", "instance_norm": "in",
    "identity": "none", "": "none",
}

_BN_BY_DIMS = {1: nlnn.BatchNorm1d, 2: nlnn.BatchNorm2d, 3: nlnn.BatchNorm3d}
_IN_BY_DIMS = {1: nlnn.InstanceNorm1d, 2: nlnn.InstanceNorm2d, 3: nlnn.InstanceNorm3d}
_BRN_BY_DIMS = {1: nlnn.BatchRenorm1d, 2: nlnn.BatchRenorm2d}


def resolve_groups(num_channels: int, num_groups: Optional[int] = None,
                   group_size: Optional[int] = None) -> int:
    """The number of groups for C = ``num_channels``.

    * ``group_size`` given: channels per group = the largest divisor of C that is <= group_size;
    * else ``num_groups`` (default 32): the largest divisor of C that is <= num_groups.

    So 64 channels at 32 groups stay 32; 48 channels at 32 groups get 24 (2 channels per group);
    16 channels at 32 groups get 16 (one channel per group, i.e. InstanceNorm).

    >>> resolve_groups(48, 32), resolve_groups(16, 32), resolve_groups(96, group_size=16)
    (24, 16, 6)
    """
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
    if num_groups is not None and group_size is not None:
        raise ValueError(
            f"give one of num_groups and group_size, got num_groups={num_groups}, "
            f"group_size={group_size}"
        )
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        size = max(d for d in range(1, min(group_size, num_channels) + 1) if num_channels % d == 0)
        return num_channels // size
    g = 32 if num_groups is None else num_groups
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"num_groups must be a positive int, got {g!r}")
    return max(d for d in range(1, min(g, num_channels) + 1) if num_channels % d == 0)


def _pick(table: dict, dims: int, name: str) -> type:
    if dims not in table:
        raise ValueError(f"norm {name!r} supports dims={sorted(table)}, got dims={dims!r}")
    return table[dims]


def _syncbn() -> type:
    try:
        return importlib.import_module("normlab.nn.syncbn").SyncBatchNorm
    except ImportError as e:  # pragma: no cover - arrives with the distributed work
        raise ValueError(f"norm 'syncbn' is not available: {e}") from None


def _build_gn(c: int, num_groups: Optional[int] = None, group_size: Optional[int] = None,
              **kw: Any) -> nn.Module:
    return nlnn.GroupNorm(resolve_groups(c, num_groups, group_size), c, **kw)


def _build_bn(c: int, dims: int = 2, **kw: Any) -> nn.Module:
    return _pick(_BN_BY_DIMS, dims, "bn")(c, **kw)


def _build_in(c: int, dims: int = 2, affine: bool = True, **kw: Any) -> nn.Module:
    return _pick(_IN_BY_DIMS, dims, "in")(c, affine=affine, **kw)


def _build_brn(c: int, dims: int = 2, **kw: Any) -> nn.Module:
    return _pick(_BRN_BY_DIMS, dims, "brn")(c, **kw)


def _build_frozen(c: int, dims: int = 2, **kw: Any) -> nn.Module:
    _pick({2: None}, dims, "frozenbn")
    return nlnn.FrozenBatchNorm2d(c, **kw)


def _build_syncbn(c: int, dims: int = 2, **kw: Any) -> nn.Module:
    return _syncbn()(c, **kw)


def _build_none(c: int, **kw: Any) -> nn.Module:
    return nn.Identity()


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "bn": _build_bn,
    "syncbn": _build_syncbn,
    "frozenbn": _build_frozen,
    "brn": _build_brn,
    "gn": _build_gn,
    "ln": lambda c, **kw: nlnn.GroupNorm(1, c, **kw),
    "ln2d": lambda c, **kw: nlnn.LayerNorm2d(c, **kw),
    "in": _build_in,
    "none": _build_none,
}


def norm_names() -> list[str]:
    """The names create_norm knows."""
    return list(_BUILDERS)


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _BUILDERS:
        raise ValueError(f"unknown norm {name!r}; known norms: {', '.join(norm_names())}")
    return key


def get_norm_class(name: str, dims: int = 2) -> type:
    """The module class that ``create_norm(name, ...)`` builds."""
    key = canonical_name(name)
    return {
        "bn": lambda: _pick(_BN_BY_DIMS, dims, key), "syncbn": _syncbn,
        "frozenbn": lambda: nlnn.FrozenBatchNorm2d, "brn": lambda: _pick(_BRN_BY_DIMS, dims, key),
        "gn": lambda: nlnn.GroupNorm, "ln": lambda: nlnn.GroupNorm,
        "ln2d": lambda: nlnn.LayerNorm2d, "in": lambda: _pick(_IN_BY_DIMS, dims, key),
        "none": lambda: nn.Identity,
    }[key]()


def create_norm(norm: NormSpec, num_channels: int, **kwargs: Any) -> nn.Module:
    """Build a normalization layer for ``num_channels`` channels.

    Args:
        norm: a name from the table in this module's docstring (case-insensitive), a module class
            (called as ``cls(num_channels, **kwargs)``; GroupNorm classes, and partials of them
            that bind only keywords such as ``partial(nn.GroupNorm, num_groups=32)``, as
            ``cls(num_groups, num_channels, **kwargs)`` with the group rule), or any callable such
            as a ``functools.partial`` (called as ``norm(num_channels, **kwargs)``). A module
            instance is a TypeError.
        num_channels: C.
        **kwargs: passed to the module (``eps``, ``momentum``, ``affine``, ``activation`` for
            gn/ln, ``num_groups``/``group_size`` for gn, ``dims`` for bn/in/brn). For a name, a
            keyword the module does not take is a TypeError naming it and those it takes ("none"
            takes and ignores any).

    Example::

        >>> import functools
        >>> from normlab.nn import GroupNorm
        >>> create_norm("gn", 256)
        GroupNorm(32, 256, eps=1e-05, affine=True, bias=True)
        >>> create_norm("gn", 48, num_groups=32)        # 24 groups, by the group rule
        GroupNorm(24, 48, eps=1e-05, affine=True, bias=True)
        >>> create_norm(functools.partial(GroupNorm, 8), 64)
        GroupNorm(8, 64, eps=1e-05, affine=True, bias=True)
    """
    if isinstance(norm, nn.Module):  # callable, but its forward is not a factory
        raise TypeError(
            "norm must be a name, a module class or a callable that builds a module, got a module "
            f"instance {type(norm).__name__}; pass its class (or a functools.partial) instead"
        )
    if isinstance(norm, str):
        key = canonical_name(norm)
        if key != "none":
            _check_num_channels(num_channels)
            _check_kwargs(norm, key, kwargs)
        return _BUILDERS[key](num_channels, **kwargs)
    if _is_groupnorm_partial(norm):  # partial(GroupNorm, num_groups=32, ...): the class path
        kwargs = {**norm.keywords, **kwargs}
        norm = norm.func
    if inspect.isclass(norm) and issubclass(norm, nn.GroupNorm):
        groups = resolve_groups(num_channels, kwargs.pop("num_groups", None),
                                kwargs.pop("group_size", None))
        return norm(groups, num_channels, **kwargs)
    if isinstance(norm, functools.partial) or callable(norm):
        return norm(num_channels, **kwargs)
    raise TypeError(
        f"norm must be a name, a module class or a callable, got {type(norm).__name__}: {norm!r}"
    )


def _is_groupnorm_partial(norm: Any) -> bool:
    return (
        isinstance(norm, functools.partial) and not norm.args
        and inspect.isclass(norm.func) and issubclass(norm.func, nn.GroupNorm)
    )


def _check_num_channels(c: Any) -> None:
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"num_channels must be a positive int, got {c!r}")


# keyword arguments create_norm itself takes for a name, besides the module's own
_BUILDER_KWARGS = {
    "bn": ("dims",), "syncbn": ("dims",), "frozenbn": ("dims",), "brn": ("dims",),
    "in": ("dims",), "gn": ("num_groups", "group_size"), "ln": (), "ln2d": (),
}
_FIXED = {"gn": ("num_channels",), "ln": ("num_groups", "num_channels", "group_size")}


def _check_kwargs(norm: str, key: str, kwargs: dict) -> None:
    """Unknown keyword arguments for a named norm: one TypeError naming them and what is taken."""
    dims = kwargs.get("dims", 2)
    try:
        cls = get_norm_class(key, dims)
    except ValueError:
        return  # a bad dims: the builder says so
    params = inspect.signature(cls).parameters
    taken = [n for n, p in params.items()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)][1:]  # after num_features/C
    if key in _FIXED:
        taken = [n for n in params if n not in _FIXED[key]]
    taken += [n for n in _BUILDER_KWARGS[key] if n not in taken]
    unknown = sorted(set(kwargs) - set(taken))
    if unknown:
        raise TypeError(
            f"create_norm({norm!r}): unexpected keyword argument(s) "
            f"{', '.join(map(repr, unknown))}; {cls.__name__} takes {', '.join(taken)}"
        )
