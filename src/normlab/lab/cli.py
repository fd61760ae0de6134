"""The ``normlab`` command line (typer + rich).

Commands::

    normlab reproduce [STUDY] [--quick] [--data NAME] [--data-dir DIR] [--model NAME]
                      [--device cpu|cuda|auto] [--seeds K] [--variants A,B] [--jobs J]
                      [--set key=value ...] [--config FILE] [--out DIR]
    normlab train [--norm bn] [--model resnet20] [--batch-size 32] [--epochs 10] ... [--out DIR]
    (train and reproduce also take --nproc-per-node K [--nnodes M --node-rank R
     --master-addr HOST --master-port P | --rdzv-endpoint HOST:PORT])
    normlab report DIR
    normlab ls [DIR] [--studies] [--models] [--norms]
    normlab spp MODEL[:key=value,...]... [--out DIR]

``normlab reproduce`` with no argument runs the batch-size study (BN vs GN at 32..2 images per
batch) on the embedded digits data and writes ``./normlab-out/{results.sqlite, report.md,
report.html, figures/}``. Re-running skips finished runs and resumes interrupted ones.

Bad input (unknown study, model, norm, dataset, bad values) prints one ``error:`` line and one
``hint:`` line on stderr and exits with status 2.

Multi-process: with ``--nproc-per-node K`` (x ``--nnodes M``) the command checks its input, then
re-runs itself through ``torch.distributed.run`` (:func:`normlab.distributed.launch`) on K
processes per node; each run trains with DDP (nccl on CUDA, gloo on CPU), ``--batch-size`` /
``batch_size`` is per process and the default lr scales with the global batch. Rank 0 alone
writes the store, the report and the progress bars. If a process dies, torchrun stops the others
and the command prints one error line and exits non-zero; re-running resumes. ``--jobs`` (several
single-process runs at once) does not combine with it. Started by torchrun directly (``torchrun
--nproc-per-node K -m normlab.lab.cli reproduce ...``) it behaves the same.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from normlab.lab.config import (ConfigError, RunConfig, apply_overrides, load_config_file,
                                parse_set)

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="normlab lab: reproduce the normalization papers' studies.")
console = Console()
err_console = Console(stderr=True)

DEFAULT_OUT = "normlab-out"


def _print_error(msg: str, hint: str = "") -> None:
    """The one ``error:`` line (and ``hint:`` line) on stderr, for every kind of bad input."""
    err_console.print(f"[bold red]error:[/] {escape(_rank_prefix() + msg)}", highlight=False,
                      soft_wrap=True)
    if hint:
        err_console.print(f"[yellow]hint:[/] {escape(hint)}", highlight=False, soft_wrap=True)


def _fail(msg: str, hint: str = "") -> None:
    _print_error(msg, hint)
    raise typer.Exit(2)


def _rank_prefix() -> str:
    """``"rank R: "`` inside a torchrun worker (its errors interleave with the other ranks')."""
    return f"rank {os.environ.get('RANK', '?')}: " if "LOCAL_RANK" in os.environ else ""


def _first_line(e: BaseException) -> str:
    lines = str(e).splitlines()
    return lines[0] if lines else type(e).__name__


class _Terminated(SystemExit):
    """Raised by the SIGTERM handler: unwinds like Ctrl-C (the run in progress is released, the
    exports written), then exits 143."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(128 + signum)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (kill, a batch scheduler stopping the job) raises :class:`_Terminated` in the main
    thread while the block runs. Not in a torchrun worker: torchrun's SIGTERM must end a rank
    blocked in a collective at once."""
    if in_worker():
        yield
        return
    with _signal_handled(signal.SIGTERM, _raise_terminated):
        yield


@contextlib.contextmanager
def _signal_handled(sig: int, handler: Any) -> Iterator[None]:
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


def _guard(fn: Any) -> Any:
    """Run fn(); turn our ConfigErrors (and ValueError/TypeError from the library) into one
    error line + hint, exit status 2."""
    try:
        with _sigterm_unwinds():
            return fn()
    except _Terminated as e:
        err_console.print("terminated; re-run the same command to resume")
        raise typer.Exit(int(e.code)) from None
    except ConfigError as e:
        _fail(str(e), e.hint or "see --help for the accepted values; `normlab ls` lists the "
                                "studies, models and norms")
    except (ValueError, TypeError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__,
              "see --help for the accepted values")
    except typer.Exit:  # already reported (a failed multi-process job)
        raise
    except RuntimeError as e:  # a training process died: say so in one line, keep the store
        err_console.print(f"[bold red]error:[/] {escape(_rank_prefix() + _first_line(e))}",
                          highlight=False, soft_wrap=True)
        err_console.print("[yellow]hint:[/] re-run the same command to resume", highlight=False)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted; re-run the same command to resume")
        raise typer.Exit(130)


def _user_overrides(data: Optional[str], data_dir: Optional[Path], model: Optional[str],
                    device: Optional[str], config: Optional[Path], sets: Optional[list[str]],
                    **direct: Any) -> dict[str, Any]:
    """Overrides in increasing priority: config file, the named flags, --set."""
    over: dict[str, Any] = {}
    norm_flag = ""  # where the norm came from, for the hint of a norm given to an NF model
    if config is not None:
        over.update(load_config_file(config))
        norm_flag = f"the 'norm' key of {config}" if "norm" in over else ""
    for key, val in (("data", data), ("data_dir", str(data_dir) if data_dir else None),
                     ("model", model), ("device", device), *direct.items()):
        if val is not None:
            over[key] = val
            norm_flag = "--norm" if key == "norm" else norm_flag
    sets_over = parse_set(sets)
    over.update(sets_over)
    if "norm" in sets_over:
        norm_flag = "--set norm=..."
    try:
        apply_overrides(RunConfig(), over, norm_flag=norm_flag)  # validate early: one clear error
    except ConfigError as e:
        if config is not None and _file_alone_fails(config, norm_flag, str(e)):
            raise ConfigError(f"config file {str(config)!r}: {e}", hint=e.hint) from None
        raise
    return over


def _file_alone_fails(config: Path, norm_flag: str, msg: str) -> bool:
    """Whether the config file's overrides on their own give the error ``msg`` (then the value
    to fix is in the file, and the error says so)."""
    try:
        apply_overrides(RunConfig(), load_config_file(config), norm_flag=norm_flag)
    except ConfigError as e:
        return str(e) == msg
    return False


# ---------------------------------------------------------------------- progress
def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=False)


