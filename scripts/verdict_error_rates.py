"""How often the lab's verdicts call two points of equal true error different, simulated.

Each pair: two points whose runs' errors are drawn from the same normal distribution (mean 5,
sd ``sd`` points of error). A "less" claim with margin 0 is judged by normlab.lab.analysis's
own functions: at a fixed seed count (one look), or as power rounds do (lab/power.py): judged
at ``first`` seeds per point, then after each added seed until it is decided, its observed
spread would need more than ``last`` seeds, or ``last`` is reached. The rate is the fraction of
pairs that end "a lower" (reproduced), the error the level ``Phi(-Z)`` = 2.28% is meant to
bound. Printed per cell: the rate at the single-look level Z at every look and at the
sequential level (``level_for((first, last))``: O'Brien & Fleming's boundary), and with
``--gap G`` the rates for true means G sds apart (how often each level decides the claim,
and the mean seeds per point it took). The numbers quoted in analysis.py's docstring come from

    python scripts/verdict_error_rates.py --pairs 4000
"""

from __future__ import annotations

import argparse
import math
import statistics

import numpy as np

from normlab.lab.analysis import (INCONCLUSIVE, REPRODUCED, SD_FLOOR, Level, level_for,
                                  one_look, seeds_needed, verdict)
from normlab.lab.studies import Claim

CLAIM = Claim("a beats b", "less", ("a", 0), ("b", 0), 0.0)


def _stats(values: np.ndarray) -> dict:
    vals = [float(v) for v in values]
    n = len(vals)
    sd = statistics.stdev(vals) if n > 1 else None
    se = max(sd, SD_FLOOR) / math.sqrt(n) if sd is not None else float("nan")
    return {"mean": statistics.fmean(vals), "sd": sd, "n": n, "values": vals, "excluded": [],
            "se": se}


def ends_lower(a: np.ndarray, b: np.ndarray, first: int, last: int, level: Level
               ) -> tuple[bool, int]:
    """Whether power rounds from ``first`` to ``last`` seeds end with the claim "a lower"
    reproduced, on the seeds' errors ``a`` and ``b`` (at least ``last`` each), and the seeds per
    point they took."""
    for n in range(first, last + 1):
        stats = {("a", 0): _stats(a[:n]), ("b", 0): _stats(b[:n])}
        v, _ = verdict(CLAIM, stats, level)
        if v != INCONCLUSIVE:
            return v == REPRODUCED, n
        need = seeds_needed(CLAIM, stats, level)
        if need is not None and need > last:
            return False, n  # out of reach within last: the rounds leave it open
    return False, last


def lower_rate(sd: float, first: int, last: int, level: Level, pairs: int, gap: float = 0.0,
               seed: int = 0) -> tuple[float, float]:
    """(the fraction of ``pairs`` that end "a lower", the mean seeds per point), b's true mean
    ``gap`` sds above a's."""
    rng = np.random.default_rng(seed)
    hits = seeds = 0
    for _ in range(pairs):
        a, b = 5.0 + sd * rng.standard_normal((2, last))
        hit, n = ends_lower(a, b + gap * sd, first, last, level)
        hits += hit
        seeds += n
    return hits / pairs, seeds / pairs


def error_rate(sd: float, first: int, last: int, level: Level, pairs: int, seed: int = 0
               ) -> float:
    """The fraction of ``pairs`` equal pairs that end "a lower"."""
    return lower_rate(sd, first, last, level, pairs, 0.0, seed)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--sds", type=float, nargs="+", default=[0.3, 0.5, 1.0, 2.0])
    p.add_argument("--gap", type=float, default=0.0, help="true gap between the means, in sds")
    args = p.parse_args()
    cells = [(n, n) for n in (2, 3, 5)] + [(2, 8), (3, 8), (2, 16)]
    print(f"gap {args.gap} sd(s)")
    print("first-last seeds | sd | sequential z, first to last look | 'a lower' at Z=2 (seeds) "
          "| 'a lower' at the sequential level (seeds)")
    for first, last in cells:
        level = level_for((first, last))
        for sd in args.sds:
            r1, n1 = lower_rate(sd, first, last, one_look, args.pairs, args.gap)
            r2, n2 = ((r1, n1) if level is one_look else
                      lower_rate(sd, first, last, level, args.pairs, args.gap))
            print(f"{first}-{last} | {sd} | {level(first):.2f}-{level(last):.2f} | "
                  f"{r1:.2%} ({n1:.2f}) | {r2:.2%} ({n2:.2f})", flush=True)


if __name__ == "__main__":
    main()
