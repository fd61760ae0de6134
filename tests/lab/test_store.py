"""The SQLite results store: claim semantics, upserts, exports, concurrent writers."""

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from normlab.lab.analysis import point_stats
from normlab.lab.config import ConfigError
from normlab.lab.owners import _me, _proc_stat
from normlab.lab.store import Store, heartbeat


def _rows(n, base=1.0):
    return [{"epoch": e, "train_loss": base + e, "train_error": 10.0 + e, "test_loss": base * 2,
             "test_error": 20.0 - e, "lr": 0.1, "wall_time": e + 1.0, "images_per_s": 99.0}
            for e in range(n)]


def test_claim_record_finish_cycle(tmp_path):
    with Store(tmp_path) as s:
        assert s.claim("r1", {"epochs": 3}) == "claimed"
        assert s.claim("r1", {"epochs": 3}) == "claimed"  # same process: still ours
        s.record_epochs("r1", _rows(2), {"wall_time": 2.0, "images_per_s": 99.0, "device": "cpu"})
        s.record_epochs("r1", _rows(2, base=5.0), {"wall_time": 2.0})  # an epoch redone: upsert
        assert [e["train_loss"] for e in s.epochs("r1")] == [5.0, 6.0]
        s.record_epochs("r1", _rows(1, base=7.0), {"wall_time": 1.0})  # started over (issue 14)
        assert [e["train_loss"] for e in s.epochs("r1")] == [7.0]  # no stale epoch 1 left
        s.record_epochs("r1", _rows(2, base=5.0), {"wall_time": 2.0})
        assert s.run("r1")["epochs_done"] == 2 and s.run("r1")["status"] == "running"
        s.finish("r1")
        assert s.claim("r1", {"epochs": 3}) == "done"
        assert s.run("r1")["final_test_error"] == 19.0


def test_run_owned_by_a_dead_process_is_taken_over(tmp_path):
    with Store(tmp_path) as s:
        s.claim("r2", {"epochs": 1})
        p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True)
        dead = int(p.stdout)
        s.con.execute("UPDATE runs SET owner=? WHERE run_id='r2'",
                      (f"{s.run('r2')['owner'].rpartition(':')[0]}:{dead}",))
        assert s.claim("r2", {"epochs": 1}) == "claimed"
        # a live foreign owner (our parent process, its start time recorded) makes it busy
        s.con.execute("UPDATE runs SET owner=?, owner_start=? WHERE run_id='r2'",
                      (f"{s.run('r2')['owner'].rpartition(':')[0]}:{os.getppid()}",
                       _proc_stat(os.getppid())[1]))
        assert s.claim("r2", {"epochs": 1}) == "busy"


_CLAIM_AND_EXIT = "import sys; from normlab.lab.store import Store; Store(sys.argv[1]).claim('r', {})"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to tell processes apart")
def test_a_recycled_local_pid_is_not_the_owner(tmp_path):
    """The owner of a run was killed and the OS gave its pid to a new, unrelated process: the
    run was waited for forever (the pid is alive). The claim records the owner's start time;
    a process at that pid with another start time is not the owner."""
    subprocess.run([sys.executable, "-c", _CLAIM_AND_EXIT, str(tmp_path)], check=True)
    reuser = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with Store(tmp_path) as s:
            host = s.run("r")["owner"].rpartition(":")[0]
            # the dead owner's pid now belongs to `reuser`; its heartbeat is fresh
            s.con.execute("UPDATE runs SET owner=?, updated=? WHERE run_id='r'",
                          (f"{host}:{reuser.pid}", time.time()))
            assert s.claim("r", {}) == "claimed"
            assert s.run("r")["owner"] == _me()
    finally:
        reuser.kill()
        reuser.wait()


def test_a_live_local_pid_with_a_stale_heartbeat_is_not_the_owner(tmp_path, monkeypatch):
    """Where the start time cannot tell (a row written before it was recorded), the heartbeat
    does, on this host as on any other: a live pid that has not touched its run for
    $NORMLAB_STALE_AFTER seconds is not its owner."""
    with Store(tmp_path) as s:
        s.claim("r", {})
        host = s.run("r")["owner"].rpartition(":")[0]
        s.con.execute("UPDATE runs SET owner=?, owner_start=NULL, updated=? WHERE run_id='r'",
                      (f"{host}:{os.getppid()}", time.time() - 60))
        assert s.claim("r", {}) == "busy"   # touched a minute ago (default: 900 s)
        monkeypatch.setenv("NORMLAB_STALE_AFTER", "30")
        assert s.claim("r", {}) == "claimed"


