"""Run a list of study points: in-process, with ``--jobs`` worker processes, or as one rank of a
torchrun job. Every mode goes through :func:`run_points`, which claims each run in the store,
skips finished ones, waits for runs another live process trains and takes over dead owners' runs.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from normlab import distributed as nd
from normlab.lab.config import ConfigError
from normlab.lab.loop import ProgressFn, is_writer, train_run
from normlab.lab.outfiles import DiskFull
from normlab.lab.progress import (describe, epoch_lines, epoch_progress, err_console, literal,
                                  print_epoch, print_note, print_outcome,
                                  print_wait, progress_bars)
from normlab.lab.recipe import resolve_device
from normlab.lab.signals import raise_terminated, sigint_ignored
from normlab.lab.store import Store, TakenOver, heartbeat

__all__ = ["run_points", "run_inline", "run_parallel", "run_distributed", "Counts"]

Counts = dict[str, int]  # {"skipped": n, "trained": n, "failed": n}


def run_points(points: list, store: Optional[Store], *,
               on_run: Optional[Callable[[Any, str, Any], None]] = None,
               progress_for: Optional[Callable[[Any], Optional[ProgressFn]]] = None,
               poll_s: float = 2.0,
               on_wait: Optional[Callable[[Any, Optional[str]], None]] = None) -> Counts:
    """Run every point (objects with ``.cfg``, ``.label``) not yet done in ``store``.

    Finished runs are skipped, interrupted ones resume from their checkpoint, runs that another
    live process is training are waited for (polling every ``poll_s`` seconds) and taken over if
    that process dies. ``on_run(point, outcome, result)`` is called with outcome in "skipped",
    "trained", "failed"; ``on_wait(point, owner)`` once per run found owned by another live
    process (``owner``: its ``host:pid``). Returns the counts of each outcome.

    Interrupted (KeyboardInterrupt, or SystemExit such as the CLI raises on SIGTERM), the run in
    progress is released (:meth:`Store.release`) and the exception goes on.

    Multi-process: every rank calls it with the same points; rank 0 (the only one that needs
    ``store``) claims each run and broadcasts the decision. A run that raises on any rank is
    recorded ``failed`` (rank 0) and ends the job, since the other ranks would wait for that
    rank in a collective; re-running resumes it from its last checkpoint.
    """
    counts = {"skipped": 0, "trained": 0, "failed": 0}
    if points:
        nd.setup(device=resolve_device(points[0].cfg.device))
    writer = is_writer(nd.rank())
    if writer and store is None:
        raise ValueError("run_points: rank 0 writes the results, it needs the store")
    pending = list(points)
    seen: set[str] = set()
    told: set[str] = set()  # runs on_wait was called for
    while pending:
        waiting = []
        for p in pending:
            rid = p.cfg.run_id()
            if rid in seen:  # the same config twice in one study (e.g. shared baselines)
                continue
            state = nd.broadcast_object(store.claim(rid, p.cfg.to_dict()) if writer else None)
            if state == "busy":
                if on_wait and rid not in told:
                    told.add(rid)
                    on_wait(p, (store.run(rid) or {}).get("owner") if store is not None else None)
                waiting.append(p)
                continue
            seen.add(rid)
            if state == "done":
                outcome, res = "skipped", store.run(rid) if store is not None else None
            else:
                outcome, res = _train_point(p, store, progress_for)
            counts[outcome] += 1
            if on_run:
                on_run(p, outcome, res)
        pending = waiting
        if pending:
            time.sleep(poll_s)
    return counts


def _train_point(p: Any, store: Optional[Store],
                 progress_for: Optional[Callable[[Any], Optional[ProgressFn]]]
                 ) -> tuple[str, Any]:
    """Train the claimed point ``p``: ("trained", result) or ("failed", {"error": ...}); a
    configuration error, a failure in a multi-process job and an interrupt go on up."""
    rid = p.cfg.run_id()
    writer = is_writer()
    try:
        # the owner's heartbeat: owners on other hosts are judged by it (store.py)
        with heartbeat(store.dir, rid) if writer else contextlib.nullcontext():
            return "trained", train_run(p.cfg, store,
                                        progress=progress_for(p) if progress_for else None)
    except ConfigError:
        if writer:
            _mark_failed(store, rid, "configuration error")
        raise
    except DiskFull:  # not the run's failure: every run after it would fail the same way
        if writer:
            with contextlib.suppress(Exception):  # (the store may have no room to say it)
                store.release(rid)
        raise
    except Exception as e:  # noqa: BLE001 - record, report and go on with the study
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        if isinstance(e, TakenOver) and not nd.is_distributed():
            return "failed", {"error": msg}  # another process trains it now: not ours to mark
        if nd.is_distributed():
            if writer and not isinstance(e, TakenOver):  # often a peer's death seen through
                _mark_failed(store, rid, f"multi-process job stopped: {msg}")  # a collective
            raise
        _mark_failed(store, rid, msg)
        return "failed", {"error": msg}
    except BaseException:  # Ctrl-C, SIGTERM (SystemExit): resumable, by anyone
        if writer:
            with contextlib.suppress(Exception):
                store.release(rid)
        raise


def _mark_failed(store: Store, rid: str, msg: str) -> None:
    """Mark ``rid`` failed, unless another process took it over meanwhile: then the run is
    that process's to end, and this one's failure is only reported."""
    with contextlib.suppress(TakenOver):
        store.finish(rid, "failed", msg)


def run_inline(points: list, store: Optional[Store]) -> Counts:
    """Train the points in this process, with progress bars and a line per run."""
    with progress_bars() as prog:
        study_task = prog.add_task("runs", total=len(points), info="")
        run_task = prog.add_task("", total=1, info="")

        def on_run(p: Any, outcome: str, res: Any) -> None:
            prog.advance(study_task)
            print_outcome(p, outcome, res)

        return run_points(points, store, on_run=on_run,
                          progress_for=lambda p: epoch_progress(prog, run_task, p),
                          on_wait=print_wait)


def run_distributed(points: list, store: Optional[Store]) -> Counts:
    """This torchrun worker's part of the job: rank 0 shows progress, the others train silently."""
    if nd.is_main_process():
        return run_inline(points, store)
    return run_points(points, None)


