"""analysis.py: which runs count (flags), point statistics, and the seeds a claim needs, checked
against hand-computed cases."""

import math
from types import SimpleNamespace

import pytest
from scipy import stats as stats_mod

from normlab.lab.analysis import (INCONCLUSIVE, NOT_REPRODUCED, NOT_RUN, REPRODUCED, flags_text,
                                  point_stats, run_flag, seeds_by_claim, seeds_needed, verdict)
from normlab.lab.studies import Claim, get_study


def _run(label, x, err, seed=0, loss=0.05, first=1.5, error=None, data="digits", epochs=3):
    history = [{"epoch": e, "train_loss": first if e == 0 else loss} for e in range(epochs)]
    return {"run_id": f"{label}{x}s{seed}", "status": "done", "label": label, "x": x,
            "final_test_error": err, "final_train_loss": loss, "error": error,
            "config": {"data": data, "seed": seed}, "history": history}


@pytest.mark.parametrize("kw, needle", [
    ({"error": "diverged: non-finite training loss in epoch 2"}, "diverged"),  # trainer's record
    ({"loss": math.nan}, "diverged"),                                          # loss NaN
    ({"loss": 2.4, "first": 2.6}, "not below its start 2.303"),   # above ln(10): learnt nothing
    ({"loss": 1.6, "first": 1.5}, "not below its start 1.500"),   # worse than its first epoch
    ({"err": 85.0}, "near chance"),                               # 85% >= 0.9 x 90%
])
def test_flagged_runs(kw, needle):
    err = kw.pop("err", 3.0)
    flag = run_flag(_run("BN", 2, err, **kw))
    assert flag is not None and needle in flag


def test_a_learning_run_counts_and_synthetic_chance_uses_its_class_count():
    assert run_flag(_run("BN", 2, 3.0)) is None
    assert run_flag(_run("BN", 2, 60.0, data="synthetic")) is None
    r = _run("BN", 2, 62.0, data="synthetic")
    r["config"]["data_kwargs"] = {"num_classes": 3}  # chance 66.7%: 62% is near it
    assert "near chance" in run_flag(r)


def test_point_stats_leave_flagged_runs_out_and_bars_stay_above_zero():
    runs = [_run("BN", 2, 1.0, 0), _run("BN", 2, 3.0, 1), _run("BN", 2, 85.0, 2),
            _run("GN", 2, 0.5, 0), _run("GN", 2, 0.1, 1, loss=math.inf)]
    st = point_stats(runs)
    bn, gn = st[("BN", 2)], st[("GN", 2)]
    assert bn["values"] == [1.0, 3.0] and bn["mean"] == 2.0 and bn["n"] == 2
    assert [e["seed"] for e in bn["excluded"]] == [2] and "near chance" in bn["excluded"][0]["flag"]
    assert bn["bar"] == pytest.approx((2.0 - math.sqrt(2), 2.0 + math.sqrt(2)))
    assert gn["n"] == 1 and gn["bar"] == (0.5, 0.5)
    spread = point_stats([_run("A", 1, v, s) for s, v in enumerate([0.2, 0.3, 9.0])])[("A", 1)]
    assert spread["bar"][0] == 0.0  # mean 3.2 - sd 5.0 would be below 0


def test_flags_text_counts_each_kind_in_the_flags_own_words():
    runs = [_run("GN", 2, 85.0, 0), _run("GN", 2, 86.0, 1, loss=2.4, first=2.6),
            _run("GN", 2, 3.0, 2, loss=math.nan)]
    assert flags_text(point_stats(runs)[("GN", 2)]["excluded"]) == "1 diverged, 2 unconverged"
    assert flags_text(point_stats(runs[:1])[("GN", 2)]["excluded"]) == "1 unconverged"
    assert flags_text([]) == ""


def _s(mean, sd, n):
    return {"mean": mean, "sd": sd, "n": n, "values": [], "excluded": []}


def _t_count(var_sum, gap):
    """The documented rule, computed here with scipy: the fewest seeds n per point at which
    Student's t (one-sided tail of 2 normal SEs, df 2(n - 1) for equal sds) times
    sqrt(var_sum / n) is below the gap."""
    level, n = stats_mod.norm.cdf(2.0), 2
    while stats_mod.t.ppf(level, 2 * (n - 1)) * math.sqrt(var_sum / n) >= gap:
        n += 1
    return n


