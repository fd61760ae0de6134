"""Where a lab run's time goes, and what a change to the lab did to it (CPU).

Two measurements (benchmarks/NOTES.md, "The lab's training loop"):

``breakdown``: trains study points of the batch-size study (``LABEL:X``, e.g. ``BN:2``: BN at 2
images per emulated device, 8 devices, the main job's config) for ``--epochs`` epochs through
:func:`normlab.lab.loop.train_run`, ``--repeats`` times after one warm-up run, with timers
around the loop's parts: the model's forward, backward (the rest of ``_step``: loss, zero_grad,
backward) and optimizer step, the loader, the epoch's evaluation and its checkpoint and store
write, the run's preparation, and what is left of ``train_epoch`` (the loop's bookkeeping:
metrics, learning rate, the peak-memory meter, progress). One CSV row per point and part.

``ab``: runs one normlab command (e.g. ``reproduce --quick``) from two checkouts of the
repository in alternation (``--rounds`` each, the order swapped every round), each into its
own ``--out`` folder, times each whole command, and compares the stored results of every pair
exactly: every column of runs.csv and epochs.csv but the timing ones (wall_time, images_per_s,
created, updated, owner). One CSV row per command run; the comparison is printed.

    python benchmarks/lab_overhead.py breakdown [--points BN:2 BN:32 GN:2 GN:32] [--epochs 3]
        [--repeats 2] [--threads 1] [--out benchmarks/results/lab_overhead_cpu.csv]
    python benchmarks/lab_overhead.py ab --old DIR --new DIR [--rounds 3] [--out CSV]
        -- reproduce --quick
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

TIMING_COLUMNS = {"wall_time", "images_per_s", "created", "updated", "owner"}


def _common() -> dict[str, Any]:
    import torch
    return {"device": "cpu", "cpu_count": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "python": platform.python_version(),
            "measured_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ")}


# ---------------------------------------------------------------------- breakdown
def _timed(times: dict, name: str, f: Callable) -> Callable:
    def g(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            times[name] += time.perf_counter() - t
    return g


def _instrument(times: dict, counts: dict) -> None:
    """Timers around the loop's parts (module attributes the loop looks up at call time)."""
    from normlab.lab import loop
    from normlab.lab.data import TensorLoader
    from normlab.lab.store import Store

    prepare = loop._prepare

    def prepared(cfg: Any, store: Any) -> Any:
        t = time.perf_counter()
        run, note = prepare(cfg, store)
        run.forward = _timed(times, "forward", run.forward)
        run.opt.step = _timed(times, "optimizer step", run.opt.step)
        times["prepare"] += time.perf_counter() - t
        return run, note

    step = loop._step

    def counted_step(*a: Any) -> Any:
        counts["steps"] += 1
        return step(*a)

    batches = TensorLoader.__iter__

    def timed_batches(self: Any) -> Any:
        it = batches(self)
        while True:
            t = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                times["loader"] += time.perf_counter() - t
                return
            times["loader"] += time.perf_counter() - t
            yield b

    loop._prepare = prepared
    loop._step = _timed(times, "_step", counted_step)
    TensorLoader.__iter__ = timed_batches
    loop.train_epoch = _timed(times, "train_epoch", loop.train_epoch)
    loop.evaluate = _timed(times, "evaluate", loop.evaluate)
    loop._end_epoch = _timed(times, "_end_epoch", loop._end_epoch)
    loop._write_epoch = _timed(times, "_write_epoch", loop._write_epoch)
    Store.record_epochs = _timed(times, "store write", Store.record_epochs)


def breakdown(args: argparse.Namespace) -> None:
    import torch

    import normlab
    from normlab.lab import loop
    from normlab.lab.store import Store
    from normlab.lab.studies import get_study

    torch.set_num_threads(args.threads)
    commit = _commit(Path(normlab.__file__).parent)
    times: dict = collections.defaultdict(float)
    counts: dict = collections.defaultdict(int)
    _instrument(times, counts)
    points = get_study("batch-size").points({"threads": args.threads}, "default")
    rows = []
    for spec in args.points:
        label, x = spec.split(":")
        cfg = next(p.cfg for p in points if p.label == label and p.x == int(x) and p.cfg.seed == 0)
        cfg = cfg.replace(epochs=args.epochs)

        def once() -> float:
            with tempfile.TemporaryDirectory() as d, Store(d) as store:
                store.claim(cfg.run_id(), cfg.to_dict())
                t = time.perf_counter()
                loop.train_run(cfg, store)
                return time.perf_counter() - t

        once()  # warm-up: imports, first allocations
        times.clear()
        counts.clear()
        total = sum(once() for _ in range(args.repeats))
        t = {k: v / args.repeats for k, v in times.items()}
        steps = counts["steps"] / args.repeats
        parts = {
            "forward": t["forward"],
            "backward (loss, zero_grad, backward)": t["_step"] - t["forward"]
            - t["optimizer step"],
            "optimizer step": t["optimizer step"],
            "loader": t["loader"],
            "loop bookkeeping (metrics, lr, memory meter)": t["train_epoch"] - t["_step"]
            - t["loader"] - t["_end_epoch"],
            "evaluate": t["evaluate"],
            "checkpoint": t["_write_epoch"] - t["store write"],
            "store write": t["store write"],
            "prepare (model, optimizer, loaders)": t["prepare"],
        }
        run_ms = total / args.repeats * 1e3
        parts["rest of train_run"] = run_ms / 1e3 - sum(parts.values())
        print(f"{spec} (batch {cfg.batch_size}, {args.epochs} epochs, {steps:.0f} steps, "
              f"normlab {commit}): {run_ms:.0f} ms a run")
        for part, s in parts.items():
            print(f"  {part:46s} {s * 1e3:8.1f} ms {100 * s / (run_ms / 1e3):5.1f}%  "
                  f"{s / steps * 1e6:8.1f} us/step")
            rows.append({**_common(), "threads": args.threads, "commit": commit, "point": spec,
                         "batch": cfg.batch_size, "epochs": args.epochs, "steps": int(steps),
                         "repeats": args.repeats, "part": part,
                         "ms_per_run": round(s * 1e3, 2),
                         "share_pct": round(100 * s / (run_ms / 1e3), 2),
                         "us_per_step": round(s / steps * 1e6, 1)})
    _write(args.out, rows)


