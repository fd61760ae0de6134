"""``normlab forget``: exactly the chosen runs leave the store, with their epochs, memberships,
checkpoints and export rows; a dry run writes nothing; a run being trained is never removed."""

import csv
import hashlib
import json
import sqlite3
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from normlab.lab.cli import app, main
from normlab.lab.config import ConfigError
from normlab.lab.forget import choose, forget
from normlab.lab.store import Store, StoreError
from normlab.lab.studies import get_study

STUDY = get_study("batch-size")


def _study(out, user, states=None, err=10.0):
    """Register the quick batch-size points of ``user`` and end each run in its state from
    ``states`` (label, x) -> done (default) | failed | interrupted | training."""
    pts = STUDY.points(user, "quick", 1)
    with Store(out) as s:
        s.register(STUDY.name, "quick", [(p.cfg.run_id(), p.label, p.x) for p in pts],
                   setup=pts[0].setup)
        for p in pts:
            rid, state = p.cfg.run_id(), (states or {}).get((p.label, p.x), "done")
            s.claim(rid, p.cfg.to_dict())
            s.record_epochs(rid, [{"epoch": 0, "test_error": err + p.x}], {})
            if state != "done":  # a finished run's checkpoint is deleted
                s.checkpoint_path(rid).parent.mkdir(exist_ok=True)
                s.checkpoint_path(rid).write_bytes(b"a checkpoint")
            if state in ("done", "failed"):
                s.finish(rid, state, "diverged" if state == "failed" else None)
            elif state == "interrupted":
                s.release(rid)
            else:  # a process on another host trains it and touched it just now
                s.con.execute("UPDATE runs SET owner='other-host:4242', updated=? WHERE "
                              "run_id=?", (time.time(), rid))
    return {(p.label, p.x): p.cfg.run_id() for p in pts}


def _rows(out):
    """Every row of the store's tables but meta (the write counter), as sorted tuples."""
    con = sqlite3.connect(out / "results.sqlite")
    try:
        return {t: sorted(map(tuple, con.execute(f"SELECT * FROM {t}")))
                for t in ("runs", "epochs", "study_runs", "setups", "spp")}
    finally:
        con.close()


def _run_ids(out, table="runs"):
    return {r[0] for r in sqlite3.connect(out / "results.sqlite").execute(
        f"SELECT DISTINCT run_id FROM {table}")}


@pytest.fixture
def store(tmp_path):
    ids = _study(tmp_path, {}, {("BN", 2): "failed", ("GN", 2): "interrupted",
                                ("GN", 32): "training"})
    return tmp_path, ids


def test_a_dry_run_lists_the_choice_and_writes_nothing(store):
    out, ids = store
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()
             if p.is_file()}
    choice = forget(out, states=["failed"])
    assert [r["run_id"] for r in choice.runs] == [ids[("BN", 2)]]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()
            if p.is_file()} == files


@pytest.mark.parametrize("state, point", [("failed", ("BN", 2)), ("interrupted", ("GN", 2))])
def test_forgetting_a_state_removes_those_runs_whole_and_nothing_else(store, state, point):
    out, ids = store
    before = _rows(out)
    forget(out, states=[state], yes=True)
    gone = ids[point]
    after = _rows(out)
    for table in ("runs", "epochs", "study_runs"):
        key = 0 if table != "study_runs" else 2  # the run_id column
        assert after[table] == [r for r in before[table] if r[key] != gone], table
    assert after["setups"] == before["setups"]
    assert not (out / "checkpoints" / f"{gone}.pt").exists()
    assert {p.stem for p in (out / "checkpoints").iterdir()} == {
        ids[k] for k in (("BN", 2), ("GN", 2), ("GN", 32))} - {gone}
    with open(out / "runs.csv") as f:  # the exports are written again from the store
        assert {r["run_id"] for r in csv.DictReader(f)} == set(ids.values()) - {gone}
    with Store(out) as s:  # a re-run trains the point again
        assert s.claim(gone, {"epochs": 1}) == "claimed"


