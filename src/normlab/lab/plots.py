"""Figures for the studies, drawn from the results store only (matplotlib, PNG + SVG).

* ``<study>_error``: final test error (mean over seeds, bars = one standard deviation, clipped to
  [0, 100]) against the study's axis, one line per series, beside the paper's numbers when there are any. For the
  batch-size studies the x axis runs from 32 down to 2 images per batch, as in Figure 1 of Wu & He,
  "Group Normalization" (ECCV 2018). ``norms`` is a bar chart; ``bn-dropout`` a 4 x 3 grid.
* ``<study>_curves``: test error against epoch (mean over seeds), one panel per x value.

The statistics are the report tables': :func:`normlab.lab.analysis.point_stats`, so a run the
analysis flags (diverged, or unconverged: it did not learn) is left out of every mean and bar
here as it is there, and the figure's title counts the runs left out.

A series has one colour in every panel and figure of a study (its place in the study's variant
list), log2 axes are ticked at the measured values written as integers, error bars stop at 0
and 100 (an error rate is a percentage), and text on the bn-dropout heatmap is black or white by the
brightness of its cell.

Example, on the output directory of a ``normlab reproduce`` run::

    >>> from normlab.lab.studies import get_study
    >>> store = Store("normlab-out", create=False)  # doctest: +SKIP
    >>> paths = plot_study(store, get_study("batch-size"), Path("normlab-out/figures"))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
# the figures draw stored text (labels, model names): a '$' in it is a dollar sign, never
# mathtext that matplotlib parses (an unknown command in it made the report fail)
matplotlib.rcParams["text.parse_math"] = False
# a figure drawn twice from one store is the same file: SVG ids from a fixed salt (not a random
# one per process) and no creation date (save's metadata)
matplotlib.rcParams["svg.hashsalt"] = "normlab"
import matplotlib.pyplot as plt  # noqa: E402

from normlab.lab.analysis import flags_text, point_stats, run_flag  # noqa: E402
from normlab.lab.outfiles import write_via  # noqa: E402
from normlab.lab.store import Store  # noqa: E402
from normlab.lab.studies import Study  # noqa: E402

__all__ = ["plot_study", "save"]


def save(fig: Any, out_dir: Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` under out_dir (each through a new file renamed into
    place: :mod:`normlab.lab.outfiles`); close the figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        p = out_dir / f"{stem}.{ext}"
        write_via(p, lambda f: fig.savefig(f, format=ext, dpi=130 if ext == "png" else None,
                                           bbox_inches="tight", metadata={"Date": None}))
        paths.append(p)
    plt.close(fig)
    return paths


def _kept(stats: dict) -> dict:
    """The points with at least one run that counts (a point whose runs are all flagged has no
    mean to draw)."""
    return {k: s for k, s in stats.items() if s["n"] > 0}


def _yerr(points: list[dict]) -> list[list[float]]:
    """[lower, upper] error-bar lengths of the points' ``bar`` (mean ± sd within [0, 100])."""
    return [[s["mean"] - s["bar"][0] for s in points], [s["bar"][1] - s["mean"] for s in points]]


def _flagged_note(stats: dict) -> str:
    """``; left out: 1 diverged, 2 unconverged`` (the flagged runs of the figure), or ``""``."""
    text = flags_text([e for s in stats.values() for e in s["excluded"]])
    return f"; left out: {text}" if text else ""


def _seeds(stats: dict) -> str:
    """Seeds per point that count: ``3`` or ``2-3``."""
    ns = sorted({s["n"] for s in _kept(stats).values()})
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def _series(stats: dict, label: str) -> tuple[list, list, list]:
    """xs, means and [lower, upper] error bars of the series' points that have runs counting."""
    pts = sorted((x, s) for (lab, x), s in _kept(stats).items() if lab == label)
    return [p[0] for p in pts], [p[1]["mean"] for p in pts], _yerr([p[1] for p in pts])


def _colors(study: Study, labels: list[str]) -> dict[str, Any]:
    """One colour per series for every panel of the study: its index among the study's variants
    (series outside them follow), in matplotlib's default cycle."""
    order = list(study.variants) + [lab for lab in labels if lab not in study.variants]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {lab: cycle[order.index(lab) % len(cycle)] for lab in labels}