def _describe(p: Any) -> str:
    c = p.cfg
    return f"{p.label} x={p.x} seed={c.seed}"


def _line(p: Any, outcome: str, res: Any) -> None:
    if outcome == "trained":
        console.print(f"  {_describe(p)}: test error {res['final_test_error']:.2f}% "
                      f"({res['wall_time']:.1f}s, {res['images_per_s']:.0f} img/s"
                      + (f", resumed at epoch {res['resumed_from']}" if res["resumed_from"] else "")
                      + (f", {res['error']}" if res.get("error") else "") + ")", highlight=False)
    elif outcome == "skipped":
        console.print(f"  {_describe(p)}: already done", highlight=False)
    else:
        console.print(f"  {_describe(p)}: [red]failed[/]: {res['error']}", highlight=False)


def _run_inline(points: list, store: Any) -> dict[str, int]:
    from normlab.lab.trainer import run_points

    with _progress() as prog:
        study_task = prog.add_task("runs", total=len(points), info="")
        run_task = prog.add_task("", total=1, info="")

        def progress_for(p: Any) -> Any:
            def cb(event: str, info: dict) -> None:
                if event == "start":
                    prog.reset(run_task, total=info["total_steps"],
                               description=f"{_describe(p)} epoch {info['epoch'] + 1}/{p.cfg.epochs}")
                elif event == "step":
                    prog.update(run_task, advance=info["advance"],
                                info=f"loss {info['loss']:.3f} {info['images_per_s']:.0f} img/s")
            return cb

        def on_run(p: Any, outcome: str, res: Any) -> None:
            prog.advance(study_task)
            _line(p, outcome, res)

        def on_wait(p: Any, owner: Optional[str]) -> None:
            console.print(f"  {_describe(p)}: being trained by {owner or 'another process'} "
                          "(another normlab process on this --out); waiting for it (an owner "
                          "on another host silent for $NORMLAB_STALE_AFTER s, default 900, "
                          "is taken over)", highlight=False)

        return run_points(points, store, on_run=on_run, progress_for=progress_for,
                          on_wait=on_wait)


