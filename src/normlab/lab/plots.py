"""Figures for the studies, drawn from the results store only (matplotlib, PNG + SVG).

* ``<study>_error``: final test error (mean over seeds, bars = one standard deviation) against the
  study's axis, one line per series, beside the paper's numbers when there are any. For the
  batch-size studies the x axis runs from 32 down to 2 images per batch, as in Figure 1 of Wu & He,
  "Group Normalization" (ECCV 2018). ``norms`` is a bar chart; ``bn-dropout`` a 4 x 3 grid.
* ``<study>_curves``: test error against epoch (mean over seeds), one panel per x value.

Example, on the output directory of a ``normlab reproduce`` run::

    >>> from normlab.lab.studies import get_study
    >>> store = Store("normlab-out", create=False)  # doctest: +SKIP
    >>> paths = plot_study(store, get_study("batch-size"), Path("normlab-out/figures"))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from normlab.lab.store import Store, summarize  # noqa: E402
from normlab.lab.studies import Study  # noqa: E402

__all__ = ["plot_study", "save"]


def save(fig: Any, out_dir: Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` under out_dir; close the figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        p = out_dir / f"{stem}.{ext}"
        fig.savefig(p, dpi=130 if ext == "png" else None, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    return paths


def _series(stats: dict, label: str) -> tuple[list, list, list]:
    pts = sorted((x, s) for (lab, x), s in stats.items() if lab == label)
    return [p[0] for p in pts], [p[1]["mean"] for p in pts], [p[1]["sd"] or 0.0 for p in pts]


def _labels(runs: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in runs:
        if r["label"] not in seen:
            seen.append(r["label"])
    return seen


def _error_plot(study: Study, runs: list[dict], stats: dict, out_dir: Path) -> list[Path]:
    labels = _labels(runs)
    paper = {k: {x: v for x, v in d.items() if isinstance(v, (int, float))}
             for k, d in study.paper.items()}
    paper = {k: d for k, d in paper.items() if d and k in labels}
    ncols = 2 if paper else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.8), squeeze=False)
    ax = axes[0, 0]
    for label in labels:
        xs, ms, sds = _series(stats, label)
        if xs:
            ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=label)
    cfg = runs[0]["config"]
    seeds = max(s["n"] for s in stats.values())
    model = "/".join(sorted({r["config"]["model"] for r in runs}))
    worlds = sorted({int(r["config"].get("world_size", 1)) for r in runs})
    procs = "" if worlds == [1] else f", {'/'.join(map(str, worlds))} processes"
    ax.set_title(f"this run: {model} on {cfg['data']}, {cfg['epochs']} epochs{procs}\n"
                 f"mean ± sd over {seeds} seed(s)", fontsize=9)
    panels = [(ax, "test error (%)")]
    if paper:
        pax = axes[0, 1]
        for label, d in paper.items():
            xs = sorted(d)
            pax.plot(xs, [d[x] for x in xs], marker="s", linestyle="--", label=label)
        pax.set_title("paper (ResNet-50, ImageNet)")
        panels.append((pax, "val error (%)"))
    for a, ylabel in panels:
        a.set_xlabel(study.axis)
        a.set_ylabel(ylabel)
        if study.x_log2:
            a.set_xscale("log", base=2)
            a.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            if study.name in ("batch-size", "nf"):
                a.invert_xaxis()
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(study.title, fontsize=10, y=1.06)
    return save(fig, out_dir, f"{study.name}_error")


def _bar_plot(study: Study, runs: list[dict], stats: dict, out_dir: Path) -> list[Path]:
    labels = [lab for lab in _labels(runs) if any(k[0] == lab for k in stats)]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ms = [stats[(lab, 32)]["mean"] for lab in labels]
    sds = [stats[(lab, 32)]["sd"] or 0.0 for lab in labels]
    ax.bar(labels, ms, yerr=sds, capsize=4, color="tab:blue", alpha=0.8, label="this run")
    for i, lab in enumerate(labels):
        pv = study.paper.get(lab, {}).get(32)
        if isinstance(pv, (int, float)):
            ax.annotate(f"paper {pv}", (i, ms[i]), textcoords="offset points", xytext=(0, 12),
                        ha="center", fontsize=7)
    ax.set_ylabel("test error (%)")
    ax.set_title(study.title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, out_dir, f"{study.name}_error")


def _grid_plot(study: Study, runs: list[dict], stats: dict, out_dir: Path) -> list[Path]:
    rows = [lab for lab in study.default_variants if any(k[0] == lab for k in stats)]
    cols = sorted({k[1] for k in stats})
    grid = [[stats.get((r, c), {}).get("mean", math.nan) for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.8))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            s = stats.get((r, c))
            if s:
                sd = f"\n±{s['sd']:.1f}" if s["sd"] is not None else ""
                ax.text(j, i, f"{s['mean']:.1f}{sd}", ha="center", va="center", fontsize=8,
                        color="white")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [f"BN: {r}" for r in rows])
    ax.set_xlabel("dropout")
    fig.colorbar(im, ax=ax, label="test error (%)")
    ax.set_title(study.title, fontsize=9)
    return save(fig, out_dir, f"{study.name}_error")


def _curves_plot(study: Study, runs: list[dict], out_dir: Path) -> Optional[list[Path]]:
    xs = sorted({r["x"] for r in runs if r["history"]}, reverse=study.name in ("batch-size", "nf"))
    if not xs:
        return None
    xs = xs[:6]
    fig, axes = plt.subplots(1, len(xs), figsize=(3.2 * len(xs), 3.0), squeeze=False, sharey=True)
    for ax, x in zip(axes[0], xs):
        for label in _labels(runs):
            hs = [r["history"] for r in runs if r["label"] == label and r["x"] == x and r["history"]]
            if not hs:
                continue
            n = min(len(h) for h in hs)
            mean = [sum(h[e]["test_error"] for h in hs) / len(hs) for e in range(n)]
            ax.plot(range(1, n + 1), mean, marker=".", label=label)
        ax.set_title(f"{study.axis}: {x}", fontsize=8)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test error (%)")
    axes[0, 0].legend(fontsize=7)
    return save(fig, out_dir, f"{study.name}_curves")


def plot_study(store: Store, study: Study, out_dir: Path, preset: Optional[str] = None) -> list[Path]:
    """Draw the study's figures from ``store`` into ``out_dir``; returns the written paths (empty
    when the study has no finished run)."""
    runs = store.study_runs(study.name, preset)
    stats = summarize(runs)
    if not stats:
        return []
    if study.name == "norms":
        paths = _bar_plot(study, runs, stats, out_dir)
    elif study.name == "bn-dropout":
        paths = _grid_plot(study, runs, stats, out_dir)
    else:
        paths = _error_plot(study, runs, stats, out_dir)
    paths += _curves_plot(study, [r for r in runs if r["status"] == "done"], out_dir) or []
    return paths
