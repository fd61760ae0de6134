"""Signal propagation plots (Brock, De & Smith, "Characterizing signal propagation to close the
performance gap in unnormalized ResNets", ICLR 2021, section 4).

Feed a unit-Gaussian batch through a network at initialization and, at the output of the stem and
of every residual block, for activations ``x`` of shape (N, C, *spatial):

* average channel squared mean: ``mean_c (mean_{n, spatial} x)^2``;
* average channel variance: ``mean_c Var_{n, spatial}(x)`` (biased);
* residual average channel variance: the same variance of the block's residual branch output
  before it is scaled (alpha, SkipInit) and added to the shortcut (``None`` where the measured
  module has no residual branch, e.g. the stem).

Blocks of normlab models are found automatically (every :class:`normlab.models.ResidualBlock`,
whose ``branch_out`` identity is hooked for the residual branch, and ``model.stem``), and so are
those of ResNets laid out as torchvision's and timm's (:func:`resnet_layout_blocks`: the blocks
of ``layer1`` ... ``layer4``, each branch ending at its ``se`` or last norm); for any other
``nn.Module`` pass ``blocks=[module names]``, or ``blocks={block name: branch module name}`` to
measure the residual branch too (e.g. a torchvision ResNet's ``{"layer1.0": "layer1.0.bn2",
...}``: the last module of the branch, whose output is added to the shortcut). The documented
shapes at init: BN-ReLU-Conv's variance grows within a stage and resets at transitions and its
squared mean grows with depth; ReLU-BN-Conv has no mean shift and a residual variance flat with
depth (about 2 in normlab's ResNets: a He-init conv on BN's unit-variance output); an
unnormalized He-init ResNet's squared mean explodes; an NF-ResNet with Scaled WS follows
``1 + l alpha^2`` with resets.

Where the model has an analytic variance (an NF-ResNet with Scaled WS and its residual branches
active at init: :func:`expected_variance`), each record carries it as ``expected_var`` and
:func:`plot` draws it (dashed) beside the measured variance in a fourth panel. :func:`describe`
names a model's kind (``BN-ReLU-Conv``, ``NF + Scaled WS``, ...), which the lab's report uses to
check each kind's documented shape.

Example::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from normlab import models, spp
    >>> recs = {n: spp.signal_propagation(models.create(n, skipinit=False))
    ...         for n in ("nf_resnet56",)}
    >>> out = Path(tempfile.mkdtemp()) / "spp.png"
    >>> [p.suffix for p in spp.plot(recs, out)]  # writes spp.png and spp.svg
    ['.png', '.svg']
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from normlab.models.nf_resnet import NFResNet
from normlab.models.residual import DropPath, ResidualBlock
from normlab.models.resnet import ResNet
from normlab.nn import ScaledStdConv2d

__all__ = ["SPPRecord", "channel_stats", "signal_propagation", "preserved_state", "plot",
           "expected_variance", "describe", "resnet_layout_blocks"]


@dataclass
class SPPRecord:
    """One measurement point: the output of module ``name`` at position ``depth`` (stem = 0);
    ``expected_var`` is the analytic variance there, where the model has one
    (:func:`expected_variance`), else None."""

    name: str
    depth: int
    avg_sq_mean: float
    avg_var: float
    residual_var: Optional[float]
    expected_var: Optional[float] = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def channel_stats(x: Tensor) -> tuple[float, float]:
    """``(mean_c mean_{n,s}(x)^2, mean_c Var_{n,s}(x))`` for x of shape (N, C, *spatial), in
    float64, any memory format (channels on dim 1; the biased variance)."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"expected an (N, C, *spatial) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    dims = (0,) + tuple(range(2, x.dim()))
    var, mean = torch.var_mean(x.detach().to(torch.float64), dim=dims, correction=0)
    return float((mean ** 2).mean()), float(var.mean())


def _first_tensor(out: Any, name: str) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"module {name!r} returned {type(out).__name__}, not a tensor")


def _reference_tensor(model: nn.Module) -> Optional[Tensor]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t
    return None


def _positive_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what} must be a positive int, got {v!r}")
    return v


def _branch_active(block: nn.Module) -> bool:
    """False when a block's residual branch is zero at init: a SkipInit scalar or a last-conv
    gain (``zero_init_last``) that is all zeros."""
    gains = [block.skip_gain] if getattr(block, "skip_gain", None) is not None else []
    gains += [m.gain for m in block.modules() if isinstance(m, ScaledStdConv2d)]
    return not any(bool((g == 0).all()) for g in gains)