def _worker(points: list, out: str, threads: int, parent: int) -> None:
    """A training process of ``--jobs``: claims runs from the shared store until none is left."""
    import torch

    from normlab.lab.store import Store
    from normlab.lab.trainer import run_points

    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, _raise_terminated)  # stopped by the study: release the run

    def progress_for(p: Any) -> Any:
        def cb(event: str, info: dict) -> None:
            if os.getppid() != parent:  # the study process died: stop with it
                os._exit(3)
        return cb

    with Store(out) as store:
        run_points(points, store, progress_for=progress_for, poll_s=1.0)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while the block runs (in the main thread; elsewhere a no-op). A process
    started meanwhile keeps ignoring it: an ignored signal stays ignored through exec, and Python
    installs its KeyboardInterrupt handler only where SIGINT is not ignored at startup."""
    with _signal_handled(signal.SIGINT, signal.SIG_IGN):
        yield


def _run_parallel(points: list, store: Any, jobs: int, out: Path) -> dict[str, int]:
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    procs = [ctx.Process(target=_worker, args=(points, str(out), threads, os.getpid()), daemon=True)
             for _ in range(jobs)]
    with _sigint_ignored():  # inherited through exec: Ctrl-C (SIGINT to the whole process group)
        for pr in procs:     # reaches this process alone, which stops them (daemons: SIGTERM at
            pr.start()       # exit) instead of each printing a KeyboardInterrupt traceback
    ids = {p.cfg.run_id(): p for p in points}
    reported: set[str] = set()
    already = {r["run_id"] for r in store.runs("done") if r["run_id"] in ids}
    counts = {"skipped": 0, "trained": 0, "failed": 0}
    with _progress() as prog:
        task = prog.add_task(f"runs ({jobs} processes)", total=len(ids), info="")
        while True:
            alive = any(pr.is_alive() for pr in procs)
            for r in store.runs():
                rid = r["run_id"]
                if rid in ids and rid not in reported and r["status"] in ("done", "failed"):
                    reported.add(rid)
                    p = ids[rid]
                    if rid in already:
                        counts["skipped"] += 1
                        _line(p, "skipped", r)
                    elif r["status"] == "failed":
                        counts["failed"] += 1
                        _line(p, "failed", r)
                    else:
                        counts["trained"] += 1
                        _line(p, "trained", {"final_test_error": r["final_test_error"],
                                             "wall_time": r["wall_time"] or 0.0,
                                             "images_per_s": r["images_per_s"] or 0.0,
                                             "resumed_from": 0, "error": r["error"]})
                    prog.advance(task)
            if not alive:
                break
            time.sleep(0.5)
    bad = [pr.exitcode for pr in procs if pr.exitcode]
    if bad:
        raise RuntimeError(f"{len(bad)} training process(es) exited with status {bad}")
    return counts


# ---------------------------------------------------------------------- multi-process
@dataclass
class _Procs:
    """The process layout asked for on the command line (``--nproc-per-node`` and friends)."""

    nproc_per_node: Optional[int]
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: Optional[int]
    rdzv_endpoint: Optional[str]

    def check(self) -> None:
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be in [0, --nnodes={self.nnodes}), got "
                              f"{self.node_rank}")
        if (self.nnodes > 1 and self.master_port is None and self.rdzv_endpoint is None
                and not in_worker()):
            raise ConfigError(f"--nnodes {self.nnodes} needs --master-port (with --master-addr) "
                              "or --rdzv-endpoint HOST:PORT",
                              hint="e.g. --master-addr node0 --master-port 29500 on every node")
        if self.relaunch:  # the launcher's checks (port range, endpoint) before anything starts
            from normlab import distributed as nd

            with _launcher_flags():
                nd.torchrun_command(["-m", "normlab.lab.cli"], self.nproc_per_node or 1,
                                    self.nnodes, self.node_rank, self.master_addr,
                                    self.master_port, self.rdzv_endpoint)

    @property
    def world_size(self) -> int:
        """Processes of the job: torchrun's $WORLD_SIZE inside a worker, else K x M."""
        if in_worker():
            from normlab import distributed as nd

            return nd.world_size()
        return (self.nproc_per_node or 1) * self.nnodes

    @property
    def relaunch(self) -> bool:
        """Whether this (parent) process must start the job through torchrun."""
        return not in_worker() and self.world_size > 1


_LAUNCH_ARGS = ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port",
                "rdzv_endpoint")


