"""``normlab forget``: remove runs from a results store, on purpose and nothing else.

What goes is chosen by filters, each narrowing the choice:

* ``states``: the runs in these states (``failed``; ``interrupted``: a run that is ``running``
  in the store with no live owner; ``done``);
* ``run_ids``: these runs (as ``normlab ls`` names them);
* ``study``: the study's memberships only (every preset and setup of it);
* ``earlier_setups``: the memberships of setups the report no longer shows (an earlier setup or
  preset of a study; ``normlab ls`` marks them).

With ``study`` or ``earlier_setups`` a run leaves those memberships, and goes from the store
only when no other membership keeps it (a run that another study or setup counts stays there).
Without them the chosen runs go whole, with every membership. A run that goes takes its epochs
and its checkpoint along; a setup left with no run goes too. A run that a live process trains
is never removed: the whole command is refused, naming it.

The command lists its choice and removes nothing unless told to (``yes``); then the exports
beside the store (and the report, where OUT has one) are written again, so every file in OUT
agrees with the store. Re-running a study trains its forgotten points again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from normlab.lab.analysis import run_flag
from normlab.lab.config import ConfigError
from normlab.lab.report import REPORT_FILES, print_report
from normlab.lab.store import Store

__all__ = ["STATES", "Choice", "choose", "forget"]

#: the run states ``--state`` takes, and how a stored run is in each
STATES = ("failed", "interrupted", "done")


@dataclass
class Choice:
    """What ``normlab forget`` removes: ``members`` (membership dicts of
    :meth:`normlab.lab.store.Store.memberships`, for runs that stay in another study or setup,
    and points registered but never started) and ``runs`` (run dicts of
    :meth:`normlab.lab.store.Store.runs`, each with its ``state`` and its ``points``)."""
    members: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.members or self.runs)


def _state(store: Store, run: dict[str, Any]) -> str:
    """A stored run's state: its status, ``running`` split into ``training`` (a live owner)
    and ``interrupted``."""
    if run["status"] != "running":
        return run["status"]
    return "training" if store.in_training(run) else "interrupted"


def _check_filters(store: Store, runs: dict[str, dict], memberships: list[dict],
                   states: Iterable[str], run_ids: Iterable[str], study: Optional[str],
                   earlier_setups: bool) -> None:
    """A ConfigError for a choice that names nothing, an unknown state, run or study."""
    if not (states or run_ids or study or earlier_setups):
        raise ConfigError("say which runs to forget",
                          hint="--state failed, --state interrupted, --run RUN_ID, --study "
                               "NAME or --earlier-setups (`normlab ls OUT` lists the runs)")
    bad = [s for s in states if s not in STATES]
    if bad:
        raise ConfigError(f"unknown state {bad[0]!r}; the states: {', '.join(STATES)}",
                          hint="--state failed (or interrupted, done)")
    missing = list(dict.fromkeys(r for r in run_ids if r not in runs))
    if missing:
        raise ConfigError(f"no run {', '.join(map(repr, missing))} in {store.path}",
                          hint="`normlab ls OUT` lists its runs by run_id")
    known = sorted({m["study"] for m in memberships})
    if study is not None and study not in known:
        raise ConfigError(f"no study {study!r} in {store.path}",
                          hint=f"its studies: {', '.join(known) or 'none'}")


def choose(store: Store, *, states: Iterable[str] = (), run_ids: Iterable[str] = (),
           study: Optional[str] = None, earlier_setups: bool = False) -> Choice:
    """What ``normlab forget`` with these filters removes from ``store`` (module docstring).
    Read in one snapshot; a ConfigError when a chosen run is being trained."""
    states, run_ids = tuple(states), tuple(run_ids)
    with store.snapshot():
        runs = {r["run_id"]: r for r in store.runs()}
        memberships = store.memberships()
    _check_filters(store, runs, memberships, states, run_ids, study, earlier_setups)
    for r in runs.values():
        r["state"] = _state(store, r)

    def run_matches(run_id: str) -> bool:
        r = runs.get(run_id)
        if r is None:  # registered, never started: only a filter of memberships takes it
            return not (states or run_ids)
        return (not states or r["state"] in states) and (not run_ids or run_id in run_ids)

    if study is None and not earlier_setups:
        gone_members = [m for m in memberships if m["run_id"] in runs
                        and run_matches(m["run_id"])]
        gone_runs = [r for r in runs.values() if run_matches(r["run_id"])]
    else:
        gone_members = [m for m in memberships
                        if (study is None or m["study"] == study)
                        and not (earlier_setups and m["current"]) and run_matches(m["run_id"])]
        gone_keys = {id(m) for m in gone_members}
        kept = {m["run_id"] for m in memberships if id(m) not in gone_keys}
        gone_runs = [runs[i] for i in dict.fromkeys(m["run_id"] for m in gone_members)
                     if i in runs and i not in kept]
    for m in gone_members:
        m["started"] = m["run_id"] in runs
    return _choice(gone_members, gone_runs)


def _choice(members: list[dict], runs: list[dict]) -> Choice:
    """The Choice: each run with the points it leaves; a run being trained is refused."""
    training = [r for r in runs if r["state"] == "training"]
    if training:
        raise ConfigError(", ".join(f"run {r['run_id']} is being trained by {r['owner']}"
                                    for r in training),
                          hint="wait for it to finish, or stop its process, then forget")
    run_ids = {r["run_id"] for r in runs}
    for r in runs:
        r["points"] = [m for m in members if m["run_id"] == r["run_id"]]
    return Choice([m for m in members if m["run_id"] not in run_ids], runs)


def forget(out: Path, *, states: Iterable[str] = (), run_ids: Iterable[str] = (),
           study: Optional[str] = None, earlier_setups: bool = False, yes: bool = False,
           show: Callable[[Choice, bool], None] = lambda choice, removing: None) -> Choice:
    """Choose (:func:`choose`), ``show(choice, yes)``, and with ``yes`` remove the choice from
    OUT's store, then write its exports (and its report, when OUT has one) again. Returns the
    choice."""
    with Store(out, create=False, read_only=not yes) as store:  # a dry run writes nothing
        choice = choose(store, states=states, run_ids=run_ids, study=study,
                        earlier_setups=earlier_setups)
        show(choice, yes)
        if not (yes and choice):
            return choice
        members = [(m["study"], m["preset"], m["run_id"], m["label"]) for m in choice.members]
        store.forget(members, {r["run_id"]: r["status"] for r in choice.runs})
        if not (out / REPORT_FILES[0]).exists():
            store.export(flag=run_flag)
    if (out / REPORT_FILES[0]).exists():
        print_report(out)  # the report and the exports, from the store as it is now
    return choice
