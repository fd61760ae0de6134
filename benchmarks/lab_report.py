"""A report of a big results store: how long ``write_report`` takes, and how much of it the
study members' reads (``Store._members``) take (CPU).

Builds a store of finished, untrained runs once (``--store``; the batch-size study on two
setups and the norms study, ``--seeds`` seeds each: 1000 runs at the default 40), then, for
``--repeats`` rounds, writes its report into a fresh copy and prints the time of the whole
``write_report`` and the calls and time of ``Store._members`` in it. The normlab it measures is
the one on ``PYTHONPATH``: an A/B of two checkouts is two runs on the same ``--store``::

    PYTHONPATH=OLD/src python benchmarks/lab_report.py --store /tmp/big
    PYTHONPATH=src python benchmarks/lab_report.py --store /tmp/big
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import normlab.lab.store as store_mod
from normlab.lab.report import write_report
from normlab.lab.store import Store
from normlab.lab.studies import get_study

#: (study, --set choices): the batch-size study's earlier setup is there
#: so the report names it, as after a study re-run with other options
_SETUPS = (("batch-size", {"epochs": 1}), ("norms", {"epochs": 1}), ("batch-size", {"epochs": 2}))


def build(out: Path, seeds: int) -> int:
    """Store every point of :data:`_SETUPS` (``seeds`` seeds each) as a finished run of three
    epochs with a random test error; returns the number of runs."""
    rng = random.Random(0)
    n = 0
    with Store(out) as s:
        for study, user in _SETUPS:
            pts = get_study(study).points(user, "default", seeds)
            s.register(study, "default", [(p.cfg.run_id(), p.label, p.x) for p in pts],
                       setup=pts[0].setup)
            for p in pts:
                if s.claim(p.cfg.run_id(), p.cfg.to_dict()) == "claimed":
                    s.record_epochs(p.cfg.run_id(), [
                        {"epoch": e, "test_error": 20 + 5 * rng.random(),
                         "train_loss": 1.5 - 0.3 * e} for e in range(3)], {})
                    s.finish(p.cfg.run_id())
                    n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True, help="built here when missing")
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not (args.store / "results.sqlite").exists():
        print(f"built {build(args.store, args.seeds)} runs in {args.store}")
    calls, spent = [0], [0.0]
    members = Store._members

    def timed(self: Store, *a, **k):
        calls[0] += 1
        t = time.perf_counter()
        try:
            return members(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    store_mod.Store._members = timed
    totals, reads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / str(i)
            shutil.copytree(args.store, out)
            calls[0], spent[0] = 0, 0.0
            t = time.perf_counter()
            write_report(out)
            totals.append(time.perf_counter() - t)
            reads.append(spent[0])
            print(f"write_report {totals[-1]:.2f} s; _members: {calls[0]} calls, "
                  f"{spent[0] * 1e3:.0f} ms", flush=True)
    print(f"median of {args.repeats}: write_report {statistics.median(totals):.2f} s, "
          f"_members {statistics.median(reads) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