@contextlib.contextmanager
def _launcher_flags() -> Iterator[None]:
    """normlab.distributed's ValueErrors as ConfigErrors that name the command-line flags
    (``master_port`` -> ``--master-port``)."""
    try:
        yield
    except ValueError as e:
        msg = re.sub(r"\b(" + "|".join(_LAUNCH_ARGS) + r")\b",
                     lambda m: "--" + m.group(1).replace("_", "-"), str(e))
        raise ConfigError(msg) from None


def in_worker() -> bool:
    """Whether this process is a worker started by torchrun (``$LOCAL_RANK`` is set)."""
    return "LOCAL_RANK" in os.environ


def _argv(ctx: typer.Context) -> list[str]:
    """The command line of this invocation (subcommand and the options the user gave), rebuilt
    from the parsed parameters, to run the same command on every worker."""
    args = [ctx.info_name or ""]
    positional = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if source is None or source.name == "DEFAULT":
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            positional += [str(v) for v in value] if param.multiple else [str(value)]
            continue
        opt = max(param.opts, key=len)
        if getattr(param, "is_flag", False) and not getattr(param, "secondary_opts", None):
            if value:
                args.append(opt)
        elif getattr(param, "is_flag", False):
            args.append(opt if value else max(param.secondary_opts, key=len))
        elif param.multiple:
            for v in value or ():
                args += [opt, str(v)]
        elif value is not None:
            args += [opt, str(value)]
    return args + positional


