"""The exports written beside a results store: ``runs.csv`` (one row per run: its status,
final numbers, ``flag``: why the report leaves a finished run out of its means, empty when it
counts, and its config, ``config.*``), ``epochs.csv`` (one row per run and epoch),
``studies.csv`` (one row per study a run was registered in: ``study``, ``preset``, ``setup``,
``in_report``: whether that setup is the one the report's section shows, ``run_id``, ``label``,
``x``: the run's point, ``registered``), ``spp.csv`` (the signal-propagation records, one row
per model and depth, as the ``spp`` table holds them) and ``results.json`` (the runs with their
histories and flags, the study members, the setups, under ``spp`` the spp rows, and under
``export`` which snapshot of the store it is, with the SHA-256 of each CSV of that snapshot),
each written to a temporary file and renamed into place, so a reader never sees half of one.
A table cell of the report is the mean of ``final_test_error`` over the runs of ``runs.csv``
that are ``done`` with an empty ``flag``, joined on ``run_id`` with the rows of
``studies.csv`` of its study, ``in_report``, label and x.

One export is one snapshot: :func:`read_snapshot` reads every table in one read transaction
(the caller's), so a run ``done`` in ``runs.csv`` has all its epochs in ``epochs.csv`` and the
same history in ``results.json``, however other processes write meanwhile. Snapshots are
ordered by the store's generation, a counter every write transaction of
:class:`normlab.lab.store.Store` increments under the store's write lock (so it orders writes
from any process on any host as the store itself does, with no clock), and named by the store's
random id (a store moved away and started afresh counts from 0 again). :func:`place_exports`
runs under the store's write lock and leaves the exports in place when ``results.json`` holds a
later snapshot of the same store: two studies ending together never put the older one last.

The CSVs are renamed into place first, ``results.json`` last, so a writer stopped between two
renames (killed, or a full disk) leaves CSVs of a newer snapshot beside a ``results.json`` of an
older one: :func:`mixed_exports` finds them (a CSV whose SHA-256 is not the one ``results.json``
names), ``normlab ls`` says so, and the next export (any normlab command that writes the
store, or ``normlab report``) writes them all again, since ``results.json``'s snapshot is then
not the later one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from normlab.lab.outfiles import write_text
from normlab.lab.store_open import DB_NAME, EPOCH_FIELDS
from normlab.lab.store_rows import (SPP_NUMBERS, epoch_row, member_x, numbers,
                                    stored_setup_info)

_RUN_FIELDS = ("run_id", "status", "owner", "epochs", "epochs_done", "wall_time", "images_per_s",
               "device", "final_train_loss", "final_train_error", "final_test_loss",
               "final_test_error", "error", "created", "updated", "peak_memory_mb", "backend")
#: the columns of studies.csv (and the keys of results.json's ``studies`` rows)
STUDY_FIELDS = ("study", "preset", "setup", "in_report", "run_id", "label", "x", "registered")
#: the columns of spp.csv (and the keys of results.json's ``spp`` rows): the ``spp`` table's
SPP_FIELDS = ("model", "depth", "name", "avg_sq_mean", "avg_var", "residual_var", "expected_var",
              "architecture", "measured_on")
#: results.json's first key (keys are sorted) says which snapshot it is
_MARKER = re.compile(rb'\A\{\s*"export": \{\s*"generation": (\d+),\s*"store": "([0-9a-f]*)"')
#: the key of results.json's ``export`` that holds each CSV's SHA-256 (sorted after ``store``)
_SHA_KEY = "tables_sha256"
#: how much of results.json's start holds its ``export`` key (every key's name is short)
_HEAD_BYTES = 4096


@dataclass
class Snapshot:
    """Every table an export writes, as one read transaction saw them."""

    runs: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    spp: list[dict[str, Any]]
    members: list[dict[str, Any]]
    setups: list[dict[str, Any]]
    generation: int   # the store's write count when read (0: a store from before it was kept)
    store: str        # the store's id ("" for a store from before it had one)


def read_snapshot(directory: Path, con: sqlite3.Connection, runs: list[dict[str, Any]],
                  memberships: list[dict[str, Any]]) -> Snapshot:
    """The tables of the store ``con`` reads (call it inside one read transaction, ``runs`` and
    ``memberships`` as :meth:`normlab.lab.store.Store.runs` and ``memberships`` read them in
    it)."""
    path = directory / DB_NAME
    epochs = [epoch_row(path, dict(r))
              for r in con.execute("SELECT * FROM epochs ORDER BY run_id, epoch")]
    spp = [numbers(path, f"signal-propagation model {r['model']!r}",
                   {k: r[k] for k in SPP_FIELDS}, SPP_NUMBERS)
           for r in con.execute("SELECT * FROM spp ORDER BY model, depth")]
    # x as the number (or text) it is, as `ls` and the report read it, not its JSON text; the
    # setup each member counts in, and whether the report's section shows it
    members = sorted(({"study": m["study"], "preset": m["preset"], "setup": m["setup"],
                       "in_report": m["current"], "run_id": m["run_id"], "label": m["label"],
                       "x": m["x"], "registered": m["registered"]} for m in memberships),
                     key=lambda m: m["study"])
    setups = [{**dict(r), "info": stored_setup_info(path, r["study"], r["info"])}
              for r in con.execute("SELECT * FROM setups ORDER BY study, registered")]
    meta: dict[str, Any] = {}
    if con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
        meta = {r[0]: r[1] for r in con.execute("SELECT key, value FROM meta")}
    generation = meta.get("generation")
    store = meta.get("store")
    return Snapshot(runs, epochs, spp, members, setups,
                    generation if isinstance(generation, int) and generation >= 0 else 0,
                    store if isinstance(store, str) and re.fullmatch("[0-9a-f]*", store) else "")


def render_exports(snap: Snapshot,
                   flag: Optional[Callable[[dict[str, Any]], Optional[str]]] = None
                   ) -> dict[str, str]:
    """The text of each export (name -> text), ``results.json`` last. ``flag(run)``: why a
    finished run (with its ``history``) is left out of the report's means, or None
    (:func:`normlab.lab.analysis.run_flag`); without it the ``flag`` column is empty."""
    by_run: dict[str, list] = {}
    for e in snap.epochs:
        by_run.setdefault(e["run_id"], []).append({k: v for k, v in e.items() if k != "run_id"})
    runs = [{**r, "history": by_run.get(r["run_id"], [])} for r in snap.runs]
    for r in runs:
        r["flag"] = (flag(r) if flag and r["status"] == "done" else None) or ""
    cfg_keys = sorted({k for r in snap.runs for k in r["config"]})
    texts = {
        "runs.csv": _csv([*_RUN_FIELDS, "flag", *(f"config.{k}" for k in cfg_keys)],
                         [[r.get(k) for k in (*_RUN_FIELDS, "flag")]
                          + [_cell(r["config"].get(k)) for k in cfg_keys] for r in runs]),
        "epochs.csv": _csv(["run_id", "epoch", *EPOCH_FIELDS],
                           [[e[k] for k in ("run_id", "epoch", *EPOCH_FIELDS)]
                            for e in snap.epochs]),
        "studies.csv": _csv(list(STUDY_FIELDS), [[m[k] for k in STUDY_FIELDS]
                                                 for m in snap.members]),
        "spp.csv": _csv(list(SPP_FIELDS), [[r[k] for k in SPP_FIELDS] for r in snap.spp]),
    }
    doc = {"runs": runs,
           "studies": snap.members, "setups": snap.setups, "spp": snap.spp,
           "export": {"generation": snap.generation, "store": snap.store,
                      _SHA_KEY: {name: _sha256(text) for name, text in texts.items()}}}
    texts["results.json"] = json.dumps(doc, indent=1, sort_keys=True, default=str)
    return texts


def place_exports(directory: Path, texts: dict[str, str], snap: Snapshot) -> list[Path]:
    """Rename the exports ``texts`` of ``snap`` into ``directory`` (``results.json`` last),
    unless its ``results.json`` holds a later snapshot of the same store: then the newer
    exports stay. Call it under the store's write lock. Returns the exports' paths."""
    placed = _placed(directory / "results.json")
    newer = placed is not None and placed[1] == snap.store and placed[0] > snap.generation
    paths = [directory / name for name in texts]
    if not newer:
        for p in paths:
            write_text(p, texts[p.name])
    return paths


def mixed_exports(directory: Path) -> list[str]:
    """The CSV exports in ``directory`` that are not of the snapshot its ``results.json``
    names (a CSV whose SHA-256 differs from the one recorded there, or that is missing): an
    export was stopped between its renames (module docstring). Empty when they agree, and
    when ``results.json`` records no SHA-256 (missing, or written by an earlier normlab)."""
    head = _head(directory / "results.json")
    export = _export_key(head) if head is not None else None
    want = export.get(_SHA_KEY) if export is not None else None
    if not isinstance(want, dict):
        return []
    return [name for name, sha in sorted(want.items())
            if _file_sha256(directory / name) != sha]


def _placed(path: Path) -> Optional[tuple[int, str]]:
    """(generation, store id) of the exports in place, from ``results.json``'s first key; None
    when it is missing, not a regular file, or has none (written by an earlier normlab)."""
    head = _head(path)
    m = _MARKER.match(head) if head is not None else None
    return (int(m.group(1)), m.group(2).decode()) if m else None


def _head(path: Path, size: int = _HEAD_BYTES) -> Optional[bytes]:
    """The first ``size`` bytes of the regular file ``path``; None when it is missing, or a
    link, a FIFO (neither followed nor waited on) or anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.read(fd, size) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _export_key(head: bytes) -> Optional[dict[str, Any]]:
    """results.json's ``export`` object, parsed from the file's start ``head``; None when it
    does not start with one."""
    if _MARKER.match(head) is None:
        return None
    text = head.decode("utf-8", errors="replace")
    try:
        export, _ = json.JSONDecoder().raw_decode(text, text.index("{", 1))
    except ValueError:
        return None
    return export if isinstance(export, dict) else None


def _sha256(text: str) -> str:
    """The SHA-256 of ``text`` as :func:`normlab.lab.outfiles.write_text` writes it (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> Optional[str]:
    """The SHA-256 of the regular file ``path``; None when it cannot be read as one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    digest = hashlib.sha256()
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return digest.hexdigest()


def _cell(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    return text.getvalue()