@pytest.mark.parametrize("pid", ["0", "-1", "99999999999999999999"])
def test_an_owner_pid_that_is_no_process_is_not_the_owner(tmp_path, pid):
    """An edited store's owner 'thishost:99999999999999999999' made os.kill raise
    OverflowError (a traceback out of reproduce); 0 and -1 name process groups to kill(), so
    the run counted as busy (waited for) while its heartbeat was fresh."""
    with Store(tmp_path) as s:
        s.claim("r", {})
        host = s.run("r")["owner"].rpartition(":")[0]
        s.con.execute("UPDATE runs SET owner=?, owner_start=NULL, updated=? WHERE run_id='r'",
                      (f"{host}:{pid}", time.time()))
        assert s.claim("r", {}) == "claimed"
        assert s.run("r")["owner"] == _me()


def test_remote_owner_is_busy_while_it_beats_and_stale_after(tmp_path, monkeypatch):
    """An owner on another host cannot be asked whether it lives: its run is busy while its
    row is touched within $NORMLAB_STALE_AFTER seconds, and taken over once it is not (a
    process killed outright, a lost node), so nobody waits forever."""
    import time

    with Store(tmp_path) as s:
        s.claim("r", {"epochs": 1})
        s.con.execute("UPDATE runs SET owner='other-host:4242', updated=? WHERE run_id='r'",
                      (time.time() - 10,))
        assert s.claim("r", {"epochs": 1}) == "busy"  # touched 10 s ago, default 900 s
        monkeypatch.setenv("NORMLAB_STALE_AFTER", "5")
        assert s.claim("r", {"epochs": 1}) == "claimed"  # 10 s > 5 s: abandoned
        assert s.run("r")["owner"] != "other-host:4242"
        # touched "in an hour" (an edited row, a clock far ahead): not believed, taken over now
        monkeypatch.delenv("NORMLAB_STALE_AFTER")
        s.con.execute("UPDATE runs SET owner='other-host:4242', updated=? WHERE run_id='r'",
                      (time.time() + 3600,))
        assert s.claim("r", {"epochs": 1}) == "claimed"
        monkeypatch.setenv("NORMLAB_STALE_AFTER", "soon")
        s.con.execute("UPDATE runs SET owner='other-host:4242' WHERE run_id='r'")
        with pytest.raises(ConfigError, match="NORMLAB_STALE_AFTER.*'soon'"):
            s.claim("r", {"epochs": 1})


def test_heartbeat_touches_our_run_until_the_block_ends(tmp_path):
    import threading
    import time

    with Store(tmp_path) as s:
        s.claim("r", {"epochs": 1})
        s.con.execute("UPDATE runs SET updated=0 WHERE run_id='r'")
        with heartbeat(tmp_path, "r", every_s=0.05):
            deadline = time.time() + 10
            while s.run("r")["updated"] == 0 and time.time() < deadline:
                time.sleep(0.02)
            assert s.run("r")["updated"] > 0  # the beat reached the store
        assert not any(t.name.startswith("normlab-heartbeat") for t in threading.enumerate())
        s.con.execute("UPDATE runs SET owner='other-host:1', updated=0 WHERE run_id='r'")
        assert s.touch("r") is False  # not ours: a heartbeat never revives another's claim
        assert s.run("r")["updated"] == 0


def test_release_frees_only_our_own_unfinished_claim(tmp_path):
    with Store(tmp_path) as s:
        s.claim("mine", {"epochs": 2})
        s.record_epochs("mine", _rows(1), {"wall_time": 1.0})
        s.release("mine")
        r = s.run("mine")
        assert (r["status"], r["owner"], r["epochs_done"]) == ("running", None, 1)
        s.claim("theirs", {"epochs": 2})
        s.con.execute("UPDATE runs SET owner='elsewhere:1' WHERE run_id='theirs'")
        s.release("theirs")  # another process's claim is not ours to give up
        assert s.run("theirs")["owner"] == "elsewhere:1"
        s.claim("done", {"epochs": 1})
        s.finish("done")
        s.release("done")
        assert s.run("done")["status"] == "done"