def _launch(ctx: typer.Context, procs: _Procs, points: list) -> None:
    """Re-run this command on ``procs`` through torchrun; one error line if the job fails."""
    from normlab.distributed import LaunchError, launch

    dev = _device_of(points)
    if dev is not None and dev.type == "cuda":  # one GPU per process: say so here, not per rank
        import torch

        gpus = torch.cuda.device_count()
        if (procs.nproc_per_node or 1) > gpus:
            raise ConfigError(f"--nproc-per-node {procs.nproc_per_node} needs one GPU per "
                              f"process, but {gpus} CUDA device(s) are visible",
                              hint=f"use --nproc-per-node {gpus} or fewer on each node (or "
                                   "--device cpu)")
    argv = _argv(ctx)
    console.print(f"launching {procs.nproc_per_node} process(es) per node x {procs.nnodes} "
                  f"node(s) (torch.distributed.run)", highlight=False)
    try:
        with _launcher_flags():  # a --master-port already in use: one error line
            launch(["-m", "normlab.lab.cli", *argv], nproc_per_node=procs.nproc_per_node or 1,
                   nnodes=procs.nnodes, node_rank=procs.node_rank,
                   master_addr=procs.master_addr, master_port=procs.master_port,
                   rdzv_endpoint=procs.rdzv_endpoint)
    except LaunchError as e:
        err_console.print(f"[bold red]error:[/] {escape(_rank_prefix() + _first_line(e))}",
                          highlight=False, soft_wrap=True)
        err_console.print("[yellow]hint:[/] the failing rank's traceback is above; re-run the "
                          "same command to resume (finished runs and epochs are kept)",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(e.returncode if e.returncode > 0 else 1)


def _with_world_size(user: dict[str, Any], procs: _Procs) -> dict[str, Any]:
    """``world_size`` = the job's process count, unless the user set it (``--set world_size=W``
    pins a run's global batch, e.g. to resume a 2-process run on 1 process)."""
    if "world_size" not in user:
        user = {**user, "world_size": procs.world_size}
    return user


def _run_distributed(points: list, store: Any) -> dict[str, int]:
    """This worker's part of the job: rank 0 shows progress, the others train silently."""
    from normlab import distributed as nd
    from normlab.lab.trainer import run_points

    if nd.is_main_process():
        return _run_inline(points, store)
    return run_points(points, None)


# ---------------------------------------------------------------------- commands
@app.command()
def reproduce(
    ctx: typer.Context,
    study: str = typer.Argument("batch-size", help="batch-size | groups | norms | bn-dropout | nf"),
    quick: bool = typer.Option(False, "--quick", help="tiny preset: a first look in under a minute"),
    data: Optional[str] = typer.Option(None, help="digits (default) | synthetic | cifar10 | "
                                                  "cifar100 | imagefolder"),
    data_dir: Optional[Path] = typer.Option(None, help="directory of cifar10/cifar100/imagefolder"),
    model: Optional[str] = typer.Option(None, help="a normlab.models name (default resnet20)"),
    device: Optional[str] = typer.Option(
        None, help="cpu | cuda | auto (default auto: CUDA when available, else CPU)"),
    seeds: Optional[int] = typer.Option(None, help="seeds per point (default: the preset's)"),
    variants: Optional[str] = typer.Option(
        None, help="comma-separated series of the study, e.g. BN,GN,BRN,GN+WS,NF for batch-size "
                   "(`normlab ls --studies` lists each study's)"),
    jobs: Optional[int] = typer.Option(
        None, help="training processes (default on the CPU: one per core, at most 4; on CUDA: 1)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override: key=value (repeatable)"),
    config: Optional[Path] = typer.Option(None, help="JSON or TOML file of overrides"),
    out: Path = typer.Option(Path(DEFAULT_OUT), help="output directory (store, figures, reports)"),
    no_report: bool = typer.Option(False, "--no-report", help="skip writing the report"),
    nproc_per_node: Optional[int] = typer.Option(
        None, "--nproc-per-node", help="processes per node: DDP through torch.distributed.run "
                                       "(one per GPU); batch size is per process"),
    nnodes: int = typer.Option(1, "--nnodes", help="nodes (run the same command on each)"),
    node_rank: int = typer.Option(0, "--node-rank", help="this node's rank (static rendezvous)"),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="rank 0's host"),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="rank 0's port"),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint",
                                                help="HOST:PORT of a c10d rendezvous"),
) -> None:
    """Run a study (skipping finished runs), then write report.md, report.html and figures."""
    def body() -> None:
        from normlab.lab.report import write_report
        from normlab.lab.store import Store
        from normlab.lab.studies import get_study

        st = get_study(study)
        preset = "quick" if quick else "default"
        procs = _Procs(nproc_per_node, nnodes, node_rank, master_addr, master_port, rdzv_endpoint)
        procs.check()
        user = _with_world_size(_user_overrides(data, data_dir, model, device, config, set_), procs)
        if seeds is not None and seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
        vs = [v.strip() for v in variants.split(",")] if variants else None
        points = st.points(user, preset, seeds, vs)
        from normlab.lab.trainer import preflight

        preflight([p.cfg for p in points], world=procs.world_size)
        multi = procs.world_size > 1
        if multi and jobs is not None and jobs > 1:
            raise ConfigError(f"--jobs {jobs} and --nproc-per-node {nproc_per_node} do not "
                              "combine: a multi-process job trains one run at a time over all "
                              "processes",
                              hint="drop --jobs (or use --jobs without --nproc-per-node)")
        if procs.relaunch:
            return _launch(ctx, procs, points)
        if in_worker():
            return _reproduce_worker(st, preset, points, out, no_report)
        n_jobs = jobs
        if n_jobs is None:
            on_cpu = points[0].cfg.device == "cpu" or (points[0].cfg.device == "auto"
                                                       and not _cuda())
            n_jobs = min(os.cpu_count() or 1, 4) if on_cpu else 1
        if n_jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {n_jobs}")
        n_jobs = min(n_jobs, len({p.cfg.run_id() for p in points}))
        store = Store(out)
        store.register(st.name, preset, [(p.cfg.run_id(), p.label, p.x) for p in points],
                       setup=points[0].setup)
        console.print(f"[bold]{st.name}[/] ({preset}): {len(points)} runs -> {out}/", highlight=False)
        t0 = time.perf_counter()
        try:
            if n_jobs > 1:
                counts = _run_parallel(points, store, n_jobs, out)
            else:
                counts = _run_inline(points, store)
        finally:
            store.export()
            store.close()
        dt = time.perf_counter() - t0
        console.print(f"trained {counts['trained']}, already done {counts['skipped']}, failed "
                      f"{counts['failed']} in {dt:.0f}s", highlight=False)
        if not no_report:
            md, html_path = write_report(out)
            console.print(f"report: {md} and {html_path}", highlight=False)

    _guard(body)


