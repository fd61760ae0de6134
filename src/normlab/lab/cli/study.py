"""``normlab reproduce`` and ``normlab train``: parse, check, then run here or relaunch through
torchrun (``--nproc-per-node`` and friends)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normlab.lab.cli.guard import guard, print_error
from normlab.lab.cli.options import (CONFIG, DATA, DATA_DIR, DEVICE, MODEL, OUT, SETS,
                                     command_argv, user_overrides, with_launch_spec)
from normlab.lab.config import ConfigError, RunConfig, apply_overrides
from normlab.lab.launch import LaunchSpec, check_launch, job_world_size, must_relaunch, relaunch
from normlab.lab.power import DEFAULT_MAX_SEEDS, check_budget
from normlab.lab.recipe import preflight
from normlab.lab.run import device_of, run_single, run_study
from normlab.lab.runner import Counts
from normlab.lab.studies import STUDIES, Point, get_study
from normlab.lab.study import check_seeds_fit
from normlab.models import is_normalizer_free

__all__ = ["reproduce", "train"]


def _check_jobs(jobs: Optional[int], launch: LaunchSpec) -> None:
    if job_world_size(launch) > 1 and jobs is not None and jobs > 1:
        raise ConfigError(f"--jobs {jobs} and --nproc-per-node {launch.nproc_per_node} do not "
                          "combine: a multi-process job trains one run at a time over all "
                          "processes", hint="drop --jobs (or use --jobs without --nproc-per-node)")


def _exit_if_failed(counts: Counts, out: Path) -> None:
    """Exit status 1 when a run failed (each failed run's line says why)."""
    if counts.get("failed"):
        print_error(f"{counts['failed']} run(s) failed (their lines above say why; "
                    f"`normlab ls {out}` lists them)", "re-run the same command to retry them")
        raise typer.Exit(1)


#: words a user may write after a flag as its value (``--quick true``): the parser takes them
#: for the study argument
_FLAG_VALUES = ("true", "false", "yes", "no", "on", "off", "1", "0")


def _check_not_a_flag_value(study: str) -> None:
    if study.strip().lower() in _FLAG_VALUES:
        raise ConfigError(f"{study!r} is not a study: --quick and --no-report are flags and "
                          "take no value", hint="write `normlab reproduce [STUDY] --quick` "
                                                "(studies: `normlab ls --studies`)")


def _series(variants: Optional[str]) -> Optional[list[str]]:
    """``--variants A,B`` as a list (each name once); None when not given."""
    if variants is None:
        return None
    names = [v.strip() for v in variants.split(",")]
    if not all(names):
        raise ConfigError(f"--variants {variants!r} has an empty series name",
                          hint="give comma-separated series, e.g. --variants BN,GN (`normlab ls "
                               "--studies` lists each study's)")
    return list(dict.fromkeys(names))


def _devices_help() -> str:
    """--devices' help, with each study's default (:attr:`Study.default_devices`; none for a
    study without a per-device batch)."""
    by: dict[int, list[str]] = {}
    for st in STUDIES.values():
        if st.per_device:
            by.setdefault(st.default_devices, []).append(st.name)
    defaults = "; ".join(f"{k} for {', '.join(names)}" + (" (the GN paper's)" if k > 1 else "")
                         for k, names in sorted(by.items(), reverse=True))
    none = [st.name for st in STUDIES.values() if not st.per_device]
    return ("devices to emulate on one process: SGD batch devices x N, BN statistics per N; 1: "
            f"one batch of N (default: {defaults}" + (f"; {', '.join(none)} takes none"
                                                        if none else "") + ")")


@with_launch_spec
def reproduce(
    ctx: typer.Context,
    study: str = typer.Argument("batch-size", help=" | ".join(STUDIES)),
    quick: bool = typer.Option(False, "--quick", metavar="",  # a flag: takes no value
                               help="fewer points and seeds, converged models: a first look"),
    data: Optional[str] = DATA,
    data_dir: Optional[Path] = DATA_DIR,
    model: Optional[str] = MODEL,
    device: Optional[str] = DEVICE,
    seeds: Optional[int] = typer.Option(None, help="seeds per point (default: the preset's)"),
    variants: Optional[str] = typer.Option(
        None, help="comma-separated series of the study, e.g. BN,GN,GN+WS,NF for batch-size "
                   "(`normlab ls --studies` lists each study's; BRN and EvoNorm-B0 have no "
                   "per-slice form: with --devices 1)"),
    jobs: Optional[int] = typer.Option(
        None, help="training processes (default on the CPU: one per core, at most 4; on CUDA: 1)"),
    set_: Optional[list[str]] = SETS,
    config: Optional[Path] = CONFIG,
    out: Path = OUT,
    no_report: bool = typer.Option(False, "--no-report", metavar="",
                                   help="skip writing the report"),
    devices: Optional[int] = typer.Option(None, help=_devices_help()),
    budget_runs: Optional[int] = typer.Option(
        None, "--budget-runs", help="runs the power rounds may add (default: half the first "
                                    "run list; --quick: 0, no rounds)"),
    budget_minutes: Optional[float] = typer.Option(
        None, "--budget-minutes", help="no power round starts after this many minutes"),
    max_seeds: Optional[int] = typer.Option(
        None, "--max-seeds",
        help=f"seeds per point the power rounds go up to (default {DEFAULT_MAX_SEEDS})"),
    launch: LaunchSpec = LaunchSpec(),
) -> None:
    """Run a study, add seeds where its claims are still open, and write its report.

    Finished runs are skipped. Power rounds add seeds within the budget (--budget-runs,
    --budget-minutes, --max-seeds). report.md, report.html and the figures go to OUT."""
    def body() -> None:
        _check_not_a_flag_value(study)
        st = get_study(study)
        preset = "quick" if quick else "default"
        check_launch(launch)
        user = user_overrides(data=data, data_dir=data_dir, model=model, device=device,
                              config=config, sets=set_, launch=launch)
        if seeds is not None and seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
        vs = _series(variants)
        points = st.points(user, preset, seeds, vs, devices)
        top = DEFAULT_MAX_SEEDS if max_seeds is None else max_seeds
        check_budget(budget_runs, budget_minutes, top)
        if seeds is not None and max_seeds is not None and max_seeds < seeds:
            # the rounds go from --seeds up: --max-seeds cannot cap the first list
            raise ConfigError(f"--max-seeds {max_seeds} is below --seeds {seeds}, the seeds "
                              "every point trains before the power rounds",
                              hint=f"--seeds {max_seeds}, or --max-seeds {seeds} or more")
        default_budget = 0 if quick else len(points) // 2  # quick: a first look, no rounds
        if (default_budget if budget_runs is None else budget_runs) > 0:  # rounds may add seeds
            check_seeds_fit(user.get("seed", 0), top,
                            "a smaller --max-seeds (or --budget-runs 0: no rounds)")
        preflight([p.cfg for p in points], world=job_world_size(launch))
        _check_jobs(jobs, launch)
        if must_relaunch(launch):
            return relaunch(launch, command_argv(ctx), device_of(points))
        power = {"budget_runs": default_budget if budget_runs is None else budget_runs,
                 "budget_minutes": budget_minutes, "max_seeds": top}
        counts = run_study(st, preset, points, out, jobs=jobs, report=not no_report,
                           more_seeds=lambda at: st.points(user, preset, seeds, vs, devices, at),
                           power=power, info={"protocol": st.protocol(
                               st.devices(user, devices), int(user.get("world_size", 1)), user)})
        _exit_if_failed(counts, out)

    guard(body)


@with_launch_spec
def train(
    ctx: typer.Context,
    norm: Optional[str] = typer.Option(None, help="a create_norm name (default bn)"),
    model: Optional[str] = MODEL,
    data: Optional[str] = DATA,
    data_dir: Optional[Path] = DATA_DIR,
    batch_size: Optional[int] = typer.Option(None,
                                             help="images per batch per process (default 32)"),
    epochs: Optional[int] = typer.Option(None, help="epochs (default 10)"),
    lr: Optional[float] = typer.Option(None, help="peak lr (default 0.1 * batch * processes/32)"),
    seed: Optional[int] = typer.Option(None, help="random seed (default 0)"),
    device: Optional[str] = DEVICE,
    set_: Optional[list[str]] = SETS,
    config: Optional[Path] = CONFIG,
    out: Path = OUT,
    launch: LaunchSpec = LaunchSpec(),
) -> None:
    """Train one run and record it in OUT's store (resumes if interrupted)."""
    def body() -> None:
        check_launch(launch)
        user = user_overrides(data=data, data_dir=data_dir, model=model, device=device,
                              config=config, sets=set_, launch=launch, norm=norm,
                              batch_size=batch_size, epochs=epochs, lr=lr, seed=seed)
        cfg = apply_overrides(RunConfig(), user)
        # a normalizer-free model is its own label; a normalized one is its norm's ("none" too)
        nf = cfg.norm == "none" and is_normalizer_free(cfg.model)
        cfg = cfg.replace(label=cfg.label or (cfg.model if nf else cfg.norm))
        point = Point(cfg.label, cfg.batch_size, cfg)
        preflight([cfg], world=job_world_size(launch))
        if must_relaunch(launch):
            return relaunch(launch, command_argv(ctx), device_of([point]))
        _exit_if_failed(run_single(point, out), out)

    guard(body)
