"""Training runs killed at exact points (a test hook), with planted, damaged or deleted
checkpoints, and failing: nothing planted runs, nothing is lost, every outcome is said, and the
exit status tells (issue 14 items 1, 2, 3, 8)."""

import errno
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from normlab.lab import loop
from normlab.distributed import LaunchSpec
from normlab.lab.cli import app
from normlab.lab.cli.options import user_overrides
from normlab.lab.config import RunConfig
from normlab.lab.loop import TEST_EXIT_ENV, TEST_KILL_ENV
from normlab.lab.store import Store
from normlab.lab.studies import get_study

runner = CliRunner()
# 64 images of 8x8: 4 steps per epoch at batch 16, a run in about a second
SMALL = json.dumps({"n_train": 64, "n_test": 32, "image_size": 8, "channels": 1,
                    "num_classes": 4})


def _train_args(out, epochs=1):
    return ["train", "--norm", "gn", "--data", "synthetic", "--set", f"data_kwargs={SMALL}",
            "--set", "norm_kwargs.num_groups=4", "--batch-size", "16", "--epochs", str(epochs),
            "--out", str(out)]


def _run_id(out):
    con = sqlite3.connect(out / "results.sqlite")
    (rid,) = con.execute("SELECT run_id FROM runs").fetchone()
    con.close()
    return rid


def _row(out, rid):
    con = sqlite3.connect(out / "results.sqlite")
    con.row_factory = sqlite3.Row
    row = dict(con.execute("SELECT * FROM runs WHERE run_id=?", (rid,)).fetchone())
    con.close()
    return row


def _cli(argv, **env):
    return subprocess.run([sys.executable, "-m", "normlab.lab.cli", *argv], capture_output=True,
                          text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env})


def _the_run_id(epochs=1):
    """The run id `_train_args` trains, without training it."""
    cfg = RunConfig(norm="gn", data="synthetic", data_kwargs=json.loads(SMALL), batch_size=16,
                    epochs=epochs, norm_kwargs={"num_groups": 4}, label="gn")
    return cfg.run_id()


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_planted_checkpoint_does_not_run_and_the_run_starts_over(tmp_path):
    """Item 1: a pickle planted at OUT/checkpoints/<run id>.pt ran its payload on the next
    `normlab train` (torch.load(weights_only=False))."""
    out = tmp_path / "out"
    rid = _the_run_id()
    marker = tmp_path / "payload-ran"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"model": _Payload(marker), "epoch": 0}, out / "checkpoints" / f"{rid}.pt")
    r = runner.invoke(app, _train_args(out))
    assert r.exit_code == 0, r.output
    assert _run_id(out) == rid  # the planted file sat where this very run looks
    assert not marker.exists()
    assert f"checkpoint {str(out / 'checkpoints' / f'{rid}.pt')!r} does not load (refused by " \
           "torch.load(weights_only=True)" in r.output.replace("\n", ""), r.output
    assert "starts over from epoch 0" in r.output
    assert (out / "checkpoints" / f"{rid}.pt.damaged").is_file()
    assert _row(out, rid)["status"] == "done"


def _wrong_keys(path):
    # a well-formed checkpoint of another model: loads, does not fit this run
    torch.save({"model": {"conv.weight": torch.ones(3)}, "optimizer": {"state": {},
                "param_groups": [{"params": [0], "lr": 0.1}]}, "epoch": 0, "history": [],
                "elapsed": 1.0, "train_time": 1.0, "train_images": 64}, path)


