"""``normlab report`` and ``normlab ls``: what a store holds, and what the lab knows."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from normlab.factory import norm_names
from normlab.lab.analysis import flag_kind, run_flag
from normlab.lab.cli.guard import guard
from normlab.lab.cli.options import path_argument, path_option
from normlab.lab.config import ConfigError, RunConfig, field_types
from normlab.lab.progress import console, literal, say
from normlab.lab.report import print_report
from normlab.lab.store import Store
from normlab.lab.store_export import mixed_exports
from normlab.lab.studies import STUDIES
from normlab.lab.summary import (device_kind, emulated_devices, precise_bn_note,
                                  setup_differences)
from normlab.models import list_models
from normlab.models.timm_models import timm_status

__all__ = ["report", "ls_", "point_name"]

_COLUMNS = ("run_id", "study@x", "label", "model", "norm", "batch/dev", "seed", "status",
            "epochs", "test err %", "time s", "img/s")


def report(out: Path = path_argument(..., help="an output directory of `normlab reproduce`"),
           to: Optional[Path] = path_option(
               None, "--to", help="write report.md, report.html and figures/ here instead of "
                                  "OUT (OUT is only read: a read-only store works)")) -> None:
    """Write report.md, report.html, figures and CSV/JSON exports from OUT's store."""
    guard(lambda: print_report(out, to))


def ls_(
    out: Optional[Path] = path_argument(None, help="an output directory: list its runs"),
    studies: bool = typer.Option(False, "--studies", metavar="", help="list the studies"),
    models: bool = typer.Option(False, "--models", metavar="", help="list the models"),
    norms: bool = typer.Option(False, "--norms", metavar="", help="list the norms"),
    keys: bool = typer.Option(False, "--keys", metavar="",
                              help="list the --set keys and their defaults"),
) -> None:
    """List the runs in OUT's store, or the known studies, models and norms (and --set keys)."""
    def body() -> None:
        asked = [f for f, on in (("--studies", studies), ("--models", models),
                                 ("--norms", norms), ("--keys", keys)) if on]
        if asked and out is not None:  # (OUT was ignored)
            raise ConfigError(
                f"`normlab ls {out} {' '.join(asked)}`: a directory lists its runs and "
                f"{'/'.join(asked)} what normlab knows; one or the other",
                hint=f"normlab ls {out}   or   normlab ls {' '.join(asked)}")
        if asked or out is None:
            every = not asked  # no flag: the studies, models and norms
            _print_known(studies or every, models or every, norms or every)
            if keys:
                _print_keys()
        else:
            _print_runs(out)

    guard(body)


def _print_known(studies: bool, models: bool, norms: bool) -> None:
    if studies:
        for s in STUDIES.values():
            say(f"[bold]{s.name}[/]: {s.title} (series: {', '.join(s.variants)})")
    if models:
        say("models: " + ", ".join(list_models()))
        say("and timm:<name> for a model of timm's registry that has BatchNorm layers (the "
            "norm replaces them) or only LayerNorm/RMSNorm layers (a ViT, Swin, ConvNeXt: ln, rms "
            f"or none replaces them): {timm_status()}")
    if norms:
        say("norms: " + ", ".join(norm_names()))


