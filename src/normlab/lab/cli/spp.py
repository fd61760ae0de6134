"""``normlab spp MODEL[:key=value,...]...``: signal propagation plots of models at init."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch
import typer
from rich.markup import escape

from normlab import spp as spp_mod
from normlab.lab.cli.guard import guard
from normlab.lab.cli.options import DEFAULT_OUT, path_option
from normlab.lab.config import ConfigError, check_seed, fits_in_memory, parse_set
from normlab.lab.outfiles import staged, subdir
from normlab.lab.progress import say
from normlab.lab.report import check_report_places
from normlab.lab.report import print_report
from normlab.lab.spp_verdicts import OTHER_KIND
from normlab.lab.store import Store
from normlab.models import check_norm, create, model_uses_norm
from normlab.models.timm_models import is_timm_name

__all__ = ["spp", "parse_model_spec"]

_SPEC_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w]*\s*=)")  # a comma that starts the next key=value
_SPEC_HINT = "write NAME:key=value[,key=value], e.g. nf_resnet56:std_conv=false"


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"NAME"`` or ``"NAME:key=value[,key=value...]"`` -> ``(NAME, {key: value})``, values
    parsed as in ``--set`` (JSON when it parses, true/false/none, else a string); a comma
    belongs to a value unless a ``key=`` follows it, so ``w:widths=[8,16]`` works.

    >>> parse_model_spec("nf_resnet56:std_conv=false,alpha=0.5")
    ('nf_resnet56', {'std_conv': False, 'alpha': 0.5})
    >>> parse_model_spec("timm:resnet18:drop_rate=0.1")
    ('timm:resnet18', {'drop_rate': 0.1})
    """
    name, sep, rest = spec.partition(":")
    if is_timm_name(spec):  # timm:<name>[:key=value,...]: the name holds the first ':'
        tail, sep, rest = rest.partition(":")
        name = f"{name}:{tail}"
    name = name.strip()
    if not name:
        raise ConfigError(f"model spec {spec!r} has no model name",
                          hint="write NAME or NAME:key=value[,key=value], e.g. "
                               "preact_resnet56:norm=none")
    if sep and not rest.strip():
        raise ConfigError(f"model spec {spec!r} has nothing after ':'", hint=_SPEC_HINT)
    items = [i.strip() for i in _SPEC_SPLIT.split(rest)] if sep else []
    try:
        kw = parse_set(items)
    except ConfigError as e:
        raise ConfigError(f"model spec {spec!r}: {e}", hint=_SPEC_HINT) from None
    return name, kw


def _model_kwargs(spec: str, name: str, own: dict, common: dict, norm: str) -> dict[str, Any]:
    """The keywords model ``name`` is built with: ``--set``, then its own ``NAME:key=value``;
    ``--norm`` for a model that takes a norm; a normalizer-free one takes none and is built
    with skipinit=False unless told (SkipInit would zero every branch at init)."""
    kw = {**common, **own}
    if model_uses_norm(name):
        kw.setdefault("norm", norm)
        if isinstance(kw["norm"], str) and not kw["norm"].strip():  # create_norm's "none"
            where = ("norm= in " + repr(spec) if "norm" in own else
                     "--set norm=" if "norm" in common else "--norm")
            raise ConfigError(f"{spec}: the norm is empty ({kw['norm']!r}, from {where}); is a "
                              "shell variable unset?", hint="name a norm (`normlab ls "
                                                            "--norms`; none: no normalization)")
        return kw
    try:
        check_norm(name, kw.pop("norm", None))
    except ValueError as e:
        raise ConfigError(str(e), hint=f"drop norm= from {spec!r}" if "norm" in own else
                          "drop --set norm=... (it applies to every model; use NAME:norm=...)"
                          ) from None
    kw.setdefault("skipinit", False)
    return kw