# ---------------------------------------------------------------------- --jobs
def _worker(points: list, out: str, threads: int, parent: int, outcomes: Any,
            events: Any) -> None:
    """A training process of ``--jobs``: claims runs from the shared store until none is left,
    putting ``(run_id, outcome, result)`` on the ``outcomes`` queue for each, and its progress
    (the training loop's events, ``(run_id, event, info)``) on ``events``, but for the finished
    epochs: those go on ``outcomes`` as ``(run_id, "epoch", info)``, so that they reach the
    study process before the run's outcome and are never dropped by a full ``events``."""
    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, raise_terminated)  # stopped by the study: release the run

    def progress_for(p: Any) -> Any:
        rid = p.cfg.run_id()

        def cb(event: str, info: dict) -> None:
            if os.getppid() != parent:  # the study process died: stop with it
                os._exit(3)
            if event == "note":
                print_note(p, info["message"])
            if event == "epoch":  # its line: in order with the run's outcome, never dropped
                outcomes.put((rid, event, dict(info)))
                return
            with contextlib.suppress(queue.Full):  # progress is never worth blocking training
                events.put_nowait((rid, event, dict(info)))
        return cb

    def on_run(p: Any, outcome: str, res: Any) -> None:
        outcomes.put((p.cfg.run_id(), outcome, dict(res or {})))

    try:
        with Store(out) as store:
            run_points(points, store, on_run=on_run, progress_for=progress_for, poll_s=1.0)
    except (ConfigError, DiskFull) as e:  # a damaged store, a full disk: one line, not a
        err_console.print(f"[bold red]error:[/] {literal(e)}", highlight=False,  # traceback
                          soft_wrap=True)
        raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None


def run_parallel(points: list, store: Store, jobs: int, out: Path) -> Counts:
    """Train the points in ``jobs`` spawned processes of cores / ``jobs`` threads each; this
    process prints a line per run its workers finished, after those of the runs found done
    already (in the study's order)."""
    done = _done_already(points, store)  # read before any worker starts: none trained yet
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    outcomes, events = ctx.Queue(), ctx.Queue(maxsize=10_000)
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(points, str(out), threads, os.getpid(), outcomes, events))
             for _ in range(jobs)]
    with sigint_ignored():  # inherited through exec: Ctrl-C (SIGINT to the whole process group)
        for pr in procs:    # reaches this process alone, which stops them (daemons: SIGTERM at
            pr.start()      # exit) instead of each printing a KeyboardInterrupt traceback
    try:
        counts = _follow(points, procs, outcomes, jobs, events, done)
    except BaseException:  # Ctrl-C, SIGTERM's SystemExit, an error: the workers stop first
        _stop(procs)
        raise
    bad = [pr.exitcode for pr in procs if pr.exitcode]
    if bad:
        raise RuntimeError(f"{len(bad)} training process(es) exited with status {bad}")
    return counts