def test_seeds_needed_is_the_count_at_which_the_verdict_turns_decisive():
    c = Claim("GN beats BN", "less", ("GN", 2), ("BN", 2), 0.0)
    stats = {("GN", 2): _s(10.0, 1.0, 2), ("BN", 2): _s(11.1, 1.0, 2)}
    assert verdict(c, stats)[0] == INCONCLUSIVE
    need = seeds_needed(c, stats)
    assert need == 8  # t(df 14) = 2.195: 2.195 sqrt(2/8) = 1.10 < 1.1; at 7, 2.24 x 0.53 = 1.2
    assert need == _t_count(1.0 + 1.0, 1.1)
    at = {k: _s(v["mean"], 1.0, need) for k, v in stats.items()}
    assert verdict(c, at)[0] == REPRODUCED
    before = {k: _s(v["mean"], 1.0, need - 1) for k, v in stats.items()}
    assert verdict(c, before)[0] == INCONCLUSIVE
    # with a margin the boundary is the margin: d = 1.1 short of 1.7 by 0.6 (normal: 22.2)
    m = Claim("BN degrades", "less", ("GN", 2), ("BN", 2), 1.7)
    assert seeds_needed(m, stats) == _t_count(2.0, 0.6) == 24
    assert seeds_needed(c, {("GN", 2): _s(10.0, None, 1), ("BN", 2): _s(11.0, None, 1)}) is None


def seeds_to_add(study, stats, max_seeds):
    """A whole power round: every open claim's seeds, as one {(label, x): seeds}."""
    want = {}
    for _, claim_want in seeds_by_claim(study, stats, max_seeds):
        want.update({p: max(n, want.get(p, 0)) for p, n in claim_want.items()})
    return want


def test_seeds_to_add_targets_the_open_claims_points_only():
    study = get_study("batch-size")
    # BN beats GN at 32: open, and 4 seeds would decide it (normal count: 4 x 0.18 / 0.55^2 = 2.4)
    stats = {("BN", 32): _s(2.0, 0.3, 2), ("GN", 32): _s(2.55, 0.3, 2),
             ("BN", 2): _s(9.0, 0.3, 2), ("GN", 2): _s(2.1, 0.3, 2)}   # decided
    assert seeds_needed(study.claims[0], stats) == _t_count(0.18, 0.55) == 4
    want = seeds_to_add(study, stats, max_seeds=6)
    assert want[("BN", 32)] == 3 and want[("GN", 32)] == 3  # one more seed per round
    assert ("BN", 2) not in want or want[("BN", 2)] == 3  # only through an open claim
    assert seeds_to_add(study, stats, max_seeds=2) == {}  # the cap is reached
    far = {**stats, ("GN", 32): _s(2.25, 0.3, 2)}  # beyond a cap of 6 (normal count: 11.5)
    assert seeds_needed(study.claims[0], far) == _t_count(0.18, 0.25) == 13
    assert ("BN", 32) not in seeds_to_add(study, far, max_seeds=6)
    assert verdict(study.claims[4], stats)[0] == NOT_RUN   # SyncBN not run: no seeds for it


def test_equal_means_are_on_the_boundary_not_a_huge_seed_count():
    """The full norms study on digits gave GN 2.51 and LN 2.51 (the same images wrong on
    average): d is float rounding, and no seed count decides 'GN beats LN'."""
    c = Claim("GN beats LN", "less", ("GN", 32), ("LN", 32), 0.0)
    mean = 100.0 * 9 / 359
    stats = {("GN", 32): _s(mean, 0.94, 5), ("LN", 32): _s(sum([mean] * 3) / 3, 0.74, 3)}
    assert verdict(c, stats)[0] == INCONCLUSIVE
    assert seeds_needed(c, stats) is None
    close = {**stats, ("LN", 32): _s(mean + 0.01, 0.74, 3)}  # 4 (0.94^2 + 0.74^2) / 0.01^2 = 57248
    assert seeds_needed(c, close) == 57_249  # shown as "over 1000" (tests/lab/test_report.py)


