"""The one error guard of every command: bad input is one ``error:`` line and one ``hint:`` line
on stderr and exit status 2; a failed job one line and status 1 (or the job's); an interrupt
unwinds (the run in progress is released, the exports written) and exits 130 or 143.

In a torchrun worker a command that succeeded (everything written, the process group left)
leaves with ``os._exit(0)``, skipping the interpreter's teardown: there a C++ thread of
torch's has aborted a worker that had finished every run ("terminate called without an active
exception", SIGABRT), which torchrun then reports as a failed job (seen twice on the
development machine, torch 2.13: once in a whole test-suite run, once in 6 runs of the torchrun
tests beside the other distributed tests; the tests' own process harness leaves the same way).
A user's ``atexit`` handlers then do not run in that worker. A failing worker ends as usual:
leaving at once would let it end before the rank whose failure caused its own, and torchrun
would name it as the rank that died first.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import typer

from normlab.distributed import LaunchError
from normlab.lab.config import ConfigError
from normlab.lab.outfiles import DiskFull
from normlab.lab.progress import err_console, literal
from normlab.lab.signals import Terminated, sigterm_unwinds

__all__ = ["print_error", "guard"]

_RESUME = "re-run the same command to resume"


def _rank_prefix() -> str:
    """``"rank R: "`` inside a torchrun worker (its errors interleave with the other ranks')."""
    return f"rank {os.environ.get('RANK', '?')}: " if "LOCAL_RANK" in os.environ else ""


def print_error(msg: str, hint: str = "") -> None:
    """The one ``error:`` line (and ``hint:`` line) on stderr, for every kind of bad input."""
    err_console.print(f"[bold red]error:[/] {literal(_rank_prefix() + msg)}", highlight=False,
                      soft_wrap=True)
    if hint:
        err_console.print(f"[yellow]hint:[/] {literal(hint)}", highlight=False, soft_wrap=True)


def _first_line(e: BaseException) -> str:
    """The first line of ``e``'s message that says something (matplotlib's parse errors, for
    one, start with a newline)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def guard(fn: Callable[[], Any]) -> Any:
    """Run fn(); turn our ConfigErrors (and ValueError/TypeError from the library) into one
    error line + hint, exit status 2; a failed training process or job into one line. A torchrun
    worker whose command succeeded then leaves at once (module docstring)."""
    result = _guarded(fn)  # raises typer.Exit on failure: the usual exit
    if "LOCAL_RANK" in os.environ:
        _leave_worker()
    return result


def _leave_worker() -> None:
    """A torchrun worker's command succeeded: flush the output and leave with status 0, before
    the interpreter's teardown (module docstring)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _guarded(fn: Callable[[], Any]) -> Any:
    try:
        with sigterm_unwinds():
            return fn()
    except Terminated as e:
        err_console.print(f"terminated; {_RESUME}")
        raise typer.Exit(int(e.code)) from None
    except ConfigError as e:
        print_error(str(e), e.hint or "see --help for the options; `normlab ls --keys` lists "
                                      "the --set keys, their types and defaults; `normlab ls` "
                                      "the studies, models and norms")
        raise typer.Exit(2) from None
    except (ValueError, TypeError) as e:
        print_error(_first_line(e), "see --help for the options and `normlab ls --keys` for "
                                    "the --set keys")
        raise typer.Exit(2) from None
    except typer.Exit:
        raise
    except LaunchError as e:  # a multi-process job failed: which rank died first, in one line
        where = f"every rank's output is in {e.log}; " if e.log else ""
        print_error(_first_line(e), f"{where}re-run the same command to resume (finished runs "
                                    "and epochs are kept)")
        raise typer.Exit(e.returncode if e.returncode > 0 else 1) from None
    except DiskFull as e:  # the study stopped at it: the run in progress resumes later
        print_error(str(e), "free some space there (or pass another --out), then re-run the "
                            "same command to resume")
        raise typer.Exit(1) from None
    except RuntimeError as e:  # a training process died: say so in one line, keep the store
        print_error(_first_line(e), _RESUME)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print(f"interrupted; {_RESUME}")
        raise typer.Exit(130) from None
