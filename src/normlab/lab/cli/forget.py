"""``normlab forget``: list, then remove, the runs a user no longer wants in a store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from normlab.lab.cli.browse import point_name
from normlab.lab.cli.guard import guard
from normlab.lab.cli.options import path_argument
from normlab.lab.forget import STATES, Choice, forget
from normlab.lab.progress import console, literal, say

__all__ = ["forget_"]


def forget_(
    out: Path = path_argument(..., help="an output directory of `normlab reproduce`"),
    state: Optional[list[str]] = typer.Option(
        None, "--state", help=f"the runs in this state: {' | '.join(STATES)} (repeatable; "
                              "interrupted: stopped before its last epoch, no process on it)"),
    run: Optional[list[str]] = typer.Option(
        None, "--run", help="this run, by its run_id in `normlab ls OUT` (repeatable)"),
    study: Optional[str] = typer.Option(
        None, "--study", help="only this study's points (a run another study counts stays "
                              "in the store)"),
    earlier_setups: bool = typer.Option(
        False, "--earlier-setups", metavar="",
        help="only the points of setups the report no longer shows (an earlier --data, "
             "--model, --set or preset of a study; `normlab ls OUT` marks them)"),
    yes: bool = typer.Option(False, "--yes", metavar="",
                             help="remove them (without it nothing is removed: the list only)"),
) -> None:
    """Remove runs from OUT's store: failed or interrupted ones, named ones, a study's, or
    those of earlier setups.

    The filters narrow each other (--study S --state failed: the failed runs of S). Without
    --yes the command lists what would go and removes nothing. A run leaves with its epochs
    and checkpoint; the exports (and report.md, when OUT has one) are written again. A run
    that a live process trains is never removed; the spp records are never removed.
    Re-running a study trains the points it lost again.

    Exit status 0, also when nothing matches (it says so); exit status 2 when a run, study or
    state is unknown, or when a chosen run is being trained or changed since it was listed
    (nothing is removed)."""
    def body() -> None:
        choice = forget(out, states=state or (), run_ids=run or (), study=study,
                        earlier_setups=earlier_setups, yes=yes, show=_print_choice)
        if yes and choice:
            say(f"forgot {_count(choice)}")

    guard(body)


def _print_choice(choice: Choice, removing: bool) -> None:
    """The runs and points chosen, then one line: what goes, or how to remove them."""
    if not choice:
        say("nothing to forget: no run or point matches")
        return
    table = Table(title="forgetting" if removing else "would forget (nothing removed yet)")
    for col in ("run_id", "points", "label", "state", "epochs", "test err %"):
        table.add_column(col)
    for r in choice.runs:
        err = r["final_test_error"]
        table.add_row(*(literal(v) for v in (
            r["run_id"], _points(r["points"]), r["config"].get("label", ""), r["state"],
            f"{r['epochs_done']}/{r['epochs']}", "-" if err is None else f"{err:.2f}")))
    for m in choice.members:
        table.add_row(*(literal(v) for v in (
            m["run_id"], _points([m]), m["label"], "(the run stays: another study or setup "
            "counts it)" if m["started"] else "(point not started)", "", "")))
    (console if console.is_terminal else Console(width=200)).print(table)
    if not removing:
        say(f"would forget {_count(choice)}; add --yes to remove them")


def _count(choice: Choice) -> str:
    return f"{len(choice.runs)} run(s)" + (f" and {len(choice.members)} other point(s)"
                                           if choice.members else "")


def _points(members: list[dict[str, Any]]) -> str:
    return ", ".join(point_name(m) for m in members)