def _reproduce_worker(st: Any, preset: str, points: list, out: Path, no_report: bool) -> None:
    """``reproduce`` inside a torchrun worker: rank 0 registers the study, writes the store and
    the report; every rank trains every run."""
    from normlab import distributed as nd
    from normlab.lab.report import write_report
    from normlab.lab.store import Store

    nd.setup(device=_device_of(points))
    main_rank = nd.is_main_process()
    store = Store(out) if main_rank else None
    t0 = time.perf_counter()
    try:
        if store is not None:
            store.register(st.name, preset, [(p.cfg.run_id(), p.label, p.x) for p in points],
                           setup=points[0].setup)
            console.print(f"[bold]{st.name}[/] ({preset}): {len(points)} runs on "
                          f"{nd.world_size()} processes (batch sizes per process) -> {out}/",
                          highlight=False)
        counts = _run_distributed(points, store)
    finally:
        if store is not None:
            store.export()
            store.close()
    if main_rank:
        console.print(f"trained {counts['trained']}, already done {counts['skipped']}, failed "
                      f"{counts['failed']} in {time.perf_counter() - t0:.0f}s", highlight=False)
        if not no_report:
            md, html_path = write_report(out)
            console.print(f"report: {md} and {html_path}", highlight=False)
    nd.cleanup()


def _device_of(points: list) -> Any:
    from normlab.lab.trainer import resolve_device

    return resolve_device(points[0].cfg.device) if points else None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@app.command()
def train(
    ctx: typer.Context,
    norm: Optional[str] = typer.Option(None, help="a create_norm name (default bn)"),
    model: Optional[str] = typer.Option(None, help="a normlab.models name (default resnet20)"),
    data: Optional[str] = typer.Option(None, help="dataset name (default digits)"),
    data_dir: Optional[Path] = typer.Option(None, help="directory for on-disk datasets"),
    batch_size: Optional[int] = typer.Option(None,
                                             help="images per batch per process (default 32)"),
    epochs: Optional[int] = typer.Option(None, help="epochs (default 10)"),
    lr: Optional[float] = typer.Option(None, help="peak lr (default 0.1 * batch * processes/32)"),
    seed: Optional[int] = typer.Option(None, help="random seed (default 0)"),
    device: Optional[str] = typer.Option(
        None, help="cpu | cuda | auto (default auto: CUDA when available, else CPU)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override: key=value (repeatable)"),
    config: Optional[Path] = typer.Option(None, help="JSON or TOML file of overrides"),
    out: Path = typer.Option(Path(DEFAULT_OUT), help="output directory"),
    nproc_per_node: Optional[int] = typer.Option(
        None, "--nproc-per-node", help="processes per node: DDP through torch.distributed.run "
                                       "(one per GPU); batch size is per process"),
    nnodes: int = typer.Option(1, "--nnodes", help="nodes (run the same command on each)"),
    node_rank: int = typer.Option(0, "--node-rank", help="this node's rank (static rendezvous)"),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="rank 0's host"),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="rank 0's port"),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint",
                                                help="HOST:PORT of a c10d rendezvous"),
) -> None:
    """Train one run and record it in OUT's store (resumes if interrupted)."""
    def body() -> None:
        from normlab.lab.store import Store
        from normlab.lab.studies import Point

        procs = _Procs(nproc_per_node, nnodes, node_rank, master_addr, master_port, rdzv_endpoint)
        procs.check()
        user = _user_overrides(data, data_dir, model, device, config, set_, norm=norm,
                               batch_size=batch_size, epochs=epochs, lr=lr, seed=seed)
        cfg = apply_overrides(RunConfig(), _with_world_size(user, procs))
        cfg = cfg.replace(label=cfg.label or (cfg.norm if cfg.norm != "none" else cfg.model))
        p = Point(cfg.label, cfg.batch_size, cfg)
        from normlab.lab.trainer import preflight

        preflight([cfg], world=procs.world_size)
        if procs.relaunch:
            return _launch(ctx, procs, [p])
        if in_worker():
            from normlab import distributed as nd

            nd.setup(device=_device_of([p]))
            if not nd.is_main_process():
                _run_distributed([p], None)
                return nd.cleanup()
        with Store(out) as store:
            store.register("train", "single", [(cfg.run_id(), p.label, p.x)])
            procs_note = (f" ({cfg.batch_size} images per process x {cfg.world_size} processes)"
                          if cfg.world_size > 1 else "")
            console.print(f"run {cfg.run_id()}{procs_note} -> {out}/", highlight=False)
            _run_inline([p], store)
            store.export()
        if in_worker():
            from normlab import distributed as nd

            nd.cleanup()

    _guard(body)


