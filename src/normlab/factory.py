"""create_norm: any normalization layer by name, class or partial (a timm-style factory).

==========  ==========================================  ===============================
name        module                                      notes
==========  ==========================================  ===============================
bn          BatchNorm{1,2,3}d                           ``dims=`` picks 1/2/3 (default 2)
syncbn      SyncBatchNorm                               statistics across processes
ghostbn     GhostBatchNorm{1,2,3}d                      per slice of ``virtual_batch=``
frozenbn    FrozenBatchNorm2d                           fixed statistics and affine
brn         BatchRenorm{1,2}d                           Batch Renormalization
gn          GroupNorm(G, C)                             G = 32 by default (rule below)
ln          GroupNorm(1, C)                             the GN paper's conv-net LayerNorm
ln2d        LayerNorm2d                                 over channels per position
rms         RMSNorm2d                                   ln2d without centering (RMSNorm)
in          InstanceNorm{1,2,3}d(affine=True)           ``dims=`` as for bn
frn         FilterResponseNorm2d                        FRN + TLU (replaces norm and ReLU)
evonorm_s0  EvoNorm2dS0                                 G = 32 by default (rule below)
evonorm_b0  EvoNorm2dB0                                 batch variance, running average
none        nn.Identity                                 no normalization
==========  ==========================================  ===============================

The group rule: when ``num_groups`` (or ``group_size``) does not divide C, GroupNorm (and
EvoNorm-S0) gets the
largest divisor of C not above the requested number of groups (or channels per group): see
:func:`resolve_groups`. The GroupNorm module itself stays strict, like torch's.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import numbers
from typing import Any, Callable, Optional, Tuple, Union

from torch import nn

from normlab import nn as nlnn

__all__ = ["create_norm", "resolve_groups", "norm_names", "get_norm_class", "did_you_mean",
           "NormEntry", "NORMS", "DEFAULT_NUM_GROUPS"]

#: groups of ``create_norm("gn", C)`` when neither num_groups nor group_size is given (the GN
#: paper's ImageNet default, REFERENCE section 1)
DEFAULT_NUM_GROUPS = 32

NormSpec = Union[str, type, Callable[..., nn.Module]]

def _is_count(value: Any) -> bool:
    """A positive int (a numpy integer too; not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


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
    if not _is_count(num_channels):
        raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
    num_channels = int(num_channels)
    if num_groups is not None and group_size is not None:
        raise ValueError(
            f"give one of num_groups and group_size, got num_groups={num_groups}, "
            f"group_size={group_size}"
        )
    if group_size is not None:
        if not _is_count(group_size):
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        size = max(d for d in range(1, min(group_size, num_channels) + 1) if num_channels % d == 0)
        return num_channels // size
    g = DEFAULT_NUM_GROUPS if num_groups is None else num_groups
    if not _is_count(g):
        raise ValueError(f"num_groups must be a positive int, got {g!r}")
    return max(d for d in range(1, min(g, num_channels) + 1) if num_channels % d == 0)


@dataclasses.dataclass(frozen=True)
class NormEntry:
    """One named norm: everything create_norm, get_norm_class and convert_norm need to know.

    Attributes:
        aliases: other spellings of the name (matched case-insensitively).
        classes: ``{dims: module class}``; ``{None: cls}`` for one class serving any dims.
        build: ``build(cls, C, **kwargs)`` for norms whose constructor does not take
            ``(C, **kwargs)`` (GroupNorm's ``(G, C)``); None: ``cls(C, **kwargs)``.
        builder_kwargs: keywords create_norm itself takes for this name, besides the module's
            (``dims`` is taken by every norm with more than one class or a fixed dims).
        fixed: constructor arguments the name fixes (not the user's to give).
        defaults: keyword defaults the name sets (``in``: ``affine=True``).
        carries: what :func:`normlab.convert_norm` carries over from the BatchNorm it replaces,
            unless given: ``eps``, ``momentum``, ``affine``, ``track_running_stats``,
            ``process_group`` (a SyncBatchNorm's own group), ``dims`` (1/2/3 from the
            BatchNorm's class), ``bias`` (``bias=False`` for a weight without bias).
    """

    aliases: Tuple[str, ...]
    classes: dict  # {dims: class}; the key None: one class for any dims
    build: Optional[Callable[..., nn.Module]] = None
    builder_kwargs: Tuple[str, ...] = ()
    fixed: Tuple[str, ...] = ()
    defaults: Tuple[Tuple[str, Any], ...] = ()
    carries: Tuple[str, ...] = ("eps", "affine")

    def cls(self, name: str, dims: int = 2) -> type:
        table = self.classes
        if None in table:
            return table[None]
        if dims not in table:
            raise ValueError(f"norm {name!r} supports dims={sorted(table)}, got dims={dims!r}")
        return table[dims]


def _build_gn(cls: type, c: int, num_groups: Optional[int] = None,
              group_size: Optional[int] = None, **kw: Any) -> nn.Module:
    return cls(resolve_groups(c, num_groups, group_size), c, **kw)


def _build_ln(cls: type, c: int, **kw: Any) -> nn.Module:
    return cls(1, c, **kw)


def _build_evonorm_s0(cls: type, c: int, num_groups: Optional[int] = None,
                      group_size: Optional[int] = None, **kw: Any) -> nn.Module:
    return cls(c, resolve_groups(c, num_groups, group_size), **kw)


def _build_none(cls: type, c: int, **kw: Any) -> nn.Module:
    return cls()  # takes and ignores any keyword


_BN_CARRIES = ("eps", "momentum", "affine", "track_running_stats", "bias")

# The one table of named norms: adding a norm is one entry here.
NORMS: dict[str, NormEntry] = {
    "bn": NormEntry(
        ("batchnorm", "batch_norm"),
        {1: nlnn.BatchNorm1d, 2: nlnn.BatchNorm2d, 3: nlnn.BatchNorm3d},
        builder_kwargs=("dims",), carries=_BN_CARRIES + ("dims",)),
    "syncbn": NormEntry(
        ("syncbatchnorm", "sync_bn"), {None: nlnn.SyncBatchNorm},
        builder_kwargs=("dims",), carries=_BN_CARRIES + ("process_group",)),
    "ghostbn": NormEntry(
        ("ghost_bn", "ghostbatchnorm", "virtual_bn"),
        {1: nlnn.GhostBatchNorm1d, 2: nlnn.GhostBatchNorm2d, 3: nlnn.GhostBatchNorm3d},
        builder_kwargs=("dims",), carries=_BN_CARRIES + ("dims",)),
    "frozenbn": NormEntry(
        ("frozen_bn", "frozenbatchnorm"), {2: nlnn.FrozenBatchNorm2d},
        builder_kwargs=("dims",), carries=("eps", "dims")),
    "brn": NormEntry(
        ("batchrenorm", "batch_renorm"),
        {1: nlnn.BatchRenorm1d, 2: nlnn.BatchRenorm2d}, builder_kwargs=("dims",),
        carries=("eps", "affine", "bias", "dims")),  # Batch Renorm keeps its own (slower) momentum
    "gn": NormEntry(
        ("groupnorm", "group_norm"), {None: nlnn.GroupNorm}, _build_gn,
        builder_kwargs=("num_groups", "group_size"), fixed=("num_channels",),
        carries=("eps", "affine", "bias")),
    "ln": NormEntry(
        ("layernorm", "layer_norm"), {None: nlnn.GroupNorm}, _build_ln,
        fixed=("num_groups", "num_channels", "group_size"), carries=("eps", "affine", "bias")),
    "ln2d": NormEntry(("layernorm2d",), {None: nlnn.LayerNorm2d}),
    "rms": NormEntry(("rmsnorm", "rms_norm", "rmsnorm2d"), {None: nlnn.RMSNorm2d}),
    "in": NormEntry(
        ("instancenorm", "instance_norm"),
        {1: nlnn.InstanceNorm1d, 2: nlnn.InstanceNorm2d, 3: nlnn.InstanceNorm3d},
        builder_kwargs=("dims",), defaults=(("affine", True),),
        carries=("eps", "momentum", "affine", "bias", "dims")),
    # FRN keeps its own eps (the paper's 1e-6, added to a mean square, not a variance)
    "frn": NormEntry(
        ("filterresponsenorm", "filter_response_norm"), {2: nlnn.FilterResponseNorm2d},
        builder_kwargs=("dims",), carries=("dims",)),
    "evonorm_s0": NormEntry(
        ("evonorms0", "evonorm-s0"), {2: nlnn.EvoNorm2dS0}, _build_evonorm_s0,
        builder_kwargs=("num_groups", "group_size", "dims"), fixed=("num_features",),
        carries=("eps", "dims")),
    "evonorm_b0": NormEntry(
        ("evonormb0", "evonorm-b0"), {2: nlnn.EvoNorm2dB0}, builder_kwargs=("dims",),
        carries=("eps", "momentum", "dims")),
    "none": NormEntry(("identity", ""), {None: nn.Identity}, _build_none, carries=()),
}

_ALIASES = {alias: name for name, entry in NORMS.items() for alias in entry.aliases}


def norm_names() -> list[str]:
    """The names create_norm knows."""
    return list(NORMS)


def did_you_mean(name: Any, known: Any, rename: Optional[dict] = None) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``name`` (case ignored), or
    ``""`` when none is close: the hint every unknown-name error of normlab (norms here, the
    lab's studies, choices, config keys and series) ends with. ``rename`` maps a close alias to
    the name to suggest.

    >>> did_you_mean("epoch", ["epochs", "seed"])
    "; did you mean 'epochs'?"
    """
    by_lower = {str(k).lower(): str(k) for k in known}
    close = difflib.get_close_matches(str(name).lower(), by_lower, n=1, cutoff=0.6)
    if not close:
        return ""
    found = by_lower[close[0]]
    return f"; did you mean {(rename or {}).get(found, found)!r}?"


def canonical_name(name: str) -> str:
    """The table's name for ``name`` or one of its aliases (any case, surrounding spaces
    ignored); a ValueError naming it, the known names and the closest of them otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a norm name must be a str, got {type(name).__name__}: {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in NORMS:
        hint = did_you_mean(key, [*NORMS, *_ALIASES], _ALIASES)
        raise ValueError(f"unknown norm {name!r}; known norms: {', '.join(norm_names())}{hint}")
    return key


def get_norm_class(name: str, dims: int = 2) -> type:
    """The module class that ``create_norm(name, ...)`` builds."""
    key = canonical_name(name)
    return NORMS[key].cls(key, dims)


def _build_named(key: str, c: int, kwargs: dict) -> nn.Module:
    entry = NORMS[key]
    kw = {**dict(entry.defaults), **kwargs}
    cls = entry.cls(key, kw.pop("dims", 2) if "dims" in entry.builder_kwargs else 2)
    return entry.build(cls, c, **kw) if entry.build is not None else cls(c, **kw)


def create_norm(norm: NormSpec, num_channels: int, **kwargs: Any) -> nn.Module:
    """Build a normalization layer for ``num_channels`` channels.

    Args:
        norm: a name from the table in this module's docstring (case-insensitive), a module class
            (called as ``cls(num_channels, **kwargs)``; GroupNorm classes, and partials of them
            that bind only keywords such as ``partial(nn.GroupNorm, num_groups=32)``, as
            ``cls(num_groups, num_channels, **kwargs)`` with the group rule, or, for a subclass
            that takes ``num_channels`` first such as timm's GroupNorm, as
            ``cls(num_channels, num_groups=G, **kwargs)``), or any callable such
            as a ``functools.partial`` (called as ``norm(num_channels, **kwargs)``). A module
            instance is a TypeError.
        num_channels: C.
        **kwargs: passed to the module (``eps``, ``momentum``, ``affine``; ``activation`` for
            bn/syncbn/ghostbn/frozenbn/in/gn/ln; ``num_groups``/``group_size`` for gn and
            evonorm_s0; ``dims`` for bn/syncbn/ghostbn/in (1, 2, 3), brn (1, 2) and
            frozenbn/frn/evonorm (2 only)).
            For a name, a keyword the module does not take is a TypeError naming it and those it
            takes ("none" takes and ignores any).

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
        return _build_named(key, num_channels, kwargs)
    return _checked_module(norm, _build_from_callable(norm, num_channels, kwargs))


def _checked_module(norm: NormSpec, built: Any) -> nn.Module:
    """What a class or callable norm built: a module, else a TypeError naming both."""
    if not isinstance(built, nn.Module):
        raise TypeError(
            f"norm {norm!r} must build an nn.Module, but it returned {type(built).__name__}: "
            f"{built!r}"
        )
    return built


def _build_from_callable(norm: NormSpec, num_channels: int, kwargs: dict) -> Any:
    if _is_groupnorm_partial(norm):  # partial(GroupNorm, num_groups=32, ...): the class path
        kwargs = {**norm.keywords, **kwargs}
        norm = norm.func
    if inspect.isclass(norm) and issubclass(norm, nn.GroupNorm):
        asked = {k: kwargs.pop(k) for k in ("num_groups", "group_size") if k in kwargs}
        groups = resolve_groups(num_channels, asked.get("num_groups"), asked.get("group_size"))
        if _positional_names(norm)[:1] == ["num_channels"]:
            # a subclass that takes C first (timm's GroupNorm and GroupNormAct: C, num_groups;
            # GroupNorm1: C only, where a group request is the class's to refuse)
            takes_groups = "num_groups" in inspect.signature(norm).parameters
            return norm(num_channels, **kwargs,
                        **({"num_groups": groups} if takes_groups else asked))
        return norm(groups, num_channels, **kwargs)
    if isinstance(norm, functools.partial) or callable(norm):
        return norm(num_channels, **kwargs)
    raise TypeError(
        f"norm must be a name, a module class or a callable, got {type(norm).__name__}: {norm!r}"
    )


def _positional_names(cls: type) -> list:
    """The names of the positional parameters of ``cls``'s constructor ([] if unknown)."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _is_groupnorm_partial(norm: Any) -> bool:
    return (
        isinstance(norm, functools.partial) and not norm.args
        and inspect.isclass(norm.func) and issubclass(norm.func, nn.GroupNorm)
    )


def _check_num_channels(c: Any) -> None:
    if not _is_count(c):
        raise ValueError(f"num_channels must be a positive int, got {c!r}")


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
    entry = NORMS[key]
    if entry.fixed:
        taken = [n for n in params if n not in entry.fixed]
    taken += [n for n in entry.builder_kwargs if n not in taken]
    unknown = sorted(set(kwargs) - set(taken))
    if unknown:
        raise TypeError(
            f"create_norm({norm!r}): unexpected keyword argument(s) "
            f"{', '.join(map(repr, unknown))}; {cls.__name__} takes {', '.join(taken)}"
        )
    required = [n for n, p in list(params.items())[1:]
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and n not in entry.fixed and n not in kwargs]
    if required:
        raise TypeError(
            f"create_norm({norm!r}): missing required keyword argument(s) "
            f"{', '.join(map(repr, required))} (e.g. create_norm({norm!r}, C, "
            f"{required[0]}=...))"
        )
