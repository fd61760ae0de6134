"""normlab.distributed.launch: torchrun in a subprocess, 2 CPU processes (gloo).

A clean run, a rank killed mid-run (the job fails in bounded time with a clear error, and the
same command then resumes from the checkpoint and completes), and a hung rank (the collective
timeout ends the job).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from normlab.distributed import LaunchError, launch

SCRIPT = os.path.join(os.path.dirname(__file__), "launch_script.py")
STEPS = 5


def read_ranks(out):
    rows = []
    for r in range(2):
        with open(os.path.join(out, f"rank{r}.txt")) as f:
            rank, world, local, is_dist, dev, start, total, mean = f.read().split()
        rows.append(dict(rank=int(rank), world=int(world), local=int(local), is_dist=int(is_dist),
                         device=dev, start=int(start), total=float(total), mean=float(mean)))
    return rows


def test_launch_runs_every_rank_to_completion(tmp_path):
    out = str(tmp_path)
    rc = launch([SCRIPT, out, "ok", str(STEPS)], nproc_per_node=2, timeout=60)
    assert rc == 0
    rows = read_ranks(out)
    for r, row in enumerate(rows):
        assert (row["rank"], row["world"], row["local"], row["is_dist"]) == (r, 2, r, 1)
        assert row["device"] == "cpu" and row["start"] == 0
        assert row["total"] == STEPS * (1 + 2)  # each step all-reduces rank+1 over 2 ranks
        # weighted mean of rank (weights rank + 1): (0 * 1 + 1 * 2) / 3
        assert row["mean"] == pytest.approx(2 / 3)
    assert open(os.path.join(out, "ckpt.txt")).read() == str(STEPS)


def test_killed_rank_fails_in_bounded_time_and_rerun_resumes(tmp_path):
    out = str(tmp_path)
    argv = [SCRIPT, out, "die-once", str(STEPS)]
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="exit code") as info:
        launch(argv, nproc_per_node=2, timeout=60)
    elapsed = time.monotonic() - t0
    assert info.value.returncode != 0
    assert elapsed < 30, f"the job took {elapsed:.1f} s to end after a rank died"
    assert os.path.exists(os.path.join(out, "died"))
    done = int(open(os.path.join(out, "ckpt.txt")).read())
    assert 1 <= done < STEPS
    assert not os.path.exists(os.path.join(out, "rank0.txt"))  # nobody finished

    # the same command again: resumes from the checkpoint and completes
    assert launch(argv, nproc_per_node=2, timeout=60) == 0
    rows = read_ranks(out)
    assert all(row["start"] == done for row in rows)
    assert all(row["total"] == (STEPS - done) * 3 for row in rows)
    assert open(os.path.join(out, "ckpt.txt")).read() == str(STEPS)


def test_hung_rank_ends_by_collective_timeout(tmp_path):
    out = str(tmp_path)
    t0 = time.monotonic()
    rc = launch([SCRIPT, out, "hang", str(STEPS)], nproc_per_node=2, timeout=60, check=False,
                env={"NORMLAB_DIST_TIMEOUT": "3"})
    elapsed = time.monotonic() - t0
    assert rc != 0
    assert 3 <= elapsed < 30, f"a hung rank kept the job alive {elapsed:.1f} s"


def _alive(pid):
    """Whether process ``pid`` runs (a zombie, killed but not reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid):
    """Pids whose parent is ``pid`` (from /proc)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except OSError:
                pass
    return kids


_LAUNCHER = ("import sys; from normlab.distributed import launch; "
             "launch([sys.argv[1], sys.argv[2], 'forever', '0'], nproc_per_node=2)")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the processes through /proc")
@pytest.mark.parametrize("victim", ["launcher", "torchrun"])
def test_a_job_dies_with_its_launcher_or_torchrun_killed_outright(tmp_path, victim):
    """Issue 14 item 7: SIGKILL of the launcher left torchrun and its workers running (in their
    own session, unwatched). torchrun is tied to the launcher and the workers to torchrun."""
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, SCRIPT, str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = []
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"pid{r}.txt").is_file() for r in range(2)):
            assert time.monotonic() < deadline and launcher.poll() is None, "the job did not start"
            time.sleep(0.2)
        workers = [int((tmp_path / f"pid{r}.txt").read_text()) for r in range(2)]
        (torchrun,) = _children(launcher.pid)
        assert set(workers) <= set(_children(torchrun))  # the tree this test expects
        pids = [torchrun, *workers]
        os.kill(launcher.pid if victim == "launcher" else torchrun, signal.SIGKILL)
        deadline = time.monotonic() + 45  # torchrun stops its workers within 30 s of a SIGTERM
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if _alive(p)], "processes outlived the kill"
    finally:
        for p in [launcher.pid, *pids]:  # only what this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        launcher.wait()