def expected_variance(model: nn.Module) -> dict[str, float]:
    """The analytic variance of every residual block's output, by module name, for an
    NF-ResNet whose convolutions are all Scaled WS and whose residual branches are active at
    init (``skipinit=False``, no zero-init gain): ``v = 1 + k alpha^2`` for the k-th block
    since the last transition (the blocks' own ``expected_var``, :mod:`normlab.models.nf_resnet`).
    Empty for any other model: with He-init convs, or with branches zeroed, the formula does not
    describe it; nor with the ImageNet stem, whose max pool's output (mean ~1.5, variance ~0.36)
    is not the zero-mean unit-variance ``v_0 = 1`` the formula starts from.

    >>> from normlab import models
    >>> v = expected_variance(models.create("nf_resnet20", skipinit=False))
    >>> [round(v[k], 2) for k in ("stages.0.0", "stages.0.2", "stages.1.0")]
    [1.04, 1.12, 1.04]
    >>> expected_variance(models.create("nf_resnet20"))  # SkipInit: every branch starts at 0
    {}
    """
    if not isinstance(model, NFResNet):
        return {}
    if not all(isinstance(m, ScaledStdConv2d) for m in model.modules()
               if isinstance(m, nn.Conv2d)):
        return {}
    if any(isinstance(m, nn.MaxPool2d) for m in model.stem.modules()):
        return {}
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, ResidualBlock)]
    if not all(_branch_active(m) for _, m in blocks):
        return {}
    return {n: float(m.expected_var) for n, m in blocks}


def _norm_short(model: nn.Module) -> Optional[str]:
    """BN, GN, LN, IN, ... of the first normalization layer inside the residual blocks (None:
    no normalization layer)."""
    for block in model.modules():
        if not isinstance(block, ResidualBlock):
            continue
        for m in block.modules():
            name = type(m).__name__
            if "Renorm" in name:
                return "BRN"
            if "BatchNorm" in name:
                return "BN"
            if "GroupNorm" in name:
                return "LN" if getattr(m, "num_groups", 0) == 1 else "GN"
            if "InstanceNorm" in name:
                return "IN"
            if "LayerNorm" in name:
                return "LN"
    return None


def describe(model: nn.Module) -> Optional[str]:
    """The kind of a normlab ResNet for the signal-propagation claims: ``BN-ReLU-Conv`` /
    ``ReLU-BN-Conv`` (pre-activation, by order; the norm's short name), ``Conv-BN-ReLU``
    (post-activation), ``no normalization (He init)``, ``NF + Scaled WS`` or ``NF + He init``;
    None for a model normlab does not know.

    >>> from normlab import models
    >>> describe(models.create("preact_resnet20")), describe(models.create("nf_resnet20"))
    ('BN-ReLU-Conv', 'NF + Scaled WS')
    """
    if isinstance(model, NFResNet):
        scaled = all(isinstance(m, ScaledStdConv2d) for m in model.modules()
                     if isinstance(m, nn.Conv2d))
        return "NF + Scaled WS" if scaled else "NF + He init"
    if not isinstance(model, ResNet):
        return None
    norm = _norm_short(model)
    if norm is None:
        return "no normalization (He init)"
    if not model.preact:
        return f"Conv-{norm}-ReLU"
    return f"{norm}-ReLU-Conv" if model.order == "norm_act" else f"ReLU-{norm}-Conv"