def test_a_run_being_trained_is_never_removed(store):
    out, ids = store
    before = _rows(out)
    with pytest.raises(ConfigError, match=f"run {ids[('GN', 32)]} is being trained by "
                                          "other-host:4242"):
        forget(out, run_ids=[ids[("GN", 32)]], yes=True)
    with pytest.raises(ConfigError, match="being trained"):  # a study's runs, that one among
        forget(out, study="batch-size", yes=True)
    assert _rows(out) == before
    # "interrupted" is a run no live process holds: the trained one is not among them
    assert [r["run_id"] for r in forget(out, states=["interrupted"]).runs] == [ids[("GN", 2)]]


def test_a_run_that_changed_since_it_was_chosen_stops_the_removal(store):
    # a process finished the failed run again between the choice and the removal: refuse all
    out, ids = store
    with Store(out) as s:
        choice = choose(s, states=["failed"])
        s.claim(ids[("BN", 2)], {"epochs": 1})
        s.finish(ids[("BN", 2)])
        before = _rows(out)
        with pytest.raises(StoreError, match="changed since it was chosen \\(failed, now done\\)"):
            s.forget([], {r["run_id"]: r["status"] for r in choice.runs})
        # an interrupted run that a process on another host resumed meanwhile: still
        # "running", now with a live owner
        choice = choose(s, states=["interrupted"])
        s.con.execute("UPDATE runs SET owner='other-host:4242', updated=? WHERE run_id=?",
                      (time.time(), ids[("GN", 2)]))
        before = _rows(out)
        with pytest.raises(StoreError, match=f"run {ids[('GN', 2)]} is being trained by "
                                             "other-host:4242"):
            s.forget([], {r["run_id"]: r["status"] for r in choice.runs})
    assert _rows(out) == before
    assert (out / "checkpoints" / f"{ids[('GN', 2)]}.pt").exists()


def test_a_study_leaves_the_runs_another_study_counts(tmp_path):
    ids = _study(tmp_path, {})
    shared = ids[("BN", 32)]
    with Store(tmp_path) as s:
        s.register("norms", "quick", [(shared, "BN", 32)], setup="n")
    choice = forget(tmp_path, study="batch-size", yes=True)
    assert {r["run_id"] for r in choice.runs} == set(ids.values()) - {shared}
    assert [m["run_id"] for m in choice.members] == [shared]
    assert _run_ids(tmp_path) == {shared}
    rows = _rows(tmp_path)
    assert [(r[0], r[2]) for r in rows["study_runs"]] == [("norms", shared)]
    assert [r[0] for r in rows["setups"]] == []  # neither study stored a setup's info here
    assert _run_ids(tmp_path, "epochs") == {shared}


def test_earlier_setups_go_and_the_reports_runs_stay(tmp_path):
    digits = _study(tmp_path, {})
    synthetic = _study(tmp_path, {"data": "synthetic"}, err=50.0)
    with Store(tmp_path) as s:
        shown = {r["run_id"] for r in s.study_runs("batch-size")}
    assert shown == set(synthetic.values())
    forget(tmp_path, earlier_setups=True, yes=True)
    assert _run_ids(tmp_path) == set(synthetic.values())
    with Store(tmp_path) as s:
        assert {r["run_id"] for r in s.study_runs("batch-size")} == shown
    assert not set(digits.values()) & _run_ids(tmp_path, "epochs")


def test_filters_narrow_each_other(store):
    out, ids = store
    assert [r["run_id"] for r in forget(out, study="batch-size", states=["failed"]).runs] == [
        ids[("BN", 2)]]
    assert not forget(out, run_ids=[ids[("BN", 32)]], states=["failed"])  # done, not failed


@pytest.mark.parametrize("argv, code, needle", [
    ([], 2, "say which runs to forget"),                 # no filter: never "everything"
    (["--run", "nope"], 2, "no run 'nope'"),
    (["--run", "nope", "--run", "gone", "--run", "nope"], 2, "no run 'nope', 'gone' in"),
    (["--study", "nope"], 2, "no study 'nope'"),
    (["--state", "lost"], 2, "unknown state 'lost'"),
    (["--state", "failed"], 0, "would forget 1 run(s); add --yes"),
    (["--earlier-setups", "--yes"], 0, "nothing to forget: no run or point matches"),
    (["--study", "batch-size", "--yes"], 2, "is being trained by other-host:4242"),
    (["--state", "done", "--study", "batch-size", "--yes"], 0, "forgot 1 run(s)"),
])
def test_the_command(store, capsys, argv, code, needle):
    out, _ = store
    with pytest.raises(SystemExit) as e:
        main(["forget", str(out), *argv])
    assert e.value.code == code
    cap = capsys.readouterr()
    text = " ".join((cap.out + cap.err).split())
    assert needle in text


