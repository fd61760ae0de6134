"""Who owns a run: the owner's ``host:pid``, its heartbeat interval, and whether it still lives.

A store's run is claimed by one process (:meth:`normlab.lab.store.Store.claim`); the rules for
when another process may take it over are in :mod:`normlab.lab.store`'s docstring ("Owners").
"""

from __future__ import annotations

import os
import socket
import time
from typing import Optional

from normlab.lab.config import ConfigError

__all__ = ["HEARTBEAT_S", "stale_after_s"]

#: seconds between an owner's touches of its run's row while it trains (see heartbeat)
HEARTBEAT_S = 60.0


def stale_after_s() -> float:
    """Seconds without a touch after which a run's owner on another host counts as dead
    (``$NORMLAB_STALE_AFTER``, default 900: fifteen missed heartbeats)."""
    raw = os.environ.get("NORMLAB_STALE_AFTER", "")
    try:
        value = float(raw) if raw.strip() else 900.0
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ConfigError(f"$NORMLAB_STALE_AFTER must be a positive number of seconds, got {raw!r}",
                          hint="unset it for the default (900)")
    return value


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: Optional[str], updated: Optional[float] = None,
                 started: Optional[int] = None) -> bool:
    """Whether the process ``host:pid`` that owns a run (last touched at ``updated``; started
    ``started`` clock ticks after its host's boot) lives.

    Every owner touches its run every :data:`HEARTBEAT_S` seconds (:func:`heartbeat`), so an
    owner silent for :func:`stale_after_s` (or touching the run that far in the future) is
    dead on any host. On another host that is all
    there is to ask; on this host the OS is asked too: a pid that does not exist, a zombie, or
    a process with another start time (the owner died and its pid was given to a new process)
    is not the owner."""
    if not owner or ":" not in owner:
        return False
    host, _, pid_s = owner.rpartition(":")
    # a touch in the future counts as old as in the past: an edited row (or a clock ahead by
    # more than the limit) cannot keep a run busy until then
    fresh = updated is None or abs(time.time() - updated) < stale_after_s()
    if host != socket.gethostname() or not fresh:
        return fresh
    try:
        pid = int(pid_s)
        if pid < 1:  # not a process: kill(0) and kill(-n) would ask about process groups
            return False
        os.kill(pid, 0)
    except (ValueError, OverflowError, ProcessLookupError):  # no pid, beyond C's, no such
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (or it just exited): the pid exists, the heartbeat is fresh
        return True
    state, ticks = stat
    return state != "Z" and (started is None or ticks == started)  # Z: killed, not reaped


def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time in clock ticks after boot) of process ``pid`` from ``/proc``
    (fields 3 and 22 of proc(5)); None where ``/proc`` cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _my_start() -> Optional[int]:
    """This process's start time in clock ticks after boot (recorded with its claims), or None."""
    stat = _proc_stat(os.getpid())
    return stat[1] if stat else None
