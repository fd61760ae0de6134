"""The report's signal-propagation section: the figure (measured curves, the analytic variance
dashed beside them) and a verdict per documented shape, computed from the stored numbers.

Each claim of Brock, De & Smith (ICLR 2021; REFERENCE section 3) applies to the models of one
kind (:func:`normlab.spp.describe`, recorded by ``normlab spp``); every such model gets a row.
"Blocks" are the residual blocks (depth >= 1; the stem is depth 0); a *stage* is the blocks
under one parent module (``stages.1.*``); a *transition* is a block where the analytic
variance does not rise (a projection shortcut resets it; it *drops* unless the block before was
a reset too, as in one-block stages).

* **follows the analytic variance**: at every block the measured average channel variance is
  within :data:`ANALYTIC_TOLERANCE` (relative) of the analytic ``1 + k alpha^2``, the measured
  variance drops wherever the analytic one drops, and it rises over every run of two or more
  blocks between transitions.
* **mean shift grows**: the average squared channel mean at the last block is at least
  :data:`GROWTH` times the one at the first block, and it rises over every stage.
* **explodes**: the average channel variance or the squared mean at the last block is at least
  :data:`EXPLOSION` times the one at the first block.

Each is **reproduced** when its condition holds and **not reproduced** otherwise (the
measurement is one deterministic batch: there is no spread to be inconclusive about); a claim
with no model of its kind in the store is **not run**, and so is a model whose records lack a
measured value (named in its row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from normlab import spp as spp_mod
from normlab.lab.markdown import md_cell
from normlab.lab.outfiles import staged

__all__ = ["spp_section", "SPP_CLAIMS", "ANALYTIC_TOLERANCE", "GROWTH", "EXPLOSION", "OTHER_KIND"]

ANALYTIC_TOLERANCE = 0.2   # relative deviation of the measured from the analytic variance
GROWTH = 2.0               # squared mean, last block / first block, for "grows"
EXPLOSION = 100.0          # last block / first block, for "explodes"

REPRODUCED, NOT_REPRODUCED, NOT_RUN = "reproduced", "not reproduced", "not run"
SOURCE = "Brock, De & Smith, ICLR 2021"

Records = list[dict]


def _blocks(recs: Records) -> Records:
    return [r for r in recs if r["depth"] >= 1]


def _stages(blocks: Records) -> list[Records]:
    """Consecutive blocks under one parent module (``stages.1.0``, ``stages.1.1``, ...)."""
    out: list[Records] = []
    for r in blocks:
        parent = r["name"].rpartition(".")[0]
        if out and out[-1][0]["name"].rpartition(".")[0] == parent:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def _rises(stages: list[Records], key: str) -> tuple[int, int]:
    """(stages whose last block exceeds their first in ``key``, stages of >= 2 blocks)."""
    long = [s for s in stages if len(s) >= 2]
    return sum(s[-1][key] > s[0][key] for s in long), len(long)


def follows_analytic(recs: Records) -> tuple[str, str]:
    blocks = [r for r in _blocks(recs) if r.get("expected_var") is not None]
    if not blocks:
        return NOT_RUN, ("no analytic variance recorded (a model it does not describe, e.g. "
                         "one with the ImageNet max-pool stem; or an older store: re-run "
                         "`normlab spp` on this model)")
    dev = max(blocks, key=lambda r: abs(r["avg_var"] / r["expected_var"] - 1))
    worst = dev["avg_var"] / dev["expected_var"] - 1
    # a reset after a reset (one-block stages) leaves the analytic variance equal, not lower:
    # it still ends a run of growth, but the measured variance need not drop there
    trans = [i for i in range(1, len(blocks))
             if blocks[i]["expected_var"] <= blocks[i - 1]["expected_var"]]
    drops = [i for i in trans if blocks[i]["expected_var"] < blocks[i - 1]["expected_var"]]
    resets = sum(blocks[i]["avg_var"] < blocks[i - 1]["avg_var"] for i in drops)
    # stages as the analytic curve has them: runs of blocks between transitions
    cuts = [0] + trans + [len(blocks)]
    segments = [blocks[a:b] for a, b in zip(cuts, cuts[1:])]
    up, n_up = _rises(segments, "avg_var")
    ok = abs(worst) <= ANALYTIC_TOLERANCE and resets == len(drops) and up == n_up
    why = (f"measured / analytic variance {min(r['avg_var'] / r['expected_var'] for r in blocks):.2f}"
           f"-{max(r['avg_var'] / r['expected_var'] for r in blocks):.2f} (largest deviation "
           f"{worst:+.0%} at {dev['name']}: {dev['avg_var']:.3g} vs {dev['expected_var']:.3g}; "
           f"tolerance {ANALYTIC_TOLERANCE:.0%}); drops at {resets}/{len(drops)} transitions; "
           f"rises over {up}/{n_up} stages")
    return (REPRODUCED if ok else NOT_REPRODUCED), why


def mean_shift_grows(recs: Records) -> tuple[str, str]:
    blocks = _blocks(recs)
    if len(blocks) < 2:
        return NOT_RUN, "fewer than two residual blocks measured"
    first, last = blocks[0], blocks[-1]
    ratio = last["avg_sq_mean"] / max(first["avg_sq_mean"], 1e-300)
    up, n_up = _rises(_stages(blocks), "avg_sq_mean")
    ok = ratio >= GROWTH and up == n_up
    why = (f"squared mean {first['avg_sq_mean']:.3g} at {first['name']} -> "
           f"{last['avg_sq_mean']:.3g} at {last['name']} ({ratio:.3g}x; grows means >= "
           f"{GROWTH:g}x); rises over {up}/{n_up} stages")
    return (REPRODUCED if ok else NOT_REPRODUCED), why


def _explodes(keys: tuple[str, ...]) -> Callable[[Records], tuple[str, str]]:
    """The check "explodes": some quantity in ``keys`` grows >= EXPLOSION x over the blocks."""
    names = {"avg_var": "variance", "avg_sq_mean": "squared mean"}

    def check(recs: Records) -> tuple[str, str]:
        blocks = _blocks(recs)
        if len(blocks) < 2:
            return NOT_RUN, "fewer than two residual blocks measured"
        first, last = blocks[0], blocks[-1]
        ratios = {k: last[k] / max(first[k], 1e-300) for k in ("avg_var", "avg_sq_mean")}
        ok = max(ratios[k] for k in keys) >= EXPLOSION
        why = f"from {first['name']} to {last['name']}: " + ", ".join(
            f"{names[k]} {first[k]:.3g} -> {last[k]:.3g} ({ratios[k]:.3g}x)" for k in ratios)
        return (REPRODUCED if ok else NOT_REPRODUCED), why + (
            f"; explodes means the {' or '.join(names[k] for k in keys)} grows >= {EXPLOSION:g}x")
    return check


#: the kind ``normlab spp`` records for a model :func:`normlab.spp.describe` does not classify
#: (a timm ResNet, say): measured and drawn, with no documented shape to check
OTHER_KIND = "none of the documented kinds"


@dataclass(frozen=True)
class SPPClaim:
    text: str
    architecture: str                     # the model kind it applies to (spp.describe)
    check: Callable[[Records], tuple[str, str]]
    example: str                          # a `normlab spp` model that is of that kind


SPP_CLAIMS = (
    SPPClaim("NF-ResNet + Scaled WS: the variance follows the analytic 1 + l*alpha^2 and resets "
             "at transitions", "NF + Scaled WS", follows_analytic, "nf_resnet56"),
    SPPClaim("BN-ReLU-Conv: the mean shift (average squared channel mean) grows with depth",
             "BN-ReLU-Conv", mean_shift_grows, "preact_resnet56"),
    SPPClaim("Unnormalized ResNet with He init: the signal explodes with depth",
             "no normalization (He init)", _explodes(("avg_var", "avg_sq_mean")),
             "preact_resnet56:norm=none"),
    # REFERENCE 3 says "explodes"; at CIFAR depths it grows 23-109x over seeds (tests/test_spp.py),
    # so the claim checked is the growth, not a threshold the paper does not give
    SPPClaim("NF-ResNet with He init (no Scaled WS): the mean shift grows with depth",
             "NF + He init", mean_shift_grows, "nf_resnet56:std_conv=false"),
)


def _unmeasured(recs: Records) -> Optional[str]:
    """Why a model's records cannot be judged: the first block whose measured variance or
    squared mean the store does not hold (a non-finite measurement is stored as NULL)."""
    for r in _blocks(recs):
        for key in ("avg_var", "avg_sq_mean"):
            if r[key] is None:
                return f"no measured {key} at {r['name']} (not finite when measured, or missing)"
    return None


def _architecture(recs: Records) -> Optional[str]:
    return next((r.get("architecture") for r in recs if r.get("architecture")), None)


def _models_text(records: dict[str, Records], kinds: dict[str, Optional[str]]) -> str:
    """The models with their kinds and the input they were measured on: once when every model
    had the same input, else per model (separate ``normlab spp`` calls into one --out)."""
    inputs = {m: next((r.get("measured_on") for r in recs if r.get("measured_on")), None)
              for m, recs in records.items()}
    same = len(set(inputs.values())) == 1 and None not in inputs.values()

    def one(m: str) -> str:
        kind = md_cell(kinds[m] or "kind not recorded")
        return f"{md_cell(m)} ({kind})" if same else (
            f"{md_cell(m)} ({kind}; {md_cell(inputs[m] or 'input not recorded')})")

    if not any(inputs.values()):  # a store from before the input was recorded
        return ("Models: " + ", ".join(f"{md_cell(m)} ({md_cell(kinds[m] or 'kind not recorded')})"
                                       for m in records) + "; the input was not recorded.")
    models = ", ".join(one(m) for m in records)
    if same:
        return (f"Models: {models}; input (unit-Gaussian): "
                f"{md_cell(next(iter(inputs.values())))}.")
    return (f"Models, measured on different inputs (the curves and verdicts depend on the "
            f"batch and resolution: re-run `normlab spp` with one --batch, --resolution and "
            f"--seed to compare them): {models}.")


def spp_section(records: dict[str, Records], fig_dir: Path) -> list[str]:
    """The report's section for the stored signal-propagation ``records`` (by model); draws
    ``fig_dir/spp.png``."""
    with staged(fig_dir) as stage:  # renamed into fig_dir: a planted link is replaced
        spp_mod.plot(records, stage / "spp.png")
    kinds = {m: _architecture(recs) for m, recs in records.items()}
    lines = ["## Signal propagation at initialization", "",
             "Brock, De & Smith, ICLR 2021: average channel squared "
             "mean, average channel variance and residual-branch variance at the stem and every "
             "residual block, unit-Gaussian input (`normlab spp`). "
             + _models_text(records, kinds),
             "", "The fourth panel, for the models that have one, draws the analytic variance "
             "1 + k*alpha^2 (k blocks since the last transition; dashed) beside the measured one.",
             "",
             "![spp](figures/spp.png)", "",
             "| claim | model | verdict | numbers |", "|---|---|---|---|"]
    for c in SPP_CLAIMS:
        models = [m for m, k in kinds.items() if k == c.architecture]
        if not models:
            lines.append(f"| {c.text} | - | **{NOT_RUN}** | no model of the kind "
                         f"{c.architecture!r} measured (e.g. `normlab spp {c.example}`) |")
        for m in models:
            gap = _unmeasured(records[m])
            v, why = (NOT_RUN, gap) if gap else c.check(records[m])
            lines.append(f"| {c.text} | {md_cell(m)} | **{v}** | {md_cell(why)} |")
    unknown = [m for m, k in kinds.items() if k is None]
    if unknown:
        lines += ["", "The kind of " + ", ".join(md_cell(m) for m in unknown) + " was not "
                  "recorded (a store from before kinds were): re-run `normlab spp` on it for its "
                  "verdicts."]
    return lines + ["", f"Source of the claims: {SOURCE}; thresholds: analytic within "
                    f"{ANALYTIC_TOLERANCE:.0%}, grows >= {GROWTH:g}x, explodes >= "
                    f"{EXPLOSION:g}x (normlab.lab.spp_verdicts).", ""]
