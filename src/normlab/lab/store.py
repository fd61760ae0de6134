"""The results store: one SQLite file per output directory, plus CSV and JSON exports.

Layout of ``OUT/results.sqlite`` (WAL journal, every write one ``BEGIN IMMEDIATE`` transaction)::

    runs(run_id PK, config JSON, status running|done|failed, owner host:pid, epochs, epochs_done,
         wall_time s, images_per_s, device, versions JSON, final_* metrics, error, created, updated,
         owner_start: the owner's start time in clock ticks after its host's boot,
         peak_memory_mb (peak memory of the training, MiB), backend (the normalization backend
         that ran, e.g. triton))
    epochs(run_id, epoch PK, train_loss, train_error, test_loss, test_error, lr, wall_time,
           images_per_s)
    study_runs(study, preset, run_id, label PK, x JSON, registered, setup)  -- which runs make a study
    setups(study, preset, setup PK, info JSON, registered)  -- how a study's setup was run: the
         protocol (:meth:`normlab.lab.studies.Study.protocol`), the power rounds' outcome
    spp(model, depth PK, name, avg_sq_mean, avg_var, residual_var, expected_var (the analytic
        variance where the model has one), architecture (e.g. BN-ReLU-Conv), measured_on (the
        input: batch, resolution, seed))  -- signal propagation
    meta(key PK, value)  -- 'store': the store's random id; 'generation': how many write
        transactions it has had (each one counts itself), which orders the exports' snapshots

Why this survives SIGKILL at any moment: SQLite commits are atomic (WAL), a run's per-epoch rows
are written in one transaction after its checkpoint file was atomically renamed into place (see
loop.py), and a run only becomes ``done`` in the transaction that writes its summary. A process
killed mid-epoch leaves its run ``running`` with an owner that no longer exists; the next process
claims it and resumes from the checkpoint. Two processes sharing a store serialize their writes
through SQLite's lock (``busy_timeout`` 60 s) and never train the same run at once: a run owned by
a live process is skipped (:meth:`Store.claim` returns ``"busy"``).

Owners: a process cannot be asked whether a remote pid lives, so the owner of a run touches its
row every :data:`HEARTBEAT_S` seconds while training (:func:`heartbeat`), and an owner whose row
has not been touched for ``$NORMLAB_STALE_AFTER`` seconds (default 900) counts as dead: a run
whose process was killed outright (SIGKILL, OOM, a lost node) is taken over by the next process on
any host instead of being waited for forever. An owner on this host is also asked of the OS at
once: its pid must exist, not be a zombie, and have the start time recorded with the claim (a
killed owner's pid given to a new process is not the owner).

Example::

    >>> import tempfile
    >>> from normlab.lab.config import RunConfig
    >>> cfg = RunConfig(norm="gn", batch_size=2)
    >>> s = Store(tempfile.mkdtemp())                  # normally the --out directory
    >>> s.claim(cfg.run_id(), cfg.to_dict())
    'claimed'

Where the parts live: the schema, opening (read-only too) and the damaged-store errors in
:mod:`normlab.lab.store_open`; owners and their liveness in :mod:`normlab.lab.owners`; the CSV
and JSON exports in :mod:`normlab.lab.store_export`. This module holds :class:`Store` (claims,
writes, reads) and :func:`heartbeat`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from normlab.lab.config import RunConfig
from normlab.lab.owners import HEARTBEAT_S, _me, _my_start, _owner_alive, stale_after_s
from normlab.lab.outfiles import a_file, a_folder, not_a_link
from normlab.lab.store_export import place_exports, read_snapshot, render_exports
from normlab.lab.store_rows import (RUN_NUMBERS, SPP_NUMBERS, epoch_row, json_object, member_x,
                                    numbers, one_kind_of_x, run_config, stored_setup_info)
from normlab.lab.store_open import (DB_NAME, EPOCH_FIELDS, EXPORTS, StoreError, _names_damage,
                                    check_columns, check_writable, connect_read_only, create_schema,
                                    open_error, set_wal, unwritable)

__all__ = ["Store", "StoreError", "TakenOver", "unwritable", "DB_NAME", "EXPORTS", "EPOCH_FIELDS",
           "heartbeat", "HEARTBEAT_S", "stale_after_s"]


class TakenOver(RuntimeError):
    """This process's run was taken over by another (see "Owners" above): it must stop."""


