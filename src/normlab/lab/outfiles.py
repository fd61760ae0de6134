"""Writing files into a results directory (``--out``, a report's ``--to``) so that nothing found
there makes normlab write outside it.

Every file is written to a new temporary file beside its place, created exclusively
(``O_EXCL``: a name planted there in advance, a symbolic link included, is never opened), then
renamed into place: a symbolic link at the final name is replaced, not written through, and a
reader sees the old file or the new one, never half of one. The folders normlab writes into
(``figures/``, ``checkpoints/``) and the store file itself must not be symbolic links, nor a
folder a file, nor a file's name a folder: each is a ConfigError naming it.

A process killed while writing (SIGKILL, a power cut) leaves its temporary file, named
``<name>.tmp<pid>.<8 hex digits>``. The next write of ``<name>`` removes such files older than
``STALE_TMP_SECONDS`` (an hour: no write takes that long, and a younger one may be another
process's write in progress); the same holds for :func:`staged`'s folders,
``.normlab-stage<pid>.<8 hex digits>``, at the next staging in that folder. Nothing else is
removed, and a symbolic link of such a name is removed as a link, never followed.

>>> import tempfile
>>> from pathlib import Path
>>> d = Path(tempfile.mkdtemp())
>>> write_text(d / "report.md", "# hi\\n")
>>> (d / "report.md").read_text()
'# hi\\n'
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from normlab.lab.config import ConfigError

__all__ = ["not_a_link", "a_folder", "a_file", "subdir", "write_via", "write_text", "staged",
           "STALE_TMP_SECONDS", "DiskFull", "disk_full"]

#: a temporary file or staging folder of a killed writer is removed once this old (seconds)
STALE_TMP_SECONDS = 3600.0
_TAG = r"\d+\.[0-9a-f]{8}"  # <pid>.<8 hex digits>, as the writers below name their files


def not_a_link(path: Path, inside: Path) -> Path:
    """``path`` (a folder or file normlab writes into, inside ``inside``); a ConfigError when it
    is a symbolic link (writing through it would write outside ``inside``)."""
    if path.is_symlink():
        raise ConfigError(f"{str(path)!r} is a symbolic link (to {os.readlink(path)!r}); normlab "
                          f"writes only inside {str(inside)!r}",
                          hint="move the link away (a real folder or file there is used as is)")
    return path


def a_folder(path: Path, inside: Path) -> Path:
    """``path``, a folder normlab writes into (see :func:`not_a_link`); a ConfigError when a
    file is at its name."""
    if not_a_link(path, inside).exists() and not path.is_dir():
        raise ConfigError(f"{str(path)!r} is a file; normlab writes its files into a folder of "
                          "that name", hint="move the file away (normlab makes the folder)")
    return path


def a_file(path: Path) -> Path:
    """``path``, a file normlab writes (renaming a new file onto it); a ConfigError when a
    folder is at its name (no rename replaces a folder). Checked before a study trains, so the
    error comes first rather than when its exports are written."""
    if path.is_dir() and not path.is_symlink():
        raise ConfigError(f"{str(path)!r} is a folder; normlab writes its own file at that name",
                          hint="move the folder away (or pass another --out)")
    return path


def subdir(directory: Path, name: str) -> Path:
    """``directory/name`` as a real folder, made when missing (see :func:`a_folder`)."""
    d = a_folder(directory / name, directory)
    d.mkdir(parents=True, exist_ok=True)
    return d


class DiskFull(RuntimeError):
    """A write into a results directory failed because its disk (or quota) is full. A study
    stops at it (the run in progress is left to resume from its last checkpoint) rather than
    failing each run after it in turn."""


#: free bytes under which a failed write counts as one that ran out of space: torch.save
#: reports a short write as "unexpected pos", with no errno
_NEARLY_FULL = 1 << 20


def disk_full(path: Path, what: str, e: BaseException) -> DiskFull | None:
    """The :class:`DiskFull` to raise for error ``e`` of writing ``what`` at ``path``, or None
    when ``e`` is no lack of space: ENOSPC or EDQUOT anywhere in its chain, SQLite's "database
    or disk is full", or any failed write while under 1 MiB is left where ``path`` is."""
    chain, seen = e, set()
    full = False
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        full |= getattr(chain, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        full |= getattr(chain, "sqlite_errorname", "") == "SQLITE_FULL"
        chain = chain.__cause__ or chain.__context__
    free = _free_bytes(path.parent)
    if not (full or (free is not None and free < _NEARLY_FULL)):
        return None
    left = "" if free is None else f"; {free / 2 ** 20:.1f} MiB free"
    return DiskFull(f"the disk holding {str(path.parent)!r} is full: writing {what} failed "
                    f"({_first_line(e)}{left})")


def _free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # no statvfs (Windows), or the folder is gone
        return None
    return st.f_bavail * st.f_frsize


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _place(src: Path, path: Path) -> None:
    """Rename ``src`` to ``path``; a ConfigError naming ``path`` when a folder is in the way."""
    try:
        os.replace(src, path)
    except OSError as e:  # a folder at the name (a file cannot replace it), or no permission
        raise ConfigError(f"cannot write {str(path)!r}: {e.strerror or type(e).__name__}",
                          hint="move away what is at that name (normlab writes its own file "
                               "there)") from None


def write_via(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a new temporary file beside ``path`` (mode 0666 less the umask, as
    ``open`` makes files), then rename it to ``path`` (module docstring); on an error the
    temporary file is removed and ``path`` left as it was."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
        _place(tmp, path)
    except Exception as e:  # noqa: BLE001 - a full disk is said as such (DiskFull)
        full = disk_full(path, path.name, e)  # measured while the partial file still fills it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full is not None:
            raise full from e
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _sweep(path.parent, re.escape(path.name) + r"\.tmp" + _TAG)


def _sweep(directory: Path, pattern: str) -> None:
    """Remove the entries of ``directory`` whose whole name matches ``pattern`` and that were
    last changed over STALE_TMP_SECONDS ago: a killed writer's leftovers (module docstring)."""
    name = re.compile(pattern)
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for e in entries:
        if not name.fullmatch(e.name):
            continue
        with contextlib.suppress(OSError):
            st = e.stat(follow_symlinks=False)
            if now - st.st_mtime < STALE_TMP_SECONDS:
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(e.path)  # not a link: rmtree removes links inside, never follows
            else:
                os.unlink(e.path)


def write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) to ``path`` through :func:`write_via`."""
    write_via(path, lambda f: f.write(text.encode("utf-8")))


@contextlib.contextmanager
def staged(directory: Path) -> Iterator[Path]:
    """A new empty folder inside ``directory`` for a writer that takes a path (matplotlib,
    :func:`normlab.spp.plot`); when the block ends without error the files made in it are
    renamed into ``directory`` (replacing whatever is at their names), and it is removed."""
    _sweep(directory, r"\.normlab-stage" + _TAG)
    stage = directory / f".normlab-stage{os.getpid()}.{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        yield stage
        for p in stage.iterdir():
            _place(p, directory / p.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