def test_study_membership_summary_and_exports(tmp_path):
    with Store(tmp_path) as s:
        for rid, label, x, err in [("a", "BN", 2, 10.0), ("b", "BN", 2, 12.0), ("c", "GN", 2, 5.0)]:
            s.claim(rid, {"epochs": 1, "seed": 0})
            s.record_epochs(rid, [{"epoch": 0, "test_error": err}], {})
            s.finish(rid)
        s.register("batch-size", "quick", [("a", "BN", 2), ("b", "BN", 2), ("c", "GN", 2)])
        stats = point_stats(s.study_runs("batch-size"))
        assert stats[("BN", 2)]["mean"] == 11.0 and stats[("BN", 2)]["n"] == 2
        assert abs(stats[("BN", 2)]["sd"] - 2 ** 0.5) < 1e-12 and stats[("GN", 2)]["sd"] is None
        paths = s.export()
    assert {p.name for p in paths} == {"runs.csv", "epochs.csv", "studies.csv", "spp.csv",
                                       "results.json"}
    doc = json.loads((tmp_path / "results.json").read_text())
    assert len(doc["runs"]) == 3 and doc["runs"][0]["history"][0]["test_error"] == 10.0
    assert (tmp_path / "runs.csv").read_text().count("\n") == 4
    # a member's x is the number it is: it was its JSON text, "2", which sorts "16" < "2" < "32"
    assert [m["x"] for m in doc["studies"]] == [2, 2, 2]


_WRITER = textwrap.dedent("""
    import sys
    from normlab.lab.store import Store
    s = Store(sys.argv[1])
    tag = sys.argv[2]
    for i in range(60):
        rid = f"{tag}{i}"
        s.claim(rid, {"epochs": 2, "i": i})
        s.record_epochs(rid, [{"epoch": e, "test_error": float(i)} for e in range(2)], {})
        s.finish(rid)
        s.register("study-" + tag, "default", [(rid, "L", i)])
""")


def test_two_processes_writing_one_store(tmp_path):
    # two studies at once: every transaction lands, the file passes SQLite's integrity check
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), tag])
             for tag in ("a", "b")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    con = sqlite3.connect(tmp_path / "results.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0] == 120
    assert con.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 240
    assert con.execute("SELECT COUNT(*) FROM study_runs").fetchone()[0] == 120


def test_a_study_rerun_on_other_data_is_not_pooled_with_the_first(tmp_path):
    """`reproduce --quick` on digits, then on synthetic into the same --out: the report must
    read the synthetic runs alone (they were pooled into one mean per point, under the first
    run's 'data digits' header). More seeds or other series of one setup do accumulate."""
    from normlab.lab.studies import get_study

    st = get_study("batch-size")

    def run(user, seeds=1, variants=None, err=10.0):
        pts = st.points(user, "quick", seeds, variants)
        with Store(tmp_path) as s:
            s.register(st.name, "quick", [(p.cfg.run_id(), p.label, p.x) for p in pts],
                       setup=pts[0].setup)
            for p in pts:
                if s.claim(p.cfg.run_id(), p.cfg.to_dict()) == "done":
                    continue  # trained by an earlier call: skipped, as a study skips it
                s.record_epochs(p.cfg.run_id(), [{"epoch": 0, "test_error": err}], {})
                s.finish(p.cfg.run_id())
        return pts

    run({}, err=10.0)                                    # digits
    syn = run({"data": "synthetic"}, err=50.0)
    with Store(tmp_path) as s:
        got = s.study_runs(st.name)
    assert {r["config"]["data"] for r in got} == {"synthetic"}
    assert sorted(r["run_id"] for r in got) == sorted(p.cfg.run_id() for p in syn)
    assert point_stats(got)[("BN", 2)]["values"] == [50.0]
    # the same setup again with two seeds and only GN: adds to the synthetic runs
    run({"data": "synthetic"}, seeds=2, variants=["GN"], err=40.0)
    with Store(tmp_path) as s:
        stats = point_stats(s.study_runs(st.name))
    assert stats[("GN", 2)]["n"] == 2 and stats[("BN", 2)]["values"] == [50.0]
    # naming the default explicitly is the same setup as leaving it out
    assert st.points({"data": "digits"}, "quick")[0].setup == st.points({}, "quick")[0].setup


def test_a_store_from_before_setups_opens_and_reads_its_studies(tmp_path):
    con = sqlite3.connect(tmp_path / "results.sqlite")
    con.execute("CREATE TABLE study_runs (study TEXT NOT NULL, preset TEXT NOT NULL, run_id TEXT "
                "NOT NULL, label TEXT NOT NULL, x TEXT, registered REAL, PRIMARY KEY (study, "
                "preset, run_id, label))")
    con.execute("INSERT INTO study_runs VALUES ('norms', 'quick', 'r', 'BN', '32', 1.0)")
    con.commit()
    con.close()
    with Store(tmp_path) as s:
        s.claim("r", {"epochs": 1})
        assert [r["run_id"] for r in s.study_runs("norms")] == ["r"]


def test_peak_memory_and_backend_are_recorded_and_exported(tmp_path):
    with Store(tmp_path) as s:
        s.claim("r1", {"epochs": 1})
        s.record_epochs("r1", _rows(1), {"images_per_s": 99.0, "peak_memory_mb": 123.5,
                                         "backend": "triton"})
        assert (s.run("r1")["peak_memory_mb"], s.run("r1")["backend"]) == (123.5, "triton")
        # a resumed run with no epoch left (killed before it was marked done) records a
        # summary without them: they are kept
        s.record_epochs("r1", _rows(1), {"images_per_s": 99.0})
        s.finish("r1")
        assert (s.run("r1")["peak_memory_mb"], s.run("r1")["backend"]) == (123.5, "triton")
        s.export()
    header, row = (tmp_path / "runs.csv").read_text().splitlines()[:2]
    cols = dict(zip(header.split(","), row.split(",")))
    assert (cols["peak_memory_mb"], cols["backend"]) == ("123.5", "triton")


def test_a_store_from_before_peak_memory_and_spp_analytics_opens(tmp_path):
    # the runs and spp tables as the first stores wrote them, with a row each
    con = sqlite3.connect(tmp_path / "results.sqlite")
    con.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, config TEXT NOT NULL, status TEXT "
                "NOT NULL, owner TEXT, epochs INTEGER, epochs_done INTEGER DEFAULT 0, wall_time "
                "REAL, images_per_s REAL, device TEXT, versions TEXT, final_train_loss REAL, "
                "final_train_error REAL, final_test_loss REAL, final_test_error REAL, error TEXT, "
                "created REAL, updated REAL)")
    con.execute("INSERT INTO runs (run_id, config, status, images_per_s) VALUES "
                "('old', '{}', 'done', 50.0)")
    con.execute("CREATE TABLE spp (model TEXT NOT NULL, depth INTEGER NOT NULL, name TEXT, "
                "avg_sq_mean REAL, avg_var REAL, residual_var REAL, PRIMARY KEY (model, depth))")
    con.execute("INSERT INTO spp VALUES ('m', 0, 'stem', 0.1, 1.0, NULL)")
    con.commit()
    con.close()
    with Store(tmp_path) as s:
        old = s.run("old")
        assert old["images_per_s"] == 50.0 and old["peak_memory_mb"] is None
        assert s.spp()["m"][0]["expected_var"] is None
        s.record_spp("n", [{"depth": 0, "name": "b", "avg_sq_mean": 0.1, "avg_var": 1.1,
                            "residual_var": 1.0, "expected_var": 1.04}], architecture="NF + Scaled WS")
        rec = s.spp()["n"][0]
        assert (rec["expected_var"], rec["architecture"]) == (1.04, "NF + Scaled WS")


