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

from normlab.lab.config import ConfigError, RunConfig, apply_overrides
from normlab.models import is_normalizer_free

__all__ = ["Study", "Point", "Claim", "STUDIES", "get_study", "PRESETS", "setup_id"]

PRESETS = ("quick", "default")
GN_PAPER = "Wu & He, Group Normalization, ECCV 2018 (ResNet-50, ImageNet val error %)"


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

    def default_series(self, world_size: int = 1) -> list[str]:
        """The series run when none are asked for: the defaults, plus
        ``multi_process_variants`` when ``world_size > 1``."""
        extra = [v for v in self.multi_process_variants if v not in self.default_variants]
        return self.default_variants + (extra if world_size > 1 else [])

    def points(self, user: Optional[dict[str, Any]] = None, preset: str = "default",
               seeds: Optional[int] = None, variants: Optional[list[str]] = None) -> list[Point]:
        """Every run of the study: variants x xs x seeds. Each config is RunConfig defaults, then
        the preset, the variant and the point's own keys, then ``user`` (the --data/--model/--set
        choices, which win, except over what the study varies: its axis and the norm or ws a
        series names are a ConfigError to override), then ``seed = user seed + i`` and the series
        label."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}", hint=f"choose one of: {', '.join(PRESETS)}")
        variants = variants or self.default_series(int(dict(user or {}).get("world_size", 1)))
        bad = [v for v in variants if v not in self.variants]
        if bad:
            raise ConfigError(f"study {self.name!r} has no variant(s) {', '.join(bad)}",
                              hint=f"known variants: {', '.join(self.variants)}")
        n_seeds = self.seeds[preset] if seeds is None else seeds
        if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
            raise ConfigError(f"seeds must be a positive int, got {n_seeds!r}")
        user = dict(user or {})
        seed0 = user.pop("seed", 0)
        setup = setup_id(user)
        out = []
        for label in variants:
            for x in self.xs[preset]:
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
                for seed in range(n_seeds):
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
    xs={"quick": BATCHES, "default": BATCHES},
    presets={"quick": {"epochs": 2, "train_limit": 640}, "default": {"epochs": 6}},
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
    presets={"quick": {"epochs": 2, "train_limit": 640}, "default": {"epochs": 6}},
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
    presets={"quick": {"epochs": 2, "train_limit": 640}, "default": {"epochs": 8}},
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
))

_add(Study(
    name="bn-dropout",
    title="BatchNorm x dropout ablation (12 configurations)",
    description="dropout {0, 0.2, 0.4} after the dense layer x BN {none, after convs, after the "
                "dense layer, both} on the small CNN of REFERENCE section 4.",
    axis="dropout",
    variants={"none": {}, "conv": {}, "dense": {}, "conv+dense": {}},
    default_variants=["none", "conv", "dense", "conv+dense"],
    xs={"quick": [0.0, 0.2, 0.4], "default": [0.0, 0.2, 0.4]},
    presets={"quick": {"epochs": 2, "train_limit": 640, "model": "bn_dropout_cnn", "base_lr": 0.05},
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
    xs={"quick": [32, 8, 2], "default": BATCHES},
    presets={"quick": {"epochs": 2, "train_limit": 640}, "default": {"epochs": 6}},
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
))


def get_study(name: str) -> Study:
    key = name.strip().lower().replace("_", "-")
    if key not in STUDIES:
        raise ConfigError(f"unknown study {name!r}", hint=f"choose one of: {', '.join(STUDIES)}")
    return STUDIES[key]