SMALL = json.dumps({"n_train": 128, "n_test": 64, "image_size": 8, "channels": 1,
                    "num_classes": 4})


def test_after_forgetting_the_report_agrees_and_a_rerun_trains_the_point_again(tmp_path):
    # a real tiny study: one run failed; forgotten, it leaves the report, runs.csv and the
    # store; the same command again trains that point alone, and the report has it back
    args = ["reproduce", "--quick", "--variants", "GN", "--data", "synthetic", "--jobs", "1",
            "--devices", "1", "--set", f"data_kwargs={SMALL}", "--set", "train_limit=32",
            "--set", "test_limit=16", "--set", "epochs=1", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    con = sqlite3.connect(tmp_path / "results.sqlite")
    (failed, err), (kept, _) = con.execute(
        "SELECT run_id, final_test_error FROM runs ORDER BY run_id").fetchall()
    con.execute("UPDATE runs SET status='failed', error='a lost node' WHERE run_id=?", (failed,))
    con.commit()
    con.close()
    assert CliRunner().invoke(app, ["report", str(tmp_path)]).exit_code == 0
    assert f"(run {failed}): failed: a lost node" in (tmp_path / "report.md").read_text()
    r = CliRunner().invoke(app, ["forget", str(tmp_path), "--state", "failed", "--yes"],
                           terminal_width=200)
    assert r.exit_code == 0 and "forgot 1 run(s)" in r.output, r.output
    md = (tmp_path / "report.md").read_text()
    assert failed not in md and kept in md and "Preset `quick`: 1/1 runs done" in md, md
    with open(tmp_path / "runs.csv") as f:
        assert [row["run_id"] for row in csv.DictReader(f)] == [kept]
    assert _run_ids(tmp_path, "study_runs") == _run_ids(tmp_path, "epochs") == {kept}
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "trained 1, already done 1, failed 0" in r.output, r.output
    assert "Preset `quick`: 2/2 runs done" in (tmp_path / "report.md").read_text()
    con = sqlite3.connect(tmp_path / "results.sqlite")
    assert con.execute("SELECT status, final_test_error FROM runs WHERE run_id=?",
                       (failed,)).fetchone() == ("done", err)  # the same seed, retrained
    con.close()


def test_the_help_says_what_each_exit_status_means():
    r = CliRunner().invoke(app, ["forget", "--help"], terminal_width=200)
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "nothing matches" in text and "exit status 2" in text, text
    assert "spp records are never removed" in text, text


_TRAINER = """
import sys, time
from normlab.lab.store import Store
s = Store(sys.argv[1], create=False)
assert s.claim(sys.argv[2], {"epochs": 1}) == "claimed"
print("claimed", flush=True)
time.sleep(60)
"""


def test_a_run_a_live_local_process_claimed_is_refused_until_that_process_is_gone(store):
    # a re-run of the study took the failed run back (a process on this host, alive): the
    # removal names it; once that process is killed the run is interrupted and goes
    out, ids = store
    failed = ids[("BN", 2)]
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, str(out), failed],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "claimed"
        before = _rows(out)
        with pytest.raises(ConfigError, match=f"run {failed} is being trained by "
                                              f".+:{trainer.pid}"):
            forget(out, run_ids=[failed], yes=True)
        assert _rows(out) == before and (out / "checkpoints" / f"{failed}.pt").exists()
        assert not forget(out, states=["failed"], yes=True)  # it is not failed any more
    finally:
        trainer.kill()
        trainer.wait()
    assert [r["state"] for r in forget(out, run_ids=[failed], yes=True).runs] == ["interrupted"]
    assert failed not in _run_ids(out)
