"""The exports written beside a results store: ``runs.csv``, ``epochs.csv``, ``spp.csv`` (the
signal-propagation records, one row per model and depth, as the ``spp`` table holds them) and
``results.json`` (the runs with their histories, the study members, the setups and, under
``spp``, the spp rows), each written to a temporary file and renamed into place, so a reader
never sees half of one.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

from normlab.lab.outfiles import write_text
from normlab.lab.store_open import DB_NAME, EPOCH_FIELDS
from normlab.lab.store_rows import (SPP_NUMBERS, epoch_row, member_x, numbers,
                                    stored_setup_info)

_RUN_FIELDS = ("run_id", "status", "owner", "epochs", "epochs_done", "wall_time", "images_per_s",
               "device", "final_train_loss", "final_train_error", "final_test_loss",
               "final_test_error", "error", "created", "updated", "peak_memory_mb", "backend")
#: the columns of spp.csv (and the keys of results.json's ``spp`` rows): the ``spp`` table's
SPP_FIELDS = ("model", "depth", "name", "avg_sq_mean", "avg_var", "residual_var", "expected_var",
              "architecture", "measured_on")


def write_exports(directory: Path, con: sqlite3.Connection,
                  runs: list[dict[str, Any]]) -> list[Path]:
    """Write ``runs.csv``, ``epochs.csv``, ``spp.csv`` and ``results.json`` into ``directory``
    (beside the store ``con`` reads); ``runs`` as :meth:`normlab.lab.store.Store.runs` gives
    them."""
    epochs = [epoch_row(directory / DB_NAME, dict(r))
              for r in con.execute("SELECT * FROM epochs ORDER BY run_id, epoch")]
    spp = [numbers(directory / DB_NAME, f"signal-propagation model {r['model']!r}",
                   {k: r[k] for k in SPP_FIELDS}, SPP_NUMBERS)
           for r in con.execute("SELECT * FROM spp ORDER BY model, depth")]
    # x as the number (or text) it is, as `ls` and the report read it, not its JSON text
    members = [{**dict(r), "x": member_x(directory / DB_NAME, r["study"], r["run_id"], r["x"])}
               for r in con.execute("SELECT * FROM study_runs ORDER BY study")]
    paths = []
    cfg_keys = sorted({k for r in runs for k in r["config"]})
    p = directory / "runs.csv"
    _atomic_csv(p, [*_RUN_FIELDS, *(f"config.{k}" for k in cfg_keys)],
                [[r.get(k) for k in _RUN_FIELDS]
                 + [_cell(r["config"].get(k)) for k in cfg_keys] for r in runs])
    paths.append(p)
    p = directory / "epochs.csv"
    _atomic_csv(p, ["run_id", "epoch", *EPOCH_FIELDS],
                [[e[k] for k in ("run_id", "epoch", *EPOCH_FIELDS)] for e in epochs])
    paths.append(p)
    p = directory / "spp.csv"
    _atomic_csv(p, list(SPP_FIELDS), [[r[k] for k in SPP_FIELDS] for r in spp])
    paths.append(p)
    p = directory / "results.json"
    by_run: dict[str, list] = {}
    for e in epochs:
        by_run.setdefault(e["run_id"], []).append({k: v for k, v in e.items() if k != "run_id"})
    setups = [{**dict(r), "info": stored_setup_info(directory / DB_NAME, r["study"], r["info"])}
              for r in con.execute("SELECT * FROM setups ORDER BY study, registered")]
    doc = {"runs": [{**r, "history": by_run.get(r["run_id"], [])} for r in runs],
           "studies": members, "setups": setups, "spp": spp}
    write_text(p, json.dumps(doc, indent=1, sort_keys=True, default=str))
    paths.append(p)
    return paths


def _cell(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v


def _atomic_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    write_text(path, text.getvalue())