def test_setup_info_is_kept_per_setup_and_merged(tmp_path):
    # the protocol a study's setup ran with, and the power rounds' outcome added later
    with Store(tmp_path) as s:
        s.claim("r1", {"epochs": 1})
        s.register("batch-size", "default", [("r1", "BN", 2)], setup="A",
                   info={"protocol": {"name": "per device", "devices": 8}})
        s.update_setup_info("batch-size", "default", "A", {"power": {"rounds": 2}})
        assert s.setup_info("batch-size") == {"protocol": {"name": "per device", "devices": 8},
                                              "power": {"rounds": 2}}
        s.register("batch-size", "default", [("r1", "BN", 2)], setup="B")  # another setup
        assert s.setup_info("batch-size") == {}
        assert s.setup_info("norms") == {}
        s.export()
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["setups"][0]["info"]["protocol"]["devices"] == 8


def test_heartbeat_beats_within_a_short_stale_limit(tmp_path, monkeypatch):
    # $NORMLAB_STALE_AFTER below the 60 s beat (a user who wants dead owners taken over fast):
    # the owner must still touch its run within the limit, else another process on this --out
    # took over a live owner's run and both trained it at once (seen with two `normlab train`
    # of one run at NORMLAB_STALE_AFTER=3: both trained all 3 epochs and wrote the store)
    monkeypatch.setenv("NORMLAB_STALE_AFTER", "0.6")
    with Store(tmp_path) as s:
        s.claim("r", {"epochs": 1})
        with heartbeat(tmp_path, "r"):
            time.sleep(1.5)  # past the limit: only beats keep the run fresh
            run = s.run("r")
            assert time.time() - run["updated"] < 0.6
            assert Store.in_training(run)  # another process would wait, not take it over


