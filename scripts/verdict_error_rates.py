"""How often the lab's verdicts call two points of equal true error different, simulated.

Each pair: two points whose runs' errors are drawn from the same normal distribution (mean 5,
sd ``sd`` points of error). A "less" claim with margin 0 is judged by normlab.lab.analysis's
own functions: at a fixed seed count (one look), or as power rounds do (lab/power.py): judged
at ``first`` seeds per point, then after each added seed until it is decided, its observed
spread would need more than ``last`` seeds, or ``last`` is reached. The rate is the fraction of
pairs that end "a lower" (reproduced), the error the level ``Phi(-Z)`` = 2.28% is meant to
bound. Printed per cell: the rate at the single-look level Z and at the sequential level
(``level_z((first, last))``). The numbers quoted in analysis.py's docstring come from

    python scripts/verdict_error_rates.py --pairs 4000
"""

from __future__ import annotations

import argparse
import math
import statistics

import numpy as np

from normlab.lab.analysis import (REPRODUCED, INCONCLUSIVE, SD_FLOOR, Z, level_z, seeds_needed,
                                  verdict)
from normlab.lab.studies import Claim

CLAIM = Claim("a beats b", "less", ("a", 0), ("b", 0), 0.0)


def _stats(values: np.ndarray) -> dict:
    vals = [float(v) for v in values]
    n = len(vals)
    sd = statistics.stdev(vals) if n > 1 else None
    se = max(sd, SD_FLOOR) / math.sqrt(n) if sd is not None else float("nan")
    return {"mean": statistics.fmean(vals), "sd": sd, "n": n, "values": vals, "excluded": [],
            "se": se}


def ends_lower(a: np.ndarray, b: np.ndarray, first: int, last: int, z: float) -> bool:
    """Whether power rounds from ``first`` to ``last`` seeds end with the claim "a lower"
    reproduced, on the seeds' errors ``a`` and ``b`` (at least ``last`` each)."""
    for n in range(first, last + 1):
        stats = {("a", 0): _stats(a[:n]), ("b", 0): _stats(b[:n])}
        v, _ = verdict(CLAIM, stats, z)
        if v != INCONCLUSIVE:
            return v == REPRODUCED
        need = seeds_needed(CLAIM, stats, z)
        if need is not None and need > last:
            return False  # out of reach within last: the rounds leave it open
    return False


def error_rate(sd: float, first: int, last: int, z: float, pairs: int, seed: int = 0) -> float:
    """The fraction of ``pairs`` equal pairs that end "a lower"."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(pairs):
        a, b = 5.0 + sd * rng.standard_normal((2, last))
        hits += ends_lower(a, b, first, last, z)
    return hits / pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--sds", type=float, nargs="+", default=[0.3, 0.5, 1.0, 2.0])
    args = p.parse_args()
    cells = [(n, n) for n in (2, 3, 5)] + [(2, 8), (3, 8), (2, 16)]
    print("first-last seeds | sd | z sequential | rate at Z=2 | rate at sequential z")
    for first, last in cells:
        zs = level_z((first, last))
        for sd in args.sds:
            r1 = error_rate(sd, first, last, Z, args.pairs)
            r2 = error_rate(sd, first, last, zs, args.pairs) if zs != Z else r1
            print(f"{first}-{last} | {sd} | {zs:.3f} | {r1:.2%} | {r2:.2%}", flush=True)


if __name__ == "__main__":
    main()
