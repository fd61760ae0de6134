"""Power rounds: a study adds seeds where its claims are still open, within a budget.

After the study's first run list (the preset's seeds) has run, each round reads the study's
runs back from the store, computes every claim's verdict (:mod:`normlab.lab.analysis`) and gives
one more seed to each point of every inconclusive claim that more seeds could decide
(:func:`normlab.lab.analysis.seeds_by_claim`: at most ``max_seeds`` per point, not for a claim
whose observed spread would need more). When that round would go over ``budget_runs``, the
runs left go to the claims that fit, fewest seeds needed first (each claim's points whole).
Rounds stop when no claim is left to decide that way, or when the budget is spent: no claim's
next seeds fit in the ``budget_runs`` runs left, or ``budget_minutes`` of wall time have passed
since the study started (a round that has started finishes). What happened is
recorded with the setup (:meth:`Store.update_setup_info`, key ``power``), so the report can
say which claims stayed open and why.

An invocation stopped during its rounds (Ctrl-C, a kill) is resumed by the next one on the same
setup: each round, before it trains, stores the rounds begun and the run ids they listed
(``unfinished`` in the record, dropped once the record is complete), and the next invocation
counts those rounds as its own and the listed runs finished meanwhile against its
``budget_runs`` (the others are listed again where a claim still wants them). The finished
runs of an invocation that ended are an earlier invocation's (``before``), not counted.

Every look at a claim is another chance to call two equal points different, so when rounds may
run, every verdict (the first list's included) uses the sequential level for looks after each
seed from the first list's seeds to ``max_seeds`` (:func:`normlab.lab.analysis.level_for`): the
record's ``looks``, ``[first, last]``, widened to cover the looks an earlier invocation on the
same setup planned. With no rounds possible (a budget of 0 runs or 0 minutes, or the first list
already at ``max_seeds``) it is one look: ``[first, first]``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable, Optional

from normlab.lab.analysis import (INCONCLUSIVE, NOT_REPRODUCED, NOT_RUN, REPRODUCED, Level,
                                  claims_status, level_for, point_stats, seeds_by_claim)
from normlab.lab.config import ConfigError
from normlab.lab.store import Store
from normlab.lab.studies import Point, Study
from normlab.lab.study import MAX_SEEDS

__all__ = ["DEFAULT_MAX_SEEDS", "run_with_power", "check_budget"]

#: seeds per point the rounds go up to by default
DEFAULT_MAX_SEEDS = 8


def check_budget(budget_runs: Optional[int], budget_minutes: Optional[float],
                 max_seeds: int) -> None:
    """A ConfigError naming a bad budget value."""
    if budget_runs is not None and (isinstance(budget_runs, bool) or not isinstance(
            budget_runs, int) or budget_runs < 0):
        raise ConfigError(f"--budget-runs must be an int >= 0, got {budget_runs!r}")
    if budget_minutes is not None and not budget_minutes >= 0:
        raise ConfigError(f"--budget-minutes must be a number >= 0, got {budget_minutes!r}")
    if isinstance(max_seeds, bool) or not isinstance(max_seeds, int) or max_seeds < 1:
        raise ConfigError(f"--max-seeds must be a positive int, got {max_seeds!r}")
    if max_seeds > MAX_SEEDS:
        raise ConfigError(f"--max-seeds must be at most {MAX_SEEDS}, got {max_seeds!r}")


def run_with_power(
    study: Study,
    preset: str,
    store: Store,
    points_for: Callable[[Optional[dict]], list[Point]],
    run: Callable[[list[Point]], dict[str, int]],
    *,
    budget_runs: Optional[int] = None,
    budget_minutes: Optional[float] = None,
    max_seeds: int = DEFAULT_MAX_SEEDS,
    info: Optional[dict[str, Any]] = None,
    registered: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Run ``study``: its first run list, then power rounds (module docstring).

    Args:
        points_for: ``points_for(None)`` gives the first run list, ``points_for({(label, x):
            seeds})`` the list with those points at those seed counts (the study's
            :meth:`Study.points` with the user's choices bound, the dict as ``seeds_at``).
        run: trains the points not yet done (skipping finished ones) and returns the outcome
            counts (``trained``, ``skipped``, ``failed``).
        budget_runs: runs the rounds may add (None: no limit but ``max_seeds``; 0: no rounds).
        budget_minutes: wall-clock minutes from the start after which no round starts.
        info: recorded with the setup when it is registered (e.g. ``{"protocol": ...}``).
        registered: called once the first run list is in the store (the caller announces
            the runs then, so that a store that cannot be written stops before any output).

    Returns:
        the ``power`` record: rounds, runs added, why the rounds stopped (``decided``: nothing
        left that more seeds could decide within ``max_seeds``; ``no-claim``: no claim of the
        study has its points among the runs, e.g. ``--variants LN,RMS,none``; ``budget-runs``;
        ``budget-minutes``), the budget, the ``looks`` the verdicts' level is set for (module
        docstring), and the claims still open with the seeds they need.
    """
    check_budget(budget_runs, budget_minutes, max_seeds)
    t0 = clock()
    points = points_for(None)
    setup = points[0].setup if points else ""
    _register(store, study, preset, points, setup, info)
    registered()
    earlier = store.setup_info(study.name, preset, setup).get("power", {})
    looks = _looks(study, points, max_seeds, budget_runs, budget_minutes, earlier.get("looks"))
    level = level_for(looks)  # fixed, and stored, before the first look: an interrupted study's
    store.update_setup_info(study.name, preset, setup,  # report judges at it too
                            {"power": {**earlier, "looks": list(looks)}})
    start = {**earlier, "looks": list(looks)}
    counts = dict(run(points))
    deadline = None if budget_minutes is None else t0 + 60.0 * budget_minutes

    def begun(rounds: int, listed: set[str]) -> None:  # what a resumed invocation counts
        store.update_setup_info(study.name, preset, setup, {"power": {
            **start, "unfinished": {"rounds": rounds, "run_ids": sorted(listed)}}})

    rounds, added, stopped = _rounds(study, preset, store, points, points_for, run, counts,
                                     setup, level, max_seeds, budget_runs, deadline, clock,
                                     _unfinished(earlier), begun)
    if stopped == "decided" and _no_claim_run(store, study, preset, setup, level):
        stopped = "no-claim"
    open_claims, decided = _claims_at_end(store, study, preset, setup, level)
    record = {"rounds": rounds, "runs_added": added, "before": _before(earlier),
              "stopped": stopped,
              "budget_runs": budget_runs, "budget_minutes": budget_minutes,
              "max_seeds": max_seeds, "looks": list(looks),
              "open": open_claims, "counts": counts}
    store.update_setup_info(study.name, preset, setup, {"power": record})
    record["decided"] = decided  # for the terminal only, not the store
    return record


