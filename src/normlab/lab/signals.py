"""Signals while a study runs: SIGTERM unwinds like Ctrl-C (the run in progress is released, the
exports written), and a block can ignore SIGINT (the ``--jobs`` parent stops its workers itself).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator

from normlab.lab.launch import in_worker

__all__ = ["Terminated", "raise_terminated", "signal_handled", "sigterm_unwinds", "sigint_ignored"]


class Terminated(SystemExit):
    """Raised by the SIGTERM handler: unwinds like Ctrl-C (the run in progress is released, the
    exports written), then exits 143."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


@contextlib.contextmanager
def signal_handled(sig: int, handler: Any) -> Iterator[None]:
    """``handler`` for ``sig`` while the block runs, the previous one restored after; a no-op
    outside the main thread (where Python cannot set handlers)."""
    try:
        old = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(sig, old)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (kill, a batch scheduler stopping the job) raises :class:`Terminated` in the main
    thread while the block runs. Not in a torchrun worker: torchrun's SIGTERM must end a rank
    blocked in a collective at once."""
    if in_worker():
        yield
        return
    with signal_handled(signal.SIGTERM, raise_terminated):
        yield


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while the block runs (in the main thread; elsewhere a no-op). A process
    started meanwhile keeps ignoring it: an ignored signal stays ignored through exec, and Python
    installs its KeyboardInterrupt handler only where SIGINT is not ignored at startup."""
    with signal_handled(signal.SIGINT, signal.SIG_IGN):
        yield
