"""The studies: run lists, the papers' tables and the claims each study checks.

A study turns (preset, seeds, variants, base config) into a list of :class:`Point` (a series label,
an x value, a RunConfig). Its paper table and its :class:`Claim` list are data; report.py computes
every claim's verdict from the store.

==============  =================================================  ==================================
study           runs                                               paper (REFERENCE section)
==============  =================================================  ==================================
batch-size      BN, GN (+ SyncBN, BRN, GN+WS, NF, FRN, EvoNorm-S0/B0)  Wu & He, ECCV 2018 (1, 2, 3);
                at 32..2 per GPU                                    FRN, EvoNorm papers (7)
stats-batch     BN with statistics per 32..2 images, SGD batch     Wu & He's BN claim; Hoffer et
                held at devices x 32; GN                            al., NeurIPS 2017 (7)
groups          GN with G = 1..64 and with C/G = 1..64, batch 32   Wu & He, ECCV 2018 (1)
norms           BN, LN, IN, GN, none (+ RMS, FRN, EvoNorm-S0/B0),   Wu & He, ECCV 2018 (1)
                batch 32
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
(``ghostbn`` with interleaved slices, :class:`normlab.nn.GhostBatchNorm2d`: exactly K-process
DDP with per-process BN, device k holding what a DistributedSampler deals rank k, running
statistics as rank 0 keeps them); SyncBN's statistics over the whole K x N batch are
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

On a transformer (``--model timm:vit_tiny_patch16_224``, a LayerNorm model:
:mod:`normlab.models.timm_models`) the norms study takes ``--variants LN,RMS,none``: LN and RMS
are then the per-token LayerNorm and RMSNorm in place of the model's own; the series that need a
batch or channel groups are refused before anything trains. On a conv net RMS is RMSNorm over
the channels at each position (``create_norm("rms")``).

The default model is the CIFAR ResNet-20 (16/32/64 channels). GroupNorm uses the group rule of
:func:`normlab.resolve_groups`; ``gn`` in these studies means 8 groups (the GN author's CIFAR
setting, REFERENCE section 1), because 32 groups on 16 channels would be InstanceNorm.
"""

from __future__ import annotations

from typing import Any

from normlab.factory import did_you_mean
from normlab.lab.config import ConfigError
from normlab.lab.study import PAPER_DEVICES, PRESETS, Claim, Point, Study, emulate_devices, setup_id

__all__ = ["Study", "Point", "Claim", "STUDIES", "get_study", "PRESETS", "setup_id",
           "PAPER_DEVICES", "emulate_devices"]

#: doctest also runs the protocol's example (defined in study.py) with this module's examples
__test__ = {"emulate_devices": emulate_devices}

GN_PAPER = "Wu & He, Group Normalization, ECCV 2018 (ResNet-50, ImageNet val error %)"

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
                "32/16/8/4/2 images per process (per GPU), lr 0.1 x N/32, same epochs for "
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
              "GN paper: BN statistics are per GPU, hence its small-batch drop"),
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
    x_descending=True,
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
                "(the group rule), so large G means InstanceNorm in the narrow layers, and C/G "
                "at or above a layer's channels one group (LayerNorm) there: G = 64 and C/G = 1 "
                "train the same model (InstanceNorm in every layer), as do G = 1 and C/G = 64 "
                "(LayerNorm in every layer), where the paper's ResNet-50 (64 to 2048 channels) "
                "kept them apart.",
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
    answer="setting",
    setting=("group setting", "{label} = {x}"),
))

_add(Study(
    name="norms",
    title="BN, LN, IN, GN and no normalization at batch 32",
    description="One model, five normalizations, batch 32.",
    axis="batch 32",
    variants={"BN": {"norm": "bn"}, "LN": {"norm": "ln"}, "IN": {"norm": "in"}, "GN": _GN,
              "none": {"norm": "none"}, "RMS": {"norm": "rms"}, **_ALTERNATIVES},
    default_variants=["BN", "LN", "IN", "GN", "none"],
    xs={"quick": [32], "default": [32]},
    presets={"quick": {"epochs": 8}, "default": {"epochs": 8}},
    seeds={"quick": 1, "default": 3},
    # the batch is its axis (x = 32, beside the paper's batch-32 table): --set batch_size=16
    # trained at 16 under x = 32
    point_overrides=_batch,
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
    figure="bars",
))

_add(Study(
    name="bn-dropout",
    title="BatchNorm x dropout ablation (12 configurations)",
    description="dropout {0, 0.2, 0.4} after the dense layer x BN {none, after convs, after the "
                "dense layer, both} on a small CNN (conv 5x5 32, conv 5x5 64, dense 1024; "
                "`normlab.models` bn_dropout_cnn).",
    axis="dropout",
    variants={"none": {}, "conv": {}, "dense": {}, "conv+dense": {}},
    default_variants=["none", "conv", "dense", "conv+dense"],
    xs={"quick": [0.0, 0.4], "default": [0.0, 0.2, 0.4]},
    presets={"quick": {"epochs": 6, "model": "bn_dropout_cnn", "base_lr": 0.05},
             "default": {"epochs": 6, "model": "bn_dropout_cnn", "base_lr": 0.05}},
    seeds={"quick": 1, "default": 2},
    point_overrides=_dropout,
    paper={"conv+dense": {0.4: "~25 (acc ~0.75)"}, "none": {0.4: "> 40 (acc < 0.6)"}},
    paper_source="a reported BN x dropout ablation on CIFAR-10 with this small CNN (accuracies "
                 "quoted, shown as error %; its paper is not named in the project's reference)",
    claims=[
        Claim("BN on conv and dense layers with dropout 0.4 is the best configuration", "best",
              ("conv+dense", 0.4), None, 0.0, "accuracy near 0.75, the reported best"),
        Claim("at dropout 0.4, BN on conv+dense beats no BN", "less", ("conv+dense", 0.4),
              ("none", 0.4), 0.0, "accuracy ~0.75 vs < 0.6"),
    ],
    figure="grid",
    answer="setting",
    setting=("configuration", "BN {label}, dropout {x}"),
))

_add(Study(
    name="nf",
    title="Normalizer-free ResNet (with AGC) vs BN-ResNet across batch sizes",
    description="NF-ResNet-20 (Scaled WS, SkipInit-style residual scaling) vs BN-ResNet-20, lr "
                "0.1 x N/32. The NF runs also clip gradients (AGC, lambda 0.04): AGC is from "
                "the later NFNets paper (Brock, De, Smith & Simonyan, ICML 2021: lambda 0.01 at "
                "batch 1024-4096); the ICLR 2021 NF-ResNets whose claims this study checks "
                "trained without it (`--set agc=null` drops it).",
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
    x_descending=True,
))


def get_study(name: str) -> Study:
    """The study called ``name`` (case and ``_`` for ``-`` do not matter).

    >>> s = get_study("Batch_Size")
    >>> s.name, s.per_device
    ('batch-size', True)
    """
    key = name.strip().lower().replace("_", "-")
    if key not in STUDIES:
        raise ConfigError(f"unknown study {name!r}{did_you_mean(key, STUDIES)}",
                          hint=f"choose one of: {', '.join(STUDIES)}")
    return STUDIES[key]