def test_an_owner_taken_over_writes_nothing_more(tmp_path):
    # an owner silent past $NORMLAB_STALE_AFTER (stopped, suspended, a stalled disk) is taken
    # over; when it wakes it must not write its stale epochs over its successor's (the DELETE
    # of later epochs would drop the successor's)
    from normlab.lab.store import TakenOver

    with Store(tmp_path) as s:
        s.claim("r", {"epochs": 3})
        s.record_epochs("r", _rows(1), {"wall_time": 1.0})
        # the successor took it over and wrote two epochs
        s.con.execute("UPDATE runs SET owner='other-host:7', epochs_done=2 WHERE run_id='r'")
        s.con.execute("INSERT INTO epochs (run_id, epoch, train_loss) VALUES ('r', 1, 42.0)")
        with pytest.raises(TakenOver, match="other-host:7"):
            s.record_epochs("r", _rows(1, base=9.0), {"wall_time": 1.0})
        assert [e["train_loss"] for e in s.epochs("r")] == [1.0, 42.0]
        r = s.run("r")
        assert (r["status"], r["owner"], r["epochs_done"]) == ("running", "other-host:7", 2)


def _taken_over_while_training(monkeypatch, error=None):
    """A point whose training is taken over by 'other-host:7' while this process was stopped,
    then writes an epoch (the runner's train_run patched), or with ``error`` fails with that
    error of its own before its next write; the point."""
    from normlab.lab import runner
    from normlab.lab.config import RunConfig

    class P:
        cfg = RunConfig(norm="gn", batch_size=2, epochs=2)
        label = "gn"

    def train_run(cfg, store, progress=None):
        store.con.execute("UPDATE runs SET owner='other-host:7' WHERE run_id=?",
                          (cfg.run_id(),))
        if error is not None:
            raise error
        store.record_epochs(cfg.run_id(), _rows(1), {})

    monkeypatch.setattr(runner, "train_run", train_run)
    return P()


def test_the_runner_leaves_a_run_taken_over_to_its_new_owner(tmp_path, monkeypatch):
    # the old owner's write raises TakenOver; recording that as the run's failure would set it
    # `failed` with no owner under the process training it, and a third process would claim
    # and train it again at the same time
    from normlab.lab import runner

    p = _taken_over_while_training(monkeypatch)
    with Store(tmp_path) as s:
        assert runner.run_points([p], s) == {"skipped": 0, "trained": 0, "failed": 1}
        r = s.run(p.cfg.run_id())
        assert (r["status"], r["owner"]) == ("running", "other-host:7")


def test_a_multi_process_job_taken_over_leaves_the_run_to_its_new_owner(tmp_path, monkeypatch):
    # the same under torch.distributed: rank 0 (the writer) marked the new owner's run failed
    # before raising, as for a peer's death
    from normlab import distributed as nd
    from normlab.lab import runner
    from normlab.lab.store import TakenOver

    p = _taken_over_while_training(monkeypatch)
    monkeypatch.setattr(nd, "is_distributed", lambda: True)
    monkeypatch.setattr(runner, "is_writer", lambda: True)
    with Store(tmp_path) as s:
        assert s.claim(p.cfg.run_id(), p.cfg.to_dict()) == "claimed"
        with pytest.raises(TakenOver):
            runner._train_point(p, s, None)
        r = s.run(p.cfg.run_id())
        assert (r["status"], r["owner"]) == ("running", "other-host:7")


@pytest.mark.parametrize("successor", ["finished", "failed", "released"])
def test_an_owner_taken_over_writes_nothing_into_a_run_its_successor_ended(tmp_path, successor):
    # the successor may finish the run (done or failed: owner NULL) or release it (owner
    # NULL, still running) before the old owner wakes: record_epochs checked only for another
    # owner, so the old owner wrote its stale epochs over the finished run's (and its DELETE of
    # later epochs dropped the successor's last ones)
    from normlab.lab.store import TakenOver

    with Store(tmp_path) as s:
        s.claim("r", {"epochs": 3})
        s.record_epochs("r", _rows(1), {"wall_time": 1.0})
        # the successor took it over, trained it to the end and finished (or released) it
        s.con.execute("INSERT INTO epochs (run_id, epoch, train_loss) VALUES ('r', 1, 42.0), "
                      "('r', 2, 43.0)")
        ended = {"finished": "status='done'", "failed": "status='failed'",
                 "released": "status='running'"}[successor]
        s.con.execute(f"UPDATE runs SET {ended}, owner=NULL, epochs_done=3 WHERE run_id='r'")
        with pytest.raises(TakenOver, match="run r was"):
            s.record_epochs("r", _rows(1, base=9.0), {"wall_time": 1.0})
        with pytest.raises(TakenOver):
            s.check_owner("r")
        assert [e["train_loss"] for e in s.epochs("r")] == [1.0, 42.0, 43.0]
        assert s.run("r")["epochs_done"] == 3