def _rounds(study: Study, preset: str, store: Store, points: list[Point],
            points_for: Callable[[Optional[dict]], list[Point]],
            run: Callable[[list[Point]], dict[str, int]], counts: dict[str, int], setup: str,
            level: Level, max_seeds: int, budget_runs: Optional[int],
            deadline: Optional[float], clock: Callable[[], float],
            carried: tuple[int, set[str]] = (0, set()),
            begun: Callable[[int, set[str]], None] = lambda rounds, listed: None
            ) -> tuple[int, int, str]:
    """The power rounds after the first run list ``points``: ``(rounds, runs added, why they
    stopped)``; each round's outcome ``counts`` are added to those given. A round adds a seed
    to the open claims' points (:func:`_next_round`) until none is left that more seeds could
    decide, the run budget has no room, or ``clock()`` reaches ``deadline``. ``carried``: the
    rounds begun and run ids listed by a stopped invocation this one resumes (its finished
    runs count as added); ``begun(rounds, listed)`` is called as each round starts to train."""
    targets: dict[tuple, int] = {}
    rounds, listed = carried[0], set(carried[1])
    added: Optional[int] = None
    while True:
        runs = store.study_runs(study.name, preset, setup)  # its own: not another process's
        if added is None:  # the stopped invocation's rounds' runs finished: spent already
            added = sum(r["run_id"] in listed and r["status"] == "done" for r in runs)
        claims = _wanted(runs, study, max_seeds, targets, level)
        if not claims:
            return rounds, added, "decided"
        if deadline is not None and clock() >= deadline:
            return rounds, added, "budget-minutes"
        room = None if budget_runs is None else budget_runs - added
        known = ({p.cfg.run_id() for p in points}
                 | {r["run_id"] for r in runs if r["status"] == "done"})
        want, new = _next_round(known, points_for, targets, claims, room)
        if not new:
            return rounds, added, "budget-runs" if want is None else "decided"
        targets.update(want)
        rounds += 1
        added += len(new)
        points = points + new
        listed |= {p.cfg.run_id() for p in new}
        _register(store, study, preset, new, setup, None)
        begun(rounds, listed)
        for k, v in run(new).items():
            counts[k] = counts.get(k, 0) + v


