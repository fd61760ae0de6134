"""Power rounds (lab/power.py) on a real study's run lists, with the training replaced by
recorded results (so the loop's decisions are checked, not SGD): seeds are added only where a
claim is open, until it is decided, the seed cap or the budget stops them."""

import itertools

import pytest

from normlab.lab.analysis import INCONCLUSIVE, claims_status, level_for, point_stats
from normlab.lab.config import ConfigError
from normlab.lab.power import run_with_power
from normlab.lab.store import Store
from normlab.lab.store_open import StoreError
from normlab.lab.studies import get_study

# true error per series; the seed adds an alternating +-0.3 (sd about 0.3)
MEANS = {"BN": 2.0, "GN": 2.6, "LN": 2.7, "IN": 5.0, "none": 9.0}


def _fake_run(store, trained, fail=()):
    """Records each point's error; the (label, seed) pairs in ``fail`` end ``failed``."""
    def run(points):
        n = 0
        for p in points:
            rid = p.cfg.run_id()
            if store.claim(rid, p.cfg.to_dict()) == "done":
                continue
            if (p.label, p.cfg.seed) in fail:
                store.finish(rid, "failed", "worker died")
                continue
            err = MEANS[p.label] + (0.3 if p.cfg.seed % 2 else -0.3) * (1 + 0.1 * p.cfg.seed)
            store.record_epochs(rid, [{"epoch": 0, "train_loss": 0.1, "test_error": err}], {})
            store.finish(rid)
            trained.append((p.label, p.cfg.seed))
            n += 1
        return {"trained": n, "skipped": len(points) - n, "failed": 0}
    return run


def _study(tmp_path, **kw):
    study = get_study("norms")
    store = Store(tmp_path)
    trained = []
    rec = run_with_power(study, "quick", store,
                         lambda at: study.points({}, "quick", seeds_at=at),
                         _fake_run(store, trained), info={"protocol": study.protocol(8)}, **kw)
    return study, store, trained, rec


def test_rounds_add_seeds_only_to_open_claims_until_decided(tmp_path):
    study, store, trained, rec = _study(tmp_path, max_seeds=6)
    stats = point_stats(store.study_runs("norms", "quick"))
    status = {c["text"]: c for c in claims_status(study, stats)}
    # IN and none are far from the rest: decided with few seeds; GN vs LN (0.1 apart) is not
    assert status["BN beats no normalization"]["verdict"] == "reproduced"
    assert status["GN beats IN"]["verdict"] == "reproduced"
    assert status["GN beats LN"]["verdict"] == INCONCLUSIVE
    assert stats[("none", 32)]["n"] < stats[("GN", 32)]["n"]  # no seeds where nothing is open
    assert all(s["n"] <= 6 for s in stats.values())
    assert rec["stopped"] == "decided"
    assert len(trained) == 5 + rec["runs_added"]
    open_claims = {o["claim"]: o for o in rec["open"]}
    assert open_claims["GN beats LN"]["seeds_needed"] > 6  # what the spread would need
    info = store.setup_info("norms")
    assert info["power"]["runs_added"] == rec["runs_added"] and info["protocol"]["devices"] == 8
    # what the terminal prints of the decided ones (it printed only the open claims)
    decided = {c["claim"]: c for c in rec["decided"]}
    assert decided["GN beats IN"]["verdict"] == "reproduced" and "GN beats LN" not in decided
    assert decided["GN beats IN"]["seeds"] == status["GN beats IN"]["seeds"]
    assert "decided" not in info["power"]  # the terminal's, not the store's


def test_series_that_no_claim_covers_say_so_rather_than_decided(tmp_path):
    # --variants LN,none on a transformer: every claim of the norms study needs BN, GN or IN,
    # so no claim has runs; "every claim is decided" was said, as if something had been judged
    study = get_study("norms")
    store = Store(tmp_path)
    rec = run_with_power(study, "default", store,
                         lambda at: study.points({}, "default", variants=["LN", "none"],
                                                 seeds_at=at),
                         _fake_run(store, []), info={"protocol": study.protocol(1)})
    assert rec["rounds"] == 0 and rec["stopped"] == "no-claim"
    # no round could run: the verdicts are judged at one look (3 seeds), not at the sequential
    # level planned for looks up to --max-seeds, known from the run list before any run
    assert rec["looks"] == [3, 3]
    # with a claim among the runs (GN beats LN, 0.1 apart: past --max-seeds) it is "decided"
    rec = run_with_power(study, "default", Store(tmp_path / "b"),
                         lambda at: study.points({}, "default", variants=["LN", "GN"],
                                                 seeds_at=at),
                         _fake_run(Store(tmp_path / "b"), []), info={}, max_seeds=4)
    assert rec["stopped"] == "decided"


