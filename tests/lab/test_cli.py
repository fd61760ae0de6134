"""The normlab CLI end to end: quick presets on synthetic and digits, SIGKILL and resume, errors."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from normlab import spp as spp_lib
from normlab.lab.cli import app

runner = CliRunner()
SMALL = json.dumps({"n_train": 128, "n_test": 64, "image_size": 8, "channels": 1, "num_classes": 4})
# on SMALL's 128 images: one device (the single-batch protocol: batches <= 32); --quick runs
# no power rounds (tests/lab/test_power.py checks the rounds)
TINY = ["--devices", "1"]


def _db(out):
    con = sqlite3.connect(out / "results.sqlite")
    con.row_factory = sqlite3.Row
    return con


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "normlab.lab.cli", *args], capture_output=True,
                          text=True, **kw)


# two well-separated classes: most runs learn in 2 epochs, so the report has points that count
# and draws its figures (on SMALL's 4 noisy classes every 2-epoch run can be flagged unconverged,
# and a study with no run that counts has no figure)
LEARNABLE = json.dumps({"n_train": 256, "n_test": 64, "image_size": 8, "channels": 1,
                        "num_classes": 2, "noise": 0.1})


def test_quick_synthetic_in_process(tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["reproduce", "--quick", "--data", "synthetic", "--jobs", "1", *TINY,
                            "--set", "epochs=2", "--set", f"data_kwargs={LEARNABLE}", "--out",
                            str(out)])
    assert r.exit_code == 0, r.output
    con = _db(out)
    rows = con.execute("SELECT r.status, s.label, s.x, r.config FROM runs r JOIN study_runs s "
                       "USING (run_id) WHERE s.study='batch-size'").fetchall()
    assert sorted((row["label"], json.loads(row["x"])) for row in rows) == sorted(
        (lab, x) for lab in ("BN", "GN") for x in (32, 2))  # quick: the two ends
    assert all(row["status"] == "done" for row in rows)
    assert all(json.loads(row["config"])["data"] == "synthetic" for row in rows)
    assert con.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 4 * 2  # 2 epochs each
    for name in ("report.md", "report.html", "runs.csv", "epochs.csv", "results.json",
                 "figures/batch-size_error.png", "figures/batch-size_error.svg",
                 "figures/batch-size_curves.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "| BN | " in md and "| GN | " in md and "4/4 runs done" in md
    # off a terminal (here: captured) the bars are off and every epoch prints a line
    for lab in ("BN", "GN"):
        for e in (1, 2):
            assert f"  {lab} x=2 seed=0: epoch {e}/2, train loss " in r.output, (lab, e)
    assert r.output.count(": epoch ") == 4 * 2
    # a second invocation recomputes nothing
    r = runner.invoke(app, ["reproduce", "--quick", "--data", "synthetic", "--jobs", "1", *TINY,
                            "--set", "epochs=2", "--set", f"data_kwargs={LEARNABLE}", "--out",
                            str(out), "--no-report"])
    assert "trained 0, already done 4" in r.output
    r = runner.invoke(app, ["ls", str(out)])
    assert r.exit_code == 0 and r.output.count("done") >= 4
    r = runner.invoke(app, ["report", str(out)])
    # one line, whole: off a terminal rich broke lines at 80 columns, inside the paths
    assert r.exit_code == 0
    assert f"report: {out / 'report.md'} and {out / 'report.html'}\n" in r.output, r.output


def _stored_study(out, study, user, preset="quick", error=lambda p: 5.0, info=None):
    """Register ``study``'s points (``user`` choices) in OUT's store as finished runs, untrained,
    each with the test error ``error(point)``; ``info(study)``: the setup's info."""
    from normlab.lab.store import Store
    from normlab.lab.studies import get_study
    points = get_study(study).points(user, preset)
    with Store(out) as s:
        s.register(study, preset, [(p.cfg.run_id(), p.label, p.x) for p in points],
                   setup=points[0].setup, info=info(get_study(study)) if info else None)
        for p in points:
            if s.claim(p.cfg.run_id(), p.cfg.to_dict()) == "done":
                continue  # stored by an earlier call (a run shared by studies): skipped
            s.record_epochs(p.cfg.run_id(), [{"epoch": 0, "test_error": error(p)}], {})
            s.finish(p.cfg.run_id())
    return points


def test_ls_names_each_runs_point_as_the_report_does(tmp_path):
    # with 8 emulated devices BN "at 2 images per process" is a ghostbn run of batch 16 and GN's
    # is a plain gn run of batch 16: `ls` showed only that, so its rows could not be matched
    # with the report's points; and after a re-run on another setup the earlier runs had an
    # empty studies cell (they are in the store, not in the report)
    first = _stored_study(tmp_path, "batch-size", {"epochs": 1})
    r = runner.invoke(app, ["ls", str(tmp_path)], terminal_width=300)
    assert r.exit_code == 0, r.output
    for p in first:
        row = next(line for line in r.output.splitlines() if p.cfg.run_id() in line)
        assert f"batch-size@{p.x} " in row and "earlier" not in row, row
    _stored_study(tmp_path, "batch-size", {"epochs": 2})  # another setup: a new table
    r = runner.invoke(app, ["ls", str(tmp_path)], terminal_width=300)
    for p in first:
        row = next(line for line in r.output.splitlines() if p.cfg.run_id() in line)
        assert f"batch-size@{p.x} (earlier setup: epochs 1; not in the report)" in row, row


def test_ls_shows_the_batch_per_device_the_report_names_its_points_by(tmp_path):
    # with 8 emulated devices the run of batch-size@2 stores the SGD batch, 16: `ls` showed 16
    # (and 256 at @32) in its batch column where the report and the study vary 2 (and 32)
    protocol = lambda st: {"protocol": st.protocol(st.devices({}))}  # as `reproduce` stores it
    per_device = _stored_study(tmp_path, "batch-size", {"epochs": 1}, info=protocol)
    fixed_sgd = _stored_study(tmp_path, "stats-batch", {"epochs": 1}, info=protocol)
    one = _stored_study(tmp_path, "norms", {"epochs": 1}, info=protocol)  # one device
    r = runner.invoke(app, ["ls", str(tmp_path)], terminal_width=300)
    assert r.exit_code == 0 and "batch/dev" in r.output, r.output
    cell = lambda p: next(line for line in r.output.splitlines()
                          if p.cfg.run_id() in line).split("│")[6].strip()
    assert {(p.label, p.x): cell(p) for p in per_device} == {
        (lab, x): f"{x}x8 emulated" for lab in ("BN", "GN") for x in (32, 2)}
    # stats-batch: 32 images per device (SGD batch 8 x 32), BN's statistics batch is its x
    assert {cell(p) for p in fixed_sgd} == {"32x8 emulated"}
    assert {cell(p) for p in one} == {"32"}


def test_ls_says_which_runs_the_report_leaves_out(tmp_path):
    # a run stuck near chance is flagged and left out of the report's means and verdicts; `ls`
    # showed it as "done" like any other, its error beside theirs
    points = _stored_study(tmp_path, "batch-size", {"epochs": 1},
                           error=lambda p: 89.0 if (p.label, p.x) == ("GN", 2) else 5.0)
    r = runner.invoke(app, ["ls", str(tmp_path)], terminal_width=300)
    assert r.exit_code == 0, r.output
    for p in points:
        row = next(line for line in r.output.splitlines() if p.cfg.run_id() in line)
        flagged = (p.label, p.x) == ("GN", 2)
        assert ("done (unconverged, left out)" in row) == flagged, row


def test_ls_tells_an_interrupted_run_from_one_in_training(tmp_path):
    # a run stopped by Ctrl-C or `timeout` (released) or by SIGKILL (its owner gone) stayed
    # "running" in `ls`, as if it still trained; it waits for a re-run to resume it
    from normlab.lab.store import Store
    with Store(tmp_path) as s:
        for rid in ("released", "training"):
            s.claim(rid, {"epochs": 4, "seed": 0})
            s.record_epochs(rid, [{"epoch": 0, "test_error": 9.0}], {})
        s.release("released")
    r = runner.invoke(app, ["ls", str(tmp_path)], terminal_width=300)
    assert r.exit_code == 0, r.output
    rows = {rid: next(line for line in r.output.splitlines() if rid in line)
            for rid in ("released", "training")}
    assert "interrupted" in rows["released"] and "running" not in rows["released"], rows
    assert "running" in rows["training"], rows  # this process owns it and lives


