"""The level verdicts use when a claim is looked at again after each added seed (power rounds).

A verdict at one look calls a difference decisive beyond ``z`` standard errors (one-sided tail
``Phi(-z)``; :mod:`normlab.lab.analysis` uses ``z = 2``, 2.28%). Power rounds judge a claim at
``first`` seeds per point, add a seed to each of its points and judge it again, up to ``last``:
every look is another chance for two equal points to cross the line, so the chance that they
ever do is larger than ``Phi(-z)`` (for 2 to 8 seeds, 6.9% at ``z = 2`` for normal data of
known sd).

:func:`sequential_z` returns the constant boundary ``c`` over those looks (Pocock's design, one
boundary for every look: Pocock 1977, "Group sequential methods in the design and analysis of
clinical trials", Biometrika 64) such that the chance of ever crossing it is the one look's
``Phi(-z)``. With n seeds at each point the difference's sum over seeds is a random walk with a
unit-variance step per seed; the look at n seeds crosses when that sum exceeds ``c sqrt(n)``.
The chance of never crossing is carried look to look on a grid of the sum (spacing ``_DW`` step
sds, a cell cut by the boundary weighted by its part below it), one convolution with the step's
normal density per added seed; ``c`` is the root of the crossing chance minus the tail. Checked
against Pocock's published constants (tests/lab/test_sequential.py): 2.178 for 2 looks, 2.413
for 5 and 2.555 for 10 at a two-sided 5%, to within 1e-3.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import optimize, signal
from scipy import stats as _scipy_stats

__all__ = ["sequential_z", "crossing_chance"]

_DW = 0.02    # grid spacing of the random walk, in step sds (error in c below 1e-4)
_SPAN = 9.0   # the grid's lower end, in sds of the walk at the last look


def crossing_chance(c: float, first: int, last: int) -> float:
    """The chance that a difference of equal true means (normal, known sd) is ever beyond ``c``
    standard errors at a look with ``first``, ``first + 1``, ..., ``last`` seeds per point."""
    top = c * math.sqrt(last)
    w = np.arange(-_SPAN * math.sqrt(last), top + _DW, _DW)   # the walk's values, step sds

    def below(n: int) -> np.ndarray:  # each cell's part under the boundary at n seeds
        return np.clip((c * math.sqrt(n) - (w - _DW / 2)) / _DW, 0.0, 1.0)

    f = _scipy_stats.norm.pdf(w, scale=math.sqrt(first)) * below(first)
    step = _scipy_stats.norm.pdf(np.arange(-8.0, 8.0 + _DW / 2, _DW)) * _DW
    for n in range(first + 1, last + 1):
        f = signal.fftconvolve(f, step, mode="same") * below(n)
    return float(1.0 - f.sum() * _DW)


@functools.lru_cache(maxsize=64)
def sequential_z(first: int, last: int, tail: float) -> float:
    """The boundary ``c`` (normal standard errors) whose chance of ever being crossed over looks
    at ``first`` to ``last`` seeds per point is ``tail``; ``Phi^-1(1 - tail)`` for one look
    (``last <= first``)."""
    if not (isinstance(first, int) and isinstance(last, int) and first >= 1):
        raise ValueError(f"looks need whole seed counts >= 1, got {first!r} to {last!r}")
    one = float(_scipy_stats.norm.isf(tail))
    if last <= first:
        return one
    return float(optimize.brentq(lambda c: crossing_chance(c, first, last) - tail,
                                 one, one + 3.0, xtol=1e-6))