@app.command()
def report(out: Path = typer.Argument(..., help="an output directory of `normlab reproduce`")) -> None:
    """Write report.md, report.html, figures and CSV/JSON exports from OUT's store."""
    def body() -> None:
        from normlab.lab.report import write_report

        md, html_path = write_report(out)
        console.print(f"report: {md} and {html_path}", highlight=False)

    _guard(body)


@app.command("ls")
def ls_(
    out: Optional[Path] = typer.Argument(None, help="an output directory: list its runs"),
    studies: bool = typer.Option(False, "--studies", help="list the studies"),
    models: bool = typer.Option(False, "--models", help="list the models"),
    norms: bool = typer.Option(False, "--norms", help="list the norms"),
) -> None:
    """List the runs in OUT's store, or the known studies, models and norms."""
    def body() -> None:
        if studies or models or norms or out is None:
            from normlab.factory import norm_names
            from normlab.lab.studies import STUDIES

            every = not (studies or models or norms)  # no flag: all three lists
            if studies or every:
                for s in STUDIES.values():
                    console.print(f"[bold]{s.name}[/]: {s.title} (series: "
                                  f"{', '.join(s.variants)})", highlight=False)
            if models or every:
                try:
                    from normlab.models import list_models

                    console.print("models: " + ", ".join(list_models()), highlight=False)
                except ImportError:
                    console.print("models: (normlab.models not available)")
            if norms or every:
                console.print("norms: " + ", ".join(norm_names()), highlight=False)
            return
        from normlab.lab.store import Store

        with Store(out, create=False) as store:
            table = Table(title=str(store.path))
            for col in ("run_id", "studies", "label", "model", "norm", "batch/proc", "seed",
                        "status", "epochs", "test err %", "time s", "img/s"):
                table.add_column(col)
            member = {}
            for s, _ in store.studies():
                for r in store.study_runs(s):
                    member.setdefault(r["run_id"], (set(), r["label"]))[0].add(s)
            for r in store.runs():
                c = r["config"]
                st, label = member.get(r["run_id"], (set(), c.get("label", "")))
                err = r["final_test_error"]
                table.add_row(r["run_id"], ",".join(sorted(st)), label, c["model"], c["norm"],
                              _batch_cell(c), str(c["seed"]), r["status"],
                              f"{r['epochs_done']}/{r['epochs']}",
                              "-" if err is None else f"{err:.2f}",
                              "-" if r["wall_time"] is None else f"{r['wall_time']:.1f}",
                              "-" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}")
            # off a terminal rich assumes 80 columns; keep the table whole for logs and pipes
            (console if console.is_terminal else Console(width=200)).print(table)

    _guard(body)


def _batch_cell(c: dict) -> str:
    """``N`` for a one-process run, ``NxW`` for N images per process on W processes."""
    w = int(c.get("world_size", 1))
    return str(c["batch_size"]) + (f"x{w}" if w > 1 else "")