def test_ls_says_why_a_run_failed(tmp_path):
    # a failed run's exit says "`normlab ls OUT` lists them", but ls showed "failed" alone:
    # the reason was only in the lines printed while it ran (and in runs.csv)
    from normlab.lab.store import Store
    with Store(tmp_path) as s:
        s.claim("broken", {"epochs": 2, "seed": 0})
        s.finish("broken", "failed", "RuntimeError: CUDA error: device-side assert triggered")
    r = runner.invoke(app, ["ls", str(tmp_path)], terminal_width=300)
    assert r.exit_code == 0, r.output
    assert "failed: RuntimeError: CUDA error: device-side assert triggered" in r.output, r.output


def test_ls_reads_one_state_of_the_store(tmp_path, monkeypatch):
    # `ls` beside a training study read the memberships and the runs at two moments: a run
    # claimed in between was listed without its study (an empty study@x cell)
    from normlab.lab.store import Store
    with Store(tmp_path) as s:
        s.claim("first", {"epochs": 1, "seed": 0})
        s.register("train", "single", [("first", "bn", 32)])
    memberships = Store.memberships

    def memberships_then_another_run(self):
        got = memberships(self)
        with Store(tmp_path) as other:  # another process claims a run meanwhile
            other.claim("late", {"epochs": 1, "seed": 1})
            other.register("train", "single", [("late", "bn", 32)])
        return got

    monkeypatch.setattr(Store, "memberships", memberships_then_another_run)
    r = runner.invoke(app, ["ls", str(tmp_path)], terminal_width=300)
    assert r.exit_code == 0 and "first" in r.output and "late" not in r.output, r.output


def test_ls_says_which_runs_were_tested_with_precise_bn_statistics(tmp_path):
    # `train` and `train --set precise_bn=B` into one --out: two rows alike but for the error
    from normlab.lab.store import Store
    with Store(tmp_path) as s:
        for rid, b in (("ema", 0), ("precise", 40)):
            s.claim(rid, {"epochs": 1, "seed": 0, "norm": "bn", "precise_bn": b})
            s.record_epochs(rid, [{"epoch": 0, "test_error": 3.0 + b / 100}], {})
            s.finish(rid)
    r = runner.invoke(app, ["ls", str(tmp_path)], terminal_width=300)
    assert r.exit_code == 0, r.output
    rows = {line.split()[1]: line for line in r.output.splitlines() if "ema" in line
            or "precise " in line}
    assert "3.40 (PreciseBN statistics, 40 batches)" in rows["precise"], r.output
    assert "PreciseBN" not in rows["ema"] and "3.00" in rows["ema"], r.output


def test_a_jobs_worker_reports_a_runs_epochs_before_its_outcome_on_one_queue(tmp_path):
    # with --jobs the epoch lines came on a progress queue and the run's outcome on another:
    # read in whichever order the two queues delivered, a run's last epoch line could follow
    # its "test error ..." line (seen on digits with --jobs 2), and a full progress queue
    # dropped epoch lines; one worker's queue keeps its order
    import queue as queue_mod
    import torch
    from normlab.lab import runner as runner_mod
    from normlab.lab.studies import get_study
    points = get_study("batch-size").points(
        {"data": "synthetic", "data_kwargs": json.loads(SMALL), "epochs": 2, "threads": 1,
         "train_limit": 32, "test_limit": 16}, "quick", variants=["GN"], devices=1)[:1]
    outcomes, events = queue_mod.Queue(), queue_mod.Queue(maxsize=1)  # progress: full at once
    threads = torch.get_num_threads()
    try:
        runner_mod._worker(points, str(tmp_path), 1, os.getppid(), outcomes, events)
    finally:
        torch.set_num_threads(threads)
    got = []
    while not outcomes.empty():
        got.append(outcomes.get_nowait()[1])
    assert got == ["epoch", "epoch", "trained"], got


def test_quick_digits_two_processes(tmp_path):
    out = tmp_path / "out"
    p = _cli("reproduce", "norms", "--quick", "--jobs", "2", "--set",
             "epochs=2", "--out", str(out), timeout=300)
    assert p.returncode == 0, p.stderr
    con = _db(out)
    labels = {r[0] for r in con.execute("SELECT label FROM study_runs WHERE study='norms'")}
    assert labels == {"BN", "LN", "IN", "GN", "none"}
    assert con.execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0] == 5
    assert {json.loads(r[0])["data"] for r in con.execute("SELECT config FROM runs")} == {"digits"}
    assert (out / "figures" / "norms_error.png").is_file()
    md = (out / "report.md").read_text()
    assert "| GN beats LN |" in md and "23.6" in md


def test_sigkill_mid_study_then_resume(tmp_path):
    args = ["reproduce", "--quick", "--data", "synthetic", "--jobs", "1", "--no-report", *TINY,
            "--set", f"data_kwargs={SMALL}", "--set", "epochs=3", "--set", "threads=1"]
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "normlab.lab.cli", *args, "--out", str(killed)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    caught = False
    while time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
        if not (killed / "results.sqlite").is_file():
            continue
        try:
            con = _db(killed)
            done = con.execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0]
            part = con.execute("SELECT COUNT(*) FROM runs WHERE status='running' AND "
                               "epochs_done >= 1").fetchone()[0]
            con.close()
        except sqlite3.OperationalError:
            continue
        if done >= 1 and part >= 1:
            os.killpg(p.pid, signal.SIGKILL)
            caught = True
            break
    p.wait()
    assert caught, "the study finished before it could be killed mid-run"
    con = _db(killed)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    before = {r["run_id"]: r["updated"] for r in con.execute(
        "SELECT run_id, updated FROM runs WHERE status='done'")}
    partial = con.execute("SELECT run_id, epochs_done FROM runs WHERE status='running'").fetchone()
    con.close()
    r = _cli(*args, "--out", str(killed), timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"already done {len(before)}" in r.stdout
    assert "resumed at epoch" in r.stdout
    con = _db(killed)
    after = {row["run_id"]: row for row in con.execute("SELECT * FROM runs")}
    assert all(after[rid]["updated"] == t for rid, t in before.items())  # not recomputed
    assert after[partial["run_id"]]["status"] == "done"
    # an uninterrupted study gives the same set of runs, all done
    clean = tmp_path / "clean"
    r = _cli(*args, "--out", str(clean), timeout=300)
    assert r.returncode == 0, r.stderr
    ref = {row["run_id"]: row for row in _db(clean).execute("SELECT * FROM runs")}
    assert set(ref) == set(after) and len(ref) == 4  # quick: BN, GN at 32 and 2
    assert all(row["status"] == "done" for row in after.values())
    assert {k: v["epochs_done"] for k, v in ref.items()} == {k: v["epochs_done"] for k, v in after.items()}


def _malformed_cifar(tmp_path):
    d = tmp_path / "cifar"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(b"not a pickle")
    return d


@pytest.mark.parametrize("args, needle", [
    (["reproduce", "batchsize"], "unknown study 'batchsize'; did you mean 'batch-size'?"),
    (["reproduce", "--quick", "true"], "'true' is not a study: --quick and --no-report are flags"),
    (["reproduce", "--model", "resnet7"], "unknown model 'resnet7'"),           # unknown model
    (["reproduce", "--set", "norm=bm"], "unknown norm 'bm'"),                   # unknown norm
    (["reproduce", "--data", "mnist"], "unknown data 'mnist'"),                 # unknown dataset
    (["reproduce", "--set", "batch_size=0"], "batch_size must be a positive int, got 0"),
    (["reproduce", "--seeds", "0"], "seeds must be >= 1, got 0"),
    (["reproduce", "--variants", "BN,XN"], "no variant(s) XN"),
    (["reproduce", "--data", "cifar10"], "no --data-dir"),
    (["reproduce", "--data", "cifar10", "--data-dir", "MALFORMED"], "is not a readable CIFAR pickle"),
    (["report", "NOWHERE"], "no results store"),
    (["train", "--norm", "gn", "--batch-size", "-3"], "batch_size must be a positive int, got -3"),
    # a norm for a normalizer-free model: the hint names the flag that set it
    (["train", "--model", "nf_resnet20", "--norm", "gn"], "hint: drop --norm"),
    (["train", "--model", "nf_resnet20", "--set", "norm=bn"], "hint: drop --set norm="),
    (["reproduce", "--model", "nf_resnet20"], "series 'BN' of study 'batch-size' uses norm 'bn'"),
    (["reproduce", "nf", "--model", "nf_resnet32"], "hint: run the series without a norm "
                                                    "(--variants NF)"),
    # sizes that ran and then failed or hung: a run list of 10**9 configs, a seed torch cannot
    # take (the run failed after the store recorded it), OpenMP asked for 100000 threads (the
    # training process crashed)
    (["reproduce", "--seeds", "100000000"], "seeds per point must be at most 1000, got 100000000"),
    (["reproduce", "--max-seeds", "5000"], "--max-seeds must be at most 1000, got 5000"),
    # the rounds go from --seeds up, so a lower --max-seeds capped nothing: 5 seeds trained
    (["reproduce", "--seeds", "5", "--max-seeds", "2"], "--max-seeds 2 is below --seeds 5"),
    (["train", "--set", "seed=100000000000000000000"],
     "seed must be an int in [0, 2**32), got 100000000000000000000"),
    (["train", "--set", "threads=100000"], "threads 100000 is more than the"),
    (["reproduce", "--variants", ","], "--variants ',' has an empty series name"),
    # the closest known name, as create_norm says it for norms
    (["reproduce", "--data", "mnsit5k"], "unknown data 'mnsit5k'; did you mean 'mnist5k'?"),
    (["reproduce", "--set", "epoch=1"], "unknown config key 'epoch'; did you mean 'epochs'?"),
    (["reproduce", "--variants", "BN,gn"], "no variant(s) gn; did you mean 'GN'?"),
    (["reproduce", "--data", "cifar10", "--data-dir", "AFILE"], "is not a directory"),
    # the store file itself named for OUT: "no results store at '.../results.sqlite/results.sqlite'"
    (["report", "STOREFILE"], "is the store file, not its output directory"),
    (["ls", "STOREFILE"], "hint: pass its directory"),
    # a study labels its runs by series: the label was dropped without a word
    (["reproduce", "--set", "label=mine"], "study 'batch-size' labels its runs by series"),
    # a directory for --config: "config file ... does not exist"
    (["reproduce", "--config", "ADIR"], "is a directory, not a .json or .toml file"),
])
def test_errors_are_one_line_and_a_hint(tmp_path, args, needle):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "results.sqlite").write_text("")
    args = [str(_malformed_cifar(tmp_path)) if a == "MALFORMED" else
            str(tmp_path / "s" / "results.sqlite") if a == "STOREFILE" else
            str(tmp_path / "s") if a == "ADIR" else
            str(tmp_path / "nowhere") if a == "NOWHERE" else
            str(tmp_path / "afile") if a == "AFILE" else a for a in args]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "o")]
                      if args[0] not in ("report", "ls") else args)
    assert r.exit_code == 2, r.output
    assert needle in r.output and r.output.startswith("error:")
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 3


