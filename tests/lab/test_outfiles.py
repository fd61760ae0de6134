"""outfiles.py: a killed writer's temporary files are removed by the next write of that name
once they are old, and nothing else is; a write that runs out of space says so and keeps the
old file."""

import errno
import os
import time

import pytest

from normlab.lab import outfiles
from normlab.lab.outfiles import STALE_TMP_SECONDS, DiskFull, staged, write_text, write_via


def _aged(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)
    return path


def test_the_next_write_removes_its_names_old_temporary_files_only(tmp_path):
    old = STALE_TMP_SECONDS + 60
    killed = tmp_path / "runs.csv.tmp4242.0a1b2c3d"                 # a killed export
    killed.write_bytes(b"half a csv")
    _aged(killed, old)
    in_progress = tmp_path / "runs.csv.tmp4343.deadbeef"             # another writer, now
    in_progress.write_bytes(b"being written")
    other_name = tmp_path / "runs.json.tmp4242.0a1b2c3d"             # another file's: its own write
    other_name.write_bytes(b"x")
    _aged(other_name, old)
    users = tmp_path / "runs.csv.tmp-my-notes"                       # not normlab's naming
    users.write_bytes(b"mine")
    _aged(users, old)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"       # a planted link's target
    outside.write_text("keep")
    link = tmp_path / "runs.csv.tmp7.00000000"
    link.symlink_to(outside)
    _aged(link, old)
    write_text(tmp_path / "runs.csv", "a,b\n")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["runs.csv", "runs.csv.tmp-my-notes", "runs.csv.tmp4343.deadbeef",
                    "runs.json.tmp4242.0a1b2c3d"]
    assert outside.read_text() == "keep" and (tmp_path / "runs.csv").read_text() == "a,b\n"


def test_staging_removes_old_staging_folders_of_killed_writers(tmp_path):
    old = tmp_path / ".normlab-stage99.0123abcd"
    old.mkdir()
    (old / "fig.png").write_bytes(b"half a png")
    _aged(old, STALE_TMP_SECONDS + 60)
    young = tmp_path / ".normlab-stage98.0123abcd"
    young.mkdir()
    with staged(tmp_path) as stage:
        (stage / "fig.png").write_bytes(b"png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".normlab-stage98.0123abcd", "fig.png"]




def _no_space(f):
    raise OSError(errno.ENOSPC, "No space left on device")


def _short_write(f):  # what torch.save says when the file stops growing: no errno
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 0")


@pytest.mark.parametrize("write, free", [(_no_space, 10 << 30),    # ENOSPC, whatever statvfs says
                                         (_short_write, 4096)])    # no errno, 4 KiB left
def test_a_write_that_runs_out_of_space_says_so_and_keeps_the_old_file(tmp_path, monkeypatch,
                                                                        write, free):
    monkeypatch.setattr(outfiles, "_free_bytes", lambda d: free)
    path = tmp_path / "runs.csv"
    path.write_text("the old export\n")
    with pytest.raises(DiskFull, match=f"the disk holding '{tmp_path}' is full: writing "
                                       "runs.csv failed"):
        write_via(path, write)
    assert path.read_text() == "the old export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv"]  # no temporary file left


def test_another_failed_write_with_room_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(outfiles, "_free_bytes", lambda d: 10 << 30)
    with pytest.raises(RuntimeError, match="unexpected pos") as e:
        write_via(tmp_path / "x.pt", _short_write)
    assert not isinstance(e.value, DiskFull)
