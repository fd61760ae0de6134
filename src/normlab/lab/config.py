"""RunConfig: everything that defines one training run, and how users override it.

A run is fully described by a :class:`RunConfig`; its identity (:meth:`RunConfig.run_id`) is a
hash of every field that can change the result, so re-running a study finds its finished runs in
the store and skips them. Defaults follow the Group Normalization paper's recipe (Wu & He, ECCV
2018, REFERENCE section 1): SGD momentum 0.9, weight decay 1e-4 on all weights, learning rate
``base_lr * batch_size * world_size / 32`` with ``base_lr = 0.1``, the same number of epochs at
every batch size. ``batch_size`` is per process ("images per GPU", as in the paper) and
``world_size`` is the number of processes the run is defined for (set by ``--nproc-per-node`` x
``--nnodes``), so one step sees ``batch_size * world_size`` images.

Overrides come from ``--set key=value`` (values parsed as JSON when they parse, else taken as
strings; dotted keys reach into the dict fields, e.g. ``norm_kwargs.num_groups=8``) and from an
optional JSON or TOML file whose top-level keys are RunConfig fields::

    >>> cfg = RunConfig(norm="gn", batch_size=4)
    >>> cfg.effective_lr()
    0.0125
    >>> cfg.replace(world_size=2).effective_lr()  # 2 processes x 4 images: the global batch is 8
    0.025
    >>> apply_overrides(cfg, parse_set(["epochs=3", "norm_kwargs.num_groups=8"])).norm_kwargs
    {'num_groups': 8}
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch

try:
    import tomllib
except ImportError:  # pragma: no cover - Python < 3.11 has no TOML reader
    tomllib = None  # type: ignore[assignment]

from normlab.factory import canonical_name, did_you_mean
from normlab.models import canonical_model, check_norm, is_normalizer_free

__all__ = [
    "ConfigError", "RunConfig", "parse_set", "apply_overrides", "load_config_file",
    "DATASETS", "DATA_DIR_DATASETS", "SCHEDULES", "check_model_norm", "check_field", "check_seed",
    "out_of_memory", "fits_in_memory", "MAX_SEEDS", "canonical_data", "field_types",
]

#: seeds per point a study builds at most (``--seeds``, ``--max-seeds``): a bound on its run
#: list, which a typo such as ``--seeds 100000000`` would otherwise grow until memory runs out,
#: and on the seed counts a stored record may name (power rounds' looks)
MAX_SEEDS = 1000

DATASETS = ("digits", "mnist5k", "synthetic", "cifar10", "cifar100", "imagefolder")
#: the datasets read from ``--data-dir`` (the others ship inside a package or are generated);
#: ``augment="auto"`` pad-crops and flips these only
DATA_DIR_DATASETS = ("cifar10", "cifar100", "imagefolder")
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("cpu", "cuda", "auto")
AMP_MODES = ("auto", "bf16", "off")
_CHOICES = (("data", DATASETS), ("schedule", SCHEDULES), ("device", DEVICES), ("amp", AMP_MODES),
            ("augment", ("auto", "on", "off")), ("optimizer", OPTIMIZERS))

# fields that do not change what a run computes (presentation and machine knobs)
_NOT_IN_ID = ("label", "threads")
# float fields: an int given for one (RunConfig(lr=1)) is the same run as the float
_FLOAT_FIELDS = ("lr", "base_lr", "momentum", "weight_decay", "warmup_epochs", "agc")
# fields left out of the identity at their default, so that ids of runs stored before the field
# existed do not change (a single-process run keeps its id)
_ID_DEFAULTS = {"world_size": 1, "precise_bn": 0, "optimizer": "sgd"}
#: seeds are ints in [0, SEED_LIMIT) (numpy's rule): torch takes the per-epoch seeds derived from
#: them (seed x 100003 + ...) only below 2**64, and a larger one failed the run after it started
SEED_LIMIT = 2**32
#: ints of a config are at most 2**63 - 1: the store's INTEGER column took ``epochs=10**23`` as
#: an OverflowError traceback after the run list was built, and ``precise_bn=10**23`` failed the
#: run after its first epoch (islice's stop is at most sys.maxsize)
INT_LIMIT = 2**63 - 1


class ConfigError(ValueError):
    """A bad user-supplied value. ``hint`` is a one-line suggestion shown by the CLI."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that memory refused (numpy's MemoryError, torch's
    "can't allocate memory" RuntimeError): a size the user chose, said as bad input."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "allocate" in str(e))