@pytest.fixture(scope="module")
def killed_before_done(tmp_path_factory):
    """An --out whose run was killed when its only epoch was checkpointed, before "done": a
    real checkpoint to damage."""
    out = tmp_path_factory.mktemp("killed") / "out"
    p = _cli(_train_args(out), **{TEST_KILL_ENV: "before-done"})
    assert p.returncode == 17, p.stderr
    return out


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.write_bytes(random.Random(0).randbytes(2048)), "does not load (refused by"),
    (lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),
     "does not load (RuntimeError: PytorchStreamReader failed reading zip archive"),
    (_wrong_keys, "does not fit this run (Error(s) in loading state_dict"),
], ids=["random-bytes", "truncated", "wrong-keys"])
def test_a_damaged_checkpoint_is_discarded_naming_it_and_the_run_restarts(
        tmp_path, killed_before_done, damage, needle):
    """Item 3: a damaged checkpoint failed its run on every re-run, with exit status 0 and an
    error that did not name the file."""
    out = tmp_path / "out"
    shutil.copytree(killed_before_done, out)
    rid = _run_id(out)
    ckpt = out / "checkpoints" / f"{rid}.pt"
    assert ckpt.is_file()
    damage(ckpt)
    r = runner.invoke(app, _train_args(out))
    assert r.exit_code == 0, r.output
    text = r.output.replace("\n", "")
    assert f"checkpoint {str(ckpt)!r} {needle}" in text, r.output
    assert "moved to" in text and "starts over from epoch 0" in text
    row = _row(out, rid)
    assert row["status"] == "done" and row["epochs_done"] == 1 and row["wall_time"] > 0


def _quick_gn_runs() -> int:
    """How many runs the batch-size study's quick preset has for the GN series alone."""
    return len(get_study("batch-size").points({}, "quick", None, ["GN"], devices=1))


def test_killed_after_the_last_checkpoint_the_rerun_finishes_and_trains_the_rest(tmp_path):
    """Item 2: killed after the last epoch's checkpoint, before the run was "done": the re-run
    crashed with KeyError 'wall_time', left the run done with wall_time NULL, and (--jobs 1)
    trained none of the runs after it."""
    out = tmp_path / "out"
    argv = ["reproduce", "--quick", "--devices", "1", "--data", "synthetic", "--variants", "GN", "--jobs", "1",
            "--set", f"data_kwargs={SMALL}", "--set", "epochs=1", "--no-report", "--out", str(out)]
    p = _cli(argv, **{TEST_KILL_ENV: "before-done"})
    assert p.returncode == 17 and "killed at before-done" in p.stdout, p.stdout + p.stderr
    con = sqlite3.connect(out / "results.sqlite")
    first, status, done = con.execute("SELECT run_id, status, epochs_done FROM runs").fetchone()
    con.close()
    assert (status, done) == ("running", 1)  # its only epoch recorded, not yet done
    r = runner.invoke(app, argv)
    assert r.exit_code == 0, r.output
    n = _quick_gn_runs()
    assert n >= 2  # the killed run and at least one after it
    assert "resumed at epoch 1" in r.output and f"trained {n}, already done 0, failed 0" in r.output
    con = sqlite3.connect(out / "results.sqlite")
    rows = con.execute("SELECT status, wall_time, images_per_s FROM runs").fetchall()
    con.close()
    assert len(rows) == n and all(s == "done" and w > 0 and i > 0 for s, w, i in rows), rows
    first_row = _row(out, first)
    assert first_row["wall_time"] > 0 and first_row["images_per_s"] > 0


def test_a_kill_between_done_and_the_checkpoint_delete_leaves_no_checkpoint(tmp_path):
    """Item 8: killed after the run was marked done, before its checkpoint was deleted: the
    .pt stayed forever. The next command that opens the store for writing removes it."""
    out = tmp_path / "out"
    p = _cli(_train_args(out), **{TEST_KILL_ENV: "before-checkpoint-delete"})
    assert p.returncode == 17, p.stderr
    rid = _run_id(out)
    assert _row(out, rid)["status"] == "done"
    assert (out / "checkpoints" / f"{rid}.pt").is_file()
    r = runner.invoke(app, _train_args(out))
    assert r.exit_code == 0 and "already done" in r.output, r.output
    assert not (out / "checkpoints" / f"{rid}.pt").exists()