def test_worst_claim_names_the_rival_that_decided_it():
    """'IN is the worst': not reproduced by the rival clearly worse than it, which the numbers
    must name (not the closest rival, whose gap may be within the interval)."""
    c = Claim("one channel per group is the worst", "worst", ("C/G", 1))
    stats = {("C/G", 1): _s(0.97, 0.59, 5), ("C/G", 16): _s(2.92, 1.38, 5),
             ("C/G", 64): _s(2.93, 0.20, 5)}  # 5 seeds: t(df 5.4) ~ 2.6
    v, why = verdict(c, stats)
    assert v == "not reproduced" and "rival C/G@64 2.93" in why
    stats[("C/G", 64)] = _s(2.0, 1.38, 5)  # now no rival is separated: the closest is named
    stats[("C/G", 16)] = _s(2.42, 1.38, 5)
    v, why = verdict(c, stats)
    assert v == INCONCLUSIVE and "closest rival C/G@16 2.42" in why


def test_a_round_lists_the_claims_that_need_the_fewest_seeds_first():
    """seeds_by_claim orders the open claims by the seeds they need (an unknown need last): a
    power round short of budget spends it where it decides soonest (lab/power.py)."""
    far = Claim("A beats B", "less", ("A", 0), ("B", 0), 0.0)
    near = Claim("C beats D", "less", ("C", 0), ("D", 0), 0.0)
    unknown = Claim("E beats F", "less", ("E", 0), ("F", 0), 0.0)   # one seed each: no spread
    stats = {("A", 0): _s(2.0, 0.3, 2), ("B", 0): _s(2.25, 0.3, 2),
             ("C", 0): _s(2.0, 0.3, 2), ("D", 0): _s(2.55, 0.3, 2),
             ("E", 0): _s(1.0, None, 1), ("F", 0): _s(1.5, None, 1)}
    study = SimpleNamespace(claims=[unknown, far, near])
    assert seeds_by_claim(study, stats, max_seeds=20) == [
        (_t_count(0.18, 0.55), {("C", 0): 3, ("D", 0): 3}),
        (_t_count(0.18, 0.25), {("A", 0): 3, ("B", 0): 3}),
        (None, {("E", 0): 2, ("F", 0): 2})]
    assert [need for need, _ in seeds_by_claim(study, stats, max_seeds=6)] == [4, None]


def _decides_at(claim, stats, n):
    """The verdict with every point of ``stats`` at ``n`` seeds (means and sds kept)."""
    return verdict(claim, {k: _s(s["mean"], s["sd"], n) for k, s in stats.items()})[0]


def test_a_beaten_best_claim_needs_the_seeds_of_the_rival_that_beats_it():
    """'a is the best' with a rival 0.4 below a and another far above: only the rival below can
    decide it (not reproduced at 14 seeds; the normal count 4 x 0.5 / 0.4^2 = 12.5); the rival
    far above is separated already and decides nothing (it gave 2, the seeds a point has: no
    round added any)."""
    c = Claim("a is the best", "best", ("S", 0))
    stats = {("S", 0): _s(2.0, 0.5, 2), ("S", 1): _s(1.6, 0.5, 2), ("S", 2): _s(5.0, 0.5, 2)}
    assert verdict(c, stats)[0] == INCONCLUSIVE
    assert seeds_needed(c, stats) == _t_count(0.5, 0.4) == 14
    assert _decides_at(c, stats, 13) == INCONCLUSIVE and _decides_at(c, stats, 14) == NOT_REPRODUCED
    assert seeds_to_add(SimpleNamespace(claims=[c]), stats, max_seeds=20) == {
        k: 3 for k in stats}
    one_seed = {**stats, ("S", 3): _s(1.0, None, 1)}  # below a too, but no spread to go on
    assert seeds_needed(c, one_seed) == 14
    worst = Claim("a is the worst", "worst", ("S", 0))
    mirrored = {k: _s(10.0 - s["mean"], s["sd"], 2) for k, s in stats.items()}
    assert seeds_needed(worst, mirrored) == 14