@pytest.mark.parametrize("args, needle", [
    (["--quick", "--seeds", "2"], "seed 4294967295 with 2 seeds per point reaches seed 4294967296"),
    # the power rounds (on by default without --quick) add seeds up to --max-seeds (8)
    (["--seeds", "1"], "seed 4294967295 with 8 seeds per point reaches seed 4294967302"),
    (["--quick", "--seeds", "1", "--budget-runs", "2", "--max-seeds", "3"], "with 3 seeds"),
])
def test_seeds_past_2_to_the_32_are_refused_before_anything_trains(args, needle, tmp_path,
                                                                    monkeypatch):
    # seeds seed..seed+K-1 of a point: each run's seed was checked only when it trained, so the
    # first seed's runs trained and the next one stopped the study with exit 2
    import normlab.lab.cli.study as cli_study

    def trained(*a, **kw):
        raise AssertionError("the study started training")

    monkeypatch.setattr(cli_study, "run_study", trained)
    r = runner.invoke(app, ["reproduce", *args, "--set", "seed=4294967295",
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith("error:") and needle in r.output, r.output
    assert "hint: lower the seed (--set seed=) to at most" in r.output


def test_spp_of_a_timm_model_without_a_working_timm_is_one_line(tmp_path, monkeypatch):
    # train and reproduce said "importing timm failed" in one line (recipe.build_model); spp
    # caught only ValueError/TypeError and printed the ImportError's traceback
    import normlab.models.timm_models as tm

    def broken():
        raise ImportError("importing timm failed: operator torchvision::nms does not exist")

    monkeypatch.setattr(tm, "import_timm", broken)
    r = runner.invoke(app, ["spp", "timm:resnet18", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: timm:resnet18: importing timm failed"), r.output
    assert "hint: install timm" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("args, where", [
    (["resnet20", "--norm", ""], "from --norm"),
    (["resnet20:norm="], "from norm= in 'resnet20:norm='"),
    (["resnet20", "--set", "norm= "], "from --set norm="),
])
def test_spp_with_an_empty_norm_is_refused(args, where, tmp_path):
    # create_norm reads "" as "none": the model was measured without normalization and stored
    # under its plain name (`--norm "$NORM"` with NORM unset)
    r = runner.invoke(app, ["spp", *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: resnet20") and "the norm is empty" in r.output, r.output
    assert where in r.output and not (tmp_path / "o" / "results.sqlite").exists()


@pytest.mark.parametrize("argv, needle", [
    (["reproduce", "--seeds", "abc"], "Invalid value for '--seeds'"),   # wrong type
    (["spp", "resnet20", "--batch", "x"], "Invalid value for '--batch'"),
    (["spp", "resnet20", "--batch", "0"], "--batch and --resolution must be >= 1, got 0"),
    (["train", "--bogus"], "No such option: --bogus"),                 # unknown option
    (["nosuchcmd"], "No such command 'nosuchcmd'"),                     # unknown command
    (["spp"], "Missing argument"),                                      # missing argument
])
def test_usage_errors_are_one_line_and_a_hint(argv, needle, capsys):
    # the entry point (what the `normlab` script runs): the parser's own errors get the same
    # error/hint pair as the commands' checks, exit 2, no usage box
    from normlab.lab.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and needle in lines[0], err
    assert lines[1].startswith("hint: ") and "--help" in lines[1], err
    assert "╭" not in err and "Traceback" not in err


@pytest.mark.parametrize("argv, name", [
    (["train", "--data", "cifar10", "--data-dir", ""], "--data-dir"),  # "$CIFAR" unset
    (["reproduce", "--quick", "--out", ""], "--out"),                 # would write into the cwd
    (["train", "--config", " "], "--config"),                         # blank
    (["spp", "resnet20", "--out", ""], "--out"),
    (["report", ""], "'out'"),                                        # the argument
    (["report", "somewhere", "--to", ""], "--to"),
    (["ls", ""], "'out'"),
])
def test_an_empty_path_is_refused_not_read_as_the_working_directory(argv, name, tmp_path,
                                                                     monkeypatch, capsys):
    """``Path("")`` is ``.``: an empty path on the command line (a shell variable that is not
    set) is a usage error naming the option, and nothing is read or written in the cwd."""
    from normlab.lab.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and name in err and "an empty path" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_leading_tilde_in_a_path_option_is_the_home_directory(tmp_path, monkeypatch):
    """``--out=~/runs`` and ``--config "~/c.json"`` reach normlab with the ``~`` as written
    (the shell expands it only at the start of a word): it made a folder named ``~`` in the
    working directory, and the config file was not found. The paths are the home directory's,
    as ``--data-dir``'s already were."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    (home / "c.json").write_text(json.dumps({"epochs": 1, "batch_size": 16}))
    r = runner.invoke(app, ["train", "--data", "synthetic", "--set", f"data_kwargs={SMALL}",
                            "--config", "~/c.json", "--out=~/runs"])
    assert r.exit_code == 0, r.output
    assert list(cwd.iterdir()) == []  # no folder named ~
    row = _db(home / "runs").execute("SELECT status, config FROM runs").fetchone()
    assert row[0] == "done" and json.loads(row[1])["batch_size"] == 16
    r = runner.invoke(app, ["ls", "~/runs"])
    assert r.exit_code == 0 and "done" in r.output, r.output


@pytest.mark.parametrize("argv, planted, kind", [
    (["train", "--data", "synthetic"], "runs.csv", "dir"),              # an export of the store
    (["train", "--data", "synthetic"], "results.json", "dir"),
    (["reproduce", "--quick", "--data", "synthetic"], "report.md", "dir"),  # the report's
    (["reproduce", "--quick", "--data", "synthetic"], "figures", "file"),
    (["spp", "resnet20"], "report.html", "dir"),
    (["spp", "resnet20"], "figures", "file"),
])
def test_what_would_stop_the_exports_or_report_is_said_before_anything_runs(
        argv, planted, kind, tmp_path, capsys):
    """A folder where normlab writes a file (or a file where it makes its folder) in OUT is an
    error naming it before any training or measuring - it was the error at the end, after the
    study's runs - and nothing is created in OUT."""
    from normlab.lab.cli import main

    out = tmp_path / "o"
    out.mkdir()
    (out / planted).mkdir() if kind == "dir" else (out / planted).write_text("x")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and planted in err, err
    assert sorted(p.name for p in out.iterdir()) == [planted]


def test_ls_keys_are_every_field_a_set_or_config_file_takes(tmp_path):
    """`ls --keys` lists every RunConfig field (what `--set` and `--config` take), in order;
    with a directory it is refused, as the other lists are."""
    import dataclasses

    from normlab.lab.config import RunConfig

    r = runner.invoke(app, ["ls", "--keys"], terminal_width=300)
    assert r.exit_code == 0, r.output
    listed = [line.split(" = ")[0].strip() for line in r.output.splitlines()[1:]]
    assert listed == [f.name for f in dataclasses.fields(RunConfig)]
    r = runner.invoke(app, ["ls", str(tmp_path), "--keys"])
    assert r.exit_code == 2 and "one or the other" in r.output, r.output


def test_entry_point_exit_status_through_a_subprocess(tmp_path):
    # the real process: status 2 and two lines for a usage error, 0 for --help and success
    r = _cli("reproduce", "--seeds", "abc")
    assert r.returncode == 2 and r.stderr.splitlines()[0].startswith("error: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 2
    assert _cli("ls", "--help").returncode == 0
    r = _cli("ls", "--norms")
    assert r.returncode == 0 and "gn" in r.stdout


# markers: a study name, a model name, a norm name that appear in their own list only
@pytest.mark.parametrize("flags,shown,hidden", [
    (["--studies"], ["batch-size:"], ["resnet20", "frozenbn"]),   # each flag lists its own kind
    (["--models"], ["resnet20"], ["batch-size:", "frozenbn"]),
    (["--norms"], ["frozenbn"], ["batch-size:", "resnet20"]),
    (["--models", "--norms"], ["resnet20", "frozenbn"], ["batch-size:"]),  # flags combine
    ([], ["batch-size:", "resnet20", "frozenbn"], ["precise_bn"]),  # no flag: all but keys
    (["--keys"], ["precise_bn = 0  (int)", "lr = None  (Optional[float])"],
     ["batch-size:", "frozenbn"]),
])
def test_ls_lists_what_its_flags_ask_for(flags, shown, hidden):
    r = runner.invoke(app, ["ls", *flags])
    assert r.exit_code == 0, r.output
    assert all(s in r.output for s in shown) and not any(h in r.output for h in hidden), r.output


def test_a_bad_set_value_points_to_ls_keys():
    # the hint said "see --help for the accepted values"; --help lists no --set keys or types
    r = runner.invoke(app, ["train", "--set", "epochs=abc"])
    assert r.exit_code == 2
    assert "epochs must be int, got str 'abc'" in r.output and "normlab ls --keys" in r.output


def test_version_names_normlab_and_torch():
    # what a bug report needs first: `normlab --version` printed "No such option"
    import importlib.metadata

    import torch

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    assert f"normlab {importlib.metadata.version('normlab')}" in r.output
    assert f"torch {torch.__version__}" in r.output and "python " in r.output
    assert r.output.splitlines()[-1].startswith("timm ")  # and whether it imports


@pytest.mark.parametrize("cmd", ["reproduce", "train", "report", "ls", "spp"])
def test_help(cmd):
    r = runner.invoke(app, [cmd, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def test_each_command_is_summed_up_in_one_line_of_the_main_help():
    # the summary is the docstring's first paragraph, its line breaks kept: `reproduce` and
    # `spp` had two-line summaries broken mid-sentence in `normlab --help`
    r = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    rows = [line for line in r.output.splitlines()
            if line.startswith("│ ") and "--help" not in line and "--version" not in line]
    cmds = [row.split()[1] for row in rows]
    assert cmds == ["reproduce", "train", "report", "ls", "forget", "spp"], r.output
    assert all(row.rstrip(" │").endswith(".") for row in rows), r.output


def test_help_paragraphs_are_reflowed_not_broken_at_the_docstrings_line_ends():
    # `normlab reproduce --help` printed "... within the budget" / "(--budget-runs," /
    # "--budget-minutes, --max-seeds). ..." on three short lines: the docstring's own line
    # breaks were kept inside each paragraph
    r = runner.invoke(app, ["reproduce", "--help"], env={"COLUMNS": "200"})
    assert ("Power rounds add seeds within the budget (--budget-runs, --budget-minutes, "
            "--max-seeds).") in r.output, r.output
    r = runner.invoke(app, ["spp", "--help"], env={"COLUMNS": "200"})
    assert "and OUT's report (report.md/.html) is rewritten" in r.output, r.output
    assert "normlab spp preact_resnet56 preact_resnet56:order=act_norm nf_resnet56" in r.output


def test_a_bad_value_in_a_config_file_names_the_file(tmp_path):
    # the value is in the file, not on the command line: say where to look
    cfg = tmp_path / "exp.toml"
    cfg.write_text('epochs = "two"\n')
    r = runner.invoke(app, ["train", "--config", str(cfg), "--out", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith(f"error: config file {str(cfg)!r}: epochs "
                                                    "must be int, got str 'two'"), r.output
    # an error the file alone does not cause is not blamed on it; a file that is fine only
    # with the command line (data on disk + --data-dir) is accepted
    cfg.write_text('data = "imagefolder"\n')
    r = runner.invoke(app, ["train", "--config", str(cfg), "--data-dir", str(tmp_path / "none"),
                            "--set", "epochs=0", "--out", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: epochs must be a positive int"), r.output


def test_reproduce_help_states_the_jobs_default_it_uses():
    # --jobs defaults to min(cores, 4) on the CPU: the help said "one per core"
    r = runner.invoke(app, ["reproduce", "--help"], terminal_width=200)
    assert "one per core, at most 4" in r.output and "ls --studies" in r.output


def test_reproduce_help_states_each_studys_devices_default():
    # --devices said "default 8, the GN paper's, for the per-device studies", but norms and
    # groups emulate 1 device by default (their batch of 32 is the paper's statistics batch
    # either way) and bn-dropout takes none
    from normlab.lab.studies import get_study
    r = runner.invoke(app, ["reproduce", "--help"], terminal_width=200)
    text = " ".join(line.strip(" │") for line in r.output.splitlines())
    assert ("(default: 8 for batch-size, stats-batch, nf (the GN paper's); 1 for groups, norms; "
            "bn-dropout takes none)") in " ".join(text.split()), r.output
    for name in ("groups", "norms"):
        assert get_study(name).devices() == 1
    assert get_study("nf").devices() == 8


def test_train_one_run(tmp_path):
    r = runner.invoke(app, ["train", "--norm", "gn", "--data", "synthetic", "--batch-size", "16",
                            "--epochs", "1", "--set", f"data_kwargs={SMALL}",
                            "--set", "norm_kwargs.num_groups=4", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    row = _db(tmp_path).execute("SELECT status, config FROM runs").fetchone()
    assert row[0] == "done" and json.loads(row[1])["norm_kwargs"] == {"num_groups": 4}


def test_dataset_and_norm_names_in_any_case_are_one_run_and_one_setup(tmp_path):
    # `--data Synthetic` was an error while `reproduce Batch_Size` worked; the store records
    # the lower-case names, so the run below is the same run (skipped) and the same setup
    from normlab.lab.studies import get_study

    args = ["--batch-size", "16", "--epochs", "1", "--set", f"data_kwargs={SMALL}", "--out",
            str(tmp_path)]
    r = runner.invoke(app, ["train", "--data", " Synthetic", "--norm", "GN", *args])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--data", "synthetic", "--norm", "gn", *args])
    assert r.exit_code == 0 and "already done" in r.output, r.output
    rows = _db(tmp_path).execute("SELECT config FROM runs").fetchall()
    assert [(c["data"], c["norm"], c["label"]) for c in map(json.loads, (r[0] for r in rows))] \
        == [("synthetic", "gn", "gn")]
    st = get_study("batch-size")
    a, b = (st.points({"data": d}, "quick") for d in ("MNIST5K ", "mnist5k"))
    assert [p.setup for p in a] == [p.setup for p in b]
    assert [p.cfg.run_id() for p in a] == [p.cfg.run_id() for p in b]


def test_train_nf_model_records_norm_none(tmp_path):
    # `--model nf_*` without --norm and with --norm none are the same run, stored as norm none
    args = ["train", "--model", "nf_resnet20", "--data", "synthetic", "--batch-size", "16",
            "--epochs", "1", "--set", f"data_kwargs={SMALL}", "--out", str(tmp_path)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--norm", "none"])
    assert r.exit_code == 0 and "already done" in r.output, r.output
    rows = _db(tmp_path).execute("SELECT status, config FROM runs").fetchall()
    assert len(rows) == 1 and rows[0][0] == "done"
    assert json.loads(rows[0][1])["norm"] == "none"
    assert json.loads(rows[0][1])["label"] == "nf_resnet20"  # an NF model is its own label
    # a normalized model trained without its norm is labelled "none" (it was "resnet20", as
    # if resnet20 were a norm beside gn and bn)
    r = runner.invoke(app, [*args[:2], "resnet20", *args[3:], "--norm", "none"])
    assert r.exit_code == 0 and "none x=16" in r.output, r.output


def test_a_rerun_on_another_setup_says_the_earlier_runs_leave_the_report(tmp_path):
    # the report's section shows the setup a study was last run with: re-running it with other
    # --set values replaced the section without a word, and a user's earlier table was gone
    args = ["reproduce", "--quick", "--variants", "GN", "--data", "synthetic", "--jobs", "1",
            *TINY, "--set", f"data_kwargs={SMALL}", "--set", "train_limit=32", "--set",
            "test_limit=16", "--set", "epochs=1", "--out", str(tmp_path), "--no-report"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "earlier setup" not in r.output, r.output
    r = runner.invoke(app, [*args, "--seeds", "2"])  # the same setup: adds to it
    assert r.exit_code == 0 and "earlier setup" not in r.output, r.output
    r = runner.invoke(app, [*args, "--set", "weight_decay=0.001"])  # another setup
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert ("note: batch-size was last run on another setup (data, model, --set values) or "
            "preset (earlier: weight_decay 0.0001; now: weight_decay 0.001): its 4 runs of the "
            "earlier setup stay in the store and runs.csv, not in the report's batch-size "
            "section") in out, out


def test_spp_report_states_the_input_each_model_was_measured_on(tmp_path):
    # the curves and verdicts depend on the input (nf_resnet20's analytic-variance verdict is
    # reproduced at the default 64 x 32x32 and not at 8 x 8x8): models measured into one --out
    # by separate calls on other inputs were drawn and judged side by side, the input unsaid
    args = ["--out", str(tmp_path)]
    r = runner.invoke(app, ["spp", "resnet20", "--batch", "4", "--resolution", "8", *args])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "report.md").read_text()
    assert "input (unit-Gaussian): batch 4 at 8x8, seed 0." in md, md
    r = runner.invoke(app, ["spp", "nf_resnet20", "--batch", "2", "--resolution", "16",
                            "--seed", "3", *args])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "report.md").read_text()
    assert "measured on different inputs" in md, md
    assert "resnet20 (Conv-BN-ReLU; batch 4 at 8x8, seed 0)" in md, md
    assert "nf\\_resnet20 (NF + Scaled WS; batch 2 at 16x16, seed 3)" in md, md


def test_spp_goes_to_the_store_and_the_report(tmp_path):
    r = runner.invoke(app, ["spp", "resnet20", "nf_resnet20", "--batch", "4", "--resolution", "8",
                            "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = _db(tmp_path).execute("SELECT model, COUNT(*) FROM spp GROUP BY model").fetchall()
    assert dict(rows) == {"nf_resnet20": 10, "resnet20": 10}  # stem + 9 residual blocks
    assert (tmp_path / "figures" / "spp.png").is_file()
    # the command writes the report itself (its --help says so), with each model's kind
    text = (tmp_path / "report.md").read_text()
    assert "Signal propagation" in text and "report:" in r.output
    assert "resnet20 (Conv-BN-ReLU)" in text and "nf\\_resnet20 (NF + Scaled WS)" in text
    assert "| nf\\_resnet20 | **" in text                 # its analytic-variance verdict row
    assert "report.md" in runner.invoke(app, ["spp", "--help"]).output
    r = runner.invoke(app, ["spp", "resnet7", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown model 'resnet7'" in r.output


def test_spp_records_are_in_the_csv_and_json_exports(tmp_path):
    # the exports keep what the store holds when the store is damaged (README); the spp records
    # were in the store and the report only
    import csv

    r = runner.invoke(app, ["spp", "resnet20", "nf_resnet20:alpha=0.5", "--batch", "2",
                            "--resolution", "8", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    con = _db(tmp_path)
    stored = [dict(row) for row in con.execute("SELECT * FROM spp ORDER BY model, depth")]
    assert len(stored) == 20 and {s["architecture"] for s in stored} >= {"NF + Scaled WS"}
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["spp"] == stored
    with open(tmp_path / "spp.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["model"] for row in rows] == [s["model"] for s in stored]
    for row, s in zip(rows, stored):
        assert int(row["depth"]) == s["depth"] and row["name"] == s["name"]
        assert row["measured_on"] == s["measured_on"] == "batch 2 at 8x8, seed 0"
        for k in ("avg_sq_mean", "avg_var", "residual_var", "expected_var"):
            # csv writes a float's repr (the same float back) and NULL as an empty cell
            assert (None if row[k] == "" else float(row[k])) == s[k], (k, row)
    assert any(s["expected_var"] is not None for s in stored)  # the NF model's analytic curve


def test_spp_per_model_specs_and_nf_branches_active(tmp_path):
    # the issue-4 comparison in one command: each NAME:key=value reaches that model only
    specs = ["preact_resnet20", "preact_resnet20:order=act_norm", "nf_resnet20",
             "nf_resnet20:std_conv=false", "preact_resnet20:norm=none",
             "nf_resnet20:skipinit=true"]
    r = runner.invoke(app, ["spp", *specs, "--batch", "4", "--resolution", "8",
                            "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    from normlab.lab.store import Store

    with Store(tmp_path) as s:
        recs = s.spp()
    assert set(recs) == set(specs) and all(len(v) == 10 for v in recs.values())
    var = {k: [x["avg_var"] for x in v] for k, v in recs.items()}
    # NF defaults to skipinit=False here: variance grows through stage 1 (analytic 1 + 3 * 0.04
    # after its third block; 1.08-1.18 measured over seeds at this batch); with SkipInit every
    # block is the identity at init: flat (exactly)
    assert var["nf_resnet20"][3] > 1.04 * var["nf_resnet20"][0]
    assert var["nf_resnet20:skipinit=true"][1:4] == pytest.approx([var["nf_resnet20"][0]] * 3,
                                                                  rel=1e-6)
    # each spec reached its own model only (same seed and input: the curves differ because the
    # models do; the shapes themselves are tested in tests/test_spp.py)
    base = var["preact_resnet20"]
    assert var["preact_resnet20:norm=none"] != base
    assert var["preact_resnet20:order=act_norm"] != base
    assert var["nf_resnet20:std_conv=false"] != var["nf_resnet20"]
    assert "skipinit=False" in runner.invoke(app, ["spp", "--help"]).output  # said in --help


@pytest.mark.parametrize("args, needle", [
    (["nf_resnet20:norm=gn"], "'nf_resnet20' is normalizer-free and takes no norm"),  # NF + norm
    (["resnet20", "nf_resnet20", "--set", "skipinit=false"],        # --set reaches every model
     "--set applies to every model; use NAME:key=value for one"),
    (["resnet20:"], "has nothing after ':'"),                       # empty spec
    (["resnet20:width"], "expects key=value"),                      # no '='
    (["resnet20", "resnet20"], "listed twice"),                     # duplicate
    (["resnet20:nope=1"], "resnet20:nope=1: "),                     # unknown keyword, named
    # a seed torch cannot take: the error named the model and "Overflow when unpacking"
    (["resnet20", "--seed", "100000000000000000000"], "--seed must be an int in [0, 2**32)"),
])
def test_spp_bad_specs_are_one_line(tmp_path, args, needle):
    r = runner.invoke(app, ["spp", *args, "--batch", "2", "--resolution", "8",
                            "--out", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error:"), r.output
    assert needle in r.output and len(r.output.strip().splitlines()) <= 3, r.output


def test_spp_of_a_normlab_model_without_residual_blocks_says_how_to_name_them(tmp_path):
    # the error asks for blocks=[module names], which NAME:key=value passes to the model (an
    # unexpected keyword); the hint said "see `normlab ls --models` and the model's keywords"
    # for a normlab model, and named signal_propagation's blocks= for timm models only
    r = runner.invoke(app, ["spp", "bn_dropout_cnn", "--batch", "2", "--resolution", "8",
                            "--out", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error: bn_dropout_cnn: BNDropoutCNN has no "
                                                    "normlab residual blocks"), r.output
    hint = r.output.strip().splitlines()[-1]
    assert hint.startswith("hint: ") and "signal_propagation(model, blocks=[...])" in hint, hint
    assert len(r.output.strip().splitlines()) == 2, r.output


def _wait_for_count(out, proc, query, at_least, timeout_s):
    """Poll the store in ``out`` until ``query`` counts ``at_least`` rows, ``proc`` ends, or
    ``timeout_s`` passes (a store still being created answers OperationalError: poll again)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            con = _db(out)
            n = con.execute(query).fetchone()[0]
            con.close()
        except sqlite3.OperationalError:
            continue
        if n >= at_least:
            return


def test_killing_the_study_stops_its_training_processes(tmp_path):
    # --jobs 2: SIGKILL the study process alone; its workers notice and stop, the store stays
    # sound, and a re-run finishes every run
    from normlab.lab.owners import _owner_alive

    args = ["reproduce", "--quick", "--data", "synthetic", "--jobs", "2", "--no-report", *TINY,
            "--set", f"data_kwargs={SMALL}", "--set", "epochs=3", "--out", str(tmp_path)]
    p = subprocess.Popen([sys.executable, "-m", "normlab.lab.cli", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_count(tmp_path, p, "SELECT COUNT(*) FROM runs WHERE epochs_done >= 1", 2, 120)
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(3)
    con = _db(tmp_path)
    owners = [r[0] for r in con.execute("SELECT owner FROM runs WHERE status='running'")]
    assert not any(_owner_alive(o) for o in owners), owners
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    r = _cli(*args, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _db(tmp_path).execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0] == 4


_INTERRUPTED_AT_START = """
import sys, time
from multiprocessing import util
from pathlib import Path


def main():
    from normlab.lab import runner
    from normlab.lab.store import Store

    def interrupted(*args):
        raise KeyboardInterrupt

    runner._follow = interrupted  # Ctrl-C the moment the --jobs workers are started
    # an exit handler that runs after the queues' semaphores are removed and before daemonic
    # processes are stopped: the window a slow exit leaves a worker that is still starting
    util.Finalize(None, time.sleep, (5,), exitpriority=0)
    out = Path(sys.argv[1])
    try:
        runner.run_parallel([], Store(out), 2, out)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)


if __name__ == "__main__":
    main()
"""


def test_ctrl_c_while_the_jobs_workers_start_prints_no_worker_traceback(tmp_path):
    """Seen in CI: Ctrl-C came while a --jobs worker was still starting; this process's exit
    removed the queues' semaphores before it stopped the workers, and the worker printed a
    FileNotFoundError traceback. The workers are now stopped before the exit handlers run."""
    script = tmp_path / "interrupt_at_start.py"
    script.write_text(_INTERRUPTED_AT_START)
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "interrupted\n", r.stderr


def test_ctrl_c_with_jobs_is_one_line_then_the_rerun_finishes(tmp_path):
    # Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the study process
    # and its --jobs training processes. No traceback from any of them, status 130, the store
    # sound; the same command then finishes every run.
    # 1024 images, 3 epochs: a run lasts about 2 s, so the study is still training when the
    # signal comes. The study starts with SIGINT at its default, as from a terminal: a test
    # suite started in the background by a non-interactive shell ignores SIGINT, and the
    # study would inherit that and ignore Ctrl-C (exit 0)
    data = json.dumps({**json.loads(SMALL), "n_train": 1024})
    args = ["reproduce", "norms", "--quick", "--data", "synthetic", "--no-report", *TINY,
            "--set", f"data_kwargs={data}", "--set", "epochs=3", "--set", "threads=1",
            "--out", str(tmp_path)]
    p = subprocess.Popen([sys.executable, "-m", "normlab.lab.cli", *args, "--jobs", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_count(tmp_path, p, "SELECT COUNT(*) FROM runs WHERE status='running'", 1, 60)
    assert p.poll() is None, "the study finished before it could be interrupted"
    time.sleep(0.3)  # the workers are training
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines() == ["interrupted; re-run the same command to resume"], err
    con = _db(tmp_path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # the interrupted runs are released, not left owned by the dead training processes
    assert con.execute("SELECT COUNT(*) FROM runs WHERE owner IS NOT NULL").fetchone()[0] == 0
    con.close()
    r = runner.invoke(app, [*args, "--jobs", "1"])  # the same study, here in this process
    assert r.exit_code == 0, r.output
    assert _db(tmp_path).execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0] == 5


def test_unusable_out_dir_or_store_is_one_line_and_keeps_the_file(tmp_path):
    # --out naming a file, and a results.sqlite that is not a database: one error line naming
    # the path, exit 2, no traceback; the user's file is left as it was
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.sqlite").write_text("not a database")
    cases = [(["ls", str(bad)], "is not a readable results store"),
             (["report", str(bad)], "is not a readable results store"),
             (["spp", "resnet20", "--batch", "2", "--resolution", "8", "--out", str(a_file)],
              "cannot use output directory")]
    for args, needle in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error:") and needle in r.output, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 2, r.output
    assert a_file.read_text() == "mine"
    assert (bad / "results.sqlite").read_text() == "not a database"


def test_a_file_or_folder_where_ls_and_report_read_or_write_says_what_it_is(tmp_path):
    # these said "no results store at 'notes.txt/results.sqlite'" (and at a results.sqlite that
    # is a folder) and "cannot write the report into 'notes.txt': File exists"
    from normlab.lab.store import Store

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    folder = tmp_path / "odd"
    (folder / "results.sqlite").mkdir(parents=True)
    Store(tmp_path / "out").close()
    cases = [(["ls", str(a_file)], f"{str(a_file)!r} is a file, not a results directory"),
             (["report", str(a_file)], f"{str(a_file)!r} is a file, not a results directory"),
             (["ls", str(folder)], f"{str(folder / 'results.sqlite')!r} is not a file"),
             (["report", str(tmp_path / "out"), "--to", str(a_file)],
              f"cannot write the report into {str(a_file)!r}: it is a file, not a directory")]
    for args, needle in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        out = " ".join(r.output.split())
        assert out.startswith("error:") and needle in out, out
        assert len(r.output.strip().splitlines()) == 2, r.output
    assert a_file.read_text() == "mine" and (folder / "results.sqlite").is_dir()


def test_sigterm_releases_the_run_for_any_host_and_keeps_its_epochs(tmp_path):
    # SIGTERM (kill, a batch scheduler stopping a job): one line, exit 143, the run keeps its
    # finished epochs and checkpoint and is owned by nobody, so a re-run on any host (a new
    # container, another node: where the old pid cannot be checked) resumes it at once
    args = ["train", "--data", "synthetic", "--set", f"data_kwargs={SMALL}", "--batch-size", "8",
            "--epochs", "50", "--set", "threads=1", "--out", str(tmp_path)]
    p = subprocess.Popen([sys.executable, "-m", "normlab.lab.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
        try:
            con = _db(tmp_path)
            n = con.execute("SELECT COUNT(*) FROM runs WHERE epochs_done >= 1").fetchone()[0]
            con.close()
        except sqlite3.OperationalError:
            continue
        if n:
            break
    assert p.poll() is None, "the run finished before it could be stopped"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines() == [
        "terminated; re-run the same command to resume"], err
    row = _db(tmp_path).execute("SELECT run_id, status, owner, epochs_done FROM runs").fetchone()
    assert row["status"] == "running" and row["owner"] is None and row["epochs_done"] >= 1
    assert (tmp_path / "checkpoints" / f"{row['run_id']}.pt").is_file()


def test_a_run_another_process_trains_is_waited_for_and_said(tmp_path):
    # a run claimed by a live process elsewhere (another terminal, host or container on a shared
    # --out) is waited for: say so, naming the owner, instead of a silent stall
    import threading

    from normlab.lab.config import RunConfig, apply_overrides, parse_set
    from normlab.lab.store import Store

    args = ["train", "--data", "synthetic", "--set", f"data_kwargs={SMALL}", "--batch-size", "8",
            "--epochs", "1", "--out", str(tmp_path)]
    cfg = apply_overrides(RunConfig(), {**parse_set([f"data_kwargs={SMALL}"]), "data": "synthetic",
                                        "batch_size": 8, "epochs": 1, "label": "bn"})
    with Store(tmp_path) as s:
        s.claim(cfg.run_id(), cfg.to_dict())
        s.con.execute("UPDATE runs SET owner='otherhost:4242'")  # alive: not checkable here

    def other_process_finishes():
        time.sleep(1.0)
        with Store(tmp_path) as s:  # as otherhost:4242 ends it (Store.finish checks the owner)
            s.con.execute("UPDATE runs SET status='done', owner=NULL WHERE run_id=?",
                          (cfg.run_id(),))

    t = threading.Thread(target=other_process_finishes)
    t.start()
    r = runner.invoke(app, args)
    t.join()
    assert r.exit_code == 0, r.output
    assert "being trained by otherhost:4242" in r.output and "already done" in r.output, r.output


def test_flags_show_no_value_in_help():
    # `--quick <bool>` in the help made users write `--quick true` (then: "unknown study")
    out = runner.invoke(app, ["reproduce", "--help"], env={"COLUMNS": "120"}).output
    line = next(l for l in out.splitlines() if "--quick" in l)
    assert "<bool>" not in line and "first look" in line
    assert "<bool>" not in next(l for l in out.splitlines() if "--no-report" in l)
    # and ls's listing flags and --version (a new user's walk through the help)
    out = runner.invoke(app, ["ls", "--help"], env={"COLUMNS": "120"}).output
    for flag in ("--studies", "--models", "--norms", "--keys"):
        assert "<bool>" not in next(l for l in out.splitlines() if flag in l), flag
    out = runner.invoke(app, ["--help"], env={"COLUMNS": "120"}).output
    assert "<bool>" not in next(l for l in out.splitlines() if "--version" in l)


def test_jobs_follower_shows_each_workers_epochs():
    """With --jobs the study process shows a bar per run a worker trains, moved by the worker's
    progress events (it sat at 0/N until a run ended), and off a terminal a line per epoch."""
    from rich.progress import Progress

    from normlab.lab import progress, runner as runner_mod
    from normlab.lab.studies import get_study

    pts = get_study("batch-size").points({}, "quick", 1, ["BN"])[:2]
    ids = {p.cfg.run_id(): p for p in pts}
    a, b = list(ids)
    prog, bars = Progress(disable=True), {}
    events = [(a, "start", {"epoch": 0, "total_steps": 20}),
              (b, "start", {"epoch": 0, "total_steps": 40}),      # the other worker's run
              (a, "step", {"advance": 10, "loss": 2.0, "images_per_s": 90.0}),
              (b, "step", {"advance": 10, "loss": 2.1, "images_per_s": 80.0}),
              (a, "step", {"advance": 10, "loss": 1.5, "images_per_s": 95.0}),
              (a, "epoch", {"epoch": 0, "train_loss": 1.7, "test_error": 40.0,
                            "images_per_s": 95.0}),
              (a, "start", {"epoch": 1, "total_steps": 20}),
              ("unknown-run", "start", {"epoch": 0, "total_steps": 5})]   # not this study's
    with progress.console.capture() as cap:
        for e in events:
            runner_mod._on_event(prog, bars, ids, *e)
    ta, tb = (prog.tasks[bars[r]] for r in (a, b))
    assert len(bars) == 2
    assert (ta.completed, ta.total) == (0, 20) and ta.description == "BN x=32 seed=0 epoch 2/20"
    assert (tb.completed, tb.total) == (10, 40) and tb.description == "BN x=2 seed=0 epoch 1/20"
    assert cap.get().splitlines() == [
        "  BN x=32 seed=0: epoch 1/20, train loss 1.700, test error 40.00% (95 img/s)"]


class _FakeWorkers:
    """``mp.get_context("spawn")`` for run_parallel whose first worker, when started, reports
    ``reports`` ((point, outcome) in that order) and exits at once."""

    def __init__(self, reports):
        self.reports = reports

    def get_context(self, method):
        return self

    def Queue(self, maxsize=0):  # noqa: N802 - multiprocessing's spelling
        import queue
        return queue.Queue(maxsize)

    def Process(self, target, daemon, args):  # noqa: N802
        fake = self

        class Proc:
            exitcode = 0

            def start(self):
                outcomes = args[4]
                for p, outcome in fake.reports:
                    res = {"final_test_error": 7.5, "wall_time": 1.0, "images_per_s": 9.0,
                           "resumed_from": 0} if outcome == "trained" else {}
                    outcomes.put((p.cfg.run_id(), outcome, res))
                fake.reports = []

            def is_alive(self):
                return False

        return Proc()


def test_jobs_print_the_runs_already_done_first_in_the_studys_order(tmp_path, monkeypatch):
    # with --jobs the "already done" lines came after the lines of every run trained, however
    # early in the study those runs were (the workers' skips were held to the end)
    from normlab.lab import progress, runner as runner_mod
    from normlab.lab.store import Store
    from normlab.lab.studies import get_study

    a, b, c, d = get_study("batch-size").points({}, "quick", 1, ["BN", "GN"])[:4]
    with Store(tmp_path) as store:
        for p in (a, c):  # finished by an earlier invocation
            store.claim(p.cfg.run_id(), p.cfg.to_dict())
            store.record_epochs(p.cfg.run_id(), [{"epoch": 0, "test_error": 4.0}], {})
            store.finish(p.cfg.run_id())
        monkeypatch.setattr(runner_mod, "mp", _FakeWorkers(
            [(b, "trained"), (a, "skipped"), (d, "trained"), (c, "skipped")]))
        with progress.console.capture() as cap:
            counts = runner_mod.run_parallel([a, b, c, d], store, 2, tmp_path)
    assert counts == {"skipped": 2, "trained": 2, "failed": 0}
    names = [progress.describe(p) for p in (a, c, b, d)]
    assert cap.get().splitlines() == [f"  {names[0]}: already done", f"  {names[1]}: already done",
                                      f"  {names[2]}: test error 7.50% (1.0s, 9 img/s)",
                                      f"  {names[3]}: test error 7.50% (1.0s, 9 img/s)"]


def test_a_label_or_path_that_looks_like_rich_markup_is_printed_as_written(tmp_path):
    # rich read '[/x]' in a label as a closing tag: the run's line raised MarkupError after its
    # epoch trained, the run was marked failed, and `ls` of that store was a traceback; a
    # `report --to` path with it likewise
    out = tmp_path / "o[/x]"
    r = runner.invoke(app, ["train", "--data", "synthetic", "--set", f"data_kwargs={SMALL}",
                            "--epochs", "1", "--batch-size", "16", "--set", "label=[/x]",
                            "--set", "threads=1", "--out", str(out)], terminal_width=300)
    assert r.exit_code == 0, r.output
    assert "  [/x] x=16 seed=0: test error " in r.output
    assert f"{out}/" in r.output.replace("\n", "")  # rich may break the line before a path
    assert _db(out).execute("SELECT status FROM runs").fetchone()[0] == "done"
    r = runner.invoke(app, ["ls", str(out)], terminal_width=300)
    assert r.exit_code == 0 and "[/x]" in r.output and "done" in r.output, r.output
    r = runner.invoke(app, ["report", str(out), "--to", str(tmp_path / "r[/y]")],
                      terminal_width=300)
    assert r.exit_code == 0, r.output
    assert f"{tmp_path / 'r[/y]' / 'report.md'}" in r.output.replace("\n", ""), r.output


def test_control_characters_in_a_label_never_reach_the_terminal(tmp_path):
    # an escape sequence in a label (typed, or edited into a store) went to the terminal as
    # is, in the run's lines and in `ls` (rich drops a bell, not ESC): it could recolour,
    # clear or retitle the user's terminal; it is shown as its escape, \x1b
    out = tmp_path / "o"
    label = "GN\x1b[2J\x1b]0;title\x07"
    r = runner.invoke(app, ["train", "--data", "synthetic", "--set", f"data_kwargs={SMALL}",
                            "--epochs", "1", "--batch-size", "16", "--set", f"label={label}",
                            "--set", "threads=1", "--out", str(out)], terminal_width=300)
    assert r.exit_code == 0, r.output
    assert "  GN\\x1b[2J\\x1b]0;title\\x07 x=16 seed=0: test error " in r.output, r.output
    r = runner.invoke(app, ["ls", str(out)], terminal_width=300)
    assert r.exit_code == 0 and "GN\\x1b[2J\\x1b]0;title\\x07" in r.output, r.output
    for r in (r, runner.invoke(app, ["train", "--norm", "bn\x1b[31m", "--out", str(out)])):
        assert "\x1b" not in r.output and "\x07" not in r.output, r.output


def test_a_newline_in_user_text_cannot_add_a_line_to_the_error(tmp_path):
    # the model spec is echoed into the error: its newline printed a second line that read as
    # normlab's own "hint:"
    r = runner.invoke(app, ["spp", "resnet20:width=0\nhint: run something else", "--out",
                            str(tmp_path)])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 2, r.output
    assert lines[0].startswith("error: resnet20:width=0\\nhint: run something else: ")
    assert lines[1].startswith("hint: see `normlab ls --models`")


def test_an_error_whose_message_starts_with_a_newline_is_not_an_empty_line(tmp_path,
                                                                              monkeypatch):
    # matplotlib's mathtext errors read "\n<the text>\n^\n<why>": the error line was "error: "
    # and nothing else
    from normlab.lab.cli import browse

    def fails(out, to):
        raise ValueError("\n\\foo{\n^\nParseFatalException: Unknown symbol")

    monkeypatch.setattr(browse, "print_report", fails)
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error: \\foo{\n"), r.output


def test_an_spp_batch_too_large_for_memory_names_batch_and_resolution(tmp_path, monkeypatch):
    # the allocator's failure was "re-run the same command to resume", exit 1; the size is the
    # user's --batch x --resolution (a real one would take the test machine's memory: the
    # allocator's error is raised where the measurement allocates)
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 26214400000 bytes")

    monkeypatch.setattr(spp_lib, "signal_propagation", out_of_memory)
    r = runner.invoke(app, ["spp", "resnet20", "--batch", "100000", "--resolution", "64",
                            "--out", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error: resnet20: --batch 100000 at "
                                                    "--resolution 64 does not fit"), r.output
    assert "hint: lower --batch or --resolution" in r.output


def test_ls_with_a_directory_and_a_list_flag_says_it_takes_one_or_the_other(tmp_path):
    # `ls OUT --studies` printed the studies and ignored OUT without a word
    r = runner.invoke(app, ["ls", str(tmp_path), "--studies", "--norms"])
    assert r.exit_code == 2
    assert "a directory lists its runs and --studies/--norms what normlab knows" in r.output
    assert "batch-size:" not in r.output


def test_train_a_timm_vit_with_rmsnorm(tmp_path):
    # a transformer: its LayerNorms become RMSNorm; a 1-block ViT on the 8 x 8 images in
    # 2 x 2 patches (img_size and patch_size through model_kwargs, as a user gives them)
    from timm_import import import_timm

    import_timm()
    out = tmp_path / "out"
    vit = json.dumps({"img_size": 8, "patch_size": 2, "depth": 1})
    r = runner.invoke(app, ["train", "--model", "timm:vit_tiny_patch16_224", "--norm", "rms",
                            "--set", f"model_kwargs={vit}", "--set", "epochs=1", "--set",
                            f"data_kwargs={SMALL}", "--data", "synthetic", "--out", str(out)])
    assert r.exit_code == 0, r.output
    row = _db(out).execute("SELECT status, config FROM runs").fetchone()
    assert row["status"] == "done" and json.loads(row["config"])["norm"] == "rms"


def test_train_a_timm_model_with_a_normlab_norm(tmp_path):
    from timm_import import import_timm

    import_timm()  # in-process: the CLI finds the timm this imported
    out = tmp_path / "out"
    r = runner.invoke(app, ["train", "--model", "timm:resnet10t", "--norm", "gn", "--set",
                            "epochs=1", "--set", f"data_kwargs={SMALL}", "--data", "synthetic",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    row = _db(out).execute("SELECT status, config, versions FROM runs").fetchone()
    assert row["status"] == "done"
    assert json.loads(row["config"])["model"] == "timm:resnet10t"
    assert "timm" in json.loads(row["versions"])  # timm's version defines the model
    # a LayerNorm model (ConvNeXt) with the default bn: refused before anything trains
    r = runner.invoke(app, ["train", "--model", "timm:convnext_atto", "--out", str(out)])
    assert r.exit_code == 2 and "norm 'bn' has no form; it takes ln, rms, none" in r.output
    assert "timm:<name>" in runner.invoke(app, ["ls", "--models"]).output
    # spp: a timm ResNet's blocks are found (its name holds a ':' before its own key=value);
    # its kind is none the report checks, which the report says (not "not recorded")
    r = runner.invoke(app, ["spp", "timm:resnet10t:zero_init_last=false", "--batch", "4",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    names = [n for (n,) in _db(out).execute(
        "SELECT name FROM spp WHERE model='timm:resnet10t:zero_init_last=false' ORDER BY depth")]
    assert names == ["maxpool", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    text = (out / "report.md").read_text()
    assert "zero\\_init\\_last=false (none of the documented kinds)" in text, text
    assert "was not recorded" not in text
    r = runner.invoke(app, ["spp", "timm:efficientnet_b0", "--out", str(out)])
    assert r.exit_code == 2 and "signal_propagation(model, blocks=" in r.output, r.output


_OWN_MODEL_SCRIPT = '''
from torch import nn
import normlab
from normlab import models


@models.register("tinynet")  # at the top level: the --jobs workers re-import this script
def tinynet(norm="bn", num_classes=10, in_chans=3, norm_kwargs=None):
    kw = dict(norm_kwargs or {})
    return nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1, bias=False),
                         normlab.create_norm(norm, 8, **kw), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


if __name__ == "__main__":
    from normlab.lab.cli import app
    app()
'''


def test_a_users_own_model_registered_in_a_script_that_runs_the_cli(tmp_path):
    # README ("Your own model"): the script registers its builder, then is the CLI; the study's
    # --jobs workers (spawned) re-import it, so they build the same model
    script = tmp_path / "my_study.py"
    script.write_text(_OWN_MODEL_SCRIPT)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(script), "reproduce", "--quick", "--model", "tinynet",
                        "--data", "synthetic", "--set", f"data_kwargs={SMALL}", "--set",
                        "epochs=1", "--jobs", "2", *TINY, "--no-report", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = _db(out).execute("SELECT status, config FROM runs").fetchall()
    assert len(rows) == 4 and all(row["status"] == "done" for row in rows)
    cfgs = [json.loads(row["config"]) for row in rows]
    assert {c["model"] for c in cfgs} == {"tinynet"}
    assert {c["norm"] for c in cfgs} == {"bn", "gn"}


def test_a_users_own_model_trains_on_torchrun_processes(tmp_path):
    # --nproc-per-node relaunches the command through torchrun: each worker runs the user's
    # script (which registers the model), not `python -m normlab.lab.cli` (which does not know it)
    script = tmp_path / "my_study.py"
    script.write_text(_OWN_MODEL_SCRIPT)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(script), "train", "--model", "tinynet", "--norm",
                        "syncbn", "--data", "synthetic", "--set", f"data_kwargs={SMALL}", "--set",
                        "epochs=1", "--batch-size", "8", "--nproc-per-node", "2", "--out",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = _db(out).execute("SELECT status, config FROM runs").fetchone()
    assert row["status"] == "done"
    cfg = json.loads(row["config"])
    assert (cfg["model"], cfg["world_size"]) == ("tinynet", 2)


def test_the_stored_protocol_states_the_batch_and_lr_the_runs_train_with(monkeypatch, tmp_path):
    # stats-batch with --set batch_size=16 --set lr=0.02 trained SGD batches of 8 x 16 at lr
    # 0.02, and the report's protocol line said "SGD batch 8 x 32 images, lr base_lr (the
    # paper's lr at 32 images per device)"; a per-device study with --set lr said "lr base_lr x
    # N / 32"
    import normlab.lab.cli.study as cli_study

    seen = {}

    def fake_run_study(study, preset, points, out, **kw):
        seen[study.name] = (points, kw["info"]["protocol"])
        return {"trained": 0, "skipped": 0, "failed": 0}

    monkeypatch.setattr(cli_study, "run_study", fake_run_study)
    for args in (["stats-batch", "--set", "batch_size=16", "--set", "lr=0.02"],
                 ["nf", "--set", "lr=0.02"], ["stats-batch"]):
        r = runner.invoke(app, ["reproduce", *args, "--quick", "--out", str(tmp_path)])
        assert r.exit_code == 0, r.output
        points, protocol = seen[args[0]]
        if args[0] == "stats-batch" and len(args) > 1:
            assert {p.cfg.batch_size for p in points} == {8 * 16}
            assert {p.cfg.lr for p in points} == {0.02}
            assert protocol["sgd_batch"] == "8 x 16"
            assert protocol["lr"] == "0.02 set by hand (not scaled with the batch)"
            assert "inside an SGD batch of 8 x 16 (the GN paper's: 8 x 32)" in protocol["source"]
        elif args[0] == "nf":
            assert protocol["lr"] == "0.02 set by hand (not scaled with the batch)"
        else:  # the defaults: the texts stores already hold
            assert protocol["sgd_batch"] == "8 x 32"
            assert protocol["lr"] == "base_lr (the paper's lr at 32 images per device)"
            assert protocol["source"].endswith("inside the GN paper's SGD batch of 8 x 32")
