"""What the commands call: a study or a single run, end to end, in whichever process layout this
process is in (alone, with ``--jobs`` workers, or as one rank of a torchrun job).

Both share one tail: rank 0 opens the store, registers the points, announces them, runs them,
writes the CSV/JSON exports and closes the store, whatever happened; then the counts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from rich.markup import escape

from normlab import distributed as nd
from normlab.lab.analysis import POWER_STOPPED, SEEDS_SHOWN, run_flag
from normlab.lab.config import ConfigError
from normlab.lab.launch import in_worker
from normlab.lab.power import run_with_power
from normlab.lab.progress import say
from normlab.lab.recipe import resolve_device
from normlab.lab.report import check_report_places, print_report
from normlab.lab.runner import Counts, run_distributed, run_inline, run_parallel
from normlab.lab.store import Store
from normlab.lab.studies import Point, Study
from normlab.lab.summary import device_kind, emulated_devices, setup_differences

__all__ = ["run_study", "run_single", "device_of", "jobs_for"]


def device_of(points: list) -> Optional[torch.device]:
    """The device the points train on (that of the first; None for no points)."""
    return resolve_device(points[0].cfg.device) if points else None


def jobs_for(points: list, jobs: Optional[int]) -> int:
    """Training processes for ``--jobs`` (None: on the CPU one per core, at most 4; on CUDA 1),
    at most one per distinct run."""
    if jobs is None:
        device = points[0].cfg.device
        on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        jobs = min(os.cpu_count() or 1, 4) if on_cpu else 1
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    return min(jobs, len({p.cfg.run_id() for p in points}))


def left_out_of_report(store: Store, study: str, preset: str, points: list,
                       protocol: Optional[dict] = None) -> tuple[int, str]:
    """How many runs the report's section of ``study`` shows now that registering ``points``
    (``preset``, their setup, run with ``protocol``) takes out of it (the study was last run on
    another setup (data, model, --set values) or preset, and the report shows the latest one
    only), and what tells the two setups apart (``earlier: epochs 1; now: epochs 2``: a
    ``data_dir`` moved is a new setup too); "" when none is left out."""
    now = [m for m in store.memberships() if m["study"] == study and m["current"]]
    if not now or not points or (now[0]["preset"], now[0]["setup"]) == (preset, points[0].setup):
        return 0, ""
    gone = {m["run_id"] for m in now} - {p.cfg.run_id() for p in points}
    if not gone:
        return 0, ""
    earlier = [r for r in map(store.run, {m["run_id"] for m in now}) if r]
    texts = setup_differences({
        "earlier": {"configs": [r["config"] for r in earlier], "preset": now[0]["preset"],
                    "setup": now[0]["setup"], "devices": emulated_devices(now[0]["protocol"]),
                    "ran_on": {device_kind(r.get("device")) for r in earlier} - {None}},
        "now": {"configs": [p.cfg.to_dict() for p in points], "preset": preset,
                "setup": points[0].setup, "devices": emulated_devices(protocol or {}),
                "ran_on": {p.cfg.identity()["device"] for p in points}}})
    return len(gone), f"earlier: {texts['earlier']}; now: {texts['now']}"


def _say_left_out(study: str, left_out: tuple[int, str]) -> None:
    n, how = left_out
    if n:
        say(escape(f"note: {study} was last run on another setup (data, model, --set values) "
                   f"or preset ({how}): its {n} runs of the earlier setup stay in the store "
                   f"and runs.csv, not in the report's {study} section (`normlab ls` marks "
                   "them; another --out keeps both reports)"))


def _recorded(study: str, preset: str, points: list, out: Path, announce: str,
              run: Callable[[list, Optional[Store]], Counts],
              info: Optional[dict] = None) -> Counts:
    """The shared tail: rank 0 registers the points in OUT's store (with ``info``, e.g. the
    study's protocol) and announces them; every process runs them; rank 0 writes the exports
    and closes the store, whatever happened."""
    store = Store(out) if nd.is_main_process() else None
    try:
        if store is not None:
            hidden = left_out_of_report(store, study, preset, points,
                                        (info or {}).get("protocol"))
            store.register(study, preset, [(p.cfg.run_id(), p.label, p.x) for p in points],
                           setup=points[0].setup, info=info)
            say(announce)
            _say_left_out(study, hidden)
        return run(points, store)
    finally:
        if store is not None:
            store.export(flag=run_flag)
            store.close()


def run_study(study: Study, preset: str, points: list[Point], out: Path, *,
              jobs: Optional[int] = None, report: bool = True,
              more_seeds: Optional[Callable[[dict], list[Point]]] = None,
              power: Optional[dict] = None, info: Optional[dict] = None) -> Counts:
    """Run the study's points (skipping finished runs), print the counts and write the report.
    In a torchrun worker every rank trains every run and rank 0 writes; otherwise ``jobs``
    processes train (:func:`jobs_for`) and, given ``more_seeds`` (the study's points at
    ``seeds_at`` counts), power rounds follow (:func:`normlab.lab.power.run_with_power` with
    the ``power`` budget keywords). ``info`` is stored with the setup (the protocol)."""
    if report:  # what would stop the report at the end, said before anything trains
        check_report_places(out)
    t0 = time.perf_counter()
    head = f"[bold]{study.name}[/] ({preset}): {len(points)} runs"
    if in_worker():  # every rank would have to agree on each round: the first run list only
        nd.setup(device=device_of(points))
        counts = _recorded(study.name, preset, points, out,
                           f"{head} on {nd.world_size()} processes (batch sizes per process) "
                           f"-> {escape(str(out))}/", run_distributed, info)
    else:
        n_jobs = jobs_for(points, jobs)
        where = escape(f"{out}/")  # a path is text, not rich markup
        run = ((lambda ps, store: run_parallel(ps, store, n_jobs, out)) if n_jobs > 1
               else run_inline)
        if more_seeds is None:
            counts = _recorded(study.name, preset, points, out, f"{head} -> {where}", run, info)
        else:
            counts = _with_power(study, preset, points, out, f"{head} -> {where}", run,
                                 more_seeds, power or {}, info)
    if nd.is_main_process():
        say(f"trained {counts['trained']}, already done {counts['skipped']}, failed "
            f"{counts['failed']} in {time.perf_counter() - t0:.0f}s")
        if report:
            print_report(out)
    if in_worker():
        nd.cleanup()
    return counts


def _with_power(study: Study, preset: str, points: list[Point], out: Path, announce: str,
                run: Callable[[list, Optional[Store]], Counts],
                more_seeds: Callable[[dict], list[Point]], power: dict,
                info: Optional[dict]) -> Counts:
    """The study's first run list, then its power rounds, in OUT's store; exports written and
    the store closed whatever happened. Says what the rounds did."""
    store = Store(out)
    try:
        hidden = left_out_of_report(store, study.name, preset, points,
                                    (info or {}).get("protocol"))
        record = run_with_power(
            study, preset, store, lambda at: points if at is None else more_seeds(at),
            lambda ps: run(ps, store), info=info,
            registered=lambda: (say(announce), _say_left_out(study.name, hidden)), **power)
    finally:
        store.export(flag=run_flag)
        store.close()
    if record["rounds"]:
        say(f"power: {record['rounds']} round(s) added {record['runs_added']} "
            f"run(s); stopped: {POWER_STOPPED[record['stopped']]}")
    for c in record.get("decided", []):
        say(escape(f"{c['verdict']} at {_seeds_text(c)}: {c['claim']}"))
    for o in record["open"]:
        say(escape(_open_line(o)))
    return record["counts"]


def _seeds_text(c: dict) -> str:
    """The seeds behind a claim as the report's claims table gives them: ``2 seeds``, or
    ``2-4 seeds`` from the fewest to the most among its points."""
    most = c["seeds"]
    fewest = c.get("fewest_seeds", most)
    return f"{most} seed{'s' if most > 1 else ''}" if fewest == most else f"{fewest}-{most} seeds"


def _open_line(o: dict) -> str:
    """The terminal's line for a claim left open (an ``open`` item of the power record), as the
    report's claims table says it: the seeds behind it (:func:`_seeds_text`; ``1-2`` where a
    point's other run was flagged) and how many would decide it, or why no count is known (a
    point with one seed, or means on the claim's boundary)."""
    fewest = o.get("fewest_seeds", o["seeds"])
    n = o["seeds_needed"]
    if fewest < 2:
        why = ("one seed has no spread: --seeds 2 or more" if o["seeds"] < 2 else
               "a point has one seed that counts: no spread; unknown how many would decide it")
    elif not n:
        why = ("no seed count follows from these runs: the difference is on the claim's "
               "boundary (equal means, or a gap equal to the claim's margin)")
    else:
        why = "the spread would need " + (f"over {SEEDS_SHOWN} seeds per point"
                                          if n > SEEDS_SHOWN else f"about {n} seeds per point")
    return f"open at {_seeds_text(o)}: {o['claim']} ({why})"


def run_single(point: Point, out: Path) -> Counts:
    """Train (or resume) one run and record it in OUT's store (as study "train")."""
    cfg = point.cfg
    procs = (f" ({cfg.batch_size} images per process x {cfg.world_size} processes)"
             if cfg.world_size > 1 else "")
    announce = escape(f"run {cfg.run_id()}{procs} -> {out}/")
    if not in_worker():
        return _recorded("train", "single", [point], out, announce, run_inline)
    nd.setup(device=device_of([point]))
    counts = _recorded("train", "single", [point], out, announce, run_distributed)
    nd.cleanup()
    return counts