def test_a_deleted_checkpoint_restarts_the_run_and_says_so(tmp_path):
    """Item 8: a run with epochs in the store whose checkpoint was deleted restarted from epoch
    0 without a word."""
    out = tmp_path / "out"
    # rank 0 exits after 6 steps: epoch 0 (4 steps) checkpointed and recorded, epoch 1 cut
    p = _cli(_train_args(out, epochs=2), **{TEST_EXIT_ENV: "0:6"})
    assert p.returncode == 17, p.stderr
    rid = _run_id(out)
    assert _row(out, rid)["epochs_done"] == 1
    (out / "checkpoints" / f"{rid}.pt").unlink()
    r = runner.invoke(app, _train_args(out, epochs=2))
    assert r.exit_code == 0, r.output
    text = r.output.replace("\n", "")
    assert "is missing (the store has 1 epoch(s) of this run); the run starts over from epoch 0" \
        in text, r.output
    assert "resumed at" not in text
    assert _row(out, rid)["epochs_done"] == 2


def test_a_failed_run_makes_train_and_reproduce_exit_non_zero(tmp_path, monkeypatch):
    """Item 3: a run that failed left `train` and `reproduce` with exit status 0."""
    def broken_step(*args, **kwargs):
        raise RuntimeError("a fault in the training step (test)")

    monkeypatch.setattr(loop, "_step", broken_step)
    r = runner.invoke(app, _train_args(tmp_path / "t"))
    assert r.exit_code == 1, r.output
    assert "failed: RuntimeError: a fault in the training step (test)" in r.output
    assert "error: 1 run(s) failed" in r.output
    r = runner.invoke(app, ["reproduce", "--quick", "--devices", "1", "--data", "synthetic", "--variants", "GN",
                            "--jobs", "1", "--set", f"data_kwargs={SMALL}", "--no-report",
                            "--out", str(tmp_path / "r")])
    n = _quick_gn_runs()
    assert r.exit_code == 1 and f"failed {n}" in r.output and f"error: {n} run(s) failed" in r.output