def signal_propagation(
    model: nn.Module,
    x: Optional[Tensor] = None,
    *,
    batch_size: int = 64,
    image_size: Union[int, Sequence[int]] = 32,
    in_chans: Optional[int] = None,
    blocks: Optional[Union[Sequence[str], Mapping[str, Optional[str]]]] = None,
    training: bool = True,
    channels_last: bool = False,
    seed: int = 0,
) -> list[SPPRecord]:
    """Measure a signal propagation plot's statistics for ``model``.

    Args:
        model: any ``nn.Module`` taking (N, C, H, W).
        x: the input batch; default a unit-Gaussian (batch_size, in_chans, H, W) batch drawn from
            ``seed`` on the model's device and dtype.
        batch_size, image_size, in_chans: the default batch's shape (``in_chans`` defaults to
            ``model.in_chans`` or 3).
        blocks: module names to measure, in place of the automatic stem + residual blocks; or a
            mapping from those names to the name of the module whose output is that block's
            residual branch before it is scaled and added (``None``: no branch). A listed normlab
            :class:`ResidualBlock` is measured through its ``branch_out`` either way.
        training: run normalization layers in training mode (batch statistics, as at the start
            of training; default) or eval mode. Dropout and stochastic depth are always off.
            The model's modes and every buffer (BN running statistics) are restored afterwards.
        channels_last: make the batch (the default one or ``x``) channels_last.
        seed: seed of the default batch.

    ``x`` is moved to the device of the model's first floating-point parameter or buffer.

    Returns: one :class:`SPPRecord` per measured module in the order the forward pass reached
    them (a module called twice is recorded once, at its first call). Depth is 0 for the stem
    and counts up; with ``blocks=`` it is the position in that order.
    """
    _check_flags(model, training, channels_last)
    modules = dict(model.named_modules())
    chosen, branch_names = _measured_modules(model, modules, blocks)
    x = _input_batch(model, x, batch_size, image_size, in_chans, channels_last, seed)
    rec = _Recorder(expected_variance(model))
    with preserved_state(model), rec.hooked(modules, chosen, branch_names):
        _measuring_mode(model, training)
        with torch.no_grad():
            model(x)
    missing = [n for n in chosen if n not in rec.seen]
    if missing:
        raise ValueError(f"modules {missing!r} were not called by the forward pass")
    return rec.records


