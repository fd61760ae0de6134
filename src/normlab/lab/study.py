"""What a study is: :class:`Study` (its run list for a preset, seeds, variants and base config, and
the protocol it runs under), :class:`Point` (one run of it), :class:`Claim` (what it checks),
:func:`emulate_devices` (the paper's K devices on one process) and :func:`setup_id`.

The studies themselves (their series, paper tables and claims) are :mod:`normlab.lab.studies`.
"""


from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from normlab.factory import canonical_name, did_you_mean
from normlab.lab.config import MAX_SEEDS, SEED_LIMIT, ConfigError, RunConfig, apply_overrides
from normlab.models import is_normalizer_free, normalizer_free_counterpart, takes_options


__all__ = ["Study", "Point", "Claim", "PRESETS", "setup_id", "PAPER_DEVICES", "emulate_devices",
           "SERIES_KEYS", "MAX_SEEDS", "check_seeds_fit"]

PRESETS = ("quick", "default")
#: the GN paper's 8 GPUs (REFERENCE section 1): the devices a per-device study emulates by default
PAPER_DEVICES = 8
PAPER_PROTOCOL = "Wu & He, ECCV 2018, section 4: N images per GPU on 8 GPUs, lr 0.1 x N/32"


@dataclass
class Point:
    """One run of a study: series ``label``, axis value ``x``, its config, and ``setup``: what
    the study was run on (:func:`setup_id` of the user's choices; the store keeps a study's runs
    of one setup together, so a report never pools runs on other data or another model)."""

    label: str
    x: Any
    cfg: RunConfig
    setup: str = ""


@dataclass
class Claim:
    """A qualitative claim, checked by report.py.

    kinds (``a``, ``b`` are (label, x) points; errors are test error %):

    * ``less``: error(a) < error(b) by at least ``margin`` points.
    * ``flat``: every point of series ``a[0]`` is within ``margin`` points of the one at ``a[1]``.
    * ``match``: |error(a) - error(b)| <= ``margin``.
    * ``best``: a has the lowest error of all points of the study.
    * ``worst``: a has the highest error of the points of its series.
    """

    text: str
    kind: str
    a: tuple
    b: Optional[tuple] = None
    margin: float = 0.0
    source: str = ""