def test_a_flat_claim_outside_its_tolerance_needs_the_seeds_of_its_farthest_point():
    """GN at 16 is 1.2 points from GN at 32 and GN at 8 1.05 (tolerance 1): the claim is not
    reproduced as soon as one point is decisively outside, the farther one at 52 seeds (the
    normal count 4 x 0.5 / 0.2^2 = 50); the nearer one would need about 800, which the report
    stated."""
    c = Claim("GN is flat", "flat", ("GN", 32), None, 1.0)
    stats = {("GN", 32): _s(2.0, 0.5, 2), ("GN", 16): _s(0.8, 0.5, 2),
             ("GN", 8): _s(0.95, 0.5, 2)}
    assert verdict(c, stats)[0] == INCONCLUSIVE
    assert seeds_needed(c, stats) == _t_count(0.5, 0.2) == 52
    assert _decides_at(c, stats, 51) == INCONCLUSIVE and _decides_at(c, stats, 52) == NOT_REPRODUCED
    # both within 1 (0.8 and 0.9 away): reproduced needs both, the nearer to 1 at about 200 seeds
    inside = {**stats, ("GN", 16): _s(1.2, 0.5, 2), ("GN", 8): _s(1.1, 0.5, 2)}
    need = seeds_needed(c, inside)
    assert need == _t_count(0.5, 0.1) == 202 and _decides_at(c, inside, need - 1) == INCONCLUSIVE
    assert _decides_at(c, inside, need) == REPRODUCED


def test_a_margin_claim_is_reproduced_only_when_the_whole_interval_clears_the_margin():
    """'BN degrades by at least 1 point' is confirmed when d - h >= 1, not when only the point
    estimate d is: with d = 1.3 and h = 0.70 (3 seeds, sd 0.3: t 2.87 x 0.245) the gap could be
    0.6. It is not refuted either (d + h > 1): inconclusive, until 10 seeds per point put h
    below 0.3 (normal count: 4 x 0.18 / 0.09 = 8)."""
    c = Claim("BN degrades at batch 2", "less", ("BN", 32), ("BN", 2), 1.0)
    stats = {("BN", 32): _s(2.0, 0.3, 3), ("BN", 2): _s(3.3, 0.3, 3)}
    assert verdict(c, stats)[0] == INCONCLUSIVE
    need = seeds_needed(c, stats)
    assert need == _t_count(0.18, 0.3) == 10
    assert verdict(c, {k: _s(v["mean"], 0.3, need) for k, v in stats.items()})[0] == REPRODUCED
    before = {k: _s(v["mean"], 0.3, need - 1) for k, v in stats.items()}
    assert verdict(c, before)[0] == INCONCLUSIVE


def test_a_difference_of_exactly_the_margin_is_on_the_boundary_whatever_the_float_rounding():
    """On 1000 test images (mnist5k) errors are k/10 %: 14 vs 4 images wrong is 1.0 point, the
    'at least 1 point' of 'BN degrades at batch 2', but 1.4 - 0.4 rounds to 0.9999999999999999.
    A gap of exactly the margin never has its whole interval above it: inconclusive, and no seed
    count follows (not the huge count a 1e-16 distance would give)."""
    c = Claim("BN degrades at batch 2", "less", ("BN", 32), ("BN", 2), 1.0)
    runs = ([_run("BN", 32, 100 * 4 / 1000, s) for s in range(3)]
            + [_run("BN", 2, 100 * 14 / 1000, s) for s in range(3)])
    stats = point_stats(runs)
    assert stats[("BN", 2)]["mean"] - stats[("BN", 32)]["mean"] < 1.0  # the rounding
    assert verdict(c, stats)[0] == INCONCLUSIVE
    assert seeds_needed(c, stats) is None


def test_a_flat_claim_says_which_points_had_every_run_flagged():
    """GN at batch 2 diverged in every seed: the claim is judged on the points that count (as
    documented), and its numbers name the point left out instead of shrinking the range
    silently."""
    c = Claim("GN is flat", "flat", ("GN", 32), None, 1.0)
    runs = ([_run("GN", 32, 2.0 + 0.1 * s, s) for s in range(3)]
            + [_run("GN", 16, 2.1 + 0.1 * s, s) for s in range(3)]
            + [_run("GN", 2, 3.0, s, loss=math.nan) for s in range(3)])
    v, why = verdict(c, point_stats(runs))
    assert v == REPRODUCED and "every run flagged, left out: GN@2 (3 diverged)" in why
