"""The options the commands share, written once: the run options of ``reproduce`` and ``train``
(data, model, device, ``--set``, ``--config``, ``--out``), the six launcher options (one
:class:`normlab.distributed.LaunchSpec`), and how they become a run's overrides."""

from __future__ import annotations

import functools
import inspect
import os
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from normlab.lab.config import (DATA_DIR_DATASETS, DATASETS, ConfigError, RunConfig,
                                apply_overrides, load_config_file, parse_set)
from normlab.lab.launch import LAUNCH_FIELDS, LaunchSpec, job_world_size

__all__ = ["DEFAULT_OUT", "DATA", "DATA_DIR", "MODEL", "DEVICE", "SETS", "CONFIG", "OUT",
           "non_empty_path", "path_option", "path_argument", "with_launch_spec",
           "user_overrides", "command_argv"]

DEFAULT_OUT = "normlab-out"


def non_empty_path(value: Any) -> Path:
    """A path on the command line, refused when empty: ``Path("")`` is ``.``, so ``--out ""``
    (``--out "$DIR"`` with DIR unset) wrote the store into the working directory and
    ``--data-dir ""`` read the data from it. A leading ``~`` is the home directory, as the
    shell expands it in ``--out ~/runs`` but not in ``--out=~/runs`` or ``--out "~/runs"``
    (there it made a folder named ``~`` in the working directory, and ``--config=~/c.toml`` was
    not found); ``os.path.expanduser`` leaves a ``~user`` it cannot resolve as written."""
    if isinstance(value, Path):
        return value
    if not str(value).strip():
        raise typer.BadParameter(f"an empty path ({value!r}); is a shell variable unset? (for "
                                 "the working directory write .)")
    return Path(os.path.expanduser(value))


def path_option(default: Any, *decls: str, help: str) -> Any:
    """A ``typer.Option`` for a path: :func:`non_empty_path` parses it (shown as ``<path>``)."""
    return typer.Option(default, *decls, help=help, parser=non_empty_path, metavar="<path>")


def path_argument(default: Any, help: str) -> Any:
    """A ``typer.Argument`` for a path, as :func:`path_option`."""
    return typer.Argument(default, help=help, parser=non_empty_path)


# typer copies an Option given as a default, so one object serves every command
DATA = typer.Option(None, help=" | ".join(f"{d} (default)" if d == RunConfig.data else d
                                          for d in DATASETS))
DATA_DIR = path_option(None, help=f"directory of {'/'.join(DATA_DIR_DATASETS)}")
MODEL = typer.Option(None, help="a normlab.models name (default resnet20), or timm:<name> for "
                     "a timm model whose BatchNorms the study's norms replace (or, in a "
                     "LayerNorm model such as a ViT, whose LayerNorms ln, rms or none replace)")
DEVICE = typer.Option(None, help="cpu | cuda | auto (default auto: CUDA when available, else CPU)")
SETS = typer.Option(None, "--set", help="override: key=value (repeatable)")
CONFIG = path_option(None, help="JSON or TOML file of overrides")
OUT = path_option(Path(DEFAULT_OUT), help="output directory (store, figures, reports)")

_KW = inspect.Parameter.KEYWORD_ONLY
_LAUNCH_OPTIONS = [  # the LaunchSpec fields, in order, as command-line options
    inspect.Parameter("nproc_per_node", _KW, annotation=int, default=typer.Option(
        1, "--nproc-per-node", help="processes per node: DDP through torch.distributed.run "
                                    "(one per GPU); batch size is per process")),
    inspect.Parameter("nnodes", _KW, annotation=int, default=typer.Option(
        1, "--nnodes", help="nodes (run the same command on each)")),
    inspect.Parameter("node_rank", _KW, annotation=int, default=typer.Option(
        0, "--node-rank", help="this node's rank (static rendezvous)")),
    inspect.Parameter("master_addr", _KW, annotation=str, default=typer.Option(
        "127.0.0.1", "--master-addr", help="rank 0's host")),
    inspect.Parameter("master_port", _KW, annotation=Optional[int], default=typer.Option(
        None, "--master-port", help="rank 0's port")),
    inspect.Parameter("rdzv_endpoint", _KW, annotation=Optional[str], default=typer.Option(
        None, "--rdzv-endpoint", help="HOST:PORT of a c10d rendezvous")),
]


def with_launch_spec(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command with the launcher options: ``fn``'s parameter ``launch: LaunchSpec`` becomes
    ``--nproc-per-node``, ``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port``
    and ``--rdzv-endpoint`` on the command line, and one LaunchSpec for ``fn``."""
    hints = typing.get_type_hints(fn)
    params = [p.replace(annotation=hints[p.name])
              for p in inspect.signature(fn).parameters.values() if p.name != "launch"]

    @functools.wraps(fn)
    def command(**kw: Any) -> Any:
        spec = LaunchSpec(**{name: kw.pop(name) for name in LAUNCH_FIELDS})
        return fn(**kw, launch=spec)

    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=_KW) for p in params] + _LAUNCH_OPTIONS)
    command.__annotations__ = {p.name: p.annotation
                               for p in command.__signature__.parameters.values()}
    return command


def user_overrides(*, data: Optional[str], data_dir: Optional[Path], model: Optional[str],
                   device: Optional[str], config: Optional[Path], sets: Optional[list[str]],
                   launch: LaunchSpec, **direct: Any) -> dict[str, Any]:
    """Overrides in increasing priority: config file, the named flags, --set; validated here
    (one clear error before anything runs). ``world_size`` is the job's process count unless
    the user set it (``--set world_size=W`` pins a run's global batch, e.g. to resume a
    2-process run on 1 process)."""
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
        apply_overrides(RunConfig(), over, norm_flag=norm_flag)
    except ConfigError as e:
        if config is not None and _file_alone_fails(config, norm_flag, str(e)):
            raise ConfigError(f"config file {str(config)!r}: {e}", hint=e.hint) from None
        raise
    return over if "world_size" in over else {**over, "world_size": job_world_size(launch)}


def _file_alone_fails(config: Path, norm_flag: str, msg: str) -> bool:
    """Whether the config file's overrides on their own give the error ``msg`` (then the value
    to fix is in the file, and the error says so)."""
    try:
        apply_overrides(RunConfig(), load_config_file(config), norm_flag=norm_flag)
    except ConfigError as e:
        return str(e) == msg
    return False


def command_argv(ctx: typer.Context) -> list[str]:
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
        args += _option_args(param, value)
    return args + positional


def _option_args(param: Any, value: Any) -> list[str]:
    """An option given on the command line, as it was given."""
    opt = max(param.opts, key=len)
    if getattr(param, "is_flag", False):
        if getattr(param, "secondary_opts", None):
            return [opt if value else max(param.secondary_opts, key=len)]
        return [opt] if value else []
    if param.multiple:
        return [a for v in value or () for a in (opt, str(v))]
    return [opt, str(value)] if value is not None else []