def _print_keys() -> None:
    """Every RunConfig field: what ``--set key=value`` and a ``--config`` file may set."""
    say("--set keys (`--set key=value`, a value read as JSON where it parses; dotted keys reach "
        "into the dict ones, e.g. norm_kwargs.num_groups=8), with a single run's defaults (a "
        "study's preset sets its own epochs, batch sizes and norms; "
        "`help(normlab.lab.config.RunConfig)` says what each key does):")
    types = field_types()
    for f in dataclasses.fields(RunConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = str(types[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
        say(literal(f"  {f.name} = {default!r}  ({kind})"))


def _print_runs(out: Path) -> None:
    with Store(out, read_only=True) as store, store.snapshot():  # one state, as the report
        table = Table(title=literal(store.path))
        for col in _COLUMNS:
            table.add_column(col)
        for s, _ in store.studies():  # read (and check) what the report reads of each study
            store.study_runs(s)
        member: dict = {}
        emulated: dict[str, set] = {}  # run_id -> the devices its setups emulated
        runs = store.runs()
        memberships = store.memberships()
        earlier = _earlier_setups(memberships, {r["run_id"]: r for r in runs})
        for m in memberships:
            points, _ = member.setdefault(m["run_id"], ({}, m["label"]))
            key = point_name(m)  # the run's point, as the report names it
            if m["current"] or points.get(key, "") is None:
                points[key] = None  # in the report
            else:  # what told its setup from the one in the report
                points[key] = earlier[(m["study"], m["preset"], m["setup"])]
            emulated.setdefault(m["run_id"], set()).add(emulated_devices(m["protocol"]))
        for r in runs:
            c = r["config"]
            points, label = member.get(r["run_id"], ({}, c.get("label", "")))
            st = [k if setup is None else f"{k} (earlier setup: {setup}; not in the report)"
                  for k, setup in points.items()]
            err = r["final_test_error"]
            flag = (run_flag({**r, "history": store.epochs(r["run_id"])})
                    if r["status"] == "done" else None)
            # flagged: left out of a study's means and verdicts (a `train` run has none)
            means = any(not k.startswith("train@") for k in points)
            status = (f"done ({flag_kind(flag)}{', left out' if means else ''})" if flag
                      else "interrupted" if r["status"] == "running" and not store.in_training(r)
                      else f"failed: {r['error']}" if r["status"] == "failed" and r.get("error")
                      else r["status"])
            cells = (r["run_id"], ", ".join(st), label, c.get("model", "?"),
                     c.get("norm", "?"), _batch_cell(c, emulated.get(r["run_id"], set())),
                     c.get("seed", "?"), status,
                     f"{r['epochs_done']}/{r['epochs']}",
                     ("-" if err is None else f"{err:.2f}") + precise_bn_note(c),
                     "-" if r["wall_time"] is None else f"{r['wall_time']:.1f}",
                     "-" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}")
            # the store's text is shown as written, never read as rich markup
            table.add_row(*(literal(v) for v in cells))
    # off a terminal rich assumes 80 columns; keep the table whole for logs and pipes
    (console if console.is_terminal else Console(width=200)).print(table)
    _say_mixed_exports(out)


def _say_mixed_exports(out: Path) -> None:
    """A line when OUT's CSV exports are not all of the snapshot its results.json names (an
    export stopped between its renames: :func:`normlab.lab.store_export.mixed_exports`)."""
    mixed = mixed_exports(out)
    if mixed:
        say(literal(f"note: {', '.join(mixed)} in {out} are not of the snapshot results.json "
                    f"names (an export was stopped midway); `normlab report {out}` writes "
                    "every export again"))


def _earlier_setups(memberships: list[dict], runs: dict[str, dict]) -> dict[tuple, str]:
    """(study, preset, setup) -> what tells that setup of the study from its others
    (:func:`normlab.lab.summary.setup_differences`: ``data digits, epochs 1``), so that the
    runs of two earlier setups, or an earlier one and the report's, can be told apart."""
    groups: dict[str, dict[tuple, dict]] = {}
    for m in memberships:
        g = groups.setdefault(m["study"], {}).setdefault(
            (m["study"], m["preset"], m["setup"]),
            {"configs": [], "preset": m["preset"], "setup": m["setup"], "ran_on": set(),
             "devices": emulated_devices(m["protocol"])})
        if m["run_id"] in runs:
            g["configs"].append(runs[m["run_id"]]["config"])
            g["ran_on"] |= {device_kind(runs[m["run_id"]].get("device"))} - {None}
    return {key: text for study in groups.values()
            for key, text in setup_differences(study).items()}


def point_name(member: dict) -> str:
    """A membership's point as the report names it: ``batch-size@2``."""
    x = member["x"]
    return f"{member['study']}@{x:g}" if isinstance(x, (int, float)) else f"{member['study']}@{x}"


def _batch_cell(c: dict, emulated: set) -> str:
    """Images per device, as the report's points count them: ``N`` for a one-process run,
    ``NxW`` for N images per process on W processes, ``NxK emulated`` for K devices emulated
    on one process (its setups' protocol: an SGD batch of K x N, BN statistics per N), whose
    stored ``batch_size`` is the SGD batch K x N."""
    w = int(c.get("world_size", 1))
    batch = c.get("batch_size", "?")
    if w == 1 and len(emulated) == 1:
        k = next(iter(emulated))
        if k > 1 and isinstance(batch, int) and batch % k == 0:
            return f"{batch // k}x{k} emulated"
    return str(batch) + (f"x{w}" if w > 1 else "")