def _check_flags(model: Any, training: Any, channels_last: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {training!r}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {channels_last!r}")


def _measured_modules(model: nn.Module, modules: dict[str, nn.Module],
                      blocks: Optional[Union[Sequence[str], Mapping[str, Optional[str]]]]
                      ) -> tuple[list[str], dict[str, str]]:
    """(the names of the modules to measure, {block name: its residual branch's module name})."""
    if blocks is None:
        chosen = [n for n, m in modules.items() if isinstance(m, ResidualBlock)]
        if not chosen:
            layout = resnet_layout_blocks(modules)
            if layout:
                return list(layout), {k: v for k, v in layout.items() if v is not None}
            raise ValueError(
                f"{type(model).__name__} has no normlab residual blocks; pass blocks=[module "
                f"names], e.g. {[n for n in modules if n][:5]}"
            )
        stem = getattr(model, "stem", None)
        if isinstance(stem, nn.Module):
            chosen.insert(0, next(n for n, m in modules.items() if m is stem))
        return chosen, {}
    branch_names = ({k: v for k, v in blocks.items() if v is not None}
                    if isinstance(blocks, Mapping) else {})
    chosen = [blocks] if isinstance(blocks, str) else list(blocks)
    if not chosen:
        raise ValueError("blocks must name at least one module")
    bad = [b for b in chosen + list(branch_names.values())
           if not isinstance(b, str) or b not in modules]
    if bad:
        raise ValueError(f"blocks {bad!r} are not module names of {type(model).__name__}")
    return chosen, branch_names


def resnet_layout_blocks(modules: Mapping[str, nn.Module]) -> dict[str, Optional[str]]:
    """The blocks of a ResNet laid out as torchvision's and timm's are (stages ``layer1`` ...
    ``layer4``, each an ``nn.Sequential`` of residual blocks, after a stem that ends in
    ``maxpool``): ``{"maxpool": None, "layer1.0": "layer1.0.bn2", ...}``, each block mapped to
    the end of its residual branch (its ``se`` module where it has one, else its last norm:
    ``bn3`` of a bottleneck, ``bn2`` of a basic block, whatever norm a conversion put there);
    empty for any other model."""
    stages = [f"layer{i}" for i in range(1, 5)
              if isinstance(modules.get(f"layer{i}"), nn.Sequential)]
    if not stages or stages[0] != "layer1":
        return {}
    out: dict[str, Optional[str]] = {"maxpool": None} if "maxpool" in modules else {}
    for stage in stages:
        for child, _ in modules[stage].named_children():
            block = f"{stage}.{child}"
            ends = [f"{block}.{n}" for n in ("se", "bn3", "bn2")]
            out[block] = next((e for e in ends if isinstance(modules.get(e), nn.Module)), None)
    return out


def _input_batch(model: nn.Module, x: Optional[Tensor], batch_size: int,
                 image_size: Union[int, Sequence[int]], in_chans: Optional[int],
                 channels_last: bool, seed: int) -> Tensor:
    """``x`` on the model's device, or the default unit-Gaussian batch drawn from ``seed``."""
    ref = _reference_tensor(model)
    if x is None:
        _positive_int(batch_size, "batch_size")
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(hw) != 2:
            raise ValueError(f"image_size must be an int or an (H, W) pair, got {image_size!r}")
        for s in hw:
            _positive_int(s, "image_size")
        c = in_chans if in_chans is not None else getattr(model, "in_chans", 3)
        _positive_int(c, "in_chans")
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, c, *hw, generator=gen).to(
            device=ref.device if ref is not None else torch.device("cpu"),
            dtype=ref.dtype if ref is not None else torch.float32)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if ref is not None:
        x = x.to(ref.device)
    if channels_last:
        if x.dim() != 4:
            raise ValueError(f"channels_last needs a 4-d x, got shape {tuple(x.shape)}")
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Every module's training mode and every buffer (BN running statistics) of ``model`` as
    they were before the block, whatever it ran. Buffers are restored in place, and put back if
    the block assigned a new tensor to the attribute (``self.running_mean = ...``)."""
    modes = {m: m.training for m in model.modules()}
    saved = [(m, k, b, b.detach().clone()) for m in model.modules()
             for k, b in m._buffers.items() if b is not None]
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for m, k, b, v in saved:
                b.copy_(v)
                m._buffers[k] = b


def _measuring_mode(model: nn.Module, training: bool) -> None:
    """Normalization layers in training (batch statistics) or eval mode; dropout and stochastic
    depth off."""
    model.train(training)
    for m in model.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, DropPath)):
            m.eval()


class _Recorder:
    """Forward hooks that record each measured module's output statistics (at its first call)
    and its residual branch's variance; ``analytic``: the expected variance by module name."""

    def __init__(self, analytic: Mapping[str, float]) -> None:
        self.analytic = analytic
        self.records: list[SPPRecord] = []
        self.seen: set[str] = set()
        self.residual: dict[str, float] = {}

    def block_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if name in self.seen:
                return
            self.seen.add(name)
            sq, var = channel_stats(_first_tensor(out, name))
            self.records.append(SPPRecord(name, len(self.records), sq, var,
                                          self.residual.pop(name, None),
                                          self.analytic.get(name)))
        return hook

    def branch_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if name not in self.seen and name not in self.residual:
                self.residual[name] = channel_stats(_first_tensor(out, name))[1]
        return hook

    @contextlib.contextmanager
    def hooked(self, modules: dict[str, nn.Module], chosen: list[str],
               branch_names: dict[str, str]) -> Iterator[None]:
        """The hooks on the ``chosen`` modules and their branches while the block runs."""
        handles = []
        try:
            for n in chosen:
                m = modules[n]
                handles.append(m.register_forward_hook(self.block_hook(n)))
                branch = (modules[branch_names[n]] if n in branch_names
                          else getattr(m, "branch_out", None))
                if isinstance(branch, nn.Module):
                    handles.append(branch.register_forward_hook(self.branch_hook(n)))
            yield
        finally:
            for h in handles:
                h.remove()


def _get(rec: Any, key: str) -> Any:
    return rec[key] if isinstance(rec, Mapping) else getattr(rec, key)


def _analytic_panel(ax: Any, records_by_model: Mapping[str, Sequence[Any]],
                    colors: Mapping[str, str]) -> None:
    """Measured variance (solid) beside the analytic one (dashed), linear scale, for the models
    whose records carry ``expected_var``."""
    for model_name, recs in records_by_model.items():
        pts = [(_get(r, "depth"), _get(r, "avg_var"), _optional(r, "expected_var"))
               for r in recs]
        pts = [p for p in pts if p[2] is not None and p[1] is not None and math.isfinite(p[1])]
        if not pts:
            continue
        d, measured, expected = zip(*pts)
        ax.plot(d, measured, marker=".", markersize=3, linewidth=1.2, color=colors[model_name],
                label=f"{model_name}: measured")
        ax.plot(d, expected, linestyle="--", linewidth=1.2, color=colors[model_name],
                label=f"{model_name}: analytic")
    ax.set_ylim(bottom=0)
    ax.set_title("variance: measured vs analytic 1 + k alpha^2", fontsize=10)
    ax.legend(fontsize=8)


def _optional(rec: Any, key: str) -> Any:
    """``rec``'s ``key``, or None where the record has none (e.g. no ``expected_var``)."""
    try:
        return _get(rec, key)
    except (KeyError, AttributeError):
        return None


