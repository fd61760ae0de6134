"""Opening a results store: its schema and the columns added since, read-only opening, and the
errors that name a damaged store, a file that is no store, or a directory that cannot be written.

The layout is described in :mod:`normlab.lab.store`; :class:`normlab.lab.store.Store` opens
through these functions.
"""

from __future__ import annotations

import functools
import os
import secrets
import sqlite3
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

from normlab.lab.config import ConfigError
from normlab.lab.outfiles import disk_full

__all__ = ["StoreError", "unwritable", "DB_NAME", "EXPORTS", "EPOCH_FIELDS"]

DB_NAME = "results.sqlite"
#: the exports written beside the store (:meth:`Store.export`)
EXPORTS = ("runs.csv", "epochs.csv", "studies.csv", "spp.csv", "results.json")
_T = TypeVar("_T")
#: the per-epoch metrics, in the order of the ``epochs`` table and ``epochs.csv``
EPOCH_FIELDS = ("train_loss", "train_error", "test_loss", "test_error", "lr", "wall_time",
                "images_per_s")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, config TEXT NOT NULL, status TEXT NOT NULL, owner TEXT,
    epochs INTEGER, epochs_done INTEGER DEFAULT 0, wall_time REAL, images_per_s REAL, device TEXT,
    versions TEXT, final_train_loss REAL, final_train_error REAL, final_test_loss REAL,
    final_test_error REAL, error TEXT, created REAL, updated REAL, owner_start INTEGER,
    peak_memory_mb REAL, backend TEXT);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL, epoch INTEGER NOT NULL, train_loss REAL, train_error REAL,
    test_loss REAL, test_error REAL, lr REAL, wall_time REAL, images_per_s REAL,
    PRIMARY KEY (run_id, epoch));
CREATE TABLE IF NOT EXISTS study_runs (
    study TEXT NOT NULL, preset TEXT NOT NULL, run_id TEXT NOT NULL, label TEXT NOT NULL,
    x TEXT, registered REAL, setup TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (study, preset, run_id, label));
CREATE TABLE IF NOT EXISTS setups (
    study TEXT NOT NULL, preset TEXT NOT NULL, setup TEXT NOT NULL, info TEXT NOT NULL,
    registered REAL, PRIMARY KEY (study, preset, setup));
CREATE TABLE IF NOT EXISTS spp (
    model TEXT NOT NULL, depth INTEGER NOT NULL, name TEXT, avg_sq_mean REAL, avg_var REAL,
    residual_var REAL, expected_var REAL, architecture TEXT, measured_on TEXT,
    PRIMARY KEY (model, depth));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""

#: columns added since the first stores were written: (table, column, declaration, the value
#: a store written before reads as)
_ADDED_COLUMNS = (("study_runs", "setup", "TEXT NOT NULL DEFAULT ''", "''"),
                  ("runs", "owner_start", "INTEGER", "NULL"),
                  ("runs", "peak_memory_mb", "REAL", "NULL"), ("runs", "backend", "TEXT", "NULL"),
                  ("spp", "expected_var", "REAL", "NULL"), ("spp", "architecture", "TEXT", "NULL"),
                  ("spp", "measured_on", "TEXT", "NULL"))


def _columns(con: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in con.execute(f"PRAGMA table_info({table})")}


def create_schema(con: sqlite3.Connection) -> None:
    """Create the tables that are missing and add the columns an older store lacks (call it
    inside a write transaction)."""
    for stmt in _SCHEMA.strip().split(";"):
        if stmt.strip():
            con.execute(stmt)
    for table, col, decl, _ in _ADDED_COLUMNS:  # a store written before they were
        if col not in _columns(con, table):
            con.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
    # the store's id and write count, which order its exports (normlab.lab.store_export)
    con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store', ?)",
                (secrets.token_hex(8),))


class StoreError(ConfigError):
    """A results store that cannot be used as asked: damaged, not a store, not writable."""