_SPEC_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w]*\s*=)")  # a comma that starts the next key=value


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"NAME"`` or ``"NAME:key=value[,key=value...]"`` -> ``(NAME, {key: value})``, values
    parsed as in ``--set`` (JSON when it parses, true/false/none, else a string); a comma
    belongs to a value unless a ``key=`` follows it, so ``w:widths=[8,16]`` works.

    >>> parse_model_spec("nf_resnet56:std_conv=false,alpha=0.5")
    ('nf_resnet56', {'std_conv': False, 'alpha': 0.5})
    """
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"model spec {spec!r} has no model name",
                          hint="write NAME or NAME:key=value[,key=value], e.g. "
                               "preact_resnet56:norm=none")
    if sep and not rest.strip():
        raise ConfigError(f"model spec {spec!r} has nothing after ':'",
                          hint="write NAME:key=value[,key=value], e.g. nf_resnet56:std_conv=false")
    items = [i.strip() for i in _SPEC_SPLIT.split(rest)] if sep else []
    try:
        kw = parse_set(items)
    except ConfigError as e:
        raise ConfigError(f"model spec {spec!r}: {e}",
                          hint="write NAME:key=value[,key=value], e.g. "
                               "nf_resnet56:std_conv=false") from None
    return name, kw


@app.command()
def spp(
    models: list[str] = typer.Argument(
        ..., help="models, each NAME or NAME:key=value[,key=value] (keywords for that model "
                  "only, e.g. preact_resnet56:order=act_norm, preact_resnet56:norm=none, "
                  "nf_resnet56:std_conv=false)"),
    out: Path = typer.Option(Path(DEFAULT_OUT), help="output directory (store and figures/spp.*)"),
    norm: str = typer.Option("bn", help="norm for the models that take one (NAME:norm=... "
                                        "for one model)"),
    batch: int = typer.Option(64, help="unit-Gaussian batch size"),
    resolution: int = typer.Option(32, help="input height = width"),
    seed: int = typer.Option(0, help="seed of the weights and of the input batch"),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="model keyword for every model: key=value (repeatable)"),
) -> None:
    """Signal propagation plots (Brock, De & Smith, ICLR 2021) of models at initialization:
    records go to OUT's store, the figure to OUT/figures/spp.png/.svg and into the report.

    Normalizer-free models (nf_*) are built with skipinit=False here: their
    default SkipInit zeroes every residual branch at init, a flat curve
    (nf_resnet56:skipinit=true shows it).

    BN-ReLU-Conv, ReLU-BN-Conv, NF + Scaled WS, NF + He init, no norm:
    normlab spp preact_resnet56 preact_resnet56:order=act_norm nf_resnet56
    nf_resnet56:std_conv=false preact_resnet56:norm=none
    """
    def body() -> None:
        import torch

        from normlab import spp as spp_mod
        from normlab.lab.store import Store
        from normlab.models import create, model_uses_norm

        if batch < 1 or resolution < 1:
            raise ConfigError(f"--batch and --resolution must be >= 1, got {batch}, {resolution}")
        common = parse_set(set_)
        records = {}
        for spec in models:
            name, own = parse_model_spec(spec)
            label = spec.strip() if own else name
            if label in records:
                raise ConfigError(f"model {label!r} is listed twice",
                                  hint="give each model once (NAME:key=value tells variants apart)")
            try:
                kw = {**common, **own}
                if model_uses_norm(name):
                    kw.setdefault("norm", norm)
                else:
                    if kw.get("norm", "none") != "none":
                        raise ConfigError(
                            f"model {name!r} is normalizer-free and takes no norm, got "
                            f"norm={kw['norm']!r}",
                            hint=f"drop norm= from {spec!r}" if "norm" in own else
                            "drop --set norm=... (it applies to every model; use NAME:norm=...)")
                    kw.pop("norm", None)
                    kw.setdefault("skipinit", False)  # SkipInit would zero every branch at init
                torch.manual_seed(seed)
                m = create(name, **kw)
                recs = spp_mod.signal_propagation(m, batch_size=batch, image_size=resolution,
                                                  seed=seed)
            except ConfigError:
                raise
            except (ValueError, TypeError) as e:
                where = (" (--set applies to every model; use NAME:key=value for one)"
                         if common else "")
                raise ConfigError(f"{spec}: {str(e).splitlines()[0]}{where}",
                                  hint="see `normlab ls --models` and the model's keywords") from None
            records[label] = [r.as_dict() for r in recs]
        with Store(out) as store:
            for label, recs in records.items():
                store.record_spp(label, recs)
        paths = spp_mod.plot(records, out / "figures" / "spp.png")
        console.print("spp: " + ", ".join(str(p) for p in paths), highlight=False)

    _guard(body)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point (``normlab``); ``argv`` defaults to ``sys.argv[1:]``.

    Usage errors of the command line itself (an unknown command or option, a value of the wrong
    type such as ``--seeds abc``, a missing argument) get the same one ``error:`` line and
    ``hint:`` line as the commands' own checks, and exit status 2; no traceback, no usage box.
    """
    import sys

    from typer.exceptions import TyperException

    try:
        code = app(args=argv, prog_name="normlab", standalone_mode=False)
    except TyperException as e:  # click's UsageError / BadParameter / NoSuchOption / ...
        status = int(getattr(e, "exit_code", 2))
        if type(e).__name__ == "NoArgsIsHelpError":  # `normlab` alone: the help is printed
            sys.exit(status)
        ctx = getattr(e, "ctx", None)
        lines = e.format_message().strip().splitlines()
        where = ctx.command_path if ctx is not None else "normlab"
        _print_error(lines[0] if lines else type(e).__name__,
                     f"see `{where} --help`" if status == 2 else "")
        sys.exit(status)
    except typer.Abort:
        _print_error("interrupted", "re-run the same command to resume")
        sys.exit(130)
    # a command's return value (None: success) or the status of a typer.Exit it raised
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