def test_parallel_jobs_count_only_what_this_process_trained(tmp_path):
    """Item 8: with --jobs, a run that another process sharing --out finished while this one's
    workers waited for it was counted as trained here (two studies each said "trained 10").
    Here this test process is that other process: it holds one run, lets the study train the
    others, then finishes the held one."""
    out = tmp_path / "out"
    sets = [f"data_kwargs={SMALL}", "epochs=1"]
    user = user_overrides(data="synthetic", data_dir=None, model=None, device=None, config=None,
                          sets=sets, launch=LaunchSpec())
    held = get_study("batch-size").points(user, "quick", None, ["GN"], devices=1)[0].cfg
    with Store(out) as store:
        assert store.claim(held.run_id(), held.to_dict()) == "claimed"  # owned by this process
        argv = ["reproduce", "--quick", "--devices", "1", "--data", "synthetic", "--variants", "GN", "--jobs", "2",
                "--no-report", "--out", str(out)] + [a for s_ in sets for a in ("--set", s_)]
        study = subprocess.Popen([sys.executable, "-m", "normlab.lab.cli", *argv],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        try:
            deadline = time.monotonic() + 240
            others = _quick_gn_runs() - 1
            while len(store.runs("done")) < others and study.poll() is None:
                assert time.monotonic() < deadline, "the study did not train the other runs"
                time.sleep(0.5)
            store.record_epochs(held.run_id(), [{"epoch": 0, "test_error": 50.0}],
                                {"wall_time": 1.0, "images_per_s": 10.0})
            store.finish(held.run_id())  # "the other process" finishes its run
            stdout, stderr = study.communicate(timeout=120)
        finally:
            study.kill()
    assert study.returncode == 0, stdout + stderr
    assert f"trained {others}, already done 1, failed 0" in stdout, stdout


# A full disk under a results directory: one error line that says so, the study stopped (not
# every later run failed in turn), the run in progress resumable from its last checkpoint. (On a
# 3 MiB tmpfs the lab failed each run of a study in turn with torch's "unexpected pos".)
def _full_from_the_second_checkpoint(monkeypatch):
    """torch.save as on a disk that fills up after the first checkpoint."""
    save, calls = torch.save, []

    def fake(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fake)


def test_train_stops_at_a_full_disk_and_resumes_from_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "t"
    with monkeypatch.context() as m:
        _full_from_the_second_checkpoint(m)
        r = runner.invoke(app, _train_args(out, epochs=3))
    assert r.exit_code == 1, r.output
    text = " ".join(r.output.split())
    assert "is full: writing" in text and "No space left on device" in text, text
    assert "hint: free some space there" in text and "failed:" not in text, text
    rid = _the_run_id(epochs=3)
    row = _row(out, rid)
    assert (row["status"], row["owner"], row["epochs_done"]) == ("running", None, 1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"{rid}.pt"]
    r = runner.invoke(app, _train_args(out, epochs=3))  # room again: it goes on from epoch 1
    assert r.exit_code == 0, r.output
    assert "resumed at epoch 1" in " ".join(r.output.split()), r.output
    assert _row(out, rid)["status"] == "done"


def test_a_study_stops_at_a_full_disk_instead_of_failing_every_run(tmp_path, monkeypatch):
    out = tmp_path / "r"
    _full_from_the_second_checkpoint(monkeypatch)
    r = runner.invoke(app, ["reproduce", "--quick", "--devices", "1", "--data", "synthetic",
                            "--variants", "GN", "--jobs", "1", "--set", f"data_kwargs={SMALL}",
                            "--set", "epochs=3", "--no-report", "--out", str(out)])
    assert r.exit_code == 1, r.output
    assert "is full" in r.output and "seed=0: failed" not in r.output, r.output
    assert "GN x=2 " not in r.output, r.output  # the next run did not start
    con = sqlite3.connect(out / "results.sqlite")
    states = con.execute("SELECT status, owner FROM runs").fetchall()
    con.close()
    assert _quick_gn_runs() > 1 and states == [("running", None)]  # one run began, released


def test_train_stops_at_a_full_store_and_resumes_from_the_last_checkpoint(tmp_path, monkeypatch):
    # SQLite's "database or disk is full" writing the second epoch's rows: one line, status 1,
    # the run released with its first epoch, and the re-run goes on from its last checkpoint
    from normlab.lab import store as store_mod
    from normlab.lab.store_open import _names_damage

    record, calls = store_mod.Store.record_epochs.__wrapped__, []

    def full_at_the_second(self, run_id, rows, summary):
        calls.append(1)
        if len(calls) > 1:
            e = sqlite3.OperationalError("database or disk is full")
            e.sqlite_errorname = "SQLITE_FULL"
            raise e
        return record(self, run_id, rows, summary)

    out = tmp_path / "t"
    with monkeypatch.context() as m:
        m.setattr(store_mod.Store, "record_epochs", _names_damage(full_at_the_second))
        r = runner.invoke(app, _train_args(out, epochs=3))
    assert r.exit_code == 1, r.output
    text = " ".join(r.output.split())
    assert f"the disk holding '{out}' is full: writing the results store failed" in text, text
    assert "database or disk is full" in text and "failed:" not in text, text
    rid = _the_run_id(epochs=3)
    row = _row(out, rid)
    assert (row["status"], row["owner"], row["epochs_done"]) == ("running", None, 1)
    r = runner.invoke(app, _train_args(out, epochs=3))
    assert r.exit_code == 0, r.output
    assert "resumed at epoch 2" in " ".join(r.output.split()), r.output  # its checkpoint's
    assert _row(out, rid)["status"] == "done"
    con = sqlite3.connect(out / "results.sqlite")
    assert [e for (e,) in con.execute("SELECT epoch FROM epochs WHERE run_id=? ORDER BY epoch",
                                      (rid,))] == [0, 1, 2]
    con.close()
