"""A results store that is damaged, on a read-only mount, or left with stale files: every command
says so in one line naming the file and what to do, and reads what can be read (issue 14)."""

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from normlab.lab.cli import app
from normlab.lab.config import RunConfig
from normlab.lab.outfiles import DiskFull
from normlab.lab.store import Store, StoreError

runner = CliRunner()


def _fill(out, n_runs=40):
    """A store of ``n_runs`` finished batch-size runs of 3 epochs each (training loss falling, so
    the analysis does not flag them as unconverged), exported: 40 runs give
    about twenty 4 KiB pages, enough to damage some and leave the schema page whole."""
    with Store(out) as s:
        members = []
        for i in range(n_runs):
            cfg = RunConfig(norm=("bn", "gn")[i % 2], batch_size=2 ** (1 + i % 5), seed=i,
                            data="synthetic", epochs=3)
            rid = cfg.run_id()
            s.claim(rid, cfg.to_dict())
            s.record_epochs(rid, [{"epoch": e, "test_error": 10.0 + i - e, "train_loss": 2.0 - 0.5 * e}
                                  for e in range(3)], {"wall_time": 3.0, "images_per_s": 50.0})
            s.finish(rid)
            members.append((rid, cfg.norm.upper(), cfg.batch_size))
        s.register("batch-size", "quick", members)
        s.export()
    return out / "results.sqlite"