def _exports(d):
    import csv
    runs = {r["run_id"]: r for r in csv.DictReader((d / "runs.csv").open())}
    epochs = [(r["run_id"], int(r["epoch"])) for r in csv.DictReader((d / "epochs.csv").open())]
    doc = json.loads((d / "results.json").read_text())
    return runs, epochs, doc


def test_one_export_is_one_snapshot(tmp_path):
    # runs, epochs, spp, ... were read in separate autocommit SELECTs: a writer between them
    # made runs.csv say `running, 1 epoch` while epochs.csv and results.json held 2 epochs
    # (or, the other way, a run `done` whose last epoch was missing). Here the other writer
    # finishes the run right after the export read the runs table
    with Store(tmp_path) as s, Store(tmp_path) as other:
        s.claim("r", {"epochs": 2})
        s.record_epochs("r", _rows(1), {"wall_time": 1.0})
        runs = s.runs

        def runs_then_a_write(*a, **kw):
            got = runs(*a, **kw)
            other.record_epochs("r", _rows(2), {"wall_time": 2.0})
            other.finish("r")
            return got

        s.runs = runs_then_a_write
        s.export()
    csv_runs, epochs, doc = _exports(tmp_path)
    assert (csv_runs["r"]["status"], csv_runs["r"]["epochs_done"]) == ("running", "1")
    assert epochs == [("r", 0)]  # as the runs table was when read, not the other writer's
    assert [len(r["history"]) for r in doc["runs"]] == [1]


def test_an_older_export_never_replaces_a_newer_one(tmp_path):
    # two processes exporting at once (two studies ending together on one --out): the one
    # that read the store first renamed its files last, over the other's newer ones, and the
    # exports said a finished run was still running. Here process A reads, then B finishes the
    # run and exports, then A places its older snapshot
    with Store(tmp_path) as a, Store(tmp_path) as b:
        a.claim("r", {"epochs": 1})
        runs = a.runs

        def runs_then_another_export(*args, **kw):
            got = runs(*args, **kw)
            b.record_epochs("r", _rows(1), {"wall_time": 1.0})
            b.finish("r")
            b.export()
            return got

        a.runs = runs_then_another_export
        a.export()
    csv_runs, epochs, doc = _exports(tmp_path)
    assert csv_runs["r"]["status"] == "done" and epochs == [("r", 0)]
    assert doc["runs"][0]["status"] == "done"
    # a store moved away and started afresh (its count from 0) replaces the old one's exports
    generation = doc["export"]["generation"]
    os.rename(tmp_path / "results.sqlite", tmp_path / "old.sqlite")
    with Store(tmp_path) as s:
        s.export()
    runs2, epochs2, doc2 = _exports(tmp_path)
    assert runs2 == {} and epochs2 == [] and doc2["export"]["generation"] < generation


def _legacy_store(path, members):
    """A store as normlab wrote it before setups were kept (no ``setup`` column, no
    ``setups`` table): ``members`` are (run_id, label, x, config, test error, registered)."""
    con = sqlite3.connect(path / "results.sqlite")
    con.executescript(
        "CREATE TABLE runs (run_id TEXT PRIMARY KEY, config TEXT NOT NULL, status TEXT NOT NULL,"
        " owner TEXT, epochs INTEGER, epochs_done INTEGER DEFAULT 0, wall_time REAL, images_per_s"
        " REAL, device TEXT, versions TEXT, final_train_loss REAL, final_train_error REAL,"
        " final_test_loss REAL, final_test_error REAL, error TEXT, created REAL, updated REAL);"
        "CREATE TABLE epochs (run_id TEXT NOT NULL, epoch INTEGER NOT NULL, train_loss REAL,"
        " train_error REAL, test_loss REAL, test_error REAL, lr REAL, wall_time REAL,"
        " images_per_s REAL, PRIMARY KEY (run_id, epoch));"
        "CREATE TABLE study_runs (study TEXT NOT NULL, preset TEXT NOT NULL, run_id TEXT NOT NULL,"
        " label TEXT NOT NULL, x TEXT, registered REAL, PRIMARY KEY (study, preset, run_id, label));"
        "CREATE TABLE spp (model TEXT NOT NULL, depth INTEGER NOT NULL, name TEXT, avg_sq_mean"
        " REAL, avg_var REAL, residual_var REAL, PRIMARY KEY (model, depth));")
    for rid, label, x, cfg, err, registered in members:
        if cfg is not None:
            con.execute("INSERT INTO runs (run_id, config, status, epochs, epochs_done, "
                        "final_test_error) VALUES (?, ?, 'done', 1, 1, ?)",
                        (rid, json.dumps(cfg), err))
            con.execute("INSERT INTO epochs (run_id, epoch, test_error) VALUES (?, 0, ?)",
                        (rid, err))
        con.execute("INSERT INTO study_runs VALUES ('batch-size', 'quick', ?, ?, ?, ?)",
                    (rid, label, json.dumps(x), registered))
    con.commit()
    con.close()


