"""What a study's runs say: which runs count, each point's statistics, each claim's verdict, and
how many seeds would decide a claim that is still open.

Runs that count: a finished run is **flagged** and left out of its point's mean (kept in the
store and listed in the point's ``excluded``) when it

* diverged (a non-finite training loss ended it: the trainer records ``error``), or
* did not learn: its final training loss is not below its start (``ln(num_classes)``, the loss
  of a uniform guess, or the first epoch's mean loss when the run had more than one epoch), or
  its final test error is within ``100 * (1 - CHANCE_FRACTION)`` % of chance
  (``100 * (1 - 1/num_classes)``; e.g. >= 81% for 10 classes).

Statistics of a point (series, x) over its kept seeds: mean m, sample sd s, n, and the standard
error ``se = max(s, SD_FLOOR) / sqrt(n)`` (n >= 2) or ``SD_ONE_SEED``, infinite (n = 1: one
seed says nothing about the spread, so no difference with such a point is decisive: an
assumed spread was once used there, and on data with errors of 10-50% it called one-seed
gaps of a few points decisive). ``bar`` is ``m ± s`` clipped to
[0, 100] (an error rate has no negative values). For two points, ``d = m_b - m_a``,
``se_d = sqrt(se_a^2 + se_b^2)`` and the half-width ``h = t se_d``; a verdict is decisive when
``d ± h`` settles it. ``t`` is Student's t quantile at the one-sided tail of ``Z`` = 2 normal
standard errors (2.28%), with Welch-Satterthwaite degrees of freedom from the two points'
(floored) sds and seeds: 4.5 at 2 seeds per point, 2.9 at 3, 2.4 at 5, 2.0 with many (equal
sds). A normal ``Z se_d`` at 2-3 seeds called 5-9% of equal pairs decisive where 2.3% was meant;
with t, 0.2-2.6% (simulated: 4000 pairs of equal true means per cell, 2-8 seeds, sd 0.5-2).

Power rounds (lab/power.py) look at a claim again after each added seed, and every look is
another chance to cross: judged at ``Z`` from 2 to 8 seeds one round at a time, 1.3-4.2% of
equal pairs end "a lower" (sd 0.3-2), and 2.9-5.8% from 2 to 16. So where rounds may run,
every verdict uses ``level_for(looks)``: t at the one-sided tail of O'Brien & Fleming's
boundary for looks after each seed from ``looks[0]`` to ``looks[1]`` seeds per point, taken
at the seeds of the look (the fewer of the two points'), whose chance of ever being crossed by
equal points is one look's ``Phi(-Z)`` (:mod:`normlab.lab.sequential`: for 2 to 8 seeds, 4.22
normal standard errors at 2, 2.98 at 4, 2.11 at 8). Simulated with this module's rules
(``scripts/verdict_error_rates.py --pairs 4000``: 4000 pairs per cell, sd 0.3-2), 0.45-0.80%
of equal pairs then end "a lower" from 2 to 8 seeds, 0.53-0.95% from 3 to 8 and 0.45-0.65%
from 2 to 16 (one look at 2, 3 or 5 seeds: 0-2.25%). Each claim is its own test: nothing
corrects across the claims of a study, so the chance that some claim among k whose points are
truly equal comes out decided grows with k (up to k times one claim's). The rules:

* ``less`` (error(a) < error(b) by >= margin): **reproduced** if ``d - h > 0`` and
  ``d - h >= margin`` (the whole interval clears the margin; within float rounding,
  ``BOUNDARY``, of it counts); **not reproduced** if ``d + h < margin``; else **inconclusive**.
  A d exactly at the margin is on the boundary: no seed count decides it.
* ``match`` (|a - b| <= margin): reproduced if ``|d| + h <= margin``; not reproduced if
  ``|d| - h > margin``; else inconclusive.
* ``flat``: ``match`` of every point of the series with the reference point; reproduced if all
  are, not reproduced if any is not, else inconclusive.
* ``best`` / ``worst``: not reproduced if another point is better / worse beyond the interval;
  reproduced if a is separated from every other point; else inconclusive.

Seeds needed (:func:`seeds_needed`): with the observed sds (floored) held fixed and n seeds at
each point, ``se_d = sqrt(s_a^2 + s_b^2) / sqrt(n)``, and an inconclusive ``less``/``match``
claim becomes decisive once ``h = t se_d`` (t at the degrees of freedom of n seeds each) is
below the distance ``g`` from d to the boundary it must clear (``|d - margin|`` for ``less``,
``|margin - |d||`` for ``match``):
the smallest such n (about ``Z^2 (s_a^2 + s_b^2) / g^2`` when it is large). A
``flat``/``best``/``worst`` claim takes that count for each point against a: the smallest over
the points that decide the claim alone (outside the tolerance; a rival on the wrong side of a),
when there are any, else the largest (every point must be separated). None when a point has a
single seed (no spread to extrapolate) or when d sits on the boundary.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Iterable, Optional, Sequence

from scipy import stats as _scipy_stats

from normlab.lab.sequential import boundary
from normlab.lab.studies import Claim, Study

__all__ = [
    "Z", "SD_FLOOR", "SD_ONE_SEED", "CHANCE_FRACTION", "SEEDS_SHOWN", "POWER_STOPPED",
    "REPRODUCED", "NOT_REPRODUCED", "INCONCLUSIVE", "NOT_RUN", "NO_USABLE_RUN", "UNMEASURED",
    "TAIL", "Level", "num_classes",
    "run_flag", "point_stats", "difference", "interval", "critical", "one_look", "level_for",
    "setup_level", "half_width_text", "prob_lower", "verdict", "seeds_needed", "claim_points", "claims_status",
    "seeds_by_claim", "flag_kind", "flags_text",
]

Z = 2.0               # the level: the one-sided tail of 2 normal standard errors (2.28%)
SD_FLOOR = 0.25       # points of error: no spread estimate below this is trusted
SD_ONE_SEED = math.inf  # a single seed's standard error: no spread, nothing decisive
BOUNDARY = 1e-9       # points of error: a difference this close to a claim's boundary is on it
_MANY = 10**9         # a seed count beyond any plan: a level's last-look value
SEEDS_SHOWN = 1000    # seed counts above this are reported as "over 1000"
#: why a study's power rounds stopped (the ``stopped`` of lab/power.py's record), in the user's
#: words: what the command prints and the report says
POWER_STOPPED = {"decided": "every claim is decided or needs more than --max-seeds",
                 "no-claim": "none of the study's claims has its series among those run (they "
                             "add seeds to claims only: --seeds N gives every point N)",
                 "budget-runs": "the --budget-runs budget is spent (no open claim's next seeds "
                                "fit in the runs left)",
                 "budget-minutes": "the --budget-minutes budget is spent"}
CHANCE_FRACTION = 0.9  # a test error above this fraction of chance's is "near chance"

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_RUN = (
    "reproduced", "not reproduced", "inconclusive", "not run")
# a point whose runs all trained but every one was flagged (diverged, unconverged): measured,
# but nothing to judge with; as NOT_RUN, no seeds are counted or asked for
NO_USABLE_RUN = "no usable run"
UNMEASURED = (NOT_RUN, NO_USABLE_RUN)

_CLASSES = {"digits": 10, "mnist5k": 10, "cifar10": 10, "cifar100": 100}


def num_classes(run: dict[str, Any]) -> Optional[int]:
    """Classes of a stored run's dataset (from its config; the trainer's ``num_classes`` in the
    run's summary when the dataset does not fix it, e.g. an imagefolder)."""
    if run.get("num_classes"):
        return int(run["num_classes"])
    cfg = run.get("config", {})
    if cfg.get("data") == "synthetic":
        return int(cfg.get("data_kwargs", {}).get("num_classes", 10))
    return _CLASSES.get(cfg.get("data"))