def test_a_failed_run_does_not_stop_its_point_from_getting_seeds(tmp_path):
    """GN's second seed fails: the next round gives GN a third seed (its run list holds the
    failed one), so 'GN beats IN' is decided as without the failure, not left open at one GN
    seed while the other points go on to the cap."""
    study = get_study("norms")
    store = Store(tmp_path)
    run_with_power(study, "quick", store, lambda at: study.points({}, "quick", seeds_at=at),
                   _fake_run(store, [], fail={("GN", 1)}), max_seeds=6)
    stats = point_stats(store.study_runs("norms", "quick"))
    assert stats[("GN", 32)]["n"] >= 2
    status = {c["text"]: c["verdict"] for c in claims_status(study, stats)}
    assert status["GN beats IN"] == "reproduced"


def test_the_run_budget_stops_the_rounds(tmp_path):
    _, store, trained, rec = _study(tmp_path, budget_runs=3)
    assert rec["runs_added"] <= 3 and rec["stopped"] == "budget-runs"
    assert len(trained) == 5 + rec["runs_added"]


def test_a_round_too_big_for_the_budget_gives_the_runs_left_to_the_claims_that_fit(tmp_path):
    """The first round wants a seed at GN, LN, IN and BN (4 runs: four open claims, none of
    them with a known need at one seed); with a budget of 3 the rounds stopped there, adding
    nothing. Now the claims that fit take the 3 runs, each claim's points whole: GN, LN and IN
    (GN beats LN, GN beats IN, and the IN-LN claim), not BN, whose claim needed a fourth run."""
    _, store, trained, rec = _study(tmp_path, budget_runs=3, max_seeds=6)
    assert rec["rounds"] == 1 and rec["runs_added"] == 3 and rec["stopped"] == "budget-runs"
    assert sorted(trained[5:]) == [("GN", 1), ("IN", 1), ("LN", 1)]
    _, _, trained, rec = _study(tmp_path / "two", budget_runs=2, max_seeds=6)
    assert rec["runs_added"] == 2 and sorted(trained[5:]) == [("GN", 1), ("LN", 1)]


def test_the_minutes_budget_stops_the_rounds(tmp_path):
    ticks = itertools.count()
    study = get_study("norms")
    store = Store(tmp_path)
    rec = run_with_power(study, "quick", store, lambda at: study.points({}, "quick", seeds_at=at),
                         _fake_run(store, []), budget_minutes=1.5,
                         clock=lambda: 60.0 * next(ticks))  # a minute per clock reading
    assert rec["stopped"] == "budget-minutes" and rec["rounds"] == 1


def test_zero_budget_runs_the_preset_only(tmp_path):
    _, _, trained, rec = _study(tmp_path, budget_runs=0)
    assert len(trained) == 5 and rec["runs_added"] == 0 and rec["open"]