def _unfinished(earlier: dict[str, Any]) -> tuple[int, set[str]]:
    """(rounds begun, run ids listed) of a stopped invocation, from the stored record's
    ``unfinished`` (module docstring); ``(0, set())`` when the last invocation ended (or the
    value is not such a record: an edited one counts as none)."""
    u = earlier.get("unfinished")
    if not isinstance(u, dict):
        return 0, set()
    rounds, ids = u.get("rounds"), u.get("run_ids")
    if (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0
            or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        return 0, set()
    return rounds, set(ids)


def _before(earlier: dict[str, Any]) -> dict[str, int]:
    """What the rounds of the earlier invocations on this setup did, all together (from the
    stored ``power`` record; a value that is not a count, an edited record, counts as 0)."""
    def count(d: Any, key: str) -> int:
        v = d.get(key) if isinstance(d, dict) else None
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

    prior = earlier.get("before")
    return {k: count(earlier, k) + count(prior, k) for k in ("rounds", "runs_added")}


def _register(store: Store, study: Study, preset: str, points: list[Point], setup: str,
              info: Optional[dict[str, Any]]) -> None:
    store.register(study.name, preset, [(p.cfg.run_id(), p.label, p.x) for p in points],
                   setup=setup, info=info)


def _looks(study: Study, points: list[Point], max_seeds: int, budget_runs: Optional[int],
           budget_minutes: Optional[float], earlier: Optional[list[int]]) -> tuple[int, int]:
    """The seed counts per point from which to which the claims may be looked at (module
    docstring): the first list's fewest seeds at a point, to ``max_seeds`` when rounds may run
    (a budget, and a claim whose points the list holds: rounds add seeds to claims only),
    covering ``earlier`` (a stored record's ``looks``)."""
    seeds = Counter((p.label, p.x) for p in points)
    first = min(seeds.values(), default=1)
    rounds = budget_runs != 0 and budget_minutes != 0 and _a_claim_is_planned(study, seeds)
    last = max(first, max_seeds) if rounds else first
    if earlier:
        first, last = min(first, earlier[0]), max(last, earlier[1])
    return first, last


def _a_claim_is_planned(study: Study, planned: Counter) -> bool:
    """Whether the run list holds the points of one of the study's claims (its a, and its b
    where it has one): ``--variants LN,RMS,none`` on the norms study holds none, so no round
    could add a seed, and its verdicts are judged at one look. Known from the list, before any
    run."""
    return any(tuple(c.a) in planned and (c.b is None or tuple(c.b) in planned)
               for c in study.claims)


def _wanted(runs: list[dict[str, Any]], study: Study, max_seeds: int,
            targets: dict[tuple, int], level: Level
            ) -> list[tuple[Optional[int], dict[tuple, int]]]:
    """The open claims of the study whose stored ``runs`` are given that more seeds could
    decide, fewest seeds needed first, each with the seeds per (label, x) it needs, where above
    ``targets``."""
    failed = Counter((r["label"], r["x"]) for r in runs if r["status"] == "failed")
    claims = [(need, {p: n for p, n in want.items() if n > targets.get(p, 0)})
              for need, want in seeds_by_claim(study, point_stats(runs), max_seeds, failed,
                                                level)]
    return [(need, want) for need, want in claims if want]


def _next_round(known: set[str], points_for: Callable[[Optional[dict]], list[Point]],
                targets: dict[tuple, int], claims: list[tuple[Optional[int], dict[tuple, int]]],
                room: Optional[int]) -> tuple[Optional[dict[tuple, int]], list[Point]]:
    """``(seeds per (label, x), new points)`` of the next round: a seed for every open claim
    when that fits in ``room`` runs (None: no limit), else the claims that fit, fewest seeds
    needed first, each with all its points (a seed at some of them decides nothing). ``(None,
    [])`` when not even one claim fits. ``known``: the run ids this invocation listed and those
    the store holds finished (an earlier invocation's rounds), which are not new; a failed or
    interrupted one is listed again, to be retried or resumed."""
    want: dict[tuple, int] = {}
    new: list[Point] = []
    over = False
    for _, claim_want in claims:
        trial = {**want, **{p: max(n, want.get(p, 0)) for p, n in claim_want.items()}}
        trial_new = _new_points(known, points_for({**targets, **trial}), trial)
        if room is None or len(trial_new) <= room:
            want, new = trial, trial_new
        else:
            over = True
    return (None if over and not new else want), new


def _new_points(known: set[str], candidates: list[Point], want: dict[tuple, int]
                ) -> list[Point]:
    """The ``candidates`` at a (label, x) in ``want`` whose run ids are not ``known``."""
    return [p for p in candidates if (p.label, p.x) in want and p.cfg.run_id() not in known]


def _no_claim_run(store: Store, study: Study, preset: str, setup: str, level: Level) -> bool:
    """Whether every claim of the study lacks a run of one of its points (the series the user
    picked leave each claim "not run"): the rounds then had nothing to add seeds to."""
    stats = point_stats(store.study_runs(study.name, preset, setup))
    return all(c["verdict"] == NOT_RUN for c in claims_status(study, stats, level))


def _claims_at_end(store: Store, study: Study, preset: str, setup: str, level: Level
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(open, decided): the study's inconclusive claims with the seeds they have and need, and
    those with a verdict (reproduced or not) with the seeds they had (the most and the fewest
    among a claim's points)."""
    stats = point_stats(store.study_runs(study.name, preset, setup))
    status = claims_status(study, stats, level)
    return ([{"claim": c["text"], "seeds": c["seeds"], "fewest_seeds": c["fewest_seeds"],
              "seeds_needed": c["seeds_needed"]}
             for c in status if c["verdict"] == INCONCLUSIVE],
            [{"claim": c["text"], "verdict": c["verdict"], "seeds": c["seeds"],
              "fewest_seeds": c["fewest_seeds"]}
             for c in status if c["verdict"] in (REPRODUCED, NOT_REPRODUCED)])