@contextlib.contextmanager
def fits_in_memory(what: str, hint: str, error: type = ConfigError) -> Iterator[None]:
    """Run the block; an allocation in it that memory refused (:func:`out_of_memory`) is one
    ``error`` line, "``what`` does not fit in memory (...)", with ``hint`` saying which size
    to lower."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise error(f"{what} does not fit in memory ({type(e).__name__}: {first})",
                    hint=hint) from None


@dataclass
class RunConfig:
    """One training run.

    Model: ``model`` (a ``normlab.models`` name, or ``timm:<name>``: a timm model whose
    BatchNorms ``norm`` replaces, or whose LayerNorms ``ln``, ``rms`` or ``none`` replace in a
    LayerNorm model) with ``norm`` (a :func:`normlab.create_norm`
    name), ``norm_kwargs`` (e.g. ``num_groups``/``group_size`` for gn), ``model_kwargs`` (e.g.
    ``width``, ``dropout``, ``bn_conv``); ``ws=True`` swaps every Conv2d for a weight-standardized
    one (GN+WS, Qiao et al. 2019).
    Data: ``data`` in :data:`DATASETS`, ``data_dir`` for files on disk, ``data_kwargs`` (mnist5k:
    ``image_size`` 28/14/7; synthetic:
    ``n_train``, ``n_test``, ``image_size``, ``channels``, ``num_classes``; imagefolder:
    ``image_size``, ``test_split``), ``train_limit``/``test_limit`` to subsample, ``augment``
    ("auto": pad-crop and flip for cifar and imagefolder only, "on", "off").
    Processes: ``batch_size`` is per process; ``world_size`` is the number of processes the run is
    defined for (global batch ``batch_size * world_size``; BN statistics stay per process, SyncBN
    takes them over all). Resumed on another process count the trainer keeps the global batch.
    Optimization: ``optimizer`` "sgd" (the papers': SGD with ``momentum`` and ``weight_decay``)
    or "adamw" (AdamW, Loshchilov & Hutter, ICLR 2019, betas (0.9, 0.999), ``weight_decay``
    its decoupled decay, ``momentum`` unused: what transformers train with, e.g. ``--set
    optimizer=adamw --set base_lr=0.001 --set weight_decay=0.05``), ``lr`` (None: ``base_lr *
    batch_size * world_size / 32``),
    ``schedule`` in :data:`SCHEDULES` (step: lr/10 at ``milestones`` fractions of the epochs),
    ``warmup_epochs`` (linear), ``agc`` (adaptive gradient clipping lambda, NFNets), ``seed``.
    Machine: ``device`` ("auto", the default: CUDA when torch sees a GPU, else the CPU; "cpu";
    "cuda"; the run's identity holds the device "auto" resolves to, so on a CPU-only machine
    "auto" and "cpu" are one run), ``amp`` (bf16 autocast on CUDA when "auto"),
    ``channels_last`` (CUDA when None), ``compile`` (torch.compile), ``threads`` (torch CPU
    threads).
    Evaluation: ``precise_bn`` B > 0 tests, after every epoch, a copy of the model whose running
    statistics :func:`normlab.precise_bn` recomputed over B training batches (at most an epoch's;
    PreciseBN, Wu & Johnson 2021) in place of the moving averages; training is unchanged (0: off,
    the default).
    """

    model: str = "resnet20"
    norm: str = "bn"
    norm_kwargs: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)
    ws: bool = False
    data: str = "digits"
    data_dir: Optional[str] = None
    data_kwargs: dict = field(default_factory=dict)
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    augment: str = "auto"
    batch_size: int = 32
    world_size: int = 1
    epochs: int = 10
    lr: Optional[float] = None
    base_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"
    schedule: str = "cosine"
    milestones: tuple = (0.5, 0.75)
    warmup_epochs: float = 0.0
    agc: Optional[float] = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: Optional[bool] = None
    compile: bool = False
    threads: Optional[int] = None
    precise_bn: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        self.model = canonical_model(self.model)  # "ResNet20" and "resnet20" are one run
        # a normalizer-free model takes no norm: the default "bn" means "not chosen" and is
        # recorded as "none", so `--model nf_resnet20` and `--model nf_resnet20 --norm none` are
        # one run (same config, same run id); any other norm is rejected by validate()
        if self.norm == "bn" and is_normalizer_free(self.model):
            self.norm = "none"
        # names in any case, spaces around them ignored (as study names): recorded as the
        # registry spells them, so `--data Digits --norm GN` is the run `--data digits --norm gn`
        # (one run id, one setup, one table); a name that is not known is left for validate()
        for name, _ in _CHOICES:  # data, schedule, device, amp, augment, optimizer
            setattr(self, name, canonical_data(getattr(self, name)))
        # the schedule counts the milestones passed (order does not matter): one order, one id
        if isinstance(self.milestones, (list, tuple)) and all(
                isinstance(m, (int, float)) and not isinstance(m, bool) for m in self.milestones):
            self.milestones = tuple(sorted(self.milestones))
        if isinstance(self.norm, str) and self.norm.strip():  # a blank one: validate() says so
            with contextlib.suppress(ValueError):
                self.norm = canonical_name(self.norm)

    # ------------------------------------------------------------------ derived values
    def effective_lr(self) -> float:
        """The peak learning rate: ``lr`` if set, else ``base_lr * batch_size * world_size / 32``
        (the GN paper's linear rule on the global batch)."""
        if self.lr is not None:
            return float(self.lr)
        return self.base_lr * self.batch_size * self.world_size / 32

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all processes: ``batch_size * world_size``."""
        return self.batch_size * self.world_size

    def identity(self) -> dict[str, Any]:
        """The fields that define what the run computes (everything but label/threads)."""
        d = dataclasses.asdict(self)
        for k in _NOT_IN_ID:
            d.pop(k)
        for k, default in _ID_DEFAULTS.items():
            if d[k] == default:
                d.pop(k)
        if d["device"] == "auto":  # what the run computes on here (ids of runs stored with the
            d["device"] = _auto_device()  # former default "cpu" stay valid on CPU machines)
        d["milestones"] = [float(m) for m in d["milestones"]]
        for k in _FLOAT_FIELDS:  # 1 and 1.0 are one value: one run (json writes them apart)
            if isinstance(d.get(k), int) and not isinstance(d[k], bool):
                d[k] = float(d[k])
        if d["data_dir"] is not None:
            d["data_dir"] = str(Path(d["data_dir"]).expanduser().resolve())
        return d

    def run_id(self) -> str:
        """A stable 16-hex-digit id: sha256 of the canonical JSON of :meth:`identity`."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(d["milestones"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"unknown config key(s): {', '.join(extra)}",
                              hint=f"known keys: {', '.join(sorted(known))}")
        d = dict(d)
        if "milestones" in d:
            if not isinstance(d["milestones"], (list, tuple)):
                raise ConfigError(f"milestones must be a list of fractions in (0, 1), got "
                                  f"{d['milestones']!r}", hint="e.g. --set milestones=[0.5,0.75]")
            d["milestones"] = tuple(d["milestones"])
        return cls(**d).validate()

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "RunConfig":
        """Check every field; raise :class:`ConfigError` naming the offending value."""
        for name, allowed in _CHOICES:  # first: "augment=yes" (read as True) names the choices
            _choice(name, getattr(self, name), allowed)
        types_ = field_types()
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), types_[f.name])
        _positive_int("batch_size", self.batch_size)
        _positive_int("world_size", self.world_size)
        _positive_int("epochs", self.epochs)
        check_seed(self.seed)
        if self.precise_bn < 0:
            raise ConfigError(f"precise_bn must be a number of batches >= 0 (0: off), got "
                              f"{self.precise_bn!r}")
        if self.precise_bn > INT_LIMIT:
            raise ConfigError(f"precise_bn must be at most 2**63 - 1 (a 64-bit int), got "
                              f"{self.precise_bn!r}")
        for name in ("train_limit", "test_limit", "threads"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("base_lr", "lr", "agc"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a positive finite number, got {v!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs):
            raise ConfigError(
                f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs!r}")
        if any(not (isinstance(m, (int, float)) and 0 < m < 1) for m in self.milestones):
            raise ConfigError(
                f"milestones must be fractions of the run in (0, 1), got {list(self.milestones)!r}")
        if self.schedule == "step" and not self.milestones:  # a constant lr, under "step"
            raise ConfigError("schedule 'step' needs at least one milestone, got milestones=[]",
                              hint="e.g. --set milestones=[0.5,0.75], or --set schedule=constant")
        for name in ("norm_kwargs", "model_kwargs", "data_kwargs"):
            _no_nan(name, getattr(self, name))
        if not self.norm.strip():  # create_norm reads "" as "none": `--norm "$NORM"` with NORM
            # unset trained without normalization, recorded as norm none
            raise ConfigError(f"norm is empty ({self.norm!r}); is a shell variable unset?",
                              hint="name a norm (`normlab ls --norms`; none: no normalization)")
        try:
            canonical_name(self.norm)  # the norm must be one create_norm knows
        except ValueError as e:
            raise ConfigError(str(e), hint="pick a norm from `normlab ls --norms`") from None
        check_model_norm(self.model, self.norm)
        if self.data in DATA_DIR_DATASETS and not self.data_dir:
            raise ConfigError(f"dataset {self.data!r} reads files from disk but no --data-dir was given",
                              hint="pass --data-dir DIR (nothing is downloaded)")
        if self.data not in DATA_DIR_DATASETS and self.data_dir is not None:
            # it would be ignored: a forgotten --data trains on the built-in set instead
            raise ConfigError(f"dataset {self.data!r} reads no files, but a data directory was "
                              f"given ({self.data_dir!r})",
                              hint=f"name the dataset in it (--data "
                                   f"{', '.join(DATA_DIR_DATASETS[:-1])} or "
                                   f"{DATA_DIR_DATASETS[-1]}) or drop --data-dir")
        return self


@functools.cache
@typing.no_type_check
def field_types() -> Mapping[str, Any]:
    """RunConfig's field types (read-only), resolved from its annotations once: that takes
    ``typing.get_type_hints`` about 0.25 ms, and every config validated or read back from the
    store asks for them (a study built, ran and reported thousands of configs:
    benchmarks/NOTES.md, "The lab's training loop")."""
    return types.MappingProxyType(typing.get_type_hints(RunConfig))


def canonical_data(name: Any) -> Any:
    """A dataset name as :data:`DATASETS` spells it (or another choice's: schedule, device,
    amp, augment, optimizer): case and surrounding spaces do not matter (``" MNIST5K"`` ->
    ``"mnist5k"``); anything but a string is returned as it is (validation names it).

    >>> canonical_data(" CIFAR10 ")
    'cifar10'
    """
    return name.strip().lower() if isinstance(name, str) else name


def check_seed(seed: int, name: str = "seed") -> None:
    """A ConfigError unless ``seed`` is in [0, :data:`SEED_LIMIT`) (``name``: the option)."""
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{name} must be an int in [0, 2**32), got {seed!r}")


def check_field(name: str, value: Any) -> None:
    """A ConfigError when ``name`` is a RunConfig field and ``value`` is not of its type (what a
    stored config is checked with when read back); other names pass."""
    types_ = field_types()
    if name in types_:
        _check_type(name, value, types_[name])


def _check_type(name: str, value: Any, tp: Any) -> None:
    origin = typing.get_origin(tp)
    if origin in (Union, getattr(types, "UnionType", Union)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    base = origin or tp
    ok = isinstance(value, base)
    if base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    if base is tuple:
        ok = isinstance(value, (tuple, list))
    if not ok:
        unparsed = (isinstance(value, str) and base in (dict, tuple, list)
                    and value.strip()[:1] in ("{", "["))
        raise ConfigError(
            f"{name} must be {getattr(base, '__name__', base)}, "
            f"got {type(value).__name__} {value!r}"
            + (" (not valid JSON: quote the keys and strings, e.g. "
               "--set 'model_kwargs={\"img_size\": 8}')" if unparsed else ""))


def _auto_device() -> str:
    """What device "auto" means on this machine: "cuda" when torch sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _no_nan(name: str, value: Any) -> None:
    """A ConfigError naming the first NaN in ``value`` (a dict field, nested lists and dicts
    walked): JSON reads ``NaN``, and a NaN momentum or eps trained a run of NaN statistics
    (infinities pass: e.g. a Batch Renorm ``r_max`` of Infinity is plain BN)."""
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{name} is NaN", hint="give a number")
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, (list, tuple)) else ())
    for k, v in items:
        _no_nan(f"{name}.{k}" if isinstance(value, dict) else f"{name}[{k}]", v)


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be a positive int, got {v!r}")
    if v > INT_LIMIT:
        raise ConfigError(f"{name} must be at most 2**63 - 1 (a 64-bit int), got {v!r}")


def _choice(name: str, v: Any, allowed: tuple) -> None:
    if v not in allowed:
        close = did_you_mean(v, allowed) if isinstance(v, str) else ""
        raise ConfigError(f"unknown {name} {v!r}{close}", hint=f"choose one of: {', '.join(allowed)}"
                          + (" (yes/no/true/false are read as booleans)"
                             if isinstance(v, bool) else ""))


def check_model_norm(model: Any, norm: Any, flag: str = "") -> None:
    """:func:`normlab.models.check_norm` (normalizer-free models take no norm) as a ConfigError
    whose hint names ``flag``, where the user set the norm (``--norm``, ``--set norm=``, a config
    file)."""
    try:
        check_norm(model, norm)
    except ValueError as e:
        where = flag or "the norm setting"
        raise ConfigError(str(e), hint=f"drop {where} (normalizer-free models run with norm none) "
                                       "or pick a model that takes a norm (`normlab ls --models`)"
                          ) from None


# ---------------------------------------------------------------------- overrides
def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        low = raw.strip().lower()
        if low in ("true", "yes"):
            return True
        if low in ("false", "no"):
            return False
        if low in ("none", "null"):
            return None
        return raw


def parse_set(items: Optional[list[str]]) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b.c": "x"}`` (values parsed as JSON when possible;
    for a field that is a plain string, ``none`` stays the word: ``--set norm=none`` is the
    norm named none)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}", hint="e.g. --set epochs=5")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set has an empty key in {item!r}", hint="e.g. --set epochs=5")
        value = _parse_value(raw.strip())
        if value is None and field_types().get(key) is str:
            value = raw.strip()
        out[key] = value
    return out


def load_config_file(path: Union[str, Path]) -> dict[str, Any]:
    """Read overrides from a JSON (``.json``) or TOML (``.toml``) file: a table of RunConfig keys."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory, not a .json or .toml file",
                          hint="give a .json or .toml file")
    if not p.is_file():
        what = "is not a regular file" if p.exists() else "does not exist"  # a FIFO, a device
        raise ConfigError(f"config file {str(p)!r} {what}", hint="give a .json or .toml file")
    try:
        if p.suffix.lower() == ".toml":
            if tomllib is None:  # pragma: no cover - Python < 3.11
                raise ConfigError("TOML config files need Python >= 3.11 (tomllib)",
                                  hint="use a .json file")
            data = tomllib.loads(p.read_text())
        elif p.suffix.lower() == ".json":
            data = json.loads(p.read_text())
        else:
            raise ConfigError(f"config file {str(p)!r} must end in .json or .toml")
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot parse config file {str(p)!r}: {e}") from None
    except OSError as e:  # no read permission, an I/O error: was a traceback
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}",
                          hint="make it readable (its permissions) or give another file"
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a table of keys, got {type(data).__name__}")
    return _flatten(data)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    dict_fields = {"norm_kwargs", "model_kwargs", "data_kwargs"}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in dict_fields:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any], *, norm_flag: str = ""
                    ) -> RunConfig:
    """Return a copy of ``cfg`` with ``overrides`` applied (dotted keys go into dict fields; a
    dict given for a dict field sets its keys and keeps the others) and validated. Ints are
    accepted where floats are expected.

    Normalizer-free models (``nf_*``) take no norm: a ``norm`` other than ``"none"`` among the
    ``overrides`` is a ConfigError whose hint names ``norm_flag`` (where the user set it, e.g.
    ``--norm`` or ``--set norm=``); a ``"bn"`` left over from ``cfg`` (the default) becomes
    ``"none"``.

    >>> apply_overrides(RunConfig(), {"model": "nf_resnet20"}).norm
    'none'
    """
    d = cfg.to_dict()
    known = set(d)
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in known:
            raise ConfigError(f"unknown config key {key!r}{did_you_mean(head, known)}",
                              hint=f"known keys: {', '.join(sorted(known))}")
        if rest:
            if not isinstance(d[head], dict):
                raise ConfigError(f"{head!r} is not a table; {key!r} cannot set a sub-key")
            d[head] = {**d[head], rest: value}
        elif isinstance(d[head], dict) and isinstance(value, dict):
            # a table sets its keys, as the dotted form does: a study's GN series keeps its
            # num_groups under `--set 'norm_kwargs={"eps": 1e-3}'` (a whole-table replace
            # dropped it without a word, and trained GN with 32 groups under the series' label)
            d[head] = {**d[head], **value}
        else:
            d[head] = value
    for name in ("base_lr", "lr", "momentum", "weight_decay", "warmup_epochs", "agc"):
        if isinstance(d.get(name), int) and not isinstance(d.get(name), bool):
            d[name] = float(d[name])
    if "norm" in overrides:  # an explicit norm, "bn" included; a default "bn" becomes "none"
        check_model_norm(d["model"], overrides["norm"], norm_flag)  # in RunConfig.__post_init__
    return RunConfig.from_dict(d)
