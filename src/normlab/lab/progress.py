"""What a study shows while it runs: the rich progress bars and one line per finished run; off
a terminal (piped, logged), where the bars are off, one line per epoch as well.

The consoles live here so that the runners (:mod:`normlab.lab.runner`) and the commands
(:mod:`normlab.lab.cli`) print through the same ones.
"""

from __future__ import annotations

from typing import Any, Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from normlab.lab.markdown import visible

__all__ = ["console", "err_console", "say", "literal", "progress_bars", "describe", "print_outcome",
           "print_wait", "print_note", "epoch_progress", "print_epoch", "epoch_lines"]

console = Console()
err_console = Console(stderr=True)


def say(markup: str) -> None:
    """One line on stdout (rich markup, no highlighting), never broken into several: off a
    terminal rich would break it at 80 columns, inside a path or a run's message; a terminal
    wraps it for the eye only."""
    console.print(markup, highlight=False, soft_wrap=True)


def literal(text: object) -> str:
    """Text for rich as written: never read as markup, control characters shown as escapes
    (:func:`normlab.lab.markdown.visible`: a stored label cannot drive the terminal)."""
    return escape(visible(text))


def progress_bars() -> Progress:
    """The study's bars (off a terminal: none, the per-run lines only)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=False)


def describe(p: Any) -> str:
    """A point of a study in a few words, ``label x=X seed=S``, as literal text for rich (a
    label such as ``[/x]`` is printed as written, never read as markup)."""
    return literal(f"{p.label} x={p.x} seed={p.cfg.seed}")


def print_outcome(p: Any, outcome: str, res: Any) -> None:
    """The line of a finished point: ``outcome`` is "trained", "skipped" or "failed"."""
    if outcome == "trained":
        say(f"  {describe(p)}: test error {res['final_test_error']:.2f}% "
            f"({res['wall_time']:.1f}s, {res['images_per_s']:.0f} img/s"
            + (f", resumed at epoch {res['resumed_from']}" if res["resumed_from"] else "")
            + (f", {literal(res['error'])}" if res.get("error") else "") + ")")
    elif outcome == "skipped":
        say(f"  {describe(p)}: already done")
    else:
        say(f"  {describe(p)}: [red]failed[/]: {literal(res['error'])}")


def epoch_lines() -> bool:
    """Whether to print a line per epoch: when the bars are off (not a terminal)."""
    return not console.is_terminal


def print_epoch(p: Any, row: dict) -> None:
    """The line of point ``p``'s finished epoch ``row`` (epoch index, train_loss, test_error,
    images_per_s)."""
    loss, err, ips = (row.get(k) for k in ("train_loss", "test_error", "images_per_s"))
    say(f"  {describe(p)}: epoch {row['epoch'] + 1}/{p.cfg.epochs}"
        + (f", train loss {loss:.3f}" if loss is not None else "")
        + (f", test error {err:.2f}%" if err is not None else "")
        + (f" ({ips:.0f} img/s)" if ips else ""))


def print_wait(p: Any, owner: Optional[str]) -> None:
    """The line of a point another process is training."""
    say(f"  {describe(p)}: being trained by {literal(owner or 'another process')} "
        "(another normlab process on this --out); waiting for it (an owner "
        "on another host silent for $NORMLAB_STALE_AFTER s, default 900, "
        "is taken over)")


def epoch_progress(prog: Progress, task: Any, p: Any) -> Any:
    """The training loop's progress callback for point ``p``: one bar ``task`` per epoch, and
    off a terminal a line per finished epoch."""
    lines = epoch_lines()

    def cb(event: str, info: dict) -> None:
        if event == "start":
            prog.reset(task, total=info["total_steps"],
                       description=f"{describe(p)} epoch {info['epoch'] + 1}/{p.cfg.epochs}")
        elif event == "step":
            prog.update(task, advance=info["advance"],
                        info=f"loss {info['loss']:.3f} {info['images_per_s']:.0f} img/s")
        elif event == "note":
            print_note(p, info["message"])
        elif event == "epoch" and lines:
            print_epoch(p, info)
    return cb


def print_note(p: Any, message: str) -> None:
    """A line about point ``p`` before it trains (a checkpoint that could not be used)."""
    err_console.print(f"  {describe(p)}: [yellow]warning:[/] {literal(message)}", highlight=False,
                      soft_wrap=True)
