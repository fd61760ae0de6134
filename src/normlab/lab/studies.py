"""The studies: run lists, the papers' tables and the claims each study checks.

A study turns (preset, seeds, variants, base config) into a list of :class:`Point` (a series label,
an x value, a RunConfig). Its paper table and its :class:`Claim` list are data; report.py computes
every claim's verdict from the store.

==============  =================================================  ==================================
study           runs                                               paper (REFERENCE section)
==============  =================================================  ==================================
batch-size      BN, GN (+ SyncBN, BRN, GN+WS, NF, FRN, EvoNorm-S0/B0)  Wu & He, ECCV 2018 (1, 2, 3);
                at 32..2 per GPU                                    FRN, EvoNorm papers (7)
groups          GN with G = 1..64 and with C/G = 1..64, batch 32   Wu & He, ECCV 2018 (1)
norms           BN, LN, IN, GN, none (+ FRN, EvoNorm-S0/B0), batch 32  Wu & He, ECCV 2018 (1)
bn-dropout      dropout {0, .2, .4} x BN {none, conv, dense, both}  REFERENCE section 4
nf              NF-ResNet (AGC) vs BN-ResNet across batch sizes    Brock, De & Smith, ICLR 2021 (3)
==============  =================================================  ==================================

The paper's protocol on one device. In the GN paper (Wu & He, ECCV 2018, section 4; REFERENCE
section 1) "N images per GPU" means BN statistics over N images inside an SGD step over the
K x N images of K = 8 GPUs, at lr 0.1 x N/32. The studies marked ``per_device`` emulate that on one
process (``devices`` K; default :data:`PAPER_DEVICES` for batch-size, stats-batch and nf; 1 for
norms and groups, whose BN statistics batch is the paper's 32 either way and whose LN and
no-norm runs did not converge in 20 epochs of 5 steps on digits at 8 x 32; docs/datasets.md):
a run takes SGD steps over
K x N images at lr ``base_lr x N / 32``, and BN normalizes each slice of N images on its own
(``ghostbn``, :class:`normlab.nn.GhostBatchNorm2d`: exactly K-process DDP with per-process BN,
running statistics as rank 0 keeps them); SyncBN's statistics over the whole K x N batch are
one process's plain BN over it; GN, LN and IN are per sample either way. The ``stats-batch``
study holds the SGD batch at K x 32 (lr ``base_lr``) and varies only BN's statistics batch,
which separates the statistics' effect from the SGD noise of a smaller step. ``devices=1``
gives the former single-batch protocol (one batch of N images per step, lr ``base_lr x N x
processes / 32``). :meth:`Study.protocol` describes the protocol a run list used; the runner
records it with the study's setup in the store, for the report.

Batch sizes are per process ("images per GPU", as in the GN paper). Run on K processes
(``--nproc-per-node K``), the batch-size study adds a SyncBN series to BN and GN: BN keeps
per-process statistics and degrades at small per-process batches, SyncBN takes its statistics over
all K processes, GN needs none. ``--variants BN,SyncBN,GN`` asks for them explicitly.

The default model is the CIFAR ResNet-20 (16/32/64 channels). GroupNorm uses the group rule of
:func:`normlab.resolve_groups`; ``gn`` in these studies means 8 groups (the GN author's CIFAR
setting, REFERENCE section 1), because 32 groups on 16 channels would be InstanceNorm.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from normlab.factory import canonical_name
from normlab.lab.config import ConfigError, RunConfig, apply_overrides
from normlab.models import is_normalizer_free

__all__ = ["Study", "Point", "Claim", "STUDIES", "get_study", "PRESETS", "setup_id",
           "PAPER_DEVICES", "emulate_devices"]

PRESETS = ("quick", "default")
GN_PAPER = "Wu & He, Group Normalization, ECCV 2018 (ResNet-50, ImageNet val error %)"
#: the GN paper's 8 GPUs (REFERENCE section 1): the devices a per-device study emulates by default
PAPER_DEVICES = 8


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

    def protocol(self, devices: int) -> dict[str, Any]:
        """What a run list with ``devices`` emulated devices computes (for the store and the
        report): ``name``, ``devices``, ``sgd_batch``, ``lr``, ``statistics``, ``source``."""
        k = devices
        if self.stats_batch_axis:
            return {"name": "fixed SGD batch", "devices": k, "sgd_batch": f"{k} x 32",
                    "lr": "base_lr (the paper's lr at 32 images per device)",
                    "statistics": "BN per slice of x images of the SGD batch (running statistics "
                                  "of slice 0, as rank 0 keeps them); GN per sample (one run, "
                                  "the same at every x)",
                    "source": "ghost batches (Hoffer et al., NeurIPS 2017) inside the GN "
                              "paper's SGD batch of 8 x 32"}
        if not self.per_device or k == 1:
            return {"name": "single batch", "devices": 1, "sgd_batch": "N x processes",
                    "lr": "base_lr x N x processes / 32",
                    "statistics": "BN per process (its N images); SyncBN over all processes; "
                                  "GN/LN/IN per sample", "source": ""}
        return {"name": "per device", "devices": k, "sgd_batch": f"{k} x N",
                "lr": "base_lr x N / 32",
                "statistics": f"BN per N images of the {k} x N batch (ghost batches: {k}-process "
                              "DDP with per-process BN; running statistics of slice 0, as rank "
                              f"0 keeps them); SyncBN over all {k} x N; GN/LN/IN per sample",
                "source": "Wu & He, ECCV 2018, section 4: N images per GPU on 8 GPUs, lr "
                          "0.1 x N/32"}

    def points(self, user: Optional[dict[str, Any]] = None, preset: str = "default",
               seeds: Optional[int] = None, variants: Optional[list[str]] = None,
               devices: Optional[int] = None, seeds_at: Optional[dict] = None) -> list[Point]:
        """Every run of the study: variants x xs x seeds. Each config is RunConfig defaults, then
        the preset, the variant and the point's own keys, then ``user`` (the --data/--model/--set
        choices, which win, except over what the study varies: its axis and the norm or ws a
        series names are a ConfigError to override), then the protocol for ``devices``
        (:meth:`devices`, :func:`emulate_devices`), then ``seed = user seed + i`` and the series
        label. ``seeds`` (default the preset's) is the seed count of every point but those
        ``seeds_at`` names (``{(label, x): count}``: the power rounds' targets)."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}", hint=f"choose one of: {', '.join(PRESETS)}")
        variants = variants or self.default_series(int(dict(user or {}).get("world_size", 1)))
        bad = [v for v in variants if v not in self.variants]
        if bad:
            raise ConfigError(f"study {self.name!r} has no variant(s) {', '.join(bad)}",
                              hint=f"known variants: {', '.join(self.variants)}")
        per_point = dict(seeds_at or {})
        n_seeds = self.seeds[preset] if seeds is None else seeds
        for n in [n_seeds, *per_point.values()]:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"seeds must be a positive int, got {n!r}")
        k = self.devices(user, devices)
        user = dict(user or {})
        seed0 = user.pop("seed", 0)
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
                self._check_not_overridden(label, x, study_cfg, cfg, user)
                cfg = emulate_devices(cfg, k, x if self.stats_batch_axis else None)
                for seed in range(per_point.get((label, x), n_seeds)):
                    out.append(Point(label, x, cfg.replace(seed=seed0 + seed, label=label),
                                     setup))
        return out

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
    per-device batch) through ``ghostbn``. ``devices == 1`` with no ``stats_batch`` returns
    ``cfg`` (the single-batch protocol). Batch Renorm and EvoNorm-B0 have no per-slice form
    here: a ConfigError.

    >>> c = emulate_devices(RunConfig(norm="bn", batch_size=2), 8)
    >>> c.batch_size, c.lr, c.norm, c.norm_kwargs
    (16, 0.00625, 'ghostbn', {'virtual_batch': 2})
    """
    n = cfg.batch_size
    stats = n if stats_batch is None else stats_batch
    if devices == 1 and stats == n:
        return cfg
    total = devices * n
    if total % stats:
        raise ConfigError(f"a statistics batch of {stats} does not divide the SGD batch of "
                          f"{devices} x {n} = {total} images")
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * n / 32
    changes: dict[str, Any] = {"batch_size": total, "lr": lr}
    norm = canonical_name(cfg.norm)
    if norm in ("bn", "ghostbn") and stats < total:
        changes["norm"] = "ghostbn"
        changes["norm_kwargs"] = {**cfg.norm_kwargs, "virtual_batch": stats}
    elif norm in _NO_GHOST_FORM and stats < total:
        raise ConfigError(f"{_NO_GHOST_FORM[norm]} has no per-slice (ghost batch) form: "
                          f"{devices} emulated devices cannot keep its batch statistics per "
                          f"{stats} images",
                          hint=f"run it with --devices 1, or on real processes "
                               "(--nproc-per-node)")
    return cfg.replace(**changes).validate()


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


BATCHES = [32, 16, 8, 4, 2]


def _batch(label: str, x: Any) -> dict:
    return {"batch_size": x}


def _groups(label: str, x: Any) -> dict:
    return {"norm_kwargs": {"num_groups": x} if label == "G" else {"group_size": x}}


def _none(label: str, x: Any) -> dict:
    return {}


def _dropout(label: str, x: Any) -> dict:
    return {"model_kwargs": {"dropout": x, "bn_conv": label in ("conv", "conv+dense"),
                             "bn_dense": label in ("dense", "conv+dense")}}


_GN = {"norm": "gn", "norm_kwargs": {"num_groups": 8}}
_NF = {"model": "nf_resnet20", "norm": "none", "agc": 0.04}
# The batch-independent alternatives of REFERENCE section 7 (optional series). They replace a
# norm and the ReLU after it in their papers; the ResNets here keep their ReLU after every norm.
# EvoNorm-S0 takes GN's 8 groups.
_ALTERNATIVES = {"FRN": {"norm": "frn"},
                 "EvoNorm-S0": {"norm": "evonorm_s0", "norm_kwargs": {"num_groups": 8}},
                 "EvoNorm-B0": {"norm": "evonorm_b0"}}
FRN_PAPER = ("Singh & Krishnan, Filter Response Normalization, CVPR 2020 (abstract: ImageNet "
             "top-1 about 0.7-1.0 points above BN at large batches, over 1 point above GN at "
             "small ones, InceptionV3 and ResNetV2-50; its tables not verified here)")
EVONORM_PAPER = ("Liu, Brock, Simonyan & Le, Evolving Normalization-Activation Layers, NeurIPS "
                 "2020 (Table 4: ResNet-50 and MobileNetV2 on ImageNet as the batch shrinks; "
                 "numbers not verified here)")

STUDIES: dict[str, Study] = {}


def _add(s: Study) -> None:
    STUDIES[s.name] = s


_add(Study(
    name="batch-size",
    title="Test error vs images per process, by normalization",
    description="BN vs GN (optionally SyncBN, BRN, GN+WS, NF, FRN, EvoNorm-S0, EvoNorm-B0) at "
                "32/16/8/4/2 images per process (per GPU), lr 0.1*N*processes/32, same epochs for "
                "every batch size. FRN and EvoNorm are followed by the model's ReLU (their papers "
                "drop it).",
    axis="images per process",
    variants={"BN": {"norm": "bn"}, "GN": _GN, "SyncBN": {"norm": "syncbn"}, "BRN": {"norm": "brn"},
              "GN+WS": {**_GN, "ws": True}, "NF": _NF, **_ALTERNATIVES},
    default_variants=["BN", "GN"],
    multi_process_variants=["SyncBN"],
    xs={"quick": [32, 2], "default": BATCHES},
    presets={"quick": {"epochs": 20}, "default": {"epochs": 20}},
    seeds={"quick": 1, "default": 2},
    point_overrides=_batch,
    paper={"BN": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
           "GN": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1}, "BRN": {4: 26.3}},
    paper_source=GN_PAPER + "; BRN at batch 4 (r_max 1.5, d_max 0.5) from the same paper; FRN: "
                 + FRN_PAPER + "; EvoNorm: " + EVONORM_PAPER,
    claims=[
        Claim("BN beats GN at the largest batch (32)", "less",
              ("BN", 32), ("GN", 32), 0.0, "GN paper: BN 23.6 vs GN 24.1 at batch 32 (0.5 points)"),
        Claim("BN degrades at batch 2 (error at least 1 point above batch 32)", "less",
              ("BN", 32), ("BN", 2), 1.0, "GN paper: BN 23.6 -> 34.7"),
        Claim("GN is insensitive to batch size (every batch within 1 point of batch 32)", "flat",
              ("GN", 32), None, 1.0, "GN paper: GN 24.0-24.2 at every batch size"),
        Claim("GN beats BN at batch 2", "less", ("GN", 2), ("BN", 2), 0.0,
              "GN paper: 24.1 vs 34.7"),
        Claim("SyncBN beats per-process BN at 2 images per process (run on > 1 process)", "less",
              ("SyncBN", 2), ("BN", 2), 0.0,
              "GN paper: BN statistics are per GPU, hence its small-batch drop (REFERENCE 1)"),
        Claim("Batch Renorm beats BN at batch 4", "less", ("BRN", 4), ("BN", 4), 0.0,
              "GN paper: BRN 26.3 vs BN 27.3"),
        Claim("GN+WS at batch 2 matches BN at batch 32 (within 1 point)", "match",
              ("GN+WS", 2), ("BN", 32), 1.0, "Qiao et al. 2019"),
        Claim("NF-ResNet beats BN-ResNet at batch 2", "less", ("NF", 2), ("BN", 2), 0.0,
              "Brock, De & Smith 2021"),
        Claim("FRN is insensitive to batch size (every batch within 1 point of batch 32)", "flat",
              ("FRN", 32), None, 1.0, "FRN paper: no batch statistics (by construction)"),
        Claim("FRN beats GN at batch 2", "less", ("FRN", 2), ("GN", 2), 0.0,
              "FRN paper, abstract: over 1 point above GN at small batches"),
        Claim("FRN beats BN at batch 2", "less", ("FRN", 2), ("BN", 2), 0.0,
              "FRN paper: BN degrades at small batches, FRN does not"),
        Claim("EvoNorm-S0 is insensitive to batch size (every batch within 1 point of batch 32)",
              "flat", ("EvoNorm-S0", 32), None, 1.0,
              "EvoNorm paper: S0 uses no batch statistics (by construction)"),
        Claim("EvoNorm-S0 beats BN at batch 2", "less", ("EvoNorm-S0", 2), ("BN", 2), 0.0,
              "EvoNorm paper, Table 4 (unverified): S0 above BN-ReLU at small batches"),
        Claim("EvoNorm-S0 beats GN at batch 2", "less", ("EvoNorm-S0", 2), ("GN", 2), 0.0,
              "EvoNorm paper, Table 4 (unverified): S0 above GN-ReLU at small batches"),
    ],
    x_log2=True,
    per_device=True,
))

_add(Study(
    name="stats-batch",
    title="Test error vs BN's statistics batch, the SGD batch held fixed",
    description="BN with statistics per x images (ghost batches) inside the same SGD step of "
                "devices x 32 images at lr 0.1, for x = 32..2; GN, which takes no statistics over "
                "the batch, is one run. Only the statistics batch changes: the SGD noise is the "
                "same at every x (Hoffer et al., NeurIPS 2017; Wu & Johnson 2021).",
    axis="BN statistics batch",
    variants={"BN": {"norm": "bn"}, "GN": _GN},
    default_variants=["BN", "GN"],
    xs={"quick": [32, 2], "default": BATCHES},
    presets={"quick": {"epochs": 20}, "default": {"epochs": 20}},
    seeds={"quick": 1, "default": 2},
    point_overrides=_none,
    paper={},
    paper_source="no paper table for this protocol: the GN paper (section 4) varied the SGD "
                 "batch with the statistics batch; its BN drop (23.6 at 32 -> 34.7 at 2 per GPU) "
                 "is the claim tested here with the SGD batch fixed",
    claims=[
        Claim("BN degrades at statistics batch 2 (error at least 1 point above 32)", "less",
              ("BN", 32), ("BN", 2), 1.0, "GN paper: BN 23.6 -> 34.7 per GPU"),
        Claim("GN beats BN at statistics batch 2", "less", ("GN", 32), ("BN", 2), 0.0,
              "GN paper: 24.1 vs 34.7 (GN does not depend on the statistics batch)"),
    ],
    x_log2=True,
    per_device=True,
    stats_batch_axis=True,
    series_xs={"GN": [32]},
))

_G_XS = [64, 32, 16, 8, 4, 2, 1]
_add(Study(
    name="groups",
    title="GroupNorm: number of groups and channels per group",
    description="GN with G = 1 (=LN) .. 64 groups, and with 1 (=IN) .. 64 channels per group, at "
                "batch 32. With ResNet-20's 16/32/64 channels a layer gets at most C groups "
                "(the group rule), so large G means InstanceNorm in the narrow layers.",
    axis="G (groups) or C/G (channels per group)",
    variants={"G": {"norm": "gn"}, "C/G": {"norm": "gn"}},
    default_variants=["G", "C/G"],
    xs={"quick": [32, 8, 1], "default": _G_XS},
    presets={"quick": {"epochs": 8}, "default": {"epochs": 8}},
    seeds={"quick": 1, "default": 2},
    point_overrides=_groups,
    paper={"G": dict(zip(_G_XS, [24.6, 24.1, 24.6, 24.4, 24.6, 24.7, 25.3])),
           "C/G": dict(zip(_G_XS, [24.4, 24.5, 24.2, 24.3, 24.8, 25.6, 28.4]))},
    paper_source=GN_PAPER + ", batch 32",
    claims=[
        Claim("GN with 32 groups beats LN (G = 1)", "less", ("G", 32), ("G", 1), 0.0,
              "GN paper: 24.1 vs 25.3"),
        Claim("GN with 8 groups beats LN (G = 1)", "less", ("G", 8), ("G", 1), 0.0,
              "GN paper: 24.4 vs 25.3"),
        Claim("one channel per group (IN) is the worst channels-per-group setting", "worst",
              ("C/G", 1), None, 0.0, "GN paper: 28.4, next worst 25.6"),
    ],
    x_log2=True,
    per_device=True,
    default_devices=1,
))

_add(Study(
    name="norms",
    title="BN, LN, IN, GN and no normalization at batch 32",
    description="One model, five normalizations, batch 32.",
    axis="batch 32",
    variants={"BN": {"norm": "bn"}, "LN": {"norm": "ln"}, "IN": {"norm": "in"}, "GN": _GN,
              "none": {"norm": "none"}, **_ALTERNATIVES},
    default_variants=["BN", "LN", "IN", "GN", "none"],
    xs={"quick": [32], "default": [32]},
    presets={"quick": {"epochs": 8}, "default": {"epochs": 8}},
    seeds={"quick": 1, "default": 3},
    point_overrides=_none,
    paper={"BN": {32: 23.6}, "LN": {32: 25.3}, "IN": {32: 28.4}, "GN": {32: 24.1}},
    paper_source=GN_PAPER + ", batch 32; FRN: " + FRN_PAPER + "; EvoNorm: " + EVONORM_PAPER,
    claims=[
        Claim("FRN beats BN at batch 32", "less", ("FRN", 32), ("BN", 32), 0.0,
              "FRN paper, abstract: 0.7-1.0 points above BN at large batches (ImageNet top-1)"),
        Claim("EvoNorm-B0 beats BN at batch 32", "less", ("EvoNorm-B0", 32), ("BN", 32), 0.0,
              "EvoNorm paper (unverified): B0 above BN-ReLU on most classification models"),
        Claim("GN beats LN", "less", ("GN", 32), ("LN", 32), 0.0, "GN paper: 24.1 vs 25.3"),
        Claim("GN beats IN", "less", ("GN", 32), ("IN", 32), 0.0, "GN paper: 24.1 vs 28.4"),
        Claim("LN beats IN", "less", ("LN", 32), ("IN", 32), 0.0, "GN paper: 25.3 vs 28.4"),
        Claim("BN beats GN at batch 32", "less", ("BN", 32), ("GN", 32), 0.0,
              "GN paper: 23.6 vs 24.1 (0.5 points)"),
        Claim("BN beats no normalization", "less", ("BN", 32), ("none", 32), 0.0, ""),
    ],
    per_device=True,
    default_devices=1,
))

_add(Study(
    name="bn-dropout",
    title="BatchNorm x dropout ablation (12 configurations)",
    description="dropout {0, 0.2, 0.4} after the dense layer x BN {none, after convs, after the "
                "dense layer, both} on the small CNN of REFERENCE section 4.",
    axis="dropout",
    variants={"none": {}, "conv": {}, "dense": {}, "conv+dense": {}},
    default_variants=["none", "conv", "dense", "conv+dense"],
    xs={"quick": [0.0, 0.4], "default": [0.0, 0.2, 0.4]},
    presets={"quick": {"epochs": 6, "model": "bn_dropout_cnn", "base_lr": 0.05},
             "default": {"epochs": 6, "model": "bn_dropout_cnn", "base_lr": 0.05}},
    seeds={"quick": 1, "default": 2},
    point_overrides=_dropout,
    paper={"conv+dense": {0.4: "~25 (acc ~0.75)"}, "none": {0.4: "> 40 (acc < 0.6)"}},
    paper_source="REFERENCE section 4 (CIFAR-10; accuracies quoted, shown as error %)",
    claims=[
        Claim("BN on conv and dense layers with dropout 0.4 is the best configuration", "best",
              ("conv+dense", 0.4), None, 0.0, "accuracy near 0.75, the reported best"),
        Claim("at dropout 0.4, BN on conv+dense beats no BN", "less", ("conv+dense", 0.4),
              ("none", 0.4), 0.0, "accuracy ~0.75 vs < 0.6"),
    ],
))

_add(Study(
    name="nf",
    title="Normalizer-free ResNet (with AGC) vs BN-ResNet across batch sizes",
    description="NF-ResNet-20 (Scaled WS, SkipInit-style residual scaling, AGC lambda 0.04) vs "
                "BN-ResNet-20, lr 0.1*N*processes/32.",
    axis="images per process",
    variants={"BN": {"norm": "bn"}, "NF": _NF},
    default_variants=["BN", "NF"],
    xs={"quick": [32, 2], "default": BATCHES},
    presets={"quick": {"epochs": 20}, "default": {"epochs": 20}},
    seeds={"quick": 1, "default": 2},
    point_overrides=_batch,
    paper={},
    paper_source="Brock, De & Smith, ICLR 2021: NF-ResNets match BN-ResNets at batch 1024 and beat "
                 "them at very small batches (no small-scale numbers to compare)",
    claims=[
        Claim("NF-ResNet matches BN-ResNet at batch 32 (within 1 point)", "match", ("NF", 32),
              ("BN", 32), 1.0, "matched at batch 1024 on ImageNet"),
        Claim("NF-ResNet beats BN-ResNet at batch 2", "less", ("NF", 2), ("BN", 2), 0.0,
              "NF better at very small batches"),
    ],
    x_log2=True,
    per_device=True,
))


def get_study(name: str) -> Study:
    key = name.strip().lower().replace("_", "-")
    if key not in STUDIES:
        raise ConfigError(f"unknown study {name!r}", hint=f"choose one of: {', '.join(STUDIES)}")
    return STUDIES[key]