def run_flag(run: dict[str, Any]) -> Optional[str]:
    """Why a finished run is left out of the means (module docstring), or None if it counts."""
    if run.get("error"):
        return f"diverged ({run['error']})"
    loss = run.get("final_train_loss")
    if loss is not None and not math.isfinite(loss):
        return "diverged (non-finite training loss)"
    c = num_classes(run)
    history = run.get("history") or []
    start = math.log(c) if c else None
    if len(history) > 1 and history[0].get("train_loss") is not None:
        first = history[0]["train_loss"]
        start = first if start is None else min(start, first)
    if start is not None and loss is not None and loss >= start:
        return f"unconverged (final train loss {loss:.3f} not below its start {start:.3f})"
    err = run.get("final_test_error")
    if c and err is not None:
        chance = 100.0 * (1 - 1 / c)
        if err >= CHANCE_FRACTION * chance:
            return f"unconverged (test error {err:.1f}% near chance, {chance:.0f}%)"
    return None


def flag_kind(flag: str) -> str:
    """The word a :func:`run_flag` flag starts with: ``diverged`` or ``unconverged``."""
    return flag.split(" ", 1)[0]


def flags_text(excluded: list[dict[str, Any]]) -> str:
    """A point's flagged runs (its ``excluded``) counted by kind, in words: ``2 unconverged``,
    ``1 diverged, 1 unconverged``; empty when none is flagged."""
    kinds = [flag_kind(e["flag"]) for e in excluded]
    return ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds)))


