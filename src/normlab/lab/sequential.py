"""The level verdicts use when a claim is looked at again after each added seed (power rounds).

A verdict at one look calls a difference decisive beyond ``z`` standard errors (one-sided tail
``Phi(-z)``; :mod:`normlab.lab.analysis` uses ``z = 2``, 2.28%). Power rounds judge a claim at
``first`` seeds per point, add a seed to each of its points and judge it again, up to ``last``:
every look is another chance for two equal points to cross the line, so the chance that they
ever do is larger than ``Phi(-z)`` (for 2 to 8 seeds, 6.9% at ``z = 2`` for normal data of
known sd).

:func:`boundary` returns the level for those looks: O'Brien & Fleming's boundary (O'Brien &
Fleming 1979, "A multiple testing procedure for clinical trials", Biometrics 35), ``c
sqrt(last / n)`` standard errors at the look with n seeds per point, with ``c`` such that the
chance of ever crossing it is the one look's ``Phi(-z)``. It is strict at the first looks and
near ``z`` at the last (4.22 at 2 seeds, 2.98 at 4, 2.11 at 8 for looks from 2 to 8): with two
or three seeds per point Student's t is so wide that those looks rarely decide anything, so a
boundary that spends little there keeps the last looks, where claims are decided, near the
single-look level. Pocock's constant boundary (2.48 at every look from 2 to 8) decided fewer
claims: in ``scripts/verdict_error_rates.py``'s rules with a true gap of 1, 1.5 and 2 sds,
16.6%, 36.2% and 56.6% of 1000 pairs end "a lower", against 20.6%, 46.1% and 68.6% with this
boundary, which spends 0.6-1.0 more seeds per pair doing so (2.88-3.49 seeds per point
against 3.47-4.52).

With n seeds at each point the difference's sum over seeds is a random walk with a unit-variance
step per seed; this boundary is the constant ``c sqrt(last)`` on that sum. The chance of never
crossing is carried look to look on a grid of the sum (spacing ``_DW`` step sds, the cell cut by
the boundary weighted by its part below it), one convolution with the step's normal density per
added seed; ``c`` is the root of the crossing chance minus the tail. Checked against the
published constants (tests/lab/test_sequential.py): ``c`` = 1.977 for 2 looks, 2.040 for 5 and
2.087 for 10 at a two-sided 5% (Jennison & Turnbull 2000, Table 2.3), to within 1e-3, and
against simulated random walks.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
from scipy import optimize, signal
from scipy import stats as _scipy_stats

__all__ = ["boundary", "crossing_chance", "final_z"]

_DW = 0.02    # grid spacing of the random walk, in step sds (error in c below 1e-4)
_SPAN = 9.0   # the grid's lower end, in sds of the walk at the last look


def crossing_chance(c: float, first: int, last: int) -> float:
    """The chance that a difference of equal true means (normal, known sd) is ever beyond
    ``c sqrt(last / n)`` standard errors at a look with n = ``first``, ``first + 1``, ...,
    ``last`` seeds per point."""
    top = c * math.sqrt(last)  # the boundary on the sum over seeds, the same at every look
    w = np.arange(-_SPAN * math.sqrt(last), top + _DW, _DW)   # the walk's values, step sds
    below = np.clip((top - (w - _DW / 2)) / _DW, 0.0, 1.0)   # each cell's part under it
    f = _scipy_stats.norm.pdf(w, scale=math.sqrt(first)) * below
    step = _scipy_stats.norm.pdf(np.arange(-8.0, 8.0 + _DW / 2, _DW)) * _DW
    for _ in range(first + 1, last + 1):
        f = signal.fftconvolve(f, step, mode="same") * below
    return float(1.0 - f.sum() * _DW)


@functools.lru_cache(maxsize=64)
def final_z(first: int, last: int, tail: float) -> float:
    """``c``: the boundary at the last look (normal standard errors) whose chance of ever being
    crossed over looks at ``first`` to ``last`` seeds per point is ``tail``;
    ``Phi^-1(1 - tail)`` for one look (``last <= first``)."""
    if not (isinstance(first, int) and isinstance(last, int) and first >= 1):
        raise ValueError(f"looks need whole seed counts >= 1, got {first!r} to {last!r}")
    one = float(_scipy_stats.norm.isf(tail))
    if last <= first:
        return one
    return float(optimize.brentq(lambda c: crossing_chance(c, first, last) - tail,
                                 0.5 * one, one + 3.0, xtol=1e-6))


def boundary(first: int, last: int, tail: float) -> Callable[[int], float]:
    """The level at each look: ``n -> c sqrt(last / n)`` normal standard errors at n seeds per
    point (:func:`final_z`'s ``c``); ``c`` from ``last`` seeds on (a count beyond the plan is
    judged at the last look's level)."""
    c = final_z(first, last, tail)
    return lambda n: c * math.sqrt(last / min(max(int(n), 1), last))