def check_columns(con: sqlite3.Connection, path: Path) -> None:
    """A StoreError when a table of the store lacks a column of :data:`_SCHEMA` that every
    store has had (a file of another program's, or an edited one): said before anything is
    written to it, not as SQLite's "no such column" from deep inside a read or a write. The
    columns of :data:`_ADDED_COLUMNS` and absent tables are the schema's to add."""
    model = sqlite3.connect(":memory:")
    try:
        model.executescript(_SCHEMA)
        want = {t: _columns(model, t) - {c for tab, c, _, _ in _ADDED_COLUMNS if tab == t}
                for (t,) in model.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        model.close()
    have = {t: _columns(con, t) for t in want}
    lacking = [f"{t} lacks {', '.join(sorted(cols - have[t]))}"
               for t, cols in sorted(want.items()) if have[t] and cols - have[t]]
    if lacking:
        raise StoreError(f"{str(path)!r} is not a results store of this normlab (table "
                         f"{'; table '.join(lacking)})",
                         hint="it is left as it is: move it away or pass another --out / DIR")


def _damaged(e: sqlite3.DatabaseError) -> bool:
    """Whether SQLite says the store's pages are damaged (SQLITE_CORRUPT*; a file that is no
    database at all is SQLITE_NOTADB, said otherwise)."""
    name = getattr(e, "sqlite_errorname", "")  # Python >= 3.11
    return name.startswith("SQLITE_CORRUPT") if name else "malformed" in str(e)


def _damage_error(path: Path, e: sqlite3.DatabaseError) -> StoreError:
    return StoreError(
        f"results store {str(path)!r} is damaged ({e})",
        hint=f"the finished runs and spp records are exported beside it ({', '.join(EXPORTS)}); "
             "move the file away (`sqlite3 FILE .recover` may salvage it) and re-run: runs not "
             "in a store are trained again")


def _names_damage(method: Callable[..., _T]) -> Callable[..., _T]:
    """A store method whose SQLite 'database disk image is malformed' becomes a
    :class:`StoreError` naming the file and what to do; 'database or disk is full' (or an I/O
    error on a disk with under 1 MiB free) a :class:`normlab.lab.outfiles.DiskFull`."""
    @functools.wraps(method)
    def wrapped(self: "Store", *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as e:
            if _damaged(e):
                raise _damage_error(self.path, e) from None
            name = getattr(e, "sqlite_errorname", "")
            full = (disk_full(self.path, "the results store", e)
                    if name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR") else None)
            if full is not None:
                raise full from None
            raise
    return wrapped


def unwritable(directory: Union[str, Path]) -> Optional[str]:
    """Why no file can be created in ``directory`` (made if missing), or None when one can."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix=".normlab-probe"):
            return None
    except OSError as e:  # a file of that name said as such, not as mkdir's "File exists"
        if Path(directory).exists() and not Path(directory).is_dir():
            return "it is a file, not a directory"
        return e.strerror or type(e).__name__


def check_writable(directory: Path, path: Path) -> None:
    """Make ``directory`` if missing; a StoreError says why a store cannot be written there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, no permission, a read-only place
        why = ("it is a file, not a directory" if directory.exists() and not directory.is_dir()
               else e.strerror or type(e).__name__)
        raise StoreError(f"cannot use output directory {str(directory)!r}: {why}",
                         hint="pass --out a directory you can write to") from None
    why = unwritable(directory)
    if why is None and path.exists() and not os.access(path, os.W_OK):
        why = "the store file is read-only"
    if why is not None:
        raise StoreError(f"cannot write to output directory {str(directory)!r}: {why}",
                         hint="pass --out a directory you can write to (`normlab ls` and "
                              "`normlab report --to DIR` read a read-only store)")



def _view_added_columns(con: sqlite3.Connection) -> None:
    """An older store lacks the columns added since: read each such table through one temp
    view that adds all of its missing columns with their defaults (one view per table), and a
    table added since as an empty temp table."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "setups" not in tables:  # added with the per-device protocol: an empty one to read
        con.execute("CREATE TEMP TABLE setups (study TEXT, preset TEXT, setup TEXT, info TEXT, "
                    "registered REAL)")
    absent: dict = {}
    for table, col, _, default in _ADDED_COLUMNS:
        if col not in _columns(con, table):
            absent.setdefault(table, []).append(f"{default} AS {col}")
    for table, cols in absent.items():
        con.execute(f"CREATE TEMP VIEW {table} AS SELECT *, {', '.join(cols)} FROM main.{table}")


def connect_read_only(directory: Path, path: Path) -> sqlite3.Connection:
    """Reads only. Where the file and its directory are writable, an ordinary connection
    with ``query_only`` (so SQLite tidies its WAL files away on close as usual); elsewhere
    ``mode=ro``, or, where SQLite cannot create the WAL index beside the file (a read-only
    place) and no write-ahead log is pending, ``immutable=1`` (nothing can change it)."""
    writable = os.access(directory, os.W_OK) and os.access(path, os.W_OK)
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    try:
        con = (sqlite3.connect(path, timeout=60, isolation_level=None) if writable
               else sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None))
        con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.OperationalError:
        wal = Path(f"{path}-wal")
        if writable or (wal.is_file() and wal.stat().st_size):
            raise StoreError(f"cannot read results store {str(path)!r} where it is",
                             hint="copy the directory somewhere writable and read the "
                                  "copy") from None
        con = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None)
    except sqlite3.DatabaseError as e:
        raise open_error(path, e) from None
    try:
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA busy_timeout=60000")
        missing = {"runs", "epochs", "study_runs", "spp"} - {
            r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if missing:
            raise StoreError(f"{str(path)!r} is not a results store (no table "
                             f"{', '.join(sorted(missing))})",
                             hint=f"check the path (a results directory holds {DB_NAME})")
        _view_added_columns(con)
        check_columns(con, path)
        con.execute("PRAGMA query_only=ON")
    except sqlite3.DatabaseError as e:
        con.close()
        raise open_error(path, e) from None
    except StoreError:
        con.close()
        raise
    return con



def open_error(path: Path, e: sqlite3.DatabaseError) -> StoreError:
    """The StoreError for a store SQLite cannot open: damaged, or not a store at all."""
    if _damaged(e):
        return _damage_error(path, e)
    return StoreError(f"{str(path)!r} is not a readable results store ({e})",
                      hint="it is left as it is: move it away or pass another --out / DIR")



def set_wal(con: sqlite3.Connection, timeout: float = 60.0) -> None:
    """Switch to WAL. Changing the journal mode needs an exclusive lock and SQLite answers
    "database is locked" at once, without its busy handler, when another process is creating
    the same new store: retry until ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