@pytest.mark.parametrize("read_only", [True, False])
def test_a_store_from_before_setups_keeps_a_study_on_other_data_apart(tmp_path, read_only):
    # a store written before setups were kept, where the study ran on digits and then on
    # synthetic: every row got setup '' when opened, so the report pooled both into one mean
    # per point (BN at 2: 5% on digits and 50% on synthetic, n=2) under "data digits /
    # synthetic". A run of the second invocation registered but never claimed goes with it.
    cfg = lambda data, norm, batch: {"model": "resnet20", "norm": norm, "batch_size": batch,
                                     "data": data, "epochs": 2, "seed": 0, "label": norm.upper()}
    _legacy_store(tmp_path, [
        ("d-bn2", "BN", 2, cfg("digits", "bn", 2), 5.0, 1.0),
        ("d-gn2", "GN", 2, cfg("digits", "gn", 2), 6.0, 1.0),
        ("s-bn2", "BN", 2, cfg("synthetic", "bn", 2), 50.0, 2.0),
        ("s-gn2", "GN", 2, None, None, 2.0)])  # the process was killed before claiming it
    with Store(tmp_path, read_only=read_only) as s:
        got = s.study_runs("batch-size")
        assert [(r["run_id"], r["config"]["data"]) for r in got] == [("s-bn2", "synthetic")]
        assert point_stats(got)[("BN", 2)]["values"] == [50.0]
        assert [m["run_id"] for m in s.study_members("batch-size")] == ["s-bn2", "s-gn2"]
        current = {m["run_id"]: m["current"] for m in s.memberships()}
    assert current == {"d-bn2": False, "d-gn2": False, "s-bn2": True, "s-gn2": True}


def test_single_runs_on_other_data_stay_one_list(tmp_path):
    # `normlab train` registers its runs with setup '' (no table pools them): runs on other
    # data are all in the report's single-runs table, not split as an old study's setups are
    with Store(tmp_path) as s:
        for rid, data in (("a", "digits"), ("b", "synthetic")):
            s.claim(rid, {"data": data, "epochs": 1, "seed": 0})
            s.register("train", "single", [(rid, "bn", 32)])
        assert [r["run_id"] for r in s.study_runs("train")] == ["a", "b"]
        assert all(m["current"] for m in s.memberships())


def test_a_rerun_on_a_cpu_of_a_study_run_on_a_gpu_says_so(tmp_path):
    # a results directory copied from a GPU machine to a CPU one: device "auto" is another
    # run there (another setup), so a re-run trains every point again, and its note told the
    # two setups apart by nothing ("earlier: setup 6c1f2a9e; now: setup 0b7d3e41")
    from normlab.lab.run import left_out_of_report
    from normlab.lab.studies import get_study

    st = get_study("norms")
    pts = st.points({"epochs": 1}, "quick", 1)
    with Store(tmp_path) as s:  # as the GPU machine stored them (its setup id was its own)
        s.register(st.name, "quick", [(f"gpu{i}", p.label, p.x) for i, p in enumerate(pts)],
                   setup="setup-on-the-gpu-machine")
        for i, p in enumerate(pts):
            s.claim(f"gpu{i}", p.cfg.to_dict())
            s.record_epochs(f"gpu{i}", [{"epoch": 0, "test_error": 5.0}],
                            {"device": "cuda:NVIDIA H100 80GB HBM3"})
            s.finish(f"gpu{i}")
        n, how = left_out_of_report(s, st.name, "quick", pts, st.protocol(1))
    assert (n, how) == (len(pts), "earlier: ran on cuda; now: ran on cpu")