def _fmt_x(x: Any) -> str:
    """An axis value as written in the study: 1, 2, 32, 0.4 (never 1.0 or 32.0)."""
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _log2_axis(ax: Any, xs: list, inverted: bool) -> None:
    """Log2 x axis ticked at the measured values ``xs`` only, labelled as integers."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(xs))
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([_fmt_x(x) for x in ticks]))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if inverted:
        ax.invert_xaxis()


def _labels(runs: list[dict], study: Study) -> list[str]:
    """The series of ``runs`` in the study's variant order (others after, as first run)."""
    seen: list[str] = []
    for r in runs:
        if r["label"] not in seen:
            seen.append(r["label"])
    order = list(study.variants)
    return sorted(seen, key=lambda lab: (order.index(lab) if lab in order else len(order),
                                         seen.index(lab)))


def _error_plot(study: Study, runs: list[dict], stats: dict, out_dir: Path) -> list[Path]:
    labels = _labels(runs, study)
    paper = {k: {x: v for x, v in d.items() if isinstance(v, (int, float))}
             for k, d in study.paper.items()}
    paper = {k: paper[k] for k in labels if paper.get(k)}  # this run's series order
    colors = _colors(study, labels)
    fig, axes = plt.subplots(1, 2 if paper else 1, figsize=(5.2 * (2 if paper else 1), 3.8),
                             squeeze=False)
    ax = axes[0, 0]
    xs_run: list = []
    for label in labels:
        xs, ms, bars = _series(stats, label)
        if xs:
            ax.errorbar(xs, ms, yerr=bars, marker="o", capsize=3, label=label,
                        color=colors[label])
            xs_run += xs
    ax.set_ylim(bottom=0)
    cfg = runs[0]["config"]
    model = "/".join(sorted({str(r["config"].get("model", "?")) for r in runs}))
    worlds = sorted({int(r["config"].get("world_size", 1)) for r in runs})
    procs = "" if worlds == [1] else f", {'/'.join(map(str, worlds))} processes"
    ax.set_title(f"this run: {model} on {cfg.get('data', '?')}, {cfg.get('epochs', '?')} "
                 f"epochs{procs}\n"
                 f"mean ± sd over {_seeds(stats)} seed(s){_flagged_note(stats)}", fontsize=9)
    panels = [(ax, "test error (%)", xs_run)]
    if paper:
        pax = axes[0, 1]
        for label, d in paper.items():
            xs = sorted(d)
            pax.plot(xs, [d[x] for x in xs], marker="s", linestyle="--", label=label,
                     color=colors[label])
        pax.set_title("paper (ResNet-50, ImageNet)", fontsize=9)
        panels.append((pax, "val error (%)", [x for d in paper.values() for x in d]))
    for a, ylabel, xs in panels:
        a.set_xlabel(study.axis)
        a.set_ylabel(ylabel)
        if study.x_log2:
            _log2_axis(a, xs, inverted=study.x_descending)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(study.title, fontsize=10, y=1.06)
    return save(fig, out_dir, f"{study.name}_error")


def _bar_plot(study: Study, runs: list[dict], stats: dict, out_dir: Path) -> list[Path]:
    """One bar per series at the study's single x; the paper's number written above each bar's
    error bar, with head room so no label reaches the title."""
    x = next(iter(study.xs["default"]))
    kept = _kept(stats)
    labels = [lab for lab in _labels(runs, study) if (lab, x) in kept]
    colors = _colors(study, labels)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    points = [kept[(lab, x)] for lab in labels]
    ms = [s["mean"] for s in points]
    highs = [s["bar"][1] for s in points]
    ax.bar(labels, ms, yerr=_yerr(points), capsize=4, color=[colors[lab] for lab in labels],
           alpha=0.85)
    top = max(highs, default=1.0)
    for i, lab in enumerate(labels):
        pv = study.paper.get(lab, {}).get(x)
        if isinstance(pv, (int, float)):
            ax.annotate(f"paper {pv}", (i, highs[i]), textcoords="offset points",
                        xytext=(0, 4), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, top * 1.18 if top > 0 else 1.0)   # room for the labels above the bars
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{study.title}\nthis run (bars: mean ± sd over seeds{_flagged_note(stats)}); "
                 "labels: the paper's ImageNet numbers", fontsize=8, pad=8)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, out_dir, f"{study.name}_error")