def _records(spec: str, common: dict, norm: str, batch: int, resolution: int,
             seed: int) -> tuple[list[dict], str]:
    """The signal propagation records of the model ``spec`` at init, and its kind
    (:func:`normlab.spp.describe`: what the report checks its curves against; ``OTHER_KIND``
    for a model it does not classify)."""
    name, own = parse_model_spec(spec)
    try:
        kw = _model_kwargs(spec, name, own, common, norm)
        torch.manual_seed(seed)
        with fits_in_memory(f"{spec}: --batch {batch} at --resolution {resolution}",
                            "lower --batch or --resolution"):
            model = create(name, **kw)
            recs = spp_mod.signal_propagation(model, batch_size=batch, image_size=resolution,
                                              seed=seed)
    except ConfigError:
        raise
    except ImportError as e:  # timm:<name> without a working timm (was a traceback)
        raise ConfigError(f"{spec}: {str(e).splitlines()[0]}",
                          hint="install timm (and a torchvision built for this torch), or pick "
                               "a normlab model (`normlab ls --models`)") from None
    except (ValueError, TypeError) as e:
        where = " (--set applies to every model; use NAME:key=value for one)" if common else ""
        # a model without residual blocks (bn_dropout_cnn, a timm EfficientNet): the blocks=
        # the error asks for are signal_propagation's, which no NAME:key=value reaches
        hint = ("this command finds the residual blocks of normlab's ResNets and of ResNets laid "
                "out as timm's (layer1..layer4); for another model name them from Python: "
                "normlab.spp.signal_propagation(model, blocks=[...])"
                if "no normlab residual blocks" in str(e) else
                "see `normlab ls --models` and the model's keywords")
        raise ConfigError(f"{spec}: {str(e).splitlines()[0]}{where}", hint=hint) from None
    return [r.as_dict() for r in recs], spp_mod.describe(model) or OTHER_KIND


def spp(
    models: list[str] = typer.Argument(
        ..., help="models, each NAME or NAME:key=value[,key=value] (keywords for that model "
                  "only, e.g. preact_resnet56:order=act_norm, preact_resnet56:norm=none, "
                  "nf_resnet56:std_conv=false)"),
    out: Path = path_option(Path(DEFAULT_OUT), help="output directory (store, figures/spp.*, "
                                                    "report.md and report.html)"),
    norm: str = typer.Option("bn", help="norm for the models that take one (NAME:norm=... "
                                        "for one model)"),
    batch: int = typer.Option(64, help="unit-Gaussian batch size"),
    resolution: int = typer.Option(32, help="input height = width"),
    seed: int = typer.Option(0, help="seed of the weights and of the input batch"),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="model keyword for every model: key=value (repeatable)"),
) -> None:
    """Signal propagation of models at initialization (Brock, De & Smith, ICLR 2021).

    Records go to OUT's store, the figure to OUT/figures/spp.png/.svg, and OUT's report
    (report.md/.html) is rewritten with every model measured into OUT: the analytic variance
    beside the measured one and a verdict for the documented shape of BN-ReLU-Conv, no
    normalization, NF + Scaled WS and NF + He init (a ReLU-BN-Conv or post-activation model is
    drawn, with no verdict row).

    Normalizer-free models (nf_*) are built with skipinit=False here: their default SkipInit
    zeroes every residual branch at init, a flat curve (nf_resnet56:skipinit=true shows it).

    BN-ReLU-Conv, ReLU-BN-Conv and NF + Scaled WS, then NF + He init and no norm, into one OUT:

    normlab spp preact_resnet56 preact_resnet56:order=act_norm nf_resnet56

    normlab spp nf_resnet56:std_conv=false preact_resnet56:norm=none
    """
    def body() -> None:
        if batch < 1 or resolution < 1:
            raise ConfigError(f"--batch and --resolution must be >= 1, got {batch}, {resolution}")
        check_seed(seed, "--seed")
        common = parse_set(set_)
        check_report_places(out)  # before measuring, not when the report is written
        records, kinds = {}, {}
        for spec in models:
            name, own = parse_model_spec(spec)
            label = spec.strip() if own else name
            if label in records:
                raise ConfigError(f"model {label!r} is listed twice",
                                  hint="give each model once (NAME:key=value tells variants apart)")
            records[label], kinds[label] = _records(spec, common, norm, batch, resolution, seed)
        with Store(out) as store:
            for label, recs in records.items():
                store.record_spp(label, recs, architecture=kinds[label], measured_on=(
                    f"batch {batch} at {resolution}x{resolution}, seed {seed}"))
        figures = subdir(out, "figures")
        with staged(figures) as stage:  # renamed into figures/: a planted link is replaced
            paths = [figures / p.name for p in spp_mod.plot(records, stage / "spp.png")]
        say(escape("spp: " + ", ".join(str(p) for p in paths)))
        print_report(out)  # every model measured into this --out, with their verdicts

    guard(body)