@dataclass
class Study:
    name: str
    title: str
    description: str
    axis: str                      # what x is (column header)
    variants: dict[str, dict]      # series label -> RunConfig overrides
    default_variants: list[str]
    xs: dict[str, list]            # preset -> x values
    presets: dict[str, dict]       # preset -> base RunConfig overrides (epochs, limits, ...)
    seeds: dict[str, int]          # preset -> default number of seeds
    point_overrides: Callable[[str, Any], dict]   # (label, x) -> overrides for that point
    paper: dict[str, dict]         # series label -> {x: paper number or text}
    paper_source: str
    claims: list[Claim] = field(default_factory=list)
    x_log2: bool = False
    # series added to the default ones when the study runs on more than one process (SyncBN:
    # one process has nothing to synchronize with, so it would repeat BN)
    multi_process_variants: list[str] = field(default_factory=list)
    # the batch is per device: the K-device protocol applies (module docstring)
    per_device: bool = False
    # devices emulated when none are asked for (per-device studies on one process)
    default_devices: int = PAPER_DEVICES
    # x is BN's statistics batch inside a fixed SGD batch (the stats-batch study)
    stats_batch_axis: bool = False
    # series run at some x only (label -> xs): a GN run does not depend on BN's statistics batch
    series_xs: dict[str, list] = field(default_factory=dict)
    # how the report shows the study, one rule per study written here:
    # plots draw x from largest to smallest (a batch shrinking from left to right)
    x_descending: bool = False
    # the error figure: "lines" (error against x, a line per series), "bars" (the series side
    # by side at each x), "grid" (a cell per series and x)
    figure: str = "lines"
    # the summary's answer: "per_x" (the series with the lowest error at each x: the series are
    # normalizations) or "setting" (the one point with the lowest error), a point named by
    # ``setting`` = (what a point is, its text with {label} and {x})
    answer: str = "per_x"
    setting: tuple[str, str] = ("", "")

    def __post_init__(self) -> None:
        for name, value, known in (("figure", self.figure, ("lines", "bars", "grid")),
                                   ("answer", self.answer, ("per_x", "setting"))):
            if value not in known:
                raise ValueError(f"study {self.name!r}: {name} {value!r} is not one of {known}")

    def default_series(self, world_size: int = 1) -> list[str]:
        """The series run when none are asked for: the defaults, plus
        ``multi_process_variants`` when ``world_size > 1``."""
        extra = [v for v in self.multi_process_variants if v not in self.default_variants]
        return self.default_variants + (extra if world_size > 1 else [])

    def devices(self, user: Optional[dict[str, Any]] = None, devices: Optional[int] = None
                ) -> int:
        """The number of devices the study's runs emulate: ``devices`` if given, else the
        study's ``default_devices`` for a per-device study on one process, else 1. Real processes
        (``world_size`` > 1) are the devices themselves: emulating more on top is an error."""
        world = int(dict(user or {}).get("world_size", 1))
        if devices is not None:
            if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
                raise ConfigError(f"devices must be a positive int, got {devices!r}")
            if devices > 1 and not self.per_device:
                raise ConfigError(f"study {self.name!r} has no per-device batch to emulate "
                                  f"devices for (got devices={devices})", hint="drop --devices")
            if devices > 1 and world > 1:
                raise ConfigError(
                    f"devices={devices} emulated on each of {world} processes: the processes "
                    "are the devices already", hint="drop --devices or --nproc-per-node")
            return devices
        return self.default_devices if self.per_device and world == 1 else 1

    def protocol(self, devices: int, world: int = 1, user: Optional[dict[str, Any]] = None
                 ) -> dict[str, Any]:
        """What a run list with ``devices`` emulated devices on ``world`` processes computes (for
        the store and the report): ``name``, ``devices``, ``sgd_batch``, ``lr``, ``statistics``,
        ``source``. ``user``: the choices the points were made with (:meth:`points`), for what
        they change of it: the stats-batch study's images per device (``batch_size``, the
        paper's 32 by default) and a peak ``lr`` set by hand."""
        k = devices
        user = dict(user or {})
        lr = user.get("lr")
        fixed = f"{lr:g} set by hand (not scaled with the batch)" if lr is not None else None
        if self.per_device and world > 1 and not self.stats_batch_axis:
            return {"name": "per device", "devices": world, "processes": world,
                    "sgd_batch": f"{world} x N",
                    "lr": fixed or "base_lr x N / 32",
                    "statistics": f"BN per process (its N images; {world} processes); SyncBN "
                                  "over all processes; GN/LN/IN per sample",
                    "source": PAPER_PROTOCOL}
        if self.stats_batch_axis:
            n = user.get("batch_size", RunConfig.batch_size)
            paper = n == 32 and k == PAPER_DEVICES
            return {"name": "fixed SGD batch", "devices": k, "sgd_batch": f"{k} x {n}",
                    "lr": fixed or ("base_lr (the paper's lr at 32 images per device)" if n == 32
                                    else f"base_lr x {n} / 32 (the paper's lr at {n} images "
                                         "per device)"),
                    "statistics": "BN per slice of x images of the SGD batch (running statistics "
                                  "of slice 0, as rank 0 keeps them); GN per sample (one run, "
                                  "the same at every x)",
                    "source": "ghost batches (Hoffer et al., NeurIPS 2017) inside "
                              + ("the GN paper's SGD batch of 8 x 32" if paper else
                                 f"an SGD batch of {k} x {n} (the GN paper's: 8 x 32)")}
        if not self.per_device or k == 1:
            return {"name": "single batch", "devices": 1, "sgd_batch": "N x processes",
                    "lr": fixed or "base_lr x N x processes / 32",
                    "statistics": "BN per process (its N images); SyncBN over all processes; "
                                  "GN/LN/IN per sample", "source": ""}
        return {"name": "per device", "devices": k, "sgd_batch": f"{k} x N",
                "lr": fixed or "base_lr x N / 32",
                "statistics": f"BN per N images of the {k} x N batch (ghost batches: {k}-process "
                              "DDP with per-process BN; running statistics of slice 0, as rank "
                              f"0 keeps them); SyncBN over all {k} x N; GN/LN/IN per sample",
                "source": PAPER_PROTOCOL}

    def points(self, user: Optional[dict[str, Any]] = None, preset: str = "default",
               seeds: Optional[int] = None, variants: Optional[list[str]] = None,
               devices: Optional[int] = None, seeds_at: Optional[dict] = None) -> list[Point]:
        """Every run of the study: variants x xs x seeds. Each config is RunConfig defaults, then
        the preset, the variant and the point's own keys, then ``user`` (the --data/--model/--set
        choices, which win, except over what the study varies: its axis and the norm or ws a
        series names are a ConfigError to override), then the protocol for ``devices``
        (:meth:`devices`, :func:`emulate_devices`; on real processes a per-device study sets
        the paper's lr ``base_lr x N / 32`` unless ``lr`` is set), then ``seed = user seed + i``
        and the series
        label. ``seeds`` (default the preset's) is the seed count of every point but those
        ``seeds_at`` names (``{(label, x): count}``: the power rounds' targets)."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}", hint=f"choose one of: {', '.join(PRESETS)}")
        variants = variants or self.default_series(int(dict(user or {}).get("world_size", 1)))
        bad = [v for v in variants if v not in self.variants]
        if bad:
            raise ConfigError(f"study {self.name!r} has no variant(s) {', '.join(bad)}"
                              f"{did_you_mean(bad[0], self.variants)}",
                              hint=f"known variants: {', '.join(self.variants)}")
        per_point = dict(seeds_at or {})
        n_seeds = self.seeds[preset] if seeds is None else seeds
        for n in [n_seeds, *per_point.values()]:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"seeds must be a positive int, got {n!r}")
            if n > MAX_SEEDS:
                raise ConfigError(f"seeds per point must be at most {MAX_SEEDS}, got {n!r}")
        k = self.devices(user, devices)
        user = dict(user or {})
        if "label" in user:
            raise ConfigError(f"study {self.name!r} labels its runs by series (label="
                              f"{user['label']!r} would be dropped)",
                              hint="drop label from --set/--config (--variants picks series; "
                                   "`normlab train --set label=...` names a single run)")
        seed0 = user.pop("seed", 0)
        check_seeds_fit(seed0, max([n_seeds, *per_point.values()]), "fewer --seeds")
        setup = setup_id(user)
        if k != 1:  # another protocol: another table
            setup = hashlib.sha256(f"{setup}|devices={k}".encode()).hexdigest()[:16]
        out = []
        for label in variants:
            for x in self.series_xs.get(label, self.xs[preset]):
                over = {**self.presets[preset], **self.variants[label], **self.point_overrides(label, x)}
                cfg = apply_overrides(RunConfig(), over)
                model = user.get("model", cfg.model)
                # a series that names its norm (BN included) cannot run on an NF model: it would
                # train the NF model under that series' label
                named = "norm" in self.variants[label] or cfg.norm != "bn"
                if ("norm" not in user and cfg.norm != "none" and named
                        and is_normalizer_free(model)):
                    fit = [v for v in self.variants
                           if self.variants[v].get("norm") in (None, "none")]
                    raise ConfigError(
                        f"series {label!r} of study {self.name!r} uses norm {cfg.norm!r}, which "
                        f"the normalizer-free model {model!r} does not take",
                        hint=(f"run the series without a norm (--variants {','.join(fit)}) or "
                              if fit else "pick ") + "a model that takes a norm "
                             "(`normlab ls --models`)")
                study_cfg, cfg = cfg, apply_overrides(cfg, user)
                if "model" in user and is_normalizer_free(self.variants[label].get("model")):
                    cfg = self._normalizer_free(label, cfg)
                self._check_not_overridden(label, x, study_cfg, cfg, user)
                self._check_model_takes(label, x, study_cfg, cfg)
                cfg = emulate_devices(cfg, k, x if self.stats_batch_axis else None)
                if self.per_device and cfg.world_size > 1:
                    # real processes are the devices: the paper's lr, as on emulated ones,
                    # not the linear rule on the global batch
                    cfg = cfg.replace(lr=paper_lr(cfg))
                for seed in range(per_point.get((label, x), n_seeds)):
                    out.append(Point(label, x, cfg.replace(seed=seed0 + seed, label=label),
                                     setup))
        return out

    def _normalizer_free(self, label: str, cfg: RunConfig) -> RunConfig:
        """A series that trains a normalizer-free model (the nf study's NF) on the user's
        ``--model``: that model's normalizer-free counterpart (``resnet56`` -> ``nf_resnet56``),
        not the model itself with its norms removed, which is no NF-ResNet (no Scaled WS, no
        analytic scaling) but would be reported as one; a ConfigError when it has none."""
        nf = normalizer_free_counterpart(cfg.model)
        if nf is None:
            raise ConfigError(
                f"series {label!r} of study {self.name!r} trains a normalizer-free ResNet, and "
                f"model {cfg.model!r} has no normalizer-free counterpart in normlab.models",
                hint="pick a normlab ResNet (resnet20/32/56/110, resnet18/34/50/101: the series "
                     "trains its nf_ twin) or leave the series out (--variants)")
        return cfg.replace(model=nf).validate()

    def _check_model_takes(self, label: str, x: Any, study_cfg: RunConfig,
                           cfg: RunConfig) -> None:
        """The model the user picked must take the model options the study varies (bn-dropout's
        ``dropout``, ``bn_conv``, ``bn_dense``): a ConfigError naming the study, its model and
        those options, rather than the model builder's list of its own keywords."""
        keys = sorted({**self.variants[label].get("model_kwargs", {}),
                       **self.point_overrides(label, x).get("model_kwargs", {})})
        if not keys or cfg.model == study_cfg.model or takes_options(cfg.model, keys):
            return
        raise ConfigError(
            f"study {self.name!r} varies model_kwargs {', '.join(keys)} of its model "
            f"{study_cfg.model!r}, and model {cfg.model!r} does not take them",
            hint=f"drop --model (the study trains {study_cfg.model}), or pick a model that takes "
                 f"{', '.join(keys)}")

    def _check_not_overridden(self, label: str, x: Any, study_cfg: RunConfig, cfg: RunConfig,
                              user: dict[str, Any]) -> None:
        """A user override (``--set``, ``--config``, flags) must not change what the study varies
        for the point (label, x): its axis keys (``point_overrides``) and the keys that name its
        series (:data:`SERIES_KEYS` a variant sets). Otherwise every point would train another
        config under the study's label and x, and the report would compare mislabelled runs."""
        paths = _paths(self.point_overrides(label, x))
        paths += [k for k in SERIES_KEYS if k in self.variants[label]]
        for path in paths:
            head, _, sub = path.partition(".")
            before, after = (_get(c, head, sub) for c in (study_cfg, cfg))
            if before == after:
                continue
            if not any(k == path or k == head for k in user):
                continue  # changed as a consequence (e.g. an NF model records norm none)
            shown = "(removed)" if after is _MISSING else f"{after!r}"
            raise ConfigError(
                f"study {self.name!r} sets {path} itself (series {label!r} at {x}: {before!r}); "
                f"the override {path}={shown} would train another config under that label",
                hint="drop it from --set/--config (--variants picks series; `normlab train` "
                     "runs a single config)")


def emulate_devices(cfg: RunConfig, devices: int, stats_batch: Optional[int] = None
                    ) -> RunConfig:
    """The run that ``devices`` devices of ``cfg.batch_size`` images each compute, on one
    process (module docstring): SGD batch ``devices * batch_size``, lr ``base_lr * batch_size /
    32`` (unless ``cfg.lr`` is set), BN statistics per ``stats_batch`` images (default: the
    per-device batch) through ``ghostbn`` with interleaved slices (device k's images are
    k, k + K, ... of the SGD batch: what the lab's DistributedSampler gives rank k of a
    ``--nproc-per-node K`` run, and a view of the batch, no copy). ``devices == 1`` with no
    ``stats_batch`` returns
    ``cfg`` (the single-batch protocol). Batch Renorm and EvoNorm-B0 have no per-slice form
    here: a ConfigError.

    >>> from normlab.lab.config import RunConfig
    >>> c = emulate_devices(RunConfig(norm="bn", batch_size=2), 8)
    >>> c.batch_size, c.lr, c.norm, c.norm_kwargs
    (16, 0.00625, 'ghostbn', {'virtual_batch': 2, 'interleaved': True})
    """
    n = cfg.batch_size
    stats = n if stats_batch is None else stats_batch
    if devices == 1 and stats == n:
        return cfg
    total = devices * n
    if total % stats:
        raise ConfigError(f"a statistics batch of {stats} does not divide the SGD batch of "
                          f"{devices} x {n} = {total} images")
    changes: dict[str, Any] = {"batch_size": total, "lr": paper_lr(cfg)}
    norm = canonical_name(cfg.norm)
    if norm in ("bn", "ghostbn") and stats < total:
        given = {k: cfg.norm_kwargs[k] for k in ("virtual_batch", "interleaved")
                 if k in cfg.norm_kwargs}
        if given:  # replaced below: the run would train another statistics batch than asked
            shown = ", ".join(f"norm_kwargs.{k}={v!r}" for k, v in given.items())
            raise ConfigError(f"{shown}: {devices} emulated devices set BN's statistics batch "
                              f"themselves ({stats} images, slices interleaved)",
                              hint="drop it; the stats-batch study varies BN's statistics "
                                   "batch, and --devices 1 trains one batch as given")
        changes["norm"] = "ghostbn"
        changes["norm_kwargs"] = {**cfg.norm_kwargs, "virtual_batch": stats, "interleaved": True}
    elif norm in _NO_GHOST_FORM and stats < total:
        raise ConfigError(f"{_NO_GHOST_FORM[norm]} has no per-slice (ghost batch) form: "
                          f"{devices} emulated devices cannot keep its batch statistics per "
                          f"{stats} images",
                          hint="run it with --devices 1, or on real processes "
                               "(--nproc-per-node)")
    return cfg.replace(**changes).validate()


def check_seeds_fit(seed0: Any, count: int, option: str) -> None:
    """A ConfigError when a point's ``count`` seeds from ``seed0`` (``seed0 + count - 1`` the
    last) pass :data:`SEED_LIMIT`: each run's seed is checked only when it trains, so the runs
    before it trained and the rest of the study stopped. ``option`` says how to ask for fewer."""
    if isinstance(seed0, bool) or not isinstance(seed0, int):
        return  # not a seed: apply_overrides names it
    last = seed0 + count - 1
    if last >= SEED_LIMIT:
        raise ConfigError(f"seed {seed0} with {count} seeds per point reaches seed {last}; "
                          "seeds must be ints in [0, 2**32)",
                          hint=f"lower the seed (--set seed=) to at most {SEED_LIMIT - count}, "
                               f"or {option}")


def paper_lr(cfg: RunConfig) -> float:
    """The GN paper's lr for ``cfg.batch_size`` images per device: ``base_lr x N / 32``
    (``cfg.lr`` when the user set it)."""
    return cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size / 32


#: norms with batch statistics that ghostbn does not cover (they would see the whole K x N batch)
_NO_GHOST_FORM = {"brn": "Batch Renorm", "evonorm_b0": "EvoNorm-B0"}


def setup_id(user: dict[str, Any]) -> str:
    """A 16-hex-digit id of the user's choices a study runs with (data, model, epochs, ...:
    ``user`` without ``seed``), canonical (the RunConfig they give, so ``--data digits`` and the
    default are one setup). More seeds or other ``--variants`` keep the setup; another dataset,
    model or ``--set`` does not."""
    user = {k: v for k, v in user.items() if k not in ("seed", "label")}
    try:
        ident = apply_overrides(RunConfig(), user).identity()
        for k in ("seed", "label"):
            ident.pop(k, None)
    except ConfigError:  # only meaningful with the study's own keys: hash the choices as given
        ident = user
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: RunConfig keys that name a study's series when a variant sets them (a BN series must run BN);
#: other variant keys (e.g. an NF series' model or agc) may be tuned with --set
SERIES_KEYS = ("norm", "ws")
_MISSING = object()


def _paths(over: dict[str, Any]) -> list[str]:
    """``{"batch_size": 8, "norm_kwargs": {"num_groups": 4}}`` -> ``["batch_size",
    "norm_kwargs.num_groups"]``."""
    return [f"{k}.{sub}" if isinstance(v, dict) else k
            for k, v in over.items() for sub in (v if isinstance(v, dict) else [None])]


def _get(cfg: RunConfig, head: str, sub: str) -> Any:
    v = getattr(cfg, head)
    return v.get(sub, _MISSING) if sub else v