def _text_color(rgba: tuple) -> str:
    """Black on light cells, white on dark ones (relative luminance, ITU-R BT.709)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def _grid_plot(study: Study, runs: list[dict], stats: dict, out_dir: Path) -> list[Path]:
    rows = [lab for lab in study.default_variants if any(k[0] == lab for k in stats)]
    cols = sorted({k[1] for k in stats})
    grid = [[stats.get((r, c), {}).get("mean", math.nan) for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.8))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            s = stats.get((r, c))
            if s and s["n"] > 0:
                sd = f"\n±{s['sd']:.1f}" if s["sd"] is not None else ""
                ax.text(j, i, f"{s['mean']:.1f}{sd}", ha="center", va="center", fontsize=8,
                        color=_text_color(im.cmap(im.norm(s["mean"]))))
            elif s:  # every run flagged: no mean, say why
                ax.text(j, i, flags_text(s["excluded"]), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), [_fmt_x(c) for c in cols])
    ax.set_yticks(range(len(rows)), [f"BN: {r}" for r in rows])
    ax.set_xlabel("dropout")
    fig.colorbar(im, ax=ax, label="test error (%)")
    ax.set_title(study.title + _flagged_note(stats).replace(";", "\n", 1), fontsize=9)
    return save(fig, out_dir, f"{study.name}_error")


def _panel_title(study: Study, x: Any, xs: list) -> str:
    """``images per process = 2``, ``G or C/G = 8`` (the axis without its parenthesized
    glosses); a study with one x names it in its axis ("batch 32")."""
    return study.axis if len(xs) == 1 else f"{re.sub(r' [(][^)]*[)]', '', study.axis)} = {_fmt_x(x)}"


_PANELS_PER_ROW = 6


def _curves_plot(study: Study, runs: list[dict], out_dir: Path) -> Optional[list[Path]]:
    """Test error per epoch, a panel per x (rows of at most :data:`_PANELS_PER_ROW`: every x
    is drawn, the groups study's 7 included)."""
    xs = sorted({r["x"] for r in runs if r["history"]}, reverse=study.x_descending)
    if not xs:
        return None
    labels = _labels(runs, study)
    colors = _colors(study, labels)
    cols = min(len(xs), _PANELS_PER_ROW)
    rows = -(-len(xs) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False,
                             sharey=True)
    axes = grid.reshape(1, -1)
    for ax in axes[0][len(xs):]:  # the last row's empty places
        ax.set_visible(False)
    for ax, x in zip(axes[0], xs):
        for label in labels:
            hs = [r["history"] for r in runs if r["label"] == label and r["x"] == x and r["history"]]
            if not hs:
                continue
            n = min(len(h) for h in hs)
            mean = [sum(h[e]["test_error"] for h in hs) / len(hs) for e in range(n)]
            ax.plot(range(1, n + 1), mean, marker=".", label=label, color=colors[label])
        ax.set_title(_panel_title(study, x, xs), fontsize=8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test error (%)")
    axes[0, 0].legend(fontsize=7)
    return save(fig, out_dir, f"{study.name}_curves")


def plot_study(store: Store, study: Study, out_dir: Path, preset: Optional[str] = None) -> list[Path]:
    """Draw the study's figures from ``store`` into ``out_dir``; returns the written paths (empty
    when the study has no finished run that counts)."""
    runs = store.study_runs(study.name, preset)
    stats = point_stats(runs)
    if not _kept(stats):
        return []
    figure = {"bars": _bar_plot, "grid": _grid_plot, "lines": _error_plot}[study.figure]
    paths = figure(study, runs, stats, out_dir)
    counted = [r for r in runs if r["status"] == "done" and not run_flag(r)]
    paths += _curves_plot(study, counted, out_dir) or []
    return paths