def _stop(procs: list) -> None:
    """Stop the workers now (SIGTERM: a training one releases its run) and wait for them.
    Left to this process's exit, they would be stopped only after its exit handlers removed the
    queues' semaphores, and a worker still starting would fail to open them and print a
    traceback."""
    for pr in procs:
        if pr.is_alive():
            pr.terminate()
    for pr in procs:
        pr.join(timeout=60)


def _done_already(points: list, store: Store) -> frozenset[str]:
    """The run ids of ``points`` that ``store`` holds finished (``done``)."""
    ids = dict.fromkeys(p.cfg.run_id() for p in points)
    return frozenset(rid for rid in ids if (store.run(rid) or {}).get("status") == "done")


def _follow(points: list, procs: list, outcomes: Any, jobs: int, events: Any,
            done: frozenset[str] = frozenset()) -> Counts:
    """Print the runs found ``done`` before the workers started ("already done", in the
    study's order), then each run the workers trained or failed as they report it, until they
    are gone; then the other runs they found done. A run counts as trained only where a worker
    of this process trained it: one that another process (another study on this --out)
    finished while a worker waited for it is "already done". Meanwhile a bar per run a worker
    trains, moved by its progress ``events`` (the steps of its current epoch), and off a
    terminal a line per epoch."""
    ids = {p.cfg.run_id(): p for p in points}
    final: dict[str, str] = {}   # run_id -> trained | failed (reported at once)
    skipped: set[str] = set()    # run_ids a worker found done (reported at the end)
    bars: dict[str, Any] = {}    # run_id -> its bar while a worker trains it
    with progress_bars() as prog:
        task = prog.add_task(f"runs ({jobs} processes)", total=len(ids), info="")
        shown = [rid for rid in ids if rid in done]
        for rid in shown:  # nothing to wait for: their lines come first
            print_outcome(ids[rid], "skipped", None)
            prog.advance(task)
        skipped.update(shown)
        while True:
            alive = any(pr.is_alive() for pr in procs)
            _drain(events, lambda rid, ev, info: _on_event(prog, bars, ids, rid, ev, info))
            try:
                rid, outcome, res = outcomes.get(timeout=0.25)
            except queue.Empty:
                if alive:
                    continue
                break
            if outcome == "epoch":  # a finished epoch of a run in training (its line)
                _on_event(prog, bars, ids, rid, outcome, res)
                continue
            if rid in bars:
                prog.remove_task(bars.pop(rid))
            if outcome == "skipped":
                skipped.add(rid)
            elif rid not in final:
                final[rid] = outcome
                print_outcome(ids[rid], outcome, res)
                if rid not in shown:  # (one shown done, then forgotten and trained: once)
                    prog.advance(task)
        for rid in sorted(skipped - set(final) - set(shown), key=list(ids).index):
            print_outcome(ids[rid], "skipped", None)
            prog.advance(task)
    counts = {"skipped": len(skipped - set(final)), "trained": 0, "failed": 0}
    for outcome in final.values():
        counts[outcome] += 1
    return counts


def _drain(events: Any, handle: Callable[[str, str, dict], None]) -> None:
    """Hand every event waiting in the queue to ``handle(run_id, event, info)``."""
    while True:
        try:
            rid, event, info = events.get_nowait()
        except queue.Empty:
            return
        handle(rid, event, info)


def _on_event(prog: Any, bars: dict, ids: dict, rid: str, event: str, info: dict) -> None:
    """A worker's training-loop event for run ``rid``: its bar (one per run in training, the
    steps of the current epoch) and, off a terminal, the line of a finished epoch."""
    p = ids.get(rid)
    if p is None:
        return
    if event == "start":
        if rid not in bars:
            bars[rid] = prog.add_task("", total=1, info="")
        prog.reset(bars[rid], total=info["total_steps"],
                   description=f"{describe(p)} epoch {info['epoch'] + 1}/{p.cfg.epochs}")
    elif event == "step" and rid in bars:
        prog.update(bars[rid], advance=info["advance"],
                    info=f"loss {info['loss']:.3f} {info['images_per_s']:.0f} img/s")
    elif event == "epoch" and epoch_lines():
        print_epoch(p, info)