_PANELS = (("avg_sq_mean", "average channel squared mean"),
           ("avg_var", "average channel variance"),
           ("residual_var", "residual average channel variance"))


def plot(records_by_model: Mapping[str, Sequence[Any]], path: Union[str, Path], *,
         title: Optional[str] = None,
         ylim: Optional[tuple[float, float]] = None) -> list[Path]:
    """Draw the three SPP panels (squared mean, variance, residual variance against depth), one
    line per model (one colour per model in every panel), and save ``path`` as PNG and SVG (the
    suffix of ``path``, if .png or .svg, is replaced). Records are :class:`SPPRecord` or dicts
    with the same keys; where they carry an ``expected_var``, a fourth panel draws the measured
    variance beside it (dashed, "analytic") on a linear scale. Log y-axes in the other panels
    (symlog where a value is 0 or negative). Uses matplotlib's Agg canvas, never pyplot.

    ``ylim`` fixes the y-range of all three panels (a curve that explodes then leaves the top
    instead of flattening the others). Returns the two written paths.
    """
    if not isinstance(records_by_model, Mapping):
        raise TypeError(f"records_by_model must be a mapping of model name -> records, got "
                        f"{type(records_by_model).__name__}")
    if not records_by_model:
        raise ValueError("records_by_model must be a non-empty mapping of model name -> records")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or a Path, got {type(path).__name__}: {path!r}")
    _check_records(records_by_model)
    # matplotlib is imported here, not at the top: `import normlab` imports this module
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import matplotlib

    base = Path(path)
    if base.suffix.lower() in (".png", ".svg"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.hashsalt": "normlab-spp", "svg.fonttype": "path"}):
        analytic = [m for m, recs in records_by_model.items()
                    if any(_optional(r, "expected_var") is not None for r in recs)]
        fig = Figure(figsize=(20 if analytic else 15, 4.2))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 4 if analytic else 3)
        cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        colors = {m: cycle[i % len(cycle)] for i, m in enumerate(records_by_model)}
        for ax, (key, label) in zip(axes, _PANELS):
            _draw_panel(ax, records_by_model, key, label, ylim, colors)
        axes[0].legend(fontsize=8)
        if analytic:
            _analytic_panel(axes[3], {m: records_by_model[m] for m in analytic}, colors)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        # append (not replace) the suffix: "out/run.v2" -> "out/run.v2.png"
        out = [base.parent / (base.name + ".png"), base.parent / (base.name + ".svg")]
        fig.savefig(out[0], dpi=120, metadata={"Software": None})
        fig.savefig(out[1], metadata={"Date": None})
    return out


def _check_records(records_by_model: Mapping[str, Sequence[Any]]) -> None:
    for model_name, recs in records_by_model.items():
        if isinstance(recs, (str, bytes)) or not isinstance(recs, Sequence) or not recs:
            raise ValueError(f"model {model_name!r}: expected a non-empty sequence of records, "
                             f"got {recs!r:.80}")
        for i, r in enumerate(recs):
            for key in ("depth",) + tuple(k for k, _ in _PANELS):
                try:
                    _get(r, key)
                except (KeyError, AttributeError, TypeError):
                    raise ValueError(f"model {model_name!r}: record {i} has no {key!r} "
                                     f"(records are SPPRecord or dicts with depth, "
                                     f"avg_sq_mean, avg_var, residual_var)") from None


def _draw_panel(ax: Any, records_by_model: Mapping[str, Sequence[Any]], key: str, label: str,
                ylim: Optional[tuple[float, float]], colors: Mapping[str, str]) -> None:
    """One panel: statistic ``key`` against depth, one line per model in its colour."""
    values = []
    for model_name, recs in records_by_model.items():
        pts = [(_get(r, "depth"), _get(r, key)) for r in recs]
        pts = [(d, v) for d, v in pts if v is not None and math.isfinite(v)]
        if not pts:
            continue
        d, v = zip(*pts)
        values.extend(v)
        ax.plot(d, v, marker=".", markersize=3, linewidth=1.2, label=model_name,
                color=colors[model_name])
    if values and min(values) > 0:
        ax.set_yscale("log")
    elif values:
        ax.set_yscale("symlog", linthresh=1e-3)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("depth (stem = 0, then residual blocks)")
    ax.set_title(label, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