def point_stats(runs: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Group finished study runs (:meth:`Store.study_runs`) by (label, x): ``mean``, ``sd``
    (None below 2 seeds), ``n``, ``values`` and ``se`` over the runs that count, ``bar`` (mean ±
    sd in [0, 100]) and ``excluded``: ``{"run_id", "seed", "error", "flag"}`` of each flagged
    run. A point whose every run is flagged has mean NaN and n 0."""
    groups: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        if r.get("status") != "done" or r.get("final_test_error") is None:
            continue
        g = groups.setdefault((r["label"], r["x"]), {"values": [], "excluded": []})
        flag = run_flag(r)
        if flag:
            g["excluded"].append({"run_id": r.get("run_id"), "seed": r["config"].get("seed"),
                                  "error": r["final_test_error"], "flag": flag})
        else:
            g["values"].append(float(r["final_test_error"]))
    out = {}
    for key, g in groups.items():
        vals = g["values"]
        n = len(vals)
        mean = statistics.fmean(vals) if vals else float("nan")
        sd = statistics.stdev(vals) if n > 1 else None
        s = {"mean": mean, "sd": sd, "n": n, "values": vals, "excluded": g["excluded"]}
        s["se"] = _se(s) if n else float("nan")
        half = sd or 0.0
        s["bar"] = (max(0.0, mean - half), min(100.0, mean + half)) if n else None
        out[key] = s
    return out


def _se(s: dict) -> float:
    if s["n"] < 2 or s["sd"] is None:
        return SD_ONE_SEED
    return max(s["sd"], SD_FLOOR) / math.sqrt(s["n"])


def difference(a: dict, b: dict) -> tuple[float, float]:
    """(m_b - m_a, its standard error) of two points' statistics."""
    return b["mean"] - a["mean"], math.hypot(_se(a), _se(b))


def _phi(z: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


_LEVEL = _phi(Z)  # 0.97725
#: the chance that one look at two points of equal true error calls them different: Phi(-Z)
TAIL = 1.0 - _LEVEL


def _welch_df(va: float, na: int, vb: float, nb: int) -> float:
    """Welch-Satterthwaite degrees of freedom of se_d^2 = va/na + vb/nb (va, vb: variances)."""
    qa, qb = va / na, vb / nb
    return (qa + qb) ** 2 / (qa * qa / (na - 1) + qb * qb / (nb - 1))


def critical(df: float, z: float = Z) -> float:
    """Student's t quantile at the one-sided tail of ``z`` normal standard errors; ``z`` when df
    is infinite (a one-seed point: its spread is assumed, not estimated)."""
    if math.isinf(df):
        return z
    if z == Z:
        return float(_scipy_stats.t.ppf(_LEVEL, df))
    return float(_scipy_stats.t.isf(_scipy_stats.norm.sf(z), df))


#: the level of a verdict: seeds per point at the look -> the normal standard errors a
#: decisive difference must exceed (t is taken at that one-sided tail)
Level = Callable[[int], float]


def one_look(n: int) -> float:
    """The level of one look at the seeds: ``Z`` whatever their count."""
    return Z


def level_for(looks: Optional[Sequence[int]]) -> Level:
    """The level the verdicts use: :func:`one_look` for one look (``looks`` None, or from n to
    n seeds per point); for looks after each seed from ``looks[0]`` to ``looks[1]`` (power
    rounds), O'Brien & Fleming's boundary (:func:`normlab.lab.sequential.boundary`)."""
    if looks is None or looks[1] <= looks[0]:
        return one_look
    return boundary(int(looks[0]), int(looks[1]), TAIL)


def setup_level(info: dict[str, Any]) -> Level:
    """The level a study's verdicts use, from its stored setup info (the ``looks`` its power
    rounds recorded; one look when there are none)."""
    return level_for(info.get("power", {}).get("looks"))


def _df(a: dict, b: dict) -> float:
    """Degrees of freedom of the two points' difference: Welch's over the floored sds, or inf
    when a point has one seed (module docstring)."""
    if a["n"] < 2 or b["n"] < 2 or a["sd"] is None or b["sd"] is None:
        return math.inf
    return _welch_df(max(a["sd"], SD_FLOOR) ** 2, a["n"], max(b["sd"], SD_FLOOR) ** 2, b["n"])


def interval(a: dict, b: dict, level: Level = one_look) -> tuple[float, float, float]:
    """(d = m_b - m_a, its standard error, the half-width t se_d the verdicts use at ``level``,
    taken at the fewer of the two points' seeds)."""
    d, se = difference(a, b)
    return d, se, critical(_df(a, b), level(min(a["n"], b["n"]))) * se


def half_width_text(h: float) -> str:
    """A half-width as shown: points of error to 2 decimals; ``>100`` beyond 100 points, which
    no two error rates can differ by (an early look's level at one or two degrees of freedom
    gives t in the thousands: the interval says nothing, and its digits would not either)."""
    return f"{h:.2f}" if h <= 100.0 else ">100"


def prob_lower(a: dict, b: dict) -> float:
    """The probability that a's error is really below b's, from the t distribution of the
    difference; NaN where a point has one seed (no spread to tell it)."""
    d, se = difference(a, b)
    if math.isinf(se):
        return math.nan
    if not se > 0:
        return 1.0 if d > 0 else 0.5
    df = _df(a, b)
    z = d / se
    return _phi(z) if math.isinf(df) else float(_scipy_stats.t.cdf(z, df))


def _diff(a: dict, b: dict, level: Level) -> tuple[float, float]:
    """(d, half-width) of two points: what every verdict tests."""
    d, _, h = interval(a, b, level)
    return d, h


def _meets(low: float, margin: float) -> bool:
    """low >= margin, where a value within float rounding (BOUNDARY) of the margin meets it: on
    1000 test images 1.4 - 0.4 is 0.9999999999999999, 10 images wrong, exactly 1 point."""
    return low >= margin - BOUNDARY


def _match(a: dict, b: dict, margin: float, level: Level) -> str:
    d, h = _diff(a, b, level)
    if abs(d) + h <= margin:
        return REPRODUCED
    if abs(d) - h > margin:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def _get(stats: dict[tuple, dict], p: tuple) -> Optional[dict]:
    s = stats.get(tuple(p))
    return s if s is not None and s["n"] > 0 and not math.isnan(s["mean"]) else None


def _rivals(claim: Claim, stats: dict[tuple, dict]) -> dict[tuple, dict]:
    return {k: s for k, s in stats.items() if k != tuple(claim.a) and _get(stats, k)
            and (claim.kind == "best" or k[0] == claim.a[0])}


def verdict(claim: Claim, stats: dict[tuple, dict], level: Level = one_look
            ) -> tuple[str, str]:
    """(verdict, the numbers it rests on) for ``claim`` given :func:`point_stats` output, at
    ``level`` (:func:`level_for`). A flat/best/worst claim names the points it compares with
    whose every run was flagged: they are left out, and the numbers say so rather than the range
    silently shrinking."""
    v, why = _verdict(claim, stats, level)
    if claim.kind not in ("flat", "best", "worst"):
        return v, why
    gone = [(k, s) for k, s in stats.items() if k != tuple(claim.a) and s["n"] == 0
            and s["excluded"] and (claim.kind == "best" or k[0] == claim.a[0])]
    if not gone:
        return v, why
    return v, why + "; every run flagged, left out: " + ", ".join(
        f"{k[0]}@{k[1]} ({flags_text(s['excluded'])})" for k, s in gone)


def _missing(stats: dict[tuple, dict], p: tuple) -> tuple[str, str]:
    """(verdict, why) for a claim whose point ``p`` has no mean: never finished (not run), or
    every run of it flagged (no usable run)."""
    s = stats.get(tuple(p))
    if s is not None and s.get("excluded"):
        return NO_USABLE_RUN, (f"every run of {p[0]} at {p[1]} flagged, left out "
                               f"({flags_text(s['excluded'])})")
    return NOT_RUN, f"no finished run of {p[0]} at {p[1]}"


def _verdict(claim: Claim, stats: dict[tuple, dict], level: Level) -> tuple[str, str]:
    a = _get(stats, claim.a)
    if a is None:
        return _missing(stats, claim.a)
    if claim.kind in ("less", "match"):
        b = _get(stats, claim.b)
        if b is None:
            return _missing(stats, claim.b)
        d, h = _diff(a, b, level)
        why = (f"{claim.a[0]}@{claim.a[1]} {a['mean']:.2f} vs {claim.b[0]}@{claim.b[1]} "
               f"{b['mean']:.2f}: difference {d:+.2f} ± {half_width_text(h)}")
        if claim.kind == "match":
            return _match(a, b, claim.margin, level), why + f" (tolerance {claim.margin})"
        if d - h > 0 and _meets(d - h, claim.margin):
            return REPRODUCED, why
        if d + h < claim.margin:
            return NOT_REPRODUCED, why
        return INCONCLUSIVE, why
    if claim.kind == "flat":
        series = {k[1]: s for k, s in _rivals(claim, stats).items()}
        if not series:
            return NOT_RUN, f"only one point of {claim.a[0]}"
        vs = {x: _match(a, s, claim.margin, level) for x, s in series.items()}
        means = [a["mean"]] + [s["mean"] for s in series.values()]
        dev = max(series.items(), key=lambda kv: abs(kv[1]["mean"] - a["mean"]))
        why = (f"{claim.a[0]} ranges {min(means):.2f}-{max(means):.2f}; largest gap to "
               f"{claim.a[1]}: at {dev[0]} {dev[1]['mean'] - a['mean']:+.2f} "
               f"(tolerance {claim.margin})")
        if all(v == REPRODUCED for v in vs.values()):
            return REPRODUCED, why
        if any(v == NOT_REPRODUCED for v in vs.values()):
            return NOT_REPRODUCED, why
        return INCONCLUSIVE, why
    if claim.kind in ("best", "worst"):
        others = _rivals(claim, stats)
        if not others:
            return NOT_RUN, "nothing to compare with"
        gaps, hws = _gaps(claim, a, others, level)
        beaten = min(gaps, key=lambda k: gaps[k] + hws[k])  # most clearly on the wrong side
        if gaps[beaten] + hws[beaten] < 0:
            return NOT_REPRODUCED, _rival_why(claim, a, others, beaten, gaps, hws, "rival")
        closest = min(gaps, key=gaps.get)
        why = _rival_why(claim, a, others, closest, gaps, hws, "closest rival")
        if all(g - hws[k] > 0 for k, g in gaps.items()):
            return REPRODUCED, why
        return INCONCLUSIVE, why
    raise ValueError(f"unknown claim kind {claim.kind!r}")


def _rival_why(claim: Claim, a: dict, others: dict, rival: tuple, gaps: dict, hws: dict,
               what: str) -> str:
    return (f"{claim.a[0]}@{claim.a[1]} {a['mean']:.2f}; {what} {rival[0]}@{rival[1]} "
            f"{others[rival]['mean']:.2f} "
            f"(gap {gaps[rival]:+.2f} ± {half_width_text(hws[rival])})")


def _gaps(claim: Claim, a: dict, others: dict, level: Level) -> tuple[dict, dict]:
    """gap > 0: the other point is worse (best) / better (worst) than a; and its half-width."""
    sign = 1 if claim.kind == "best" else -1
    diffs = {k: _diff(a, s, level) for k, s in others.items()}
    return {k: sign * d for k, (d, _) in diffs.items()}, {k: h for k, (_, h) in diffs.items()}


def _n_for(sa: dict, sb: dict, gap: float, level: Level) -> Optional[int]:
    """Seeds per point for t se_d < gap at the observed (floored) sds, t at the degrees of
    freedom of that many seeds at both points; None if unknowable (a gap of float rounding,
    e.g. two equal means, is on the boundary: no count decides it)."""
    if sa["n"] < 2 or sb["n"] < 2 or gap <= BOUNDARY:
        return None
    va, vb = max(sa["sd"], SD_FLOOR) ** 2, max(sb["sd"], SD_FLOOR) ** 2
    low = level(_MANY)  # the level's lowest (the last look's): the normal count below is a floor
    n = max(2, math.floor(low * low * (va + vb) / (gap * gap)) + 1)
    if n > SEEDS_SHOWN:  # t is Z there to within 0.2%: the report says "over 1000" anyway
        return n
    while critical(_welch_df(va, n, vb, n), level(n)) * math.sqrt((va + vb) / n) >= gap:
        n += 1
    return n


def seeds_needed(claim: Claim, stats: dict[tuple, dict], level: Level = one_look
                 ) -> Optional[int]:
    """Seeds per point that the observed spread would need for ``claim`` to be decisive at
    ``level`` (module docstring); the current seed count if it already is; None if not
    computable (a point with one seed or not run, or a difference exactly on the boundary)."""
    v, _ = verdict(claim, stats, level)
    if v in UNMEASURED:
        return None
    a = _get(stats, claim.a)
    if v != INCONCLUSIVE:
        return min(s["n"] for s in (_get(stats, p) for p in claim_points(claim, stats)) if s)
    if claim.kind in ("less", "match"):
        b = _get(stats, claim.b)
        d = b["mean"] - a["mean"]
        if claim.kind == "match":
            return _n_for(a, b, abs(claim.margin - abs(d)), level)
        return _n_for(a, b, abs(d - claim.margin), level)
    others = _rivals(claim, stats)
    if claim.kind == "flat":
        # > 0: the point is outside the tolerance
        out = {k: abs(s["mean"] - a["mean"]) - claim.margin for k, s in others.items()}
        open_points = [k for k in out
                       if _match(a, others[k], claim.margin, level) == INCONCLUSIVE]
    else:
        gaps, _ = _gaps(claim, a, others, level)
        out = {k: -g for k, g in gaps.items()}  # > 0: the rival is on the wrong side of a
        open_points = list(gaps)
    if max(out.values()) > 0:  # one such point separated decides the claim: the first to be
        alone = [_n_for(a, others[k], g, level) for k, g in out.items() if g > 0]
        return min((n for n in alone if n is not None), default=None)
    needs = [_n_for(a, others[k], abs(out[k]), level) for k in open_points]
    if not needs or any(n is None for n in needs):
        return None
    return max(needs)


def claim_points(claim: Claim, stats: dict[tuple, dict]) -> list[tuple]:
    """The (label, x) points a claim's verdict rests on (those more seeds would help)."""
    if claim.kind in ("less", "match"):
        return [tuple(claim.a), tuple(claim.b)]
    if claim.kind == "flat":
        return [tuple(claim.a)] + [k for k in stats if k[0] == claim.a[0] and k != tuple(claim.a)]
    return [tuple(claim.a)] + list(_rivals(claim, stats))


def claims_status(study: Study, stats: dict[tuple, dict], level: Level = one_look
                  ) -> list[dict[str, Any]]:
    """Per claim of ``study`` at ``level``: ``text``, ``verdict``, ``why``, ``seeds`` and
    ``fewest_seeds`` (the largest and smallest seed counts among its points) and
    ``seeds_needed`` (:func:`seeds_needed`)."""
    out = []
    for c in study.claims:
        v, why = verdict(c, stats, level)
        pts = [_get(stats, p) for p in claim_points(c, stats)] if v not in UNMEASURED else []
        out.append({"text": c.text, "verdict": v, "why": why,
                    "seeds": max((s["n"] for s in pts if s), default=0),
                    "fewest_seeds": min((s["n"] for s in pts if s), default=0),
                    "seeds_needed": seeds_needed(c, stats, level)})
    return out


def seeds_by_claim(study: Study, stats: dict[tuple, dict], max_seeds: int,
                   failed: Optional[dict[tuple, int]] = None, level: Level = one_look
                   ) -> list[tuple[Optional[int], dict[tuple, int]]]:
    """One power round, claim by claim: for every inconclusive claim that more seeds could
    decide, ``(seeds it needs, {(label, x): seeds that point should have})``, each of its points
    below ``max_seeds`` (and below the need, when known) getting one more seed; fewest seeds
    needed first, an unknown need last. Empty when every claim is decisive, not run, or out of
    reach within ``max_seeds``. ``failed``: runs per point that failed (not in ``stats``); their
    seeds are taken, so a point's next seed comes after them."""
    failed = failed or {}
    out = []
    for c in study.claims:
        v, _ = verdict(c, stats, level)
        if v != INCONCLUSIVE:
            continue
        need = seeds_needed(c, stats, level)
        if need is not None and need > max_seeds:
            continue  # beyond the cap: the report states the count instead
        want: dict[tuple, int] = {}
        for p in claim_points(c, stats):
            have = failed.get(p, 0) + (
                stats[p]["n"] + len(stats[p]["excluded"]) if p in stats else 0)
            if have < max_seeds and (need is None or stats.get(p, {"n": 0})["n"] < need):
                want[p] = have + 1
        if want:
            out.append((need, want))
    return sorted(out, key=lambda cw: math.inf if cw[0] is None else cw[0])