class Store:
    """Results of every run in one output directory (see the module docstring).

    ``create``: make the directory and the store when missing (else a StoreError says there is
    none). ``read_only``: open an existing store for reading only (``normlab ls``, ``report``),
    which works on a read-only mount or without write permission; writes then raise."""

    def __init__(self, out_dir: Union[str, Path], *, create: bool = True,
                 read_only: bool = False) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / DB_NAME
        self.read_only = read_only
        self._checked: set[tuple[Any, Any]] = set()  # (run_id, config text) checked (_config)
        # what a snapshot read once (_members: "members"), kept to its end; None outside one
        self._snapshot_reads: Optional[dict[str, Any]] = None
        if (read_only or not create) and self.dir.name == DB_NAME and self.dir.is_file():
            raise StoreError(f"{str(self.dir)!r} is the store file, not its output directory",
                             hint=f"pass its directory: {str(self.dir.parent)!r}")
        if (read_only or not create) and self.dir.exists() and not self.dir.is_dir():
            raise StoreError(f"{str(self.dir)!r} is a file, not a results directory",
                             hint=f"pass the directory that holds {DB_NAME}")
        if (read_only or not create) and self.path.exists() and not self.path.is_file():
            raise StoreError(f"{str(self.path)!r} is not a file (a folder or a device where the "
                             "results store should be)",
                             hint="it is left as it is: move it away or pass another directory")
        if (read_only or not create) and not self.path.is_file():
            raise StoreError(f"no results store at {str(self.path)!r}",
                             hint="run `normlab reproduce --out DIR` first, or check the path")
        for p in (Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):  # SQLite writes them,
            not_a_link(p, self.dir)  # reading too; it refuses links, saying "unable to open"
        if read_only:
            self.con = connect_read_only(self.dir, self.path)
        else:
            check_writable(self.dir, self.path)
            not_a_link(self.path, self.dir)  # written into: not a link out of --out
            a_folder(self.checkpoint_dir, self.dir)
            for name in EXPORTS:  # written when the store closes: said now, not after a study
                a_file(self.dir / name)
            self.con = self._connect_writable()
        if not read_only:
            try:
                self._drop_finished_checkpoints()
            except BaseException:
                self.con.close()
                raise


    def _connect_writable(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.DatabaseError as e:  # a folder, a FIFO at the store's name
            raise open_error(self.path, e) from None
        self.con = con
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA busy_timeout=60000")
            check_columns(con, self.path)  # another program's file is left as it is
            set_wal(con)
            con.execute("PRAGMA synchronous=NORMAL")
            with self.transaction():
                create_schema(con)
        except sqlite3.DatabaseError as e:  # not a database, damaged, unwritable, locked
            con.close()
            raise open_error(self.path, e) from None
        except StoreError:
            con.close()
            raise
        return con


    @_names_damage
    def _drop_finished_checkpoints(self) -> None:
        """Delete the checkpoints of finished runs: a process killed between marking its run
        done and deleting the file would otherwise leave it forever."""
        if not self.checkpoint_dir.is_dir():
            return
        for ckpt in self.checkpoint_dir.glob("*.pt"):
            row = self.con.execute("SELECT status FROM runs WHERE run_id=?",
                                   (ckpt.name[:-len(".pt")],)).fetchone()
            if row is not None and row["status"] == "done":
                with contextlib.suppress(FileNotFoundError):
                    ckpt.unlink()


    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    def checkpoint_path(self, run_id: str) -> Path:
        return self.checkpoint_dir / f"{run_id}.pt"

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator["Store"]:
        """Every read in the block sees one state of the store (one read transaction): a report
        or a listing written while other processes train reads no run twice in two states (a
        summary of n seeds beside a table of n + 1). Nothing may be written in the block.
        In it the study members (:meth:`_members`) are read once: one state has one list."""
        self.con.execute("BEGIN")  # deferred: the first read fixes the snapshot (WAL)
        self._snapshot_reads = {}
        try:
            yield self
        except BaseException:  # the block's error goes on (a damaged page may have ended the
            if self.con.in_transaction:  # transaction already, and fails a COMMIT as well)
                with contextlib.suppress(sqlite3.Error):
                    self.con.execute("ROLLBACK")
            raise
        finally:
            self._snapshot_reads = None  # read again after the block: the store moves on
        self.con.execute("COMMIT")  # nothing written: ends the read

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: takes the write lock up front). It counts
        itself in the store's generation (``meta``), which orders the exports' snapshots."""
        if self._snapshot_reads:  # a write makes what a snapshot read stale
            self._snapshot_reads.clear()
        self.con.execute("BEGIN IMMEDIATE")
        try:
            yield self.con
            self.con.execute("INSERT INTO meta (key, value) VALUES ('generation', 1) ON "
                             "CONFLICT (key) DO UPDATE SET value=value+1")
            self.con.execute("COMMIT")  # (a full disk may fail it: rolled back below)
        except BaseException:
            if self.con.in_transaction:  # SQLite ends it itself on some errors (a full disk):
                self.con.execute("ROLLBACK")  # a ROLLBACK then would hide the error
            raise

    # ------------------------------------------------------------------ writes
    @_names_damage
    def register(self, study: str, preset: str, members: list[tuple[str, str, Any]],
                 setup: str = "", info: Optional[dict[str, Any]] = None) -> None:
        """Record that ``study`` (``preset``) run on ``setup`` (what it was run on: data,
        model, overrides; :func:`normlab.lab.studies.setup_id`) consists of the (run_id, label,
        x) ``members``. The members of one setup accumulate (more seeds, other series);
        :meth:`study_runs` reads the setup registered last. ``info`` (JSON-able; e.g.
        ``{"protocol": ...}``) is merged into the setup's (:meth:`setup_info`)."""
        now = time.time()
        with self.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO study_runs (study, preset, run_id, label, x, "
                          "registered, setup) VALUES (?, ?, ?, ?, ?, ?, ?)",
                          [(study, preset, rid, label, json.dumps(x), now, setup)
                           for rid, label, x in members])
            if info:
                self._merge_info(c, study, preset, setup, info, now)

    def update_setup_info(self, study: str, preset: str, setup: str,
                          info: dict[str, Any]) -> None:
        """Merge ``info`` (top-level keys replace) into what the store keeps about a setup."""
        with self.transaction() as c:
            self._merge_info(c, study, preset, setup, info, time.time())

    def _merge_info(self, c: sqlite3.Connection, study: str, preset: str, setup: str,
                    info: dict[str, Any], now: float) -> None:
        row = c.execute("SELECT info FROM setups WHERE study=? AND preset=? AND setup=?",
                        (study, preset, setup)).fetchone()
        merged = {**(stored_setup_info(self.path, study, row[0]) if row else {}), **info}
        c.execute("INSERT OR REPLACE INTO setups (study, preset, setup, info, registered) "
                  "VALUES (?, ?, ?, ?, ?)",
                  (study, preset, setup, json.dumps(merged, sort_keys=True, default=str), now))

    def setup_info(self, study: str, preset: Optional[str] = None,
                   setup: Optional[str] = None) -> dict[str, Any]:
        """What the store keeps about the setup :meth:`study_runs` reads (the latest one, or
        ``setup``): ``protocol`` (:meth:`normlab.lab.studies.Study.protocol`: devices, SGD
        batch, lr rule, where the statistics run), ``power`` (the power rounds: seeds added,
        budget, why they stopped); ``{}`` for a study registered without it."""
        preset = preset or self._latest_preset(study)
        latest = (setup if setup is not None
                  else self._latest_setups(self._members(study)).get((study, preset)))
        if latest is None:
            return {}
        row = self.con.execute("SELECT info FROM setups WHERE study=? AND preset=? AND setup=?",
                               (study, preset, latest)).fetchone()
        return stored_setup_info(self.path, study, row[0]) if row else {}

    def _latest_preset(self, study: str) -> Optional[str]:
        pairs = [p for s, p in self.studies() if s == study]
        return pairs[-1] if pairs else None

    @_names_damage
    def claim(self, run_id: str, config: dict[str, Any]) -> str:
        """Take ownership of a run: ``"done"`` (finished, skip it), ``"busy"`` (a live process owns
        it) or ``"claimed"`` (this process owns it now; status ``running``)."""
        now = time.time()
        with self.transaction() as c:
            row = c.execute("SELECT status, owner, updated, owner_start FROM runs WHERE "
                            "run_id=?", (run_id,)).fetchone()
            if row is not None and row["status"] == "done":
                return "done"
            if (row is not None and row["status"] == "running" and row["owner"] != _me()
                    and _owner_alive(row["owner"], row["updated"], row["owner_start"])):
                return "busy"
            if row is None:
                c.execute("INSERT INTO runs (run_id, config, status, owner, owner_start, epochs, "
                          "epochs_done, created, updated) VALUES (?, ?, 'running', ?, ?, ?, 0, "
                          "?, ?)", (run_id, json.dumps(config, sort_keys=True), _me(),
                                    _my_start(), config.get("epochs"), now, now))
            else:
                c.execute("UPDATE runs SET status='running', owner=?, owner_start=?, error=NULL, "
                          "updated=? WHERE run_id=?", (_me(), _my_start(), now, run_id))
        return "claimed"

    @_names_damage
    def record_epochs(self, run_id: str, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Upsert per-epoch rows (``epoch`` plus :data:`EPOCH_FIELDS`) and the run's running
        summary (device, versions, wall_time, images_per_s, peak_memory_mb, backend) in one
        transaction. ``rows`` is the run's whole history: rows of later epochs (a run that
        started over) are deleted. A summary without a peak memory or a backend (a resumed run
        with no epoch left to measure) keeps the recorded ones. :class:`TakenOver` when
        this process does not own the run (another process took it over while this one was silent
        for ``$NORMLAB_STALE_AFTER`` s, e.g. stopped or suspended, and may have finished it
        since): nothing is written."""
        with self.transaction() as c:
            self._still_ours(c, run_id)
            c.execute("DELETE FROM epochs WHERE run_id=? AND epoch>?",
                      (run_id, max((r["epoch"] for r in rows), default=-1)))
            c.executemany(
                f"INSERT OR REPLACE INTO epochs (run_id, epoch, {', '.join(EPOCH_FIELDS)}) "
                f"VALUES (?, ?, {', '.join('?' * len(EPOCH_FIELDS))})",
                [(run_id, r["epoch"], *[r.get(k) for k in EPOCH_FIELDS]) for r in rows])
            last = max(rows, key=lambda r: r["epoch"]) if rows else {}
            c.execute(
                "UPDATE runs SET epochs_done=?, wall_time=?, images_per_s=?, device=?, versions=?, "
                "peak_memory_mb=COALESCE(?, peak_memory_mb), backend=COALESCE(?, backend), "
                "final_train_loss=?, final_train_error=?, "
                "final_test_loss=?, final_test_error=?, updated=? WHERE run_id=?",
                (len(rows) and last["epoch"] + 1, summary.get("wall_time"),
                 summary.get("images_per_s"), summary.get("device"),
                 json.dumps(summary.get("versions", {}), sort_keys=True),
                 summary.get("peak_memory_mb"), summary.get("backend"),
                 last.get("train_loss"), last.get("train_error"), last.get("test_loss"),
                 last.get("test_error"), time.time(), run_id))

    def _still_ours(self, c: sqlite3.Connection, run_id: str) -> None:
        """:class:`TakenOver` unless this process owns ``run_id`` and it is still ``running``:
        a silent owner taken over as stale must not write over its successor's epochs, nor into
        the run once its successor finished it (``done`` or ``failed``, owner NULL) or released
        it (owner NULL)."""
        row = c.execute("SELECT status, owner FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise TakenOver(f"run {run_id} is not in the store (this process never claimed it)")
        if row["owner"] == _me() and row["status"] == "running":
            return
        if row["owner"] not in (None, _me()):
            who = f"was taken over by {row['owner']}"
        elif row["status"] != "running":
            who = f"was finished ({row['status']}) by another process"
        else:
            who = "was taken over and released by another process"
        raise TakenOver(f"run {run_id} {who} while this process was silent for over "
                        "$NORMLAB_STALE_AFTER s; it stops here")

    @_names_damage
    def check_owner(self, run_id: str) -> None:
        """:class:`TakenOver` unless this process owns ``run_id`` and it is still ``running``
        (what :meth:`record_epochs` checks; the loop asks before it writes the checkpoint)."""
        self._still_ours(self.con, run_id)

    @_names_damage
    def touch(self, run_id: str) -> bool:
        """The owner's heartbeat: refresh ``updated`` of a run this process owns. False when
        it owns it no longer (finished, released, or taken over as stale)."""
        with self.transaction() as c:
            cur = c.execute("UPDATE runs SET updated=? WHERE run_id=? AND owner=? AND "
                            "status='running'", (time.time(), run_id, _me()))
        return cur.rowcount == 1

    @_names_damage
    def release(self, run_id: str) -> None:
        """Give up this process's claim on a run it did not finish (interrupted): the run stays
        ``running`` with its epochs and checkpoint, owned by nobody, so the next process on any
        host resumes it at once (a dead owner on another host cannot be told from a live one)."""
        with self.transaction() as c:
            c.execute("UPDATE runs SET owner=NULL, updated=? WHERE run_id=? AND status='running' "
                      "AND owner=?", (time.time(), run_id, _me()))

    @_names_damage
    def finish(self, run_id: str, status: str = "done", error: Optional[str] = None) -> None:
        """Mark a run this process owns ``done`` or ``failed`` (``error``: one line saying
        why). :class:`TakenOver` when this process owns it no longer (see
        :meth:`record_epochs`): an owner taken over must not end its successor's run."""
        if status not in ("done", "failed"):
            raise ValueError(f"status must be 'done' or 'failed', got {status!r}")
        with self.transaction() as c:
            self._still_ours(c, run_id)
            c.execute("UPDATE runs SET status=?, error=?, owner=NULL, updated=? WHERE run_id=?",
                      (status, error, time.time(), run_id))

    @_names_damage
    def forget(self, members: list[tuple[str, str, str, str]], runs: dict[str, str]) -> None:
        """Remove study memberships and whole runs, in one write transaction
        (``normlab forget``; what to remove is chosen in :mod:`normlab.lab.forget`).

        ``members``: (study, preset, run_id, label) rows of ``study_runs``; a setup left with
        no member goes too. ``runs``: run_id -> the status it was chosen in (``running`` for
        an interrupted run): the run's row, epochs, every membership and checkpoint. A run
        that is no longer in that status (a process claimed, finished or failed it since), or
        that a live process trains, is a :class:`StoreError` naming it, and nothing is
        removed. The checkpoints are deleted before the transaction commits, under its write
        lock, so no process can resume one meanwhile."""
        with self.transaction() as c:
            for run_id, status in runs.items():
                self._still_as_chosen(c, run_id, status)
            c.executemany("DELETE FROM study_runs WHERE study=? AND preset=? AND run_id=? AND "
                          "label=?", members)
            for table in ("study_runs", "epochs", "runs"):
                c.executemany(f"DELETE FROM {table} WHERE run_id=?", [(r,) for r in runs])
            c.execute("DELETE FROM setups WHERE NOT EXISTS (SELECT 1 FROM study_runs s WHERE "
                      "s.study=setups.study AND s.preset=setups.preset AND "
                      "s.setup=setups.setup)")
            for run_id in runs:
                with contextlib.suppress(FileNotFoundError):
                    self.checkpoint_path(run_id).unlink()

    def _still_as_chosen(self, c: sqlite3.Connection, run_id: str, status: str) -> None:
        """:meth:`forget`'s check that run ``run_id`` is still ``status`` and trained by no
        live process."""
        row = c.execute("SELECT status, owner, updated, owner_start FROM runs WHERE run_id=?",
                        (run_id,)).fetchone()
        if row is None or row["status"] != status:
            now = "gone" if row is None else row["status"]
            raise StoreError(f"run {run_id} changed since it was chosen ({status}, now {now})",
                             hint="run the same command again to choose from the store as it "
                                  "is now")
        if status == "running" and _owner_alive(row["owner"], row["updated"],
                                                row["owner_start"]):
            raise StoreError(f"run {run_id} is being trained by {row['owner']}",
                             hint="wait for it to finish, or stop that process first")

    @_names_damage
    def record_spp(self, model: str, records: list[dict[str, Any]],
                   architecture: Optional[str] = None,
                   measured_on: Optional[str] = None) -> None:
        """Replace model's signal-propagation records (dicts: depth, name, avg_sq_mean, avg_var,
        residual_var, optional expected_var) in one transaction; ``architecture`` names the
        model's kind (:func:`normlab.spp.describe`), ``measured_on`` the input (e.g. ``batch 64
        at 32x32, seed 0``)."""
        with self.transaction() as c:
            c.execute("DELETE FROM spp WHERE model=?", (model,))
            c.executemany("INSERT INTO spp (model, depth, name, avg_sq_mean, avg_var, "
                          "residual_var, expected_var, architecture, measured_on) VALUES (?, ?, "
                          "?, ?, ?, ?, ?, ?, ?)",
                          [(model, r["depth"], r["name"], r["avg_sq_mean"], r["avg_var"],
                            r["residual_var"], r.get("expected_var"), architecture, measured_on)
                           for r in records])

    # ------------------------------------------------------------------ reads
    @_names_damage
    def spp(self) -> dict[str, list[dict[str, Any]]]:
        """Signal-propagation records by model, in depth order."""
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.con.execute("SELECT * FROM spp ORDER BY model, depth"):
            d = numbers(self.path, f"signal-propagation model {r['model']!r}", dict(r),
                        SPP_NUMBERS)
            out.setdefault(d.pop("model"), []).append(d)
        return out

    def _run_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        """A ``runs`` row with its JSON parsed, every value checked
        (:mod:`normlab.lab.store_rows`)."""
        d = numbers(self.path, f"run {row['run_id']!r}", dict(row), RUN_NUMBERS)
        d["config"] = self._config(d["run_id"], d["config"])
        d["versions"] = json_object(self.path, f"run {d['run_id']!r}", "versions",
                                    d.get("versions"), empty=True)
        return d

    def _config(self, run_id: Any, raw: Any) -> dict[str, Any]:
        """A run's stored config, parsed (a new dict each time) and checked
        (:func:`normlab.lab.store_rows.run_config`) once per text while the store is open: a
        report reads every run's config many times over."""
        if (run_id, raw) not in self._checked:
            config = run_config(self.path, run_id, raw)
            self._checked.add((run_id, raw))
            return config
        return json.loads(raw)

    @_names_damage
    def run(self, run_id: str) -> Optional[dict[str, Any]]:
        row = self.con.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return self._run_dict(row) if row else None

    @_names_damage
    def runs(self, status: Optional[str] = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM runs" + (" WHERE status=?" if status else "") + " ORDER BY created"
        return [self._run_dict(r) for r in self.con.execute(q, (status,) if status else ())]

    @_names_damage
    def epochs(self, run_id: str) -> list[dict[str, Any]]:
        return [epoch_row(self.path, dict(r)) for r in self.con.execute(
            "SELECT * FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,))]

    @_names_damage
    def studies(self) -> list[tuple[str, str]]:
        """(study, preset) pairs, most recently registered last."""
        return [(r[0], r[1]) for r in self.con.execute(
            "SELECT study, preset, MAX(registered) AS t FROM study_runs GROUP BY study, preset "
            "ORDER BY t")]

    @staticmethod
    def in_training(run: dict[str, Any]) -> bool:
        """Whether a ``running`` run (a :meth:`run` dict) has a live owner training it; False
        for one that was interrupted (released, or its owner is gone: a re-run resumes it)."""
        return run.get("status") == "running" and _owner_alive(
            run.get("owner"), run.get("updated"), run.get("owner_start"))

    @_names_damage
    def memberships(self) -> list[dict[str, Any]]:
        """Every (study, preset, setup) a run was registered in, as dicts with ``study``,
        ``preset``, ``setup``, ``run_id``, ``label``, ``x``, ``current``: whether it is in what
        :meth:`study_runs` reads for the study (its latest preset and, in it, the setup
        registered last), i.e. in the report's table; a run of an earlier setup or preset is
        kept in the store but not shown there; and ``protocol``: that setup's stored protocol
        (:meth:`setup_info`; ``{}`` where none was stored)."""
        protocols = {(r[0], r[1], r[2]): stored_setup_info(self.path, r[0], r[3]).get(
            "protocol", {}) for r in self.con.execute(
                "SELECT study, preset, setup, info FROM setups")}
        members = self._members()
        setups = self._latest_setups(members)
        latest = {}
        for study, preset in self.studies():  # most recently registered last: its preset wins
            latest[study] = (preset, setups[(study, preset)])
        return [{"study": m["study"], "preset": m["preset"], "setup": m["setup"],
                 "run_id": m["run_id"], "label": m["label"], "registered": m["registered"],
                 "x": member_x(self.path, m["study"], m["run_id"], m["x"]),
                 "current": latest.get(m["study"]) == (m["preset"], m["setup"]),
                 "protocol": protocols.get((m["study"], m["preset"], m["setup"]), {})}
                for m in members]

    def _members(self, study: Optional[str] = None) -> list[dict[str, Any]]:
        """The ``study_runs`` rows (of ``study``, or all), oldest registered first, each with
        the setup it counts in. A setup id hashes the user's choices only, so one setup can
        hold runs whose settings differ: those an earlier normlab trained with another preset
        (the quick preset's ``train_limit`` 640 of its day), or, in a store written before
        setups were kept (every row's setup ''), the study's runs on other data or epochs. Its
        runs whose settings (:func:`_settings`) are not those of the run registered last count
        in a setup of their own, ``<setup>~<their settings' hash>``, so that no table pools
        them (the single runs of ``normlab train``, setup '', are one list and stay one).

        Inside :meth:`snapshot` every study's rows are read once and kept until the block ends
        (a report asks for them several times per study); each call gets its own dicts."""
        reads = self._snapshot_reads
        if reads is None:
            return self._read_members(study)
        if "members" not in reads:
            reads["members"] = self._read_members(None)  # a study's rows: those of all, kept
        return [dict(m) for m in reads["members"] if study is None or m["study"] == study]

    def _read_members(self, study: Optional[str]) -> list[dict[str, Any]]:
        """:meth:`_members`, read from the store."""
        rows = [dict(r) for r in self.con.execute(
            "SELECT s.study, s.preset, s.run_id, s.label, s.x, s.setup, s.registered, "
            "r.config FROM study_runs s LEFT JOIN runs r ON r.run_id = s.run_id"
            + (" WHERE s.study=?" if study is not None else "")
            + " ORDER BY s.registered, s.study, s.run_id", (study,) if study is not None else ())]
        by_time: dict[tuple, str] = {}  # one invocation registered its points at one time
        for m in rows:
            if m["config"] is not None and m["study"] != SINGLE_RUNS:
                m["settings"] = _settings(self._config(m["run_id"], m.pop("config")))
                by_time.setdefault((m["study"], m["preset"], m["setup"], m["registered"]),
                                   m["settings"])
        for m in rows:  # registered, never claimed: the settings of the points beside it
            m.pop("config", None)
            if "settings" not in m:
                m["settings"] = by_time.get((m["study"], m["preset"], m["setup"],
                                             m["registered"]))
        latest = {(m["study"], m["preset"], m["setup"]): m["settings"] for m in rows
                  if m["settings"] is not None}  # oldest first: the last one registered wins
        for m in rows:
            ref = latest.get((m["study"], m["preset"], m["setup"]))
            if m["settings"] is not None and ref is not None and m["settings"] != ref:
                m["setup"] = f"{m['setup']}~{m['settings']}"
            del m["settings"]
        return rows

    @staticmethod
    def _latest_setups(members: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
        """(study, preset) -> the setup registered last (``members`` as :meth:`_members`
        orders them: oldest first)."""
        return {(m["study"], m["preset"]): m["setup"] for m in members}

    @_names_damage
    def study_members(self, study: str, preset: Optional[str] = None,
                      setup: Optional[str] = None) -> list[dict[str, Any]]:
        """Every run registered in what :meth:`study_runs` reads (the study's latest preset when
        ``preset`` is None, on the setup registered last or ``setup``), as dicts with
        ``run_id``, ``label``, ``x``, ``preset``; with the runs not claimed yet (a study stopped
        before it reached them), which :meth:`study_runs` does not return."""
        if preset is None:
            preset = self._latest_preset(study)
            if preset is None:
                return []
        members = [m for m in self._members(study) if m["preset"] == preset]
        latest = setup if setup is not None else self._latest_setups(members).get(
            (study, preset))
        if latest is None:
            return []
        order: dict[Any, int] = {}  # members come oldest first: order by when registered
        for m in members:
            order.setdefault(m["registered"], len(order))
        return [{"run_id": m["run_id"], "label": m["label"], "preset": preset,
                 "x": member_x(self.path, study, m["run_id"], m["x"])}
                for m in sorted((m for m in members if m["setup"] == latest), key=lambda m: (
                    order[m["registered"]], m["label"], m["run_id"]))]

    @_names_damage
    def study_runs(self, study: str, preset: Optional[str] = None,
                   setup: Optional[str] = None) -> list[dict[str, Any]]:
        """The runs of a study (the latest registered preset when ``preset`` is None) on the
        setup registered last for it, or on ``setup`` (a study's own power rounds: another
        process may register the study on another setup meanwhile); runs of the same study on
        other data, another model or other overrides are not pooled with them. Each run has
        its ``label``, ``x``, ``config`` and ``history`` (list of epoch rows). A registered run
        not claimed yet has no row to read: :meth:`study_members` lists it."""
        out = []
        for m in self.study_members(study, preset, setup):
            r = self.run(m["run_id"])
            if r is None:
                continue
            r.update(m)
            r["history"] = self.epochs(m["run_id"])
            out.append(r)
        one_kind_of_x(self.path, study, out)
        return out

    # ------------------------------------------------------------------ exports
    @_names_damage
    def export(self, flag: Optional[Callable[[dict[str, Any]], Optional[str]]] = None
               ) -> list[Path]:
        """Write ``runs.csv``, ``epochs.csv``, ``studies.csv``, ``spp.csv`` and
        ``results.json`` next to the database (:mod:`normlab.lab.store_export`): one snapshot
        of the store, read in one read transaction, and placed under the store's write lock
        unless a later snapshot is in place already (two processes exporting at once: the newer
        one stays). ``flag(run)`` (a finished run with its ``history``; the lab passes
        :func:`normlab.lab.analysis.run_flag`) says why the report leaves a run out of its
        means, exported beside it."""
        with self.snapshot():
            snap = read_snapshot(self.dir, self.con, self.runs(), self.memberships())
        texts = render_exports(snap, flag)
        with self._write_lock():
            return place_exports(self.dir, texts, snap)

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Hold the store's write lock (``BEGIN IMMEDIATE`` ... ``ROLLBACK``: nothing is
        written, a read-only store too), which every writer of the store takes; where SQLite
        cannot take it (a read-only file, where no process writes) the block runs without."""
        if self.read_only:
            self.con.execute("PRAGMA query_only=OFF")  # query_only refuses BEGIN IMMEDIATE
        try:
            try:
                self.con.execute("BEGIN IMMEDIATE")
                locked = True
            except sqlite3.OperationalError as e:
                if "readonly" not in str(e):
                    raise
                locked = False
            try:
                yield
            finally:
                if locked:
                    self.con.execute("ROLLBACK")
        finally:
            if self.read_only:
                self.con.execute("PRAGMA query_only=ON")


#: the study of ``normlab train``'s single runs, registered with setup '' (no table pools them)
SINGLE_RUNS = "train"
#: the config keys a study varies from point to point (series, axis, seeds), and those whose
#: stored text may differ for one run (device "auto" / "cpu", a relative data_dir): not a
#: run's settings (:func:`_settings`; the setup id holds the user's choices of the latter)
_PER_POINT = ("model", "norm", "norm_kwargs", "model_kwargs", "ws", "batch_size", "lr", "agc",
              "seed", "label", "threads", "device", "data_dir")
_DEFAULTS = RunConfig().to_dict()


def _settings(config: dict[str, Any]) -> str:
    """A hash of a run's settings: its config less the keys a study varies per point
    (:data:`_PER_POINT`), a key a stored config lacks (written before it existed) read as its
    default, 1 and 1.0 one number, milestones in order. Runs of one setup of a study have
    the same settings unless an earlier normlab's preset or a store from before setups were
    kept put other ones there (:meth:`Store._members`)."""
    kept = {}
    for k in sorted((set(config) | set(_DEFAULTS)) - set(_PER_POINT)):
        v = config.get(k, _DEFAULTS.get(k))
        if isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if k == "milestones" and isinstance(v, list):
            v = sorted(v, key=str)
        kept[k] = v
    blob = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


@contextlib.contextmanager
def heartbeat(out_dir: Union[str, Path], run_id: str,
              every_s: Optional[float] = None) -> Iterator[None]:
    """While the block runs, touch ``run_id``'s row every ``every_s`` seconds (default
    :data:`HEARTBEAT_S`, or a quarter of ``$NORMLAB_STALE_AFTER`` when that is shorter) from a
    daemon thread with its own connection, so that processes on other hosts see the owner
    alive (:func:`_owner_alive`). A failed touch (store busy) is tried again at the next beat;
    the thread never raises into the training."""
    # a beat slower than the stale limit would let any process take over a live owner's run
    # (and train it twice at once) whenever $NORMLAB_STALE_AFTER is set below a minute
    every = min(HEARTBEAT_S, stale_after_s() / 4) if every_s is None else every_s
    stop = threading.Event()

    def beat() -> None:
        store = None
        try:
            while not stop.wait(every):
                try:
                    store = store or Store(out_dir, create=False)
                    store.touch(run_id)
                except Exception:  # noqa: BLE001 - the next beat tries again
                    pass
        finally:
            if store is not None:
                store.close()

    thread = threading.Thread(target=beat, name=f"normlab-heartbeat-{run_id[:12]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