def _damage_pages(path):
    """Random bytes over every third page after the first (the schema page stays readable, so
    the store opens and the damage shows in the first query that reaches a bad page)."""
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    rng = random.Random(0)
    for p in range(2, len(data) // page - 1, 3):
        data[p * page:(p + 1) * page] = rng.randbytes(page)
    path.write_bytes(bytes(data))


def _one_error(output, *needles):
    lines = output.strip().splitlines()
    assert "Traceback" not in output and len(lines) == 2, output
    assert lines[0].startswith("error:") and lines[1].startswith("hint:"), output
    for needle in needles:
        assert needle in output, output


def test_a_damaged_store_is_one_line_naming_the_file_and_the_exports(tmp_path):
    """Issue 14 item 4: `ls`, `report` and `reproduce` on a store with damaged pages gave a raw
    `sqlite3.DatabaseError: database disk image is malformed` traceback."""
    out = tmp_path / "out"
    db = _fill(out)
    _damage_pages(db)
    damaged = db.read_bytes()
    cmds = [["ls", str(out)], ["report", str(out)],
            ["reproduce", "--quick", "--devices", "1", "--data", "synthetic", "--jobs", "1", "--set",
             'data_kwargs={"n_train": 64, "n_test": 32, "image_size": 8, "channels": 1}',
             "--out", str(out)]]
    for argv in cmds:
        r = runner.invoke(app, argv)
        assert r.exit_code == 2, (argv, r.output)
        _one_error(r.output, str(db), "is damaged", "runs.csv", "move the file away")
    assert db.read_bytes() == damaged  # left as it was, for salvage
    assert (out / "runs.csv").read_text().count("\n") == 41  # the exports are intact


def test_store_methods_name_the_damaged_file(tmp_path):
    db = _fill(tmp_path)
    _damage_pages(db)
    with Store(tmp_path, read_only=True) as s, pytest.raises(StoreError, match="is damaged"):
        s.runs()
        for r in s.runs():
            s.epochs(r["run_id"])


def test_read_only_store_reads_a_store_written_before_new_columns(tmp_path):
    con = sqlite3.connect(tmp_path / "results.sqlite")
    con.executescript(
        "CREATE TABLE runs (run_id TEXT PRIMARY KEY, config TEXT NOT NULL, status TEXT NOT NULL,"
        " owner TEXT, epochs INTEGER, epochs_done INTEGER DEFAULT 0, wall_time REAL, images_per_s"
        " REAL, device TEXT, versions TEXT, final_train_loss REAL, final_train_error REAL,"
        " final_test_loss REAL, final_test_error REAL, error TEXT, created REAL, updated REAL);"
        "CREATE TABLE epochs (run_id TEXT, epoch INTEGER, train_loss REAL, train_error REAL,"
        " test_loss REAL, test_error REAL, lr REAL, wall_time REAL, images_per_s REAL);"
        "CREATE TABLE spp (model TEXT, depth INTEGER, name TEXT, avg_sq_mean REAL, avg_var REAL,"
        " residual_var REAL);"
        "CREATE TABLE study_runs (study TEXT NOT NULL, preset TEXT NOT NULL, run_id TEXT NOT NULL,"
        " label TEXT NOT NULL, x TEXT, registered REAL, PRIMARY KEY (study, preset, run_id, label));"
        "INSERT INTO runs (run_id, config, status) VALUES ('r', '{}', 'done');"
        "INSERT INTO study_runs VALUES ('norms', 'quick', 'r', 'BN', '32', 1.0);")
    con.close()
    with Store(tmp_path, read_only=True) as s:
        assert [r["run_id"] for r in s.study_runs("norms")] == ["r"]
        assert s.run("r")["owner_start"] is None
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            s.finish("r")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"]  # nothing left beside


@pytest.mark.parametrize("command", [["ls"], ["report"], ["train", "--epochs", "1"]])
def test_a_store_whose_tables_lack_columns_is_one_line_and_left_as_it_is(tmp_path, command):
    # a results.sqlite with the store's table names but not its columns (another program's,
    # an edited one) was SQLite's "no such column" traceback from inside `ls`, `report` or a
    # run, after a writer had already switched its journal and added columns to it
    db = tmp_path / "results.sqlite"
    con = sqlite3.connect(db)
    con.executescript("CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT);"
                      "CREATE TABLE epochs (run_id TEXT, epoch INTEGER);"
                      "CREATE TABLE study_runs (study TEXT, preset TEXT, run_id TEXT, label TEXT,"
                      " x TEXT);"
                      "CREATE TABLE spp (model TEXT, depth INTEGER);"
                      "INSERT INTO runs VALUES ('r1', 'done');")
    con.close()
    before = db.read_bytes()
    r = runner.invoke(app, [*command, str(tmp_path)] if command[0] != "train"
                      else [*command, "--out", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"error: {str(db)!r} is not a results store of this normlab "
                               "(table epochs lacks images_per_s, lr, test_error,"), r.output
    assert "table runs lacks config, created," in r.output and "hint: it is left" in r.output
    assert db.read_bytes() == before


def test_finished_runs_checkpoints_are_cleaned_up_on_start(tmp_path):
    """Issue 14 item 8: a process killed between marking its run done and deleting its
    checkpoint left the .pt forever. Opening the store for writing removes finished runs'
    checkpoints; an unfinished run's stays (it resumes from it)."""
    with Store(tmp_path) as s:
        for rid in ("finished", "unfinished", "failed"):
            s.claim(rid, {"epochs": 2})
        s.finish("finished")
        s.finish("failed", "failed", "boom")
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("finished", "unfinished", "failed", "not-in-the-store"):
        (ckpts / f"{name}.pt").write_bytes(b"x")
    with Store(tmp_path, read_only=True):
        pass  # reading never deletes
    assert len(list(ckpts.iterdir())) == 4
    Store(tmp_path).close()
    assert sorted(p.name for p in ckpts.iterdir()) == ["failed.pt", "not-in-the-store.pt",
                                                       "unfinished.pt"]


# ---------------------------------------------------------------------- read-only mounts
_RO_MOUNT = ('for d in "$@"; do case "$d" in --) break;; esac; mount --bind "$d" "$d" && '
             'mount -o remount,ro,bind "$d" || exit 99; shift; done; shift; exec "$@"')


def _read_only(dirs, argv):
    """Run ``argv`` in a private mount namespace where each of ``dirs`` is mounted read-only
    (user namespace: needs no root)."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", _RO_MOUNT, "sh", *map(str, dirs), "--",
                           *argv], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


_INVOKE = """
import json, sys
from typer.testing import CliRunner
from normlab.lab.cli import app
runner = CliRunner()
print(json.dumps([(r.exit_code, r.output) for r in
                  (runner.invoke(app, argv) for argv in json.loads(sys.argv[1]))]))
"""


def _cli_read_only(dirs, *argvs):
    """[(exit code, output)] of the ``normlab`` command lines ``argvs``, run in one process with
    ``dirs`` mounted read-only (one interpreter start for all of them keeps the test short)."""
    r = _read_only(dirs, [sys.executable, "-c", _INVOKE, json.dumps(argvs)])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def ro_mounts(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a read-only mount")
    r = _read_only([d], ["sh", "-c", f"! touch {d}/x"])
    if r.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {r.stderr.strip()[:200]}")


def test_a_read_only_store_is_listed_and_reported_elsewhere(tmp_path, ro_mounts):
    """Issue 14 item 5: on a read-only mount `ls` said "not a readable results store (unable to
    open database file)" and report failed; training commands gave a traceback."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    _fill(out)
    small = '{"n_train": 64, "n_test": 32, "image_size": 8, "channels": 1}'
    results = _cli_read_only(
        [out], ["ls", str(out)], ["report", str(out)], ["report", str(out), "--to", str(elsewhere)],
        ["train", "--data", "synthetic", "--epochs", "1", "--set", f"data_kwargs={small}",
         "--out", str(out)],
        ["reproduce", "--quick", "--devices", "1", "--data", "synthetic", "--set", f"data_kwargs={small}",
         "--out", str(out)],
        ["spp", "resnet20", "--batch", "2", "--resolution", "8", "--out", str(out)])
    (ls_rc, ls_out), (rep_rc, rep_out), (to_rc, to_out), *training = results
    assert ls_rc == 0 and ls_out.count(" done ") == 40, ls_out
    assert rep_rc == 2, rep_out
    _one_error(rep_out, f"cannot write the report into {str(out)!r}", "Read-only file system",
               "--to DIR")
    assert to_rc == 0, to_out
    assert "| BN |" in (elsewhere / "report.md").read_text()
    assert (elsewhere / "report.html").is_file() and (elsewhere / "figures").is_dir()
    for rc, output in training:
        assert rc == 2, output
        _one_error(output, f"cannot write to output directory {str(out)!r}",
                   "Read-only file system")


def test_a_read_only_store_with_a_pending_log_is_read_whole(tmp_path, ro_mounts):
    """A writer killed before SQLite folded its write-ahead log into the file, then the
    directory mounted read-only: `ls` reads the log's runs too."""
    live, out = tmp_path / "live", tmp_path / "out"
    _fill(live, n_runs=4)
    with Store(live) as s:  # the files of a writer killed now: a copy taken while it is open
        s.con.execute("PRAGMA wal_autocheckpoint=0")
        for i in range(3):
            s.claim(f"late{i}", {"model": "resnet20", "norm": "gn", "batch_size": 2, "seed": 0})
        shutil.copytree(live, out)
    assert (out / "results.sqlite-wal").stat().st_size > 0
    [(rc, output)] = _cli_read_only([out], ["ls", str(out)])
    assert rc == 0 and output.count(" done ") == 4 and output.count("late") == 3, output


# a value of the wrong kind in each place the readers use one (a store edited by hand or
# written by another program): the SQL that plants it, the words the error line says
@pytest.mark.parametrize("sql, needle", [
    ("UPDATE runs SET config='[1, 2]'", "config is not a JSON object: [1, 2]"),
    ("UPDATE runs SET config='{not json'", "config is not JSON: '{not json'"),
    ("UPDATE runs SET config=json_set(config, '$.epochs', 'ten')",
     "config: epochs must be int, got str 'ten'"),
    ("UPDATE runs SET versions='[1]'", "versions is not a JSON object: [1]"),
    ("UPDATE runs SET final_test_error='abc'", "final_test_error is not a number: 'abc'"),
    ("UPDATE epochs SET train_loss='x'", "train_loss is not a number: 'x'"),
    ("UPDATE runs SET final_test_error=250.0", "final_test_error is not a percentage in "
     "[0, 100]: 250.0"),                                    # was taken into the verdicts
    ("UPDATE epochs SET test_error=-3.0", "test_error is not a percentage in [0, 100]: -3.0"),
    ("UPDATE study_runs SET x='{\"a\": 1}'", "x is not a number or a string: {'a': 1}"),
    # a text point among numbers: the axis was sorted ("'<' not supported between ...")
    ("UPDATE study_runs SET x='\"two\"' WHERE label='GN'",
     "x is 'two' where the study's first run has a number: 2"),
    # (ls does not read a setup's info: the report does)
    ("INSERT OR REPLACE INTO setups SELECT DISTINCT study, preset, setup, '[1]', 0 "
     "FROM study_runs", "the setup of study 'batch-size': info is not a JSON object: [1]"),
    ("INSERT OR REPLACE INTO setups SELECT DISTINCT study, preset, setup, '{\"power\": 3}', 0 "
     "FROM study_runs", "the setup of study 'batch-size': power is not a JSON object: 3"),
])
def test_a_value_of_the_wrong_kind_in_a_store_is_one_line_naming_it(tmp_path, sql, needle):
    # these were tracebacks (AttributeError, KeyError) or lines naming neither file nor value
    # ("unhashable type: 'dict'"); the store is left as it is
    db = _fill(tmp_path / "out", n_runs=2)
    con = sqlite3.connect(db)
    con.executescript(sql)
    con.close()
    before = db.read_bytes()
    commands = [["report", str(db.parent), "--to", str(tmp_path / "r")]]
    commands += [] if "setups" in sql else [["ls", str(db.parent)]]
    for args in commands:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        _one_error(r.output, f"results store {str(db)!r}", needle)
    assert db.read_bytes() == before


def _links(out, victim):
    """Symbolic links planted in a results directory, each to a file or folder of ``victim``
    (outside it): where the exports and the report write their temporary and final files."""
    for name in ("runs.csv", "runs.csv.tmp", "results.json.tmp", "report.md", "report.html"):
        os.symlink(victim / "file", out / name)


def test_nothing_planted_in_a_results_directory_makes_normlab_write_outside_it(tmp_path):
    # a results directory from elsewhere, with links where `normlab report` writes: the report
    # wrote through them (the link's target overwritten with CSV, report.md created beside it)
    out, victim = tmp_path / "out", tmp_path / "victim"
    _fill(out, n_runs=2)
    victim.mkdir()
    (victim / "file").write_text("mine")
    (out / "runs.csv").unlink()
    _links(out, victim)
    r = runner.invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert (victim / "file").read_text() == "mine" and os.listdir(victim) == ["file"]
    for name in ("runs.csv", "report.md", "report.html"):  # the links replaced by our files
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert "batch-size" in (out / "report.md").read_text()
    assert not list(out.glob("*.tmp[0-9]*"))  # our temporary files were renamed into place


@pytest.mark.parametrize("name, args", [
    ("figures", ["report", "STORE"]),                                    # the report's figures
    ("figures", ["spp", "resnet20", "--batch", "2", "--resolution", "8", "--out", "STORE"]),
    ("checkpoints", ["train", "--out", "STORE"]),                       # the runs' checkpoints
    ("results.sqlite", ["train", "--out", "STORE"]),                    # the store itself
    # SQLite's own files beside the store: it refuses to open a link, but said only "unable to
    # open database file" (train) or "copy the directory somewhere writable" (ls, report)
    ("results.sqlite-wal", ["train", "--out", "STORE"]),
    ("results.sqlite-shm", ["ls", "STORE"]),
    ("results.sqlite-wal", ["report", "STORE"]),
])
def test_a_link_where_normlab_writes_a_folder_or_the_store_is_one_line(tmp_path, name, args):
    out, victim = tmp_path / "out", tmp_path / "victim"
    db = _fill(out, n_runs=2)
    victim.mkdir()
    target = victim / name
    if name == "results.sqlite":
        db.rename(target)
    elif name.startswith("results.sqlite-"):
        target.write_text("mine")
    else:
        target.mkdir()
    os.symlink(target, out / name)
    before = sorted(p.name for p in victim.rglob("*"))
    r = runner.invoke(app, [str(out) if a == "STORE" else a for a in args])
    assert r.exit_code == 2, r.output
    _one_error(r.output, f"{str(out / name)!r} is a symbolic link", "writes only inside")
    assert sorted(p.name for p in victim.rglob("*")) == before


@pytest.mark.parametrize("name, kind, args, needle", [
    # a folder where normlab renames its file: IsADirectoryError tracebacks from the report
    # and the exports
    ("report.md", "folder", ["report", "STORE"], "cannot write {path}: Is a directory"),
    ("runs.csv", "folder", ["report", "STORE"], "cannot write {path}: Is a directory"),
    # a file where normlab makes its folder: a FileExistsError traceback from the report; a
    # train run "failed" (its checkpoint "does not load", then FileExistsError), every re-run
    ("figures", "file", ["report", "STORE"], "{path} is a file; normlab writes its files into"),
    ("checkpoints", "file", ["train", "--out", "STORE"],
     "{path} is a file; normlab writes its files into"),
])
def test_something_else_where_normlab_writes_is_one_line_and_kept(tmp_path, name, kind, args,
                                                                  needle):
    out = tmp_path / "out"
    _fill(out, n_runs=2)
    (out / name).unlink(missing_ok=True)
    if kind == "folder":
        (out / name).mkdir()
        (out / name / "mine").write_text("mine")
    else:
        (out / name).write_text("mine")
    r = runner.invoke(app, [str(out) if a == "STORE" else a for a in args])
    assert r.exit_code == 2, r.output
    _one_error(r.output, needle.format(path=repr(str(out / name))))
    assert (out / name / "mine" if kind == "folder" else out / name).read_text() == "mine"
    assert not list(out.glob("*.tmp[0-9]*"))  # the temporary file went too


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_store_name_that_is_no_file_is_one_line(tmp_path, kind):
    # SQLite's "disk I/O error" / "unable to open database file" came from sqlite3.connect,
    # outside the errors the store names: a traceback
    out = tmp_path / "out"
    out.mkdir()
    db = out / "results.sqlite"
    os.mkfifo(db) if kind == "fifo" else db.mkdir()
    r = runner.invoke(app, ["train", "--out", str(out)])
    assert r.exit_code == 2, r.output
    _one_error(r.output, f"{str(db)!r} is not a readable results store", "left as it is")
    assert db.is_fifo() if kind == "fifo" else db.is_dir()


def test_a_full_store_says_so(tmp_path):
    # SQLite's "database or disk is full" (SQLITE_FULL), here from a page limit
    with Store(tmp_path) as s:
        s.claim("r", {"epochs": 1})
        (pages,) = s.con.execute("PRAGMA page_count").fetchone()
        s.con.execute(f"PRAGMA max_page_count={pages}")
        rows = [{"epoch": e, "train_loss": float(e), "test_error": 1.5} for e in range(5000)]
        with pytest.raises(DiskFull, match="full: writing the results store failed "
                                           r"\(OperationalError: database or disk is full"):
            s.record_epochs("r", rows, {})
        assert s.epochs("r") == []  # the transaction wrote nothing


class _Killed(BaseException):
    """What a SIGKILL between two renames would leave: the writer stops there."""


def test_an_export_stopped_between_its_renames_is_found_and_the_next_command_repairs_it(
        tmp_path, monkeypatch):
    # The exports are renamed into place one by one, results.json last: a writer killed after
    # the first rename left runs.csv of a newer snapshot beside a results.json naming an older
    # one, and nothing (results.json's `export` key, `normlab ls`) could tell
    from normlab.lab import outfiles
    from normlab.lab.store_export import mixed_exports

    _fill(tmp_path, n_runs=4)
    assert mixed_exports(tmp_path) == []
    cfg = RunConfig(norm="gn", batch_size=6, seed=7, data="synthetic", epochs=1)
    with Store(tmp_path) as s:
        s.claim(cfg.run_id(), cfg.to_dict())
        s.record_epochs(cfg.run_id(), [{"epoch": 0, "test_error": 3.25, "train_loss": 0.7}], {})
        s.finish(cfg.run_id())
        place, placed = outfiles._place, []

        def killed_after_the_first(src, path):
            if placed:
                raise _Killed
            placed.append(path.name)
            place(src, path)

        monkeypatch.setattr(outfiles, "_place", killed_after_the_first)
        with pytest.raises(_Killed):
            s.export()
        monkeypatch.setattr(outfiles, "_place", place)
    assert placed == ["runs.csv"] and cfg.run_id() in (tmp_path / "runs.csv").read_text()
    assert cfg.run_id() not in (tmp_path / "results.json").read_text()  # the older snapshot
    assert mixed_exports(tmp_path) == ["runs.csv"]
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # no half file left
    r = runner.invoke(app, ["ls", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert ("note: runs.csv in " in r.output and "are not of the snapshot results.json names"
            in " ".join(r.output.split())), r.output
    r = runner.invoke(app, ["report", str(tmp_path)])  # the next command writing the exports
    assert r.exit_code == 0, r.output
    assert mixed_exports(tmp_path) == []
    doc = json.loads((tmp_path / "results.json").read_text())
    assert cfg.run_id() in {run["run_id"] for run in doc["runs"]}
    assert "note:" not in runner.invoke(app, ["ls", str(tmp_path)]).output


def test_a_csv_edited_or_removed_after_its_export_is_named(tmp_path):
    from normlab.lab.store_export import mixed_exports

    _fill(tmp_path, n_runs=3)
    (tmp_path / "spp.csv").unlink()
    with open(tmp_path / "epochs.csv", "a") as f:
        f.write("x,0,1.5\n")
    assert mixed_exports(tmp_path) == ["epochs.csv", "spp.csv"]
    (tmp_path / "results.json").write_text('{"runs": []}')  # an earlier normlab's: cannot tell
    assert mixed_exports(tmp_path) == []


def test_a_full_disk_while_the_exports_are_placed_is_one_line_and_repaired_next(tmp_path,
                                                                               monkeypatch):
    # ENOSPC writing epochs.csv, the second export: one line naming the folder, status 1, the
    # old epochs.csv whole and no temporary file; runs.csv, placed before, is found mixed
    import errno as errno_mod

    from normlab.lab import outfiles
    from normlab.lab.store_export import mixed_exports

    _fill(tmp_path, n_runs=3)
    old_epochs = (tmp_path / "epochs.csv").read_bytes()
    with Store(tmp_path) as s:  # a fourth run since: every export changes
        cfg = RunConfig(norm="gn", batch_size=6, seed=5, data="synthetic", epochs=1)
        s.claim(cfg.run_id(), cfg.to_dict())
        s.record_epochs(cfg.run_id(), [{"epoch": 0, "test_error": 2.5, "train_loss": 0.4}], {})
        s.finish(cfg.run_id())
    write_via = outfiles.write_via

    def full_at_epochs_csv(path, write):
        if path.name == "epochs.csv":
            def short(f):
                f.write(b"run_id,ep")  # part of it written, then the disk is full
                raise OSError(errno_mod.ENOSPC, "No space left on device")
            return write_via(path, short)
        return write_via(path, write)

    monkeypatch.setattr(outfiles, "write_via", full_at_epochs_csv)
    r = runner.invoke(app, ["report", str(tmp_path)])
    monkeypatch.setattr(outfiles, "write_via", write_via)
    assert r.exit_code == 1, r.output
    _one_error(r.output, f"the disk holding {str(tmp_path)!r} is full: writing epochs.csv failed",
               "No space left on device", "hint: free some space there")
    assert (tmp_path / "epochs.csv").read_bytes() == old_epochs
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert mixed_exports(tmp_path) == ["runs.csv"]
    assert runner.invoke(app, ["report", str(tmp_path)]).exit_code == 0  # room again
    assert mixed_exports(tmp_path) == []
    assert cfg.run_id() in (tmp_path / "epochs.csv").read_text()
