"""The ``normlab`` command line (typer + rich): thin commands, parse -> run -> print.

Commands::

    normlab reproduce [STUDY] [--quick] [--data NAME] [--data-dir DIR] [--model NAME]
                      [--device cpu|cuda|auto] [--seeds K] [--variants A,B] [--jobs J]
                      [--set key=value ...] [--config FILE] [--out DIR]
    normlab train [--norm bn] [--model resnet20] [--batch-size 32] [--epochs 10] ... [--out DIR]
    (train and reproduce also take --nproc-per-node K [--nnodes M --node-rank R
     --master-addr HOST --master-port P | --rdzv-endpoint HOST:PORT])
    normlab report DIR [--to DIR2]
    normlab ls [DIR] [--studies] [--models] [--norms]
    normlab forget DIR [--state failed|interrupted|done] [--run ID] [--study NAME]
                   [--earlier-setups] [--yes]
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

Where things are: ``study.py`` (reproduce, train), ``browse.py`` (report, ls), ``forget.py``
(forget), ``spp.py`` (spp),
``options.py`` (the shared options, the launcher options as one LaunchSpec, overrides),
``guard.py`` (the one error guard). What they call: :mod:`normlab.lab.run`.
"""

from __future__ import annotations

import inspect
import sys
from typing import Callable, Optional

import typer
from typer.exceptions import TyperException

from normlab.lab.cli.browse import ls_, report
from normlab.lab.cli.forget import forget_
from normlab.lab.cli.guard import print_error
from normlab.lab.cli.spp import parse_model_spec, spp
from normlab.lab.cli.study import reproduce, train
from normlab.lab.recipe import versions
from normlab.models.timm_models import timm_status

__all__ = ["app", "main", "parse_model_spec"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="normlab lab: reproduce the normalization papers' studies.")


def _help(command: Callable) -> str:
    """The command's docstring with each paragraph on one line: the help reflows it to the
    terminal's width (rich keeps a docstring's line breaks inside a paragraph)."""
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(p.split("\n")) for p in paragraphs)


def _print_version(value: bool) -> None:
    if value:
        v = versions()
        print(" ".join(f"{k} {v[k]}" for k in ("normlab", "torch", "triton", "python") if k in v))
        print(timm_status())  # whether --model timm:<name> can import it
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(
        False, "--version", metavar="", is_eager=True, callback=_print_version,
        help="Print the versions of normlab, torch, triton, timm and Python, and exit.")) -> None:
    """normlab lab: reproduce the normalization papers' studies."""


for _name, _command in (("reproduce", reproduce), ("train", train), ("report", report),
                        ("ls", ls_), ("forget", forget_), ("spp", spp)):
    app.command(_name, help=_help(_command))(_command)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point (``normlab``); ``argv`` defaults to ``sys.argv[1:]``.

    Usage errors of the command line itself (an unknown command or option, a value of the wrong
    type such as ``--seeds abc``, a missing argument) get the same one ``error:`` line and
    ``hint:`` line as the commands' own checks, and exit status 2; no traceback, no usage box.
    """
    try:
        code = app(args=argv, prog_name="normlab", standalone_mode=False)
    except TyperException as e:  # click's UsageError / BadParameter / NoSuchOption / ...
        status = int(getattr(e, "exit_code", 2))
        if type(e).__name__ == "NoArgsIsHelpError":  # `normlab` alone: the help is printed
            sys.exit(status)
        ctx = getattr(e, "ctx", None)
        lines = e.format_message().strip().splitlines()
        where = ctx.command_path if ctx is not None else "normlab"
        print_error(lines[0] if lines else type(e).__name__,
                    f"see `{where} --help`" if status == 2 else "")
        sys.exit(status)
    except typer.Abort:
        print_error("interrupted", "re-run the same command to resume")
        sys.exit(130)
    # a command's return value (None: success) or the status of a typer.Exit it raised
    sys.exit(code if isinstance(code, int) else 0)
