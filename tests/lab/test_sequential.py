"""The sequential level (lab/sequential.py) against published constants and simulation, and the
verdicts at it (its use by power rounds and the report: test_power.py)."""

import importlib.util
import os

import numpy as np
import pytest

from normlab.lab.analysis import (INCONCLUSIVE, REPRODUCED, TAIL, Z, level_for, one_look,
                                  seeds_needed, verdict)
from normlab.lab.sequential import boundary, crossing_chance, final_z
from normlab.lab.studies import Claim

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.parametrize("looks, obf", [
    (2, 1.977),   # O'Brien & Fleming, two-sided 5% (Jennison & Turnbull 2000, Table 2.3): 2 looks
    (5, 2.040),   # ... 5 looks
    (10, 2.087),  # ... 10 looks
])
def test_the_boundary_is_obrien_flemings_for_equally_spaced_looks(looks, obf):
    """Looks after seed 1, 2, ..., K are equally spaced; a one-sided 2.5% boundary is the
    two-sided 5% one (the chance of crossing both ways is negligible). The constant is the
    last look's level; look k's is c sqrt(K / k)."""
    assert final_z(1, looks, 0.025) == pytest.approx(obf, abs=1e-3)
    assert boundary(1, looks, 0.025)(1) == pytest.approx(obf * looks ** 0.5, abs=3e-3)


def test_the_crossing_chance_matches_a_simulated_random_walk():
    """An independent check of the grid recursion: 400k random walks of 8 unit steps, looked
    at after step 2 to 8 (the power rounds' default schedule): the boundary c sqrt(8) on the
    walk is c sqrt(8 / n) standard errors at step n."""
    rng = np.random.default_rng(1)
    walks = np.cumsum(rng.standard_normal((400_000, 8)), axis=1)[:, 1:]  # after 2..8 steps
    c = final_z(2, 8, TAIL)
    for level in (2.0, c):
        simulated = float((walks > level * 8 ** 0.5).any(axis=1).mean())  # MC sd below 4e-4
        assert crossing_chance(level, 2, 8) == pytest.approx(simulated, abs=1.5e-3)
    assert crossing_chance(c, 2, 8) == pytest.approx(TAIL, abs=1e-5)
    # what the level corrects: 2 standard errors at every look crosses far more often
    at_two = float((walks / np.sqrt(np.arange(2, 9)) > 2.0).any(axis=1).mean())
    assert at_two > 2.5 * TAIL


def test_one_look_is_the_single_look_level_and_bad_looks_are_named():
    assert level_for(None) is one_look and level_for((3, 3)) is one_look and one_look(5) == Z
    level = level_for((2, 8))
    assert level(2) > level(4) > level(8) > Z  # strict first, near Z last
    assert level(8) == level(20) == final_z(2, 8, TAIL)  # beyond the plan: the last look's
    assert final_z(4, 2, TAIL) == pytest.approx(Z)
    with pytest.raises(ValueError, match="got 0 to 8"):
        final_z(0, 8, TAIL)


def _rates_script():
    spec = importlib.util.spec_from_file_location(
        "verdict_error_rates", os.path.join(ROOT, "scripts", "verdict_error_rates.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_power_rounds_at_the_sequential_level_call_equal_points_different_as_rarely_as_one_look():
    """The verdicts' own rule (Student's t, floored sds), equal points of sd 1, rounds from 2 to
    8 seeds: at z = 2 about 3.9% of pairs end 'a lower', at the sequential level well within
    one look's 2.28% (analysis.py's docstring: 4000 pairs per cell; binomial sd at 800 pairs:
    0.5%)."""
    rates = _rates_script()
    at_z = rates.error_rate(1.0, 2, 8, one_look, pairs=800)
    at_seq = rates.error_rate(1.0, 2, 8, level_for((2, 8)), pairs=800)
    assert at_seq <= TAIL + 0.01 and at_z >= at_seq + 0.02


def test_a_gap_decisive_at_one_look_stays_open_at_the_sequential_level():
    c = Claim("a beats b", "less", ("a", 0), ("b", 0), 0.0)
    stats = {("a", 0): {"mean": 2.0, "sd": 0.5, "n": 4, "excluded": []},
             ("b", 0): {"mean": 2.9, "sd": 0.5, "n": 4, "excluded": []}}
    # 4 seeds of looks from 2 to 8: h = t(df 6) x 0.354, t 2.52 at z = 2 (0.89 < 0.9), and
    # at the sequential level's 2.98 (4.1) 1.45
    assert verdict(c, stats)[0] == REPRODUCED
    level = level_for((2, 8))
    assert verdict(c, stats, level)[0] == INCONCLUSIVE
    assert seeds_needed(c, stats, level) > seeds_needed(c, {k: {**v, "n": 2} for k, v in
                                                             stats.items()}) >= 4