def test_runs_of_an_earlier_presets_settings_are_not_pooled_into_one_setup(tmp_path):
    # a setup id hashes the user's choices only: after an upgrade whose quick preset no longer
    # sets train_limit 640, `reproduce --quick` on the same options registered its new runs in
    # the setup of the old ones, and the report's BN at 32 was one mean over a run on 640
    # images and one on all of them, both "seed 0" (n=2). A run stored by the earlier normlab
    # with the same settings (its config lacking the keys added since) still counts.
    old = {"model": "resnet20", "norm": "bn", "batch_size": 32, "data": "digits", "epochs": 2,
           "device": "cpu", "label": "BN"}
    new = {**old, "device": "auto", "optimizer": "sgd", "precise_bn": 0, "world_size": 1,
           "threads": 1}
    with Store(tmp_path) as s:
        runs = [("old640", {**old, "train_limit": 640, "seed": 0}, 4.0),
                ("old-seed1", {**old, "seed": 1}, 6.0),
                ("new", {**new, "seed": 0}, 5.0)]
        for rid, cfg, err in runs:
            s.claim(rid, cfg)
            s.record_epochs(rid, [{"epoch": 0, "test_error": err}], {})
            s.finish(rid)
        for rid, _, _ in runs:
            s.register("batch-size", "quick", [(rid, "BN", 32)], setup="S")
            time.sleep(0.01)
        stats = point_stats(s.study_runs("batch-size"))
        current = {m["run_id"]: m["current"] for m in s.memberships()}
    assert stats[("BN", 32)]["values"] == [6.0, 5.0], stats
    assert current == {"old640": False, "old-seed1": True, "new": True}


def test_an_owner_taken_over_neither_finishes_nor_fails_its_successors_run(tmp_path,
                                                                             monkeypatch):
    # Store.finish did not check the owner: the stale owner's failure (an error other than
    # TakenOver, before its next write) set the successor's run `failed` with no owner, and
    # the successor stopped at its next epoch; its last finish (a takeover between its last
    # record_epochs and finish) marked the successor's run `done`
    from normlab.lab import runner
    from normlab.lab.store import TakenOver

    p = _taken_over_while_training(monkeypatch, MemoryError("out of memory in the stale owner"))
    with Store(tmp_path) as s:
        assert runner.run_points([p], s) == {"skipped": 0, "trained": 0, "failed": 1}
        r = s.run(p.cfg.run_id())
        assert (r["status"], r["owner"]) == ("running", "other-host:7")
        with pytest.raises(TakenOver, match="other-host:7"):
            s.finish(p.cfg.run_id(), "done")
        assert s.run(p.cfg.run_id())["status"] == "running"


def _two_studies_with_an_earlier_setup(s):
    """batch-size on two setups (the second with a point never claimed) and norms on one:
    ``(run_id, study, x)`` registered, each run finished with a random, off-centre error."""
    rng = __import__("random").Random(7)
    registered = []
    for study, setup, epochs, ids in (("batch-size", "A", 1, "abc"), ("norms", "N", 1, "de"),
                                      ("batch-size", "B", 2, "fgh")):
        members = [(f"{study}-{i}", "BN" if k % 2 else "GN", 2 ** (k + 1))
                   for k, i in enumerate(ids)]
        for rid, label, x in members[:-1] if setup == "B" else members:  # h: never claimed
            s.claim(rid, {"epochs": epochs, "seed": 0, "label": label, "batch_size": x})
            s.record_epochs(rid, [{"epoch": 0, "test_error": 30 + 20 * rng.random()}], {})
            s.finish(rid)
        s.register(study, "quick", members, setup=setup, info={"protocol": {"setup": setup}})
        registered += [(rid, study, x) for rid, _, x in members]
        time.sleep(0.01)
    return registered


def _reads(s):
    """What a report asks the store about its studies."""
    return {"memberships": s.memberships(),
            **{f"{study} {what}": getattr(s, what)(study) for study in ("batch-size", "norms")
               for what in ("study_members", "setup_info", "study_runs")}}


def test_reads_in_a_snapshot_are_those_outside_one_and_see_each_write_after_it(tmp_path):
    # a snapshot keeps the study members it read once (a report asked for them O(studies)
    # times, each O(runs)): inside one the answers must be those read without it, and a write
    # after it, by this store or another process, must be seen by the next one
    with Store(tmp_path) as s:
        _two_studies_with_an_earlier_setup(s)
        outside = _reads(s)
        with s.snapshot():
            first = _reads(s)
            assert _reads(s) == first  # asked again in the same snapshot
            with Store(tmp_path) as other:  # another process registers a point meanwhile
                other.register("norms", "quick", [("norms-x", "GN", 64)], setup="N")
            assert _reads(s) == first  # one snapshot: one state
        assert first == outside
        assert ("norms-x", "GN", 64) in [(m["run_id"], m["label"], m["x"])
                                         for m in s.study_members("norms")]
        with s.snapshot():
            assert "norms-x" in [m["run_id"] for m in s.study_members("norms")]
        s.register("batch-size", "quick", [("batch-size-y", "GN", 64)], setup="C")  # this store
        with s.snapshot():
            assert [m["run_id"] for m in s.study_members("batch-size")] == ["batch-size-y"]
            assert s.setup_info("batch-size") == {}
            current = {m["run_id"] for m in s.memberships() if m["current"]}
        assert current == {"batch-size-y", "norms-d", "norms-e", "norms-x"}

