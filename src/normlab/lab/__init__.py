"""normlab.lab: reproduce the normalization papers' studies on any model and dataset.

Data flows one way, and each module imports only those below it::

    cli/          the ``normlab`` command: parse -> run -> print (shared options, one error guard)
    run.py / forget.py   a study or a single run end to end -> counts; runs removed on purpose
    runner.py     run points in-process, with --jobs workers, or as a torchrun rank
    signals.py    SIGTERM and SIGINT while a study runs
    launch.py     the launcher flags as one LaunchSpec; relaunching through torchrun
    power.py      power rounds: seeds added where claims are open, within a budget
    loop.py       one run: resume, train an epoch, evaluate, checkpoint, store writes
    checkpoint.py / memory.py   a run's checkpoints (read with weights_only); its peak memory
    recipe.py     model, optimizer, schedule, loaders for a RunConfig; preflight
    report.py / plots.py   report.md/.html and figures, from the store only
    summary.py / spp_verdicts.py   the report's summary and signal-propagation sections
    analysis.py   which runs count, each point's statistics, verdicts, seeds needed
    sequential.py the level verdicts use when power rounds look again
    studies.py    the studies: lists of run configs, the papers' tables and claims
    study.py      what a study is: Study, Point, Claim, emulate_devices, setup_id
    store.py      the results store (SQLite): claims, writes, reads, heartbeat
    store_export.py   runs.csv, epochs.csv, spp.csv, results.json beside the store
    store_rows.py     rows read back, each value checked for its kind
    store_open.py     schema and added columns, read-only opening, damaged-store errors
    owners.py     a run's owner (host:pid): heartbeat interval, liveness
    outfiles.py   files written into a results directory, never outside it
    data.py       the dataset registry (load_dataset) and the tensor loader
    cifar.py      CIFAR-10/100 through a restricted unpickler
    datasets.py   DataSplit and the digits, mnist5k, synthetic, imagefolder loaders
    progress.py   progress lines
    markdown.py   user text as literal text (report markdown, terminal lines)
    config.py     RunConfig and overrides (the NF-norm rule: normlab.models.check_norm)

The studies (studies.py) are lists of run configs plus the papers' tables and the claims to check:
``batch-size`` and ``groups`` (Wu & He, "Group Normalization", ECCV 2018), ``stats-batch`` (its
BN claim with the SGD batch held; Hoffer et al., NeurIPS 2017), ``norms`` (the GN paper),
``bn-dropout`` (BN x dropout on a small CNN), ``nf`` (Brock, De & Smith, ICLR 2021; Brock et al.
2021).
Plots and reports read only the store, so ``normlab report DIR`` works on any finished or partial
output directory.
"""

from normlab.lab.config import ConfigError, RunConfig
from normlab.lab.store import Store

__all__ = ["ConfigError", "RunConfig", "Store"]
