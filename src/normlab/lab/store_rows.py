"""Reading a store's rows back: every value the readers use is checked for its kind, so a store
written by something else (edited by hand, another program's, planted) is one
:class:`~normlab.lab.store_open.StoreError` that names the file, the row and the value, never a
traceback from deep inside ``ls`` or the report.

What is checked: a run's ``config`` is a JSON object, each field of a known name of its
:class:`~normlab.lab.config.RunConfig` type (a missing one is shown as ``?``); ``versions`` and
a setup's ``info`` are JSON objects (``info["protocol"]`` and ``info["power"]`` too, where
present); metrics and counts are numbers or NULL, error rates within [0, 100]; a study member's
``x`` is a JSON number or string, of one kind across the study. Text is not checked: the readers
show it as literal text, control characters as escapes (:mod:`normlab.lab.markdown`,
:func:`normlab.lab.progress.literal`).

>>> try:
...     run_config("s.sqlite", "r1", '{"model": "resnet20", "epochs": "ten"}')
... except StoreError as e:
...     print(e)
results store 's.sqlite': run 'r1': config: epochs must be int, got str 'ten'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from normlab.lab.config import MAX_SEEDS, ConfigError, check_field
from normlab.lab.store_open import EPOCH_FIELDS, StoreError

__all__ = ["run_config", "json_object", "stored_setup_info", "numbers", "member_x",
           "one_kind_of_x", "epoch_row", "RUN_NUMBERS", "SPP_NUMBERS", "PERCENT_COLUMNS"]

#: the number columns of ``runs`` and ``spp`` (NULL allowed); ``epochs`` rows: EPOCH_FIELDS
RUN_NUMBERS = ("epochs", "epochs_done", "wall_time", "images_per_s", "final_train_loss",
               "final_train_error", "final_test_loss", "final_test_error", "created", "updated",
               "peak_memory_mb")
SPP_NUMBERS = ("depth", "avg_sq_mean", "avg_var", "residual_var", "expected_var")
#: the columns that hold error rates in %
PERCENT_COLUMNS = ("final_train_error", "final_test_error", "train_error", "test_error")

_HINT = ("the file was not written by normlab or was edited; move it away (the CSV/JSON exports "
         "beside it keep the finished runs) or pass another directory")
_SHOWN = 80  # characters of a bad value the error line shows


def _bad(path: Union[str, Path], where: str, what: str) -> StoreError:
    return StoreError(f"results store {str(path)!r}: {where}: {what}", hint=_HINT)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def json_object(path: Union[str, Path], where: str, column: str, raw: Any,
                empty: bool = False) -> dict[str, Any]:
    """The JSON object in ``raw`` (column ``column`` of the row ``where``); ``empty``: NULL or
    an empty string read as ``{}``."""
    if empty and raw in (None, ""):
        return {}
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        raise _bad(path, where, f"{column} is not JSON: {_show(raw)}") from None
    return _an_object(path, where, column, value)


def _an_object(path: Union[str, Path], where: str, column: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(path, where, f"{column} is not a JSON object: {_show(value)}")
    return value


def stored_setup_info(path: Union[str, Path], study: Any, raw: Any) -> dict[str, Any]:
    """A setup's stored ``info``: a JSON object whose ``protocol`` and ``power``, where present,
    are ones too."""
    where = f"the setup of study {study!r}"
    info = json_object(path, where, "info", raw)
    for key in ("protocol", "power"):
        if key in info:
            _an_object(path, where, key, info[key])
    looks = info.get("power", {}).get("looks")
    if looks is not None and not _looks_ok(looks):
        raise _bad(path, where, f"power looks is not two seed counts 1 <= first <= last <= "
                                f"{MAX_SEEDS}: {_show(looks)}")
    return info


def _looks_ok(looks: Any) -> bool:
    return (isinstance(looks, list) and len(looks) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in looks)
            and 1 <= looks[0] <= looks[1] <= MAX_SEEDS)


def run_config(path: Union[str, Path], run_id: Any, raw: Any) -> dict[str, Any]:
    """A run's stored config: a JSON object, its known fields of their types."""
    where = f"run {run_id!r}"
    cfg = json_object(path, where, "config", raw)
    for key, value in cfg.items():
        try:
            check_field(key, value)
        except ConfigError as e:
            raise _bad(path, where, f"config: {_show(str(e))[1:-1]}") from None
    return cfg


def numbers(path: Union[str, Path], where: str, row: dict[str, Any],
            columns: tuple[str, ...]) -> dict[str, Any]:
    """``row`` after checking that its ``columns`` hold numbers or NULL, and its error rates
    percentages (the verdicts and bars take them as such)."""
    for col in columns:
        v = row.get(col)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise _bad(path, where, f"{col} is not a number: {_show(v)}")
        if v is not None and col in PERCENT_COLUMNS and not 0.0 <= v <= 100.0:
            raise _bad(path, where, f"{col} is not a percentage in [0, 100]: {_show(v)}")
    return row


def member_x(path: Union[str, Path], study: Any, run_id: Any, raw: Any) -> Union[int, float, str]:
    """A study member's ``x`` (its point on the study's axis): a JSON number or string."""
    where = f"study {study!r}, run {run_id!r}"
    try:
        x = json.loads(raw)
    except (TypeError, ValueError):
        raise _bad(path, where, f"x is not JSON: {_show(raw)}") from None
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise _bad(path, where, f"x is not a number or a string: {_show(x)}")
    return x


def one_kind_of_x(path: Union[str, Path], study: Any, runs: list[dict[str, Any]]) -> None:
    """A study's points are all numbers or all strings (its axis is sorted): the first run
    whose ``x`` is of the other kind than the first run's is named."""
    if not runs:
        return
    text = isinstance(runs[0]["x"], str)
    for r in runs[1:]:
        if isinstance(r["x"], str) != text:
            first = "a string" if text else "a number"
            raise _bad(path, f"study {study!r}, run {r['run_id']!r}",
                       f"x is {_show(r['x'])} where the study's first run has {first}: "
                       f"{_show(runs[0]['x'])}")


def epoch_row(path: Union[str, Path], row: dict[str, Any]) -> dict[str, Any]:
    """An ``epochs`` row after checking its epoch index and metrics are numbers."""
    where = f"run {row.get('run_id')!r}, epoch {row.get('epoch')!r}"
    if isinstance(row.get("epoch"), bool) or not isinstance(row.get("epoch"), int):
        raise _bad(path, where, "epoch is not an int")
    return numbers(path, where, row, EPOCH_FIELDS)