@pytest.mark.parametrize("kw, needle", [
    ({"budget_runs": -1}, "--budget-runs must be an int >= 0, got -1"),
    ({"budget_minutes": -2.0}, "--budget-minutes must be a number >= 0, got -2.0"),
    ({"max_seeds": 0}, "--max-seeds must be a positive int, got 0"),
])
def test_bad_budgets(tmp_path, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        _study(tmp_path, **kw)


def test_a_rerun_with_budget_left_adds_new_seeds_not_the_earlier_rounds_runs(tmp_path):
    """`reproduce` again on the same --out after the budget stopped the rounds: the earlier
    rounds' finished runs are in the store, not new. They were listed again (then skipped)
    and counted against the new budget: here GN's seed 1 made the one open claim's round 3
    runs for a budget of 2, and the rerun added nothing."""
    _, store, trained, first = _study(tmp_path, budget_runs=3, max_seeds=6)
    store.close()
    assert first["runs_added"] == 3 and ("GN", 1) in trained
    _, store, again, rec = _study(tmp_path, budget_runs=2, max_seeds=6)
    assert rec["runs_added"] == 2 and sorted(again) == [("GN", 2), ("IN", 2)]


def test_the_report_says_what_the_rounds_did_and_why_they_stopped(tmp_path):
    """The rounds' record was stored with the setup but no report showed it: a reader of
    report.md saw claims open at 2 seeds without learning that the budget, not the spread,
    stopped the seeds. A stored record's text is shown inert."""
    from normlab.lab.report import write_report

    _, store, _, rec = _study(tmp_path, budget_runs=3, max_seeds=6)
    store.close()
    md = write_report(tmp_path)[0].read_text()
    assert ("Power rounds: 1 round(s) added 3 run(s) (budget: 3 runs, up to 6 seeds per point); "
            "stopped: the --budget-runs budget is spent (no open claim's next seeds fit in the "
            "runs left). Running the study again with a larger budget") in md
    with Store(tmp_path) as s:  # an edited record: markup where numbers were, an unknown reason
        setup = s.con.execute("SELECT setup FROM study_runs WHERE study='norms'").fetchone()[0]
        s.update_setup_info("norms", "quick", setup,
                            {"power": {**rec, "rounds": "<b>2</b>", "stopped": "*x*"}})
    md = write_report(tmp_path)[0].read_text()
    assert r"Power rounds: \<b\>2\</b\> round(s) added 3 run(s)" in md
    assert r"stopped: \*x\*." in md and "Running the study again" not in md
    _, store, _, _ = _study(tmp_path / "quick", budget_runs=0)  # --quick's default
    store.close()
    md = write_report(tmp_path / "quick")[0].read_text()
    assert "Power rounds: none (a budget of 0 runs, `--quick`'s default; `--budget-runs N`" in md


def test_power_rounds_record_their_looks_and_the_report_judges_and_says_so(tmp_path):
    from normlab.lab.report import write_report

    _, store, _, rec = _study(tmp_path, max_seeds=6)
    assert rec["looks"] == [1, 6]  # the quick preset's one seed per point, up to --max-seeds
    assert store.setup_info("norms")["power"]["looks"] == [1, 6]
    store.close()
    md = write_report(tmp_path)[0].read_text()
    level = level_for((1, 6))
    assert ("verdict is set for looks after each seed from 1 to 6 per point: decisive beyond "
            f"c sqrt(6 / n) normal standard errors at n seeds per point ({level(1):.2f} at 1, "
            f"{level(3):.2f} at 3, {level(6):.2f} at 6;") in md
    # a rerun with no rounds keeps the looks already planned: they were taken
    _, store, _, again = _study(tmp_path, budget_runs=0)
    assert again["looks"] == [1, 6]
    store.close()
    _, store, _, none = _study(tmp_path / "quick", budget_runs=0)
    assert none["looks"] == [1, 1]
    store.close()
    assert "verdict is set for looks" not in write_report(tmp_path / "quick")[0].read_text()


def test_a_rerun_without_rounds_keeps_what_earlier_rounds_did_in_the_report(tmp_path):
    # `reproduce` with --budget-runs 3, then again with --budget-runs 0: the report said "Power
    # rounds: none (a budget of 0 runs, `--quick`'s default ...)" beside points with the
    # seeds the first invocation's round added, and no longer named the sequential level its
    # verdicts are still judged at
    from normlab.lab.report import write_report

    _, store, _, first = _study(tmp_path, budget_runs=3, max_seeds=6)
    store.close()
    assert first["rounds"] == 1 and first["runs_added"] == 3
    _, store, _, again = _study(tmp_path, budget_runs=0)
    store.close()
    assert again["rounds"] == 0 and again["before"] == {"rounds": 1, "runs_added": 3}
    md = write_report(tmp_path)[0].read_text()
    assert "`--quick`'s default" not in md
    assert ("Power rounds: none this time (a budget of 0 runs); earlier invocations' 1 round(s) "
            "added 3 run(s)") in md, md
    assert "verdict is set for looks after each seed from 1 to 6 per point" in md
    _, store, _, third = _study(tmp_path, budget_runs=2, max_seeds=6)  # rounds again: summed
    store.close()
    assert third["before"] == {"rounds": 1, "runs_added": 3} and third["runs_added"] == 2
    md = write_report(tmp_path)[0].read_text()
    assert "Power rounds: 1 round(s) added 2 run(s); earlier invocations' 1 round(s) added 3 run(s) (budget:" in md, md


def test_a_zero_budget_on_the_default_preset_is_not_called_quicks_default(tmp_path):
    from normlab.lab.report import write_report

    study = get_study("norms")
    store = Store(tmp_path)
    run_with_power(study, "default", store, lambda at: study.points({}, "default", seeds_at=at),
                   _fake_run(store, []), budget_runs=0)
    store.close()
    md = write_report(tmp_path)[0].read_text()
    assert "`--quick`'s default" not in md
    assert "Power rounds: none (a budget of 0 runs, `--budget-runs 0`; `--budget-runs N`" in md


@pytest.mark.parametrize("looks", [[0, 8], [3, 2], [2, 10**9], "2-8", [True, 8]])
def test_a_stored_looks_value_that_is_not_two_seed_counts_is_one_error_line(tmp_path, looks):
    """An edited record must not set the verdicts' level, nor start a boundary computation
    over a billion looks."""
    from normlab.lab.report import write_report

    _, store, _, rec = _study(tmp_path, max_seeds=3)
    setup = store.con.execute("SELECT setup FROM study_runs WHERE study='norms'").fetchone()[0]
    store.update_setup_info("norms", "quick", setup, {"power": {**rec, "looks": looks}})
    store.close()
    with pytest.raises(StoreError, match="power looks is not two seed counts"):
        write_report(tmp_path)


def test_an_interrupted_study_is_judged_at_the_level_planned_before_its_first_look(tmp_path):
    """The looks are stored before any run: a study stopped by Ctrl-C during its first list
    (no power record written at the end) is reported at the sequential level its rounds would
    have used, not at one look's."""
    from normlab.lab.report import write_report

    study = get_study("norms")
    store = Store(tmp_path)
    inner = _fake_run(store, [])

    def interrupted(points):
        inner(points[:3])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_with_power(study, "quick", store, lambda at: study.points({}, "quick", seeds_at=at),
                       interrupted, max_seeds=6)
    assert store.setup_info("norms")["power"] == {"looks": [1, 6]}
    store.close()
    md = write_report(tmp_path)[0].read_text()
    # the same record as a study still running (`normlab report` while it trains): the report
    # said "the study was interrupted" of a study in progress
    assert ("Power rounds: not finished (the study is still running, or was interrupted: running "
            "it again goes on from the stored runs)") in md
    assert f"({level_for((1, 6))(1):.2f} at 1, " in md


def test_the_terminal_says_an_open_claims_seeds_and_why_no_count_as_the_report_does(tmp_path,
                                                                                     capsys):
    """The lines printed for open claims used the most seeds among a claim's points and called
    every unknown count "the spread would need more seeds": with one of none's two runs flagged
    (near chance) the terminal said "open at 2 seeds: BN beats no normalization (the spread
    would need more seeds)" where the report said 1-2 seeds and no count (a point has one seed);
    and GN and LN with equal means (on the claim's boundary: no count decides it) read as a
    claim that more seeds would decide."""
    from normlab.lab.report import write_report
    from normlab.lab.run import _with_power

    errors = {"BN": [2.0, 2.6], "GN": [2.0, 2.6], "LN": [2.6, 2.0], "IN": [5.0, 5.6],
              "none": [89.9, 9.0]}  # none's seed 0 at chance (90%): flagged, left out

    def run(points, store):
        for p in points:
            rid = p.cfg.run_id()
            store.claim(rid, p.cfg.to_dict())
            err = errors[p.label][p.cfg.seed]
            store.record_epochs(rid, [{"epoch": 0, "train_loss": 0.1, "test_error": err}], {})
            store.finish(rid)
        return {"trained": len(points), "skipped": 0, "failed": 0}

    study = get_study("norms")
    points = study.points({}, "quick", seeds=2)
    _with_power(study, "quick", points, tmp_path, "norms", run,
                lambda at: study.points({}, "quick", seeds=2, seeds_at=at),
                {"budget_runs": 0}, {})
    out = capsys.readouterr().out
    assert ("open at 1-2 seeds: BN beats no normalization (a point has one seed that counts: no "
            "spread; unknown how many would decide it)") in out, out
    assert ("open at 2 seeds: GN beats LN (no seed count follows from these runs: the difference "
            "is on the claim's boundary (equal means, or a gap equal to the claim's margin))"
            ) in out, out
    assert "would need more seeds" not in out
    md = write_report(tmp_path)[0].read_text()  # the report's words for the same claims
    assert "| BN beats no normalization | **inconclusive** |" in md
    assert "| 1-2; unknown how many would decide it (a point has one seed: no spread) |" in md


def test_rounds_judge_their_own_setup_while_another_process_runs_the_study_on_another(
        tmp_path):
    # two `reproduce norms` into one --out, on two setups: the rounds read "the setup
    # registered last", which was the other process's once it registered, so this study's
    # seeds were added (or not) and its claims called from the other setup's numbers
    study = get_study("norms")
    store = Store(tmp_path)
    trained = []
    run = _fake_run(store, trained)
    other = study.points({"epochs": 3}, "quick", 3)  # no normalization best there
    OTHER = {"BN": 10.0, "GN": 20.0, "LN": 30.0, "IN": 40.0, "none": 1.0}

    def run_while_another_registers(points):
        counts = run(points)
        if not trained[len(points):]:  # once: the other process registers, trains, ends
            with Store(tmp_path) as s:
                s.register(study.name, "quick", [(p.cfg.run_id(), p.label, p.x) for p in other],
                           setup=other[0].setup)
                for p in other:
                    s.claim(p.cfg.run_id(), p.cfg.to_dict())
                    err = OTHER[p.label] + 0.1 * p.cfg.seed  # every claim decided there
                    s.record_epochs(p.cfg.run_id(), [{"epoch": 0, "train_loss": 0.1,
                                                      "test_error": err}], {})
                    s.finish(p.cfg.run_id())
        return counts

    rec = run_with_power(study, "quick", store, lambda at: study.points({}, "quick", seeds_at=at),
                         run_while_another_registers, max_seeds=6)
    decided = {c["claim"]: c["verdict"] for c in rec["decided"]}
    assert decided["BN beats no normalization"] == "reproduced", rec  # this setup's numbers
    assert rec["runs_added"] > 0  # its own claims were open at one seed
    assert store.setup_info("norms", "quick").get("power", {}).get("runs_added") == \
        rec["runs_added"]
    store.close()


def test_a_round_interrupted_and_run_again_counts_its_finished_runs_against_the_budget(
        tmp_path):
    # `reproduce --budget-runs 3` stopped (Ctrl-C) in its first round after one of the round's
    # three runs, then run again to resume: the rerun counted the finished run as an earlier
    # invocation's, not against its budget, and added 3 runs more, 4 in all for a budget of 3
    study = get_study("norms")
    store = Store(tmp_path)
    trained = []
    inner = _fake_run(store, trained)
    calls = []

    def stopped_in_the_first_round(points):
        calls.append(len(points))
        if len(calls) == 1:
            return inner(points)
        inner(points[:1])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_with_power(study, "quick", store, lambda at: study.points({}, "quick", seeds_at=at),
                       stopped_in_the_first_round, budget_runs=3, max_seeds=6)
    assert calls == [5, 3] and len(trained) == 6  # the round's first run finished
    store.close()
    _, store, again, rec = _study(tmp_path, budget_runs=3, max_seeds=6)
    assert trained[5:] == [("LN", 1)] and len(again) == 2, again  # 3 in all, as unstopped
    # the stopped round and this one's, as the invocation it resumes would have counted them
    assert (rec["rounds"], rec["runs_added"], rec["stopped"]) == (2, 3, "budget-runs"), rec
    assert rec["before"] == {"rounds": 0, "runs_added": 0}
    assert store.setup_info("norms")["power"]["runs_added"] == 3
    store.close()
    _, store, third, rec = _study(tmp_path, budget_runs=2, max_seeds=6)  # a finished one's
    assert len(third) == 2 and rec["before"] == {"rounds": 2, "runs_added": 3}  # not counted
    store.close()
