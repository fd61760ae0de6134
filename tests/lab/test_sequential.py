"""The sequential level (lab/sequential.py) against published constants and simulation, and the
verdicts at it (its use by power rounds and the report: test_power.py)."""

import importlib.util
import os

import numpy as np
import pytest

from normlab.lab.analysis import (INCONCLUSIVE, REPRODUCED, TAIL, Z, level_z, seeds_needed,
                                  verdict)
from normlab.lab.sequential import crossing_chance, sequential_z
from normlab.lab.studies import Claim

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.parametrize("looks, pocock", [
    (2, 2.178),   # Pocock (1977), two-sided 5%: the constant for 2 equally spaced looks
    (5, 2.413),   # ... 5 looks
    (10, 2.555),  # ... 10 looks
])
def test_the_boundary_is_pococks_for_equally_spaced_looks(looks, pocock):
    """Looks after seed 1, 2, ..., K are equally spaced; a one-sided 2.5% boundary is the
    two-sided 5% one (the chance of crossing both ways is negligible)."""
    assert sequential_z(1, looks, 0.025) == pytest.approx(pocock, abs=1e-3)


def test_the_crossing_chance_matches_a_simulated_random_walk():
    """An independent check of the grid recursion: 400k random walks of 8 unit steps, looked
    at after step 2 to 8 (the power rounds' default schedule), at the single-look z = 2 and at
    the sequential boundary."""
    rng = np.random.default_rng(1)
    walks = np.cumsum(rng.standard_normal((400_000, 8)), axis=1)[:, 1:]  # after 2..8 steps
    zs = walks / np.sqrt(np.arange(2, 9))
    c = sequential_z(2, 8, TAIL)
    for level in (2.0, c):
        simulated = float((zs > level).any(axis=1).mean())  # MC sd below 4e-4
        assert crossing_chance(level, 2, 8) == pytest.approx(simulated, abs=1.5e-3)
    assert crossing_chance(c, 2, 8) == pytest.approx(TAIL, abs=1e-5)
    assert crossing_chance(2.0, 2, 8) > 2.5 * TAIL  # the inflation the level corrects


def test_one_look_is_the_single_look_level_and_bad_looks_are_named():
    assert level_z(None) == Z and level_z((3, 3)) == Z
    assert sequential_z(4, 2, TAIL) == pytest.approx(Z)
    assert Z < level_z((3, 8)) < level_z((2, 8)) < level_z((2, 16))  # more looks, higher bar
    with pytest.raises(ValueError, match="got 0 to 8"):
        sequential_z(0, 8, TAIL)


def _rates_script():
    spec = importlib.util.spec_from_file_location(
        "verdict_error_rates", os.path.join(ROOT, "scripts", "verdict_error_rates.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_power_rounds_at_the_sequential_level_call_equal_points_different_as_rarely_as_one_look():
    """The verdicts' own rule (Student's t, floored sds), equal points of sd 1, rounds from 2 to
    8 seeds: at z = 2 about 3.9% of pairs end 'a lower', at the sequential level about 0.9%
    (analysis.py's docstring: 4000 pairs per cell), within one look's 2.28% (binomial sd at
    800 pairs: 0.5%)."""
    rates = _rates_script()
    at_z = rates.error_rate(1.0, 2, 8, Z, pairs=800)
    at_seq = rates.error_rate(1.0, 2, 8, level_z((2, 8)), pairs=800)
    assert at_seq <= TAIL + 0.01 and at_z >= at_seq + 0.02


def test_a_gap_decisive_at_one_look_stays_open_at_the_sequential_level():
    c = Claim("a beats b", "less", ("a", 0), ("b", 0), 0.0)
    stats = {("a", 0): {"mean": 2.0, "sd": 0.5, "n": 4, "excluded": []},
             ("b", 0): {"mean": 2.9, "sd": 0.5, "n": 4, "excluded": []}}
    # h = t(df 6) x 0.354: 2.52 x 0.354 = 0.89 at z = 2, 3.4 x 0.354 = 1.2 at 2.48
    assert verdict(c, stats)[0] == REPRODUCED
    z = level_z((2, 8))
    assert verdict(c, stats, z)[0] == INCONCLUSIVE
    assert seeds_needed(c, stats, z) > seeds_needed(c, {k: {**v, "n": 2} for k, v in
                                                         stats.items()}) >= 4