# ---------------------------------------------------------------------- ab
def _exports(out: Path) -> dict[str, dict[tuple, dict[str, str]]]:
    found = {}
    for name, key in (("runs.csv", ("run_id",)), ("epochs.csv", ("run_id", "epoch"))):
        with open(out / name, newline="") as f:
            found[name] = {tuple(r[k] for k in key):
                           {k: v for k, v in r.items() if k not in TIMING_COLUMNS}
                           for r in csv.DictReader(f)}
    return found


def _commit(path: Path) -> str:
    """The short commit of the checkout holding ``path``."""
    return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children and theirs."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _training_s(out: Path) -> float:
    """The runs' own training time as the store has it (the sum of runs.csv's wall_time)."""
    with open(out / "runs.csv", newline="") as f:
        return sum(float(r["wall_time"] or 0) for r in csv.DictReader(f))


def _differences(a: Path, b: Path) -> list[str]:
    """Every stored value (timing columns aside) that differs between two outputs."""
    ea, eb = _exports(a), _exports(b)
    out = []
    for name in ea:
        if ea[name].keys() != eb[name].keys():
            out.append(f"{name}: other rows ({sorted(set(ea[name]) ^ set(eb[name]))[:3]})")
            continue
        out += [f"{name} {k} {c}: {v} != {eb[name][k][c]}"
                for k, row in ea[name].items() for c, v in row.items() if v != eb[name][k][c]]
    return out


def ab(args: argparse.Namespace) -> None:
    trees = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    commits = {k: _commit(v) for k, v in trees.items()}
    work = Path(tempfile.mkdtemp(prefix="normlab-ab-"))
    rows, outs = [], collections.defaultdict(list)
    walls, cpus = collections.defaultdict(list), collections.defaultdict(list)
    for r in range(args.rounds):
        for code in (("old", "new") if r % 2 == 0 else ("new", "old")):
            out = work / f"{code}{r}"
            env = dict(os.environ, PYTHONPATH=str(trees[code] / "src"),
                       OMP_NUM_THREADS=str(args.threads))
            common = _common()
            cpu0, t = _children_cpu(), time.perf_counter()
            subprocess.run([sys.executable, "-m", "normlab.lab.cli", *args.command,
                            "--out", str(out)], env=env, cwd=trees[code], check=True,
                           stdout=subprocess.DEVNULL)
            wall, cpu = time.perf_counter() - t, _children_cpu() - cpu0
            train = _training_s(out)
            walls[code].append(wall)
            cpus[code].append(cpu)
            outs[code].append(out)
            print(f"round {r} {code} ({commits[code]}): {wall:.1f} s wall, {cpu:.1f} s CPU, "
                  f"runs' training {train:.1f} s (load {common['load_avg_1min']})", flush=True)
            rows.append({**common, "threads": args.threads, "command": " ".join(args.command),
                         "code": code, "commit": commits[code], "round": r,
                         "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "runs_training_s": round(train, 2)})
    for what, got in (("wall", walls), ("CPU", cpus)):
        m = {k: statistics.median(v) for k, v in got.items()}
        paired = [a - b for a, b in zip(got["old"], got["new"])]
        print(f"median {what}: old {m['old']:.1f} s, new {m['new']:.1f} s, new/old "
              f"{m['new'] / m['old']:.3f}; paired old - new: median "
              f"{statistics.median(paired):.1f} s, new faster in "
              f"{sum(d > 0 for d in paired)}/{len(paired)} rounds")
    diffs = [d for a, b in zip(outs["old"], outs["new"]) for d in _differences(a, b)]
    print("stored results (timing columns aside): "
          + ("identical in every pair" if not diffs else f"{len(diffs)} differences"))
    for d in diffs[:20]:
        print("  ", d)
    _write(args.out, rows)
    if not args.keep:
        shutil.rmtree(work)


def _write(path: str, rows: list[dict]) -> None:
    if not path or not rows:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("breakdown", help="time the parts of a run")
    b.add_argument("--points", nargs="+", default=["BN:2", "BN:32", "GN:2", "GN:32"])
    b.add_argument("--epochs", type=int, default=3)
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--out", default="")
    a = sub.add_parser("ab", help="a command from two checkouts, timed and compared")
    a.add_argument("--old", required=True)
    a.add_argument("--new", default=str(Path(__file__).resolve().parents[1]))
    a.add_argument("--rounds", type=int, default=3)
    a.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the commands")
    a.add_argument("--keep", action="store_true", help="keep the commands' output folders")
    a.add_argument("--out", default="")
    a.add_argument("command", nargs="+", help="the normlab command, after --")
    args = p.parse_args()
    breakdown(args) if args.what == "breakdown" else ab(args)


if __name__ == "__main__":
    main()
