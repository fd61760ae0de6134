"""The report's opening section, ``## Summary``: which normalization had the lowest test error
at each batch size measured on this data and model, by how much and with what confidence, beside
what the papers found; and what each normalization cost in the same runs.

It reads the studies whose series are normalizations and whose axis is the batch per process,
or BN's statistics batch inside a fixed SGD batch (stats-batch: there GN, which takes no
statistics over the batch, is one run that stands at every statistics batch;
:data:`SUMMARY_STUDIES`), one table each (their setups differ: epochs, seeds), then the answer
of each study that asks for one setting (:data:`SETTING_STUDIES`: the groups study's G groups
or C/G channels per group, bn-dropout's configuration): the setting with the lowest error, the
next lowest and how sure, beside the paper's.

Confidence. At one batch size let a be the series with the lowest mean error and b the next
lowest; ``d = m_b - m_a`` and its half-width ``h`` follow the verdicts' rule
(:mod:`normlab.lab.analysis`: Student's t times the standard error, from the spread over seeds,
floored). The table gives ``d ± h``, the probability that a is really lower (from the same t
distribution), and calls the gap *decisive* when ``d > h``, as the verdicts do, at the study's
level (the sequential one when its power rounds could look after each added seed). Where a
point has one seed there is no spread: only ``d`` is shown, never decisive. A series whose
every run at that batch size was flagged (diverged, unconverged) has no mean to rank: the row
names it and its flags.

Cost, measured in the same runs: training images per second (the run's training images over its
training time, mean over the seeds that count: flagged runs are left out, as in the error
tables, and counted in the cell), peak memory in MiB (:mod:`normlab.lab.memory`: on CUDA the
allocator's peak, on the CPU the tensor bytes of a training step) and, where recorded, the
normalization backend that ran (on CUDA: triton or native). A value the store did not record is
shown as "-".
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Collection, Hashable, Optional

from normlab.factory import DEFAULT_NUM_GROUPS
from normlab.lab.analysis import (Level, flags_text, half_width_text, interval, point_stats,
                                  prob_lower, run_flag, setup_level)
from normlab.lab.config import RunConfig
from normlab.lab.markdown import md_cell
from normlab.lab.store import Store
from normlab.lab.studies import STUDIES, Study

__all__ = ["summary_lines", "SUMMARY_STUDIES", "config_values", "setup_differences",
           "emulated_devices", "device_kind"]

#: studies whose series are normalizations and whose x is the batch per process (stats-batch:
#: BN's statistics batch), in the order the summary shows them (``Study.answer`` "per_x")
SUMMARY_STUDIES = tuple(n for n, s in STUDIES.items() if s.answer == "per_x")


def _cite(study: Study) -> str:
    """The paper's short citation: its source text up to the first parenthesis or colon."""
    src = study.paper_source
    cut = min((i for i in (src.find(" ("), src.find(":")) if i > 0), default=len(src))
    return src[:cut]


def _fmt_x(x: Any) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else md_cell(x)  # stored text: inert


def _paper_cell(study: Study, x: Any, labels: list[str], here_best: str) -> str:
    """The paper's numbers at ``x`` for the series this run measured, the lowest named, and
    whether this run's lowest is the same series."""
    nums = {lab: study.paper.get(lab, {}).get(x) for lab in labels}
    nums = {lab: v for lab, v in nums.items() if isinstance(v, (int, float))}
    if not nums:
        return "-"
    ranked = sorted(nums.items(), key=lambda kv: kv[1])
    text = ", ".join(f"{md_cell(lab)} {v:.1f}" for lab, v in ranked)  # the paper's one decimal
    if len(ranked) > 1:
        gap = ranked[1][1] - ranked[0][1]
        same = "same as here" if ranked[0][0] == here_best else f"here: {md_cell(here_best)}"
        text += f": {md_cell(ranked[0][0])} lowest by {gap:.1f} ({same})"
    return text


def _left_out_text(left_out: dict[str, dict]) -> str:
    """``GN: 2 unconverged, left out``: the series whose every run at a batch size was flagged."""
    return "; ".join(f"{md_cell(lab)}: {flags_text(s['excluded'])}, left out"
                     for lab, s in left_out.items())


def _winner_row(study: Study, x: Any, points: dict[str, dict], left_out: dict[str, dict],
                level: Level) -> str:
    """``left_out``: the series at ``x`` whose every run was flagged (no mean to rank)."""
    ranked = sorted(points.items(), key=lambda kv: kv[1]["mean"])
    best, s = ranked[0]
    paper = _paper_cell(study, x, list(points), best)
    head = f"| {_fmt_x(x)} | **{md_cell(best)}** {s['mean']:.2f} (n={s['n']}) | "
    flagged = _left_out_text(left_out)
    if len(ranked) == 1:
        only = f"has runs that count ({flagged})" if flagged else "measured"
        return head + f"only {md_cell(best)} {only} | - | - | {paper} |"
    runner, r = ranked[1]
    more = f" ({flagged})" if flagged else ""
    return (head + f"{md_cell(runner)} {r['mean']:.2f} (n={r['n']}){more} | "
            f"{_gap_cells(s, r, level)} | {paper} |")


def _gap_cells(s: dict, r: dict, level: Level) -> str:
    """``d ± h | P, decisive or not``: the lowest point s against the next lowest r, h at the
    study's level."""
    d, _, h = interval(s, r, level)
    if min(s["n"], r["n"]) < 2:  # no spread measured: nothing to weigh the gap against
        return f"{d:.2f} | -, not decisive (a point has one seed: no spread; --seeds 2 or more)"
    p = prob_lower(s, r)
    conf = (">99.9%" if p > 0.999 else f"{p:.1%}") + ", " + (
        "decisive" if d - h > 0 else "not decisive (gap < t SE)")
    return f"{d:.2f} ± {half_width_text(h)} | {conf}"


def precise_bn_note(config: dict) -> str:
    """What a run's test error cell adds when it was tested with PreciseBN statistics ("" when
    not), so that two runs differing only in that do not read as one run twice."""
    b = int(config.get("precise_bn") or 0)
    return f" (PreciseBN statistics, {b} batches)" if b else ""


def precise_bn_text(runs: list[dict]) -> str:
    """How the runs' BN-type layers were tested when ``precise_bn`` was set ("" when not)."""
    counts = sorted({int(r["config"].get("precise_bn") or 0) for r in runs})
    if counts == [0]:
        return ""
    b = " / ".join(str(c) for c in counts)
    # precise_bn takes at most an epoch of the training loader: B past it is the whole epoch
    return (f"tested with PreciseBN statistics: every running statistic recomputed over {b} "
            f"training batches (all of an epoch's where it has fewer) of the trained model "
            f"(`normlab.precise_bn`, Wu & Johnson 2021) in place of the moving averages; the "
            f"training is the same as without")


def config_values(runs: list[dict], key: str, missing: str = "?") -> str:
    """Every value the runs' configs hold for ``key``, as inert text: ``nf_resnet20 /
    resnet20`` where the series train different models (the nf study); ``missing`` (``?``)
    for a config without it."""
    return md_cell(" / ".join(sorted({str(r["config"].get(key, missing)) for r in runs})))


#: config keys that tell no setup from another: a run's own (seed, label), a machine knob
_NOT_SETUP = ("seed", "label", "threads")
#: keys the emulated devices set per point (the SGD batch, ghost BN, its lr): said as "devices K"
_BY_DEVICES = ("batch_size", "norm", "norm_kwargs", "lr")
#: keys a study varies from point to point (its series and axis): two setups' runs differ in
#: them when the setups ran other points (another preset, other --variants), said only when
#: nothing else tells the setups apart
_POINT_KEYS = ("batch_size", "norm", "norm_kwargs", "model_kwargs", "ws", "lr", "agc")


def _in_order(values: Collection[str]) -> list[str]:
    """Numbers by value (``2 / 16 / 32``), then text."""
    def key(v: str) -> tuple:
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)
    return sorted(values, key=key)


def _value_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def emulated_devices(protocol: dict[str, Any]) -> int:
    """The devices a setup's protocol emulated on one process (1: none; real processes are
    the run's ``world_size``)."""
    k = protocol.get("devices")
    if "processes" in protocol or isinstance(k, bool) or not isinstance(k, int) or k < 1:
        return 1
    return k


def device_kind(recorded: Any) -> Optional[str]:
    """The kind of device a run's recorded ``device`` names (``cuda:NVIDIA H100`` -> ``cuda``,
    ``cpu (2 cores, 1 threads)`` -> ``cpu``); None when it recorded none."""
    if not isinstance(recorded, str) or not recorded.strip():
        return None
    return recorded.strip().split(":", 1)[0].split(" ", 1)[0]


def setup_differences(groups: dict[Hashable, dict[str, Any]]) -> dict[Hashable, str]:
    """What tells each setup of a study from the others, as plain text (``data synthetic,
    epochs 1``): ``groups`` maps a key to ``{"configs": [run configs], "preset": ...,
    "devices": ..., "setup": id, "ran_on": {"cpu"}}``; a key the configs differ in is named
    with its values in this group (a key missing from a stored config reads as its default),
    and the preset and emulated devices where those differ, and the kind of device the runs
    ran on (``ran_on``, optional: ``device`` "auto" is a run on the GPU where there is one, so
    a store copied from a GPU machine to a CPU one holds another setup than a re-run there). A
    group told from the others by nothing of that (its runs not claimed yet, say) is named by
    its setup id."""
    defaults = RunConfig().to_dict()
    vals: dict[Hashable, dict[str, set]] = {}
    for key, g in groups.items():
        per = vals.setdefault(key, {})
        for c in g["configs"]:
            for k in set(c) | set(defaults):
                if k not in _NOT_SETUP:
                    per.setdefault(k, set()).add(_value_text(c.get(k, defaults.get(k))))
    known = [g for g in groups.values() if g["configs"]]
    devices_differ = len({g.get("devices") for g in groups.values()}) > 1
    names = sorted({k for per in vals.values() for k in per})
    differ = [k for k in names if len({frozenset(vals[key].get(k, ())) for key, g in groups.items()
                                       if g["configs"]}) > 1
              and not (devices_differ and k in _BY_DEVICES)]
    if any(k not in _POINT_KEYS for k in differ):
        differ = [k for k in differ if k not in _POINT_KEYS]
    ran = [frozenset(g.get("ran_on") or ()) for g in known]
    if "device" in differ and len(set(ran)) == 1 and ran[0]:  # "auto" and "cpu", both on the
        differ.remove("device")  # CPU: one device (the run ids agree)
    ran_on_differ = "device" not in differ and len(
        {frozenset(g["ran_on"]) for g in groups.values() if g.get("ran_on")}) > 1
    out = {}
    for key, g in groups.items():
        parts = []
        if len({h.get("preset") for h in groups.values()}) > 1:
            parts.append(f"preset {g.get('preset')}")
        if devices_differ:
            parts.append(f"devices {g.get('devices')}")
        if g["configs"] and len(known) > 1:
            parts += [f"{k} {' / '.join(_in_order(vals[key].get(k, ())))}" for k in differ]
        if ran_on_differ and g.get("ran_on"):
            parts.append(f"ran on {' / '.join(sorted(g['ran_on']))}")
        out[key] = ", ".join(parts) or f"setup {str(g.get('setup') or '-')[:8]}"
    return out


def _setup_line(runs: list[dict], stats: dict) -> str:
    seeds = sorted({s["n"] for s in stats.values()})
    n = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    epochs = config_values(runs, "epochs")
    precise = precise_bn_text(runs)
    # plain text, not code spans: markdown shows a code span's backslash escapes as written
    # (`nf\_resnet20`), and the names are escaped (md_cell)
    return (f"{config_values(runs, 'model')} on {config_values(runs, 'data')}, "
            f"{epochs} epoch{'' if epochs == '1' else 's'}, "
            f"{n} seed(s) per point" + (f"; {precise}." if precise else "."))


def _fixed_series(study: Study) -> dict[str, Any]:
    """The series the study runs at one x only because their runs do not depend on x
    (:attr:`Study.series_xs`: stats-batch's GN, which takes no statistics over the batch), and
    that x."""
    return {lab: xs[0] for lab, xs in study.series_xs.items() if len(xs) == 1}


def _at_every_x(study: Study, all_stats: dict) -> dict:
    """The point statistics with each :func:`_fixed_series` standing at every x measured: the
    claims compare it so ("GN beats BN at statistics batch 2" is GN's one run against BN's at
    2)."""
    fixed = _fixed_series(study)
    xs = {x for lab, x in all_stats if lab not in fixed}
    out = dict(all_stats)
    for (lab, _), s in all_stats.items():
        if lab in fixed:
            out.update({(lab, x): s for x in xs if (lab, x) not in all_stats})
    return out


def _winners(study: Study, runs: list[dict], all_stats: dict, level: Level) -> list[str]:
    all_stats = _at_every_x(study, all_stats)
    stats = {k: s for k, s in all_stats.items() if s["n"] > 0}
    xs = sorted({x for _, x in all_stats}, reverse=True)
    at_each = ("BN statistics batch (the SGD batch the same in every row)"
               if study.stats_batch_axis else "batch size")
    lines = [f"### {study.name}: lowest test error at each {at_each}", "",
             _setup_line(runs, stats),
             "", f"| {study.axis} | lowest error % (this run) | next lowest | gap (± t SE) | "
             f"P(lowest is really lower) | the paper ({_cite(study)}) |",
             "|---|---|---|---|---|---|"]
    rankings = []
    for x in xs:
        points = {lab: s for (lab, xx), s in stats.items() if xx == x and s["n"] > 0
                  and math.isfinite(s["mean"])}
        left_out = {lab: s for (lab, xx), s in all_stats.items() if xx == x and s["n"] == 0}
        if points:
            lines.append(_winner_row(study, x, points, left_out, level))
        else:
            lines.append(f"| {_fmt_x(x)} | no run counts ({_left_out_text(left_out)}) | - | - | "
                         "- | - |")
        if len(points) > 2:
            ranked = sorted(points.items(), key=lambda kv: kv[1]["mean"])
            rankings.append(f"at {_fmt_x(x)}: " + " < ".join(f"{md_cell(lab)} {s['mean']:.2f}"
                                                             for lab, s in ranked))
    if rankings:
        lines += ["", "All series, lowest error first: " + "; ".join(rankings) + "."]
    for lab, x in _fixed_series(study).items():
        if any(lab == k[0] for k in stats):
            lines += ["", f"{md_cell(lab)} takes no statistics over the batch: its runs at "
                          f"{_fmt_x(x)} stand in every row (and every column of the costs)."]
    if not study.paper:
        lines += ["", f"The paper: {study.paper_source}."]
    return lines + [""]


def _mean(values: list[Optional[float]]) -> Optional[float]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def _costs(study: Study, runs: list[dict]) -> list[str]:
    """Per series and batch: images/s (and the ratio to the study's first series), peak MiB,
    over the runs that count: a flagged run (:func:`normlab.lab.analysis.run_flag`: diverged,
    unconverged) is left out as in the error tables, its cell says so (``; 1 unconverged left
    out``, ``2 unconverged (left out)`` when none counts) and a note counts them."""
    done = [r for r in runs if r["status"] == "done"]
    if not done:
        return []
    flag = {id(r): run_flag(r) for r in done}
    counted = [r for r in done if not flag[id(r)]]
    order = list(study.variants)
    labels = sorted({r["label"] for r in done},
                    key=lambda lab: order.index(lab) if lab in order else len(order))
    xs = sorted({r["x"] for r in done}, reverse=True)
    fixed = _fixed_series(study)  # its runs at one x stand at every x (_at_every_x)
    cell: dict[tuple, tuple] = {}
    left_out: dict[tuple, str] = {}
    for lab in labels:
        for x in xs:
            at = fixed.get(lab, x)
            rs = [r for r in counted if r["label"] == lab and r["x"] == at]
            cell[(lab, x)] = (_mean([r.get("images_per_s") for r in rs]),
                              _mean([r.get("peak_memory_mb") for r in rs]))
            left_out[(lab, x)] = flags_text([{"flag": flag[id(r)]} for r in done
                                             if r["label"] == lab and r["x"] == at
                                             and flag[id(r)]])
    ref = labels[0]
    devices = sorted({str(r["device"]) for r in counted if r.get("device")}) or ["-"]
    backends = {lab: sorted({r["backend"] for r in counted
                             if r["label"] == lab and r.get("backend")}) for lab in labels}
    lines = [f"What each cost in these runs (training images/s, ratio to {md_cell(ref)} at the "
             "same batch, "
             f"peak memory; device: {md_cell(', '.join(devices))}):", "",
             "| series | " + " | ".join(_fmt_x(x) for x in xs) + " | backend |",
             "|---|" + "---|" * (len(xs) + 1)]
    for lab in labels:
        cells = []
        for x in xs:
            ips, mem = cell[(lab, x)]
            flagged = left_out[(lab, x)]
            if flagged and not any(r["label"] == lab and r["x"] == fixed.get(lab, x)
                                   for r in counted):
                cells.append(f"{flagged} (left out)")
                continue
            base = cell[(ref, x)][0]
            text = "-" if ips is None else f"{ips:.0f} img/s"
            if ips is not None and lab != ref and base:
                text += f" ({ips / base:.2f}x)"
            text += f", {mem:.0f} MiB" if mem is not None else ", - MiB"
            cells.append(text + (f"; {flagged} left out" if flagged else ""))
        lines.append(f"| {md_cell(lab)} | " + " | ".join(cells)
                     + f" | {md_cell(', '.join(backends[lab]) or '-')} |")
    notes = []
    n_flagged = len(done) - len(counted)
    if n_flagged:
        notes.append(f"{n_flagged} flagged run{'s' if n_flagged > 1 else ''} (diverged or "
                     f"unconverged) {'are' if n_flagged > 1 else 'is'} left out, as in the "
                     "error tables")
    if counted and all(m is None for _, m in cell.values()):
        notes.append("peak memory was not recorded by the runs in this store")
    if counted and not any(backends.values()):
        notes.append("the backend was not recorded")
    if notes:
        lines += ["", "(" + "; ".join(notes) + ".)"]
    return lines + [""]


def _groups_line(runs: list[dict]) -> list[str]:
    """The group count GN ran with in these tables, beside create_norm's default."""
    used = set()
    for r in runs:
        c = r["config"]
        if c.get("norm") == "gn":
            kw = c.get("norm_kwargs") or {}
            used.add(f"{kw['group_size']} channels per group" if "group_size" in kw
                     else f"{kw.get('num_groups', DEFAULT_NUM_GROUPS)} groups")
    if not used:
        return []
    return [f"**GN here is GroupNorm with {' / '.join(sorted(used))}** (a layer with fewer "
            "channels gets the largest divisor of its channel count not above that); "
            f"`normlab.create_norm('gn', C)` without `num_groups` uses {DEFAULT_NUM_GROUPS} "
            "groups, the paper's ImageNet default. The groups study varies the count.", ""]


#: studies whose answer is one setting (a point of series x axis: ``Study.answer`` "setting")
SETTING_STUDIES = tuple(n for n, s in STUDIES.items() if s.answer == "setting")


def _setting_name(study: Study) -> tuple[str, Callable[[tuple], str]]:
    """(what a point of the study is, how a point is named), from ``Study.setting``."""
    what, text = study.setting
    return what, lambda p: text.format(label=md_cell(p[0]), x=_fmt_x(p[1]))


def _paper_setting(study: Study, best: tuple, name: Callable[[tuple], str],
                   measured: Collection[tuple]) -> str:
    """The paper's lowest two of the settings ``measured`` here (as the batch tables compare the
    series measured at each batch size) and whether here's lowest is the same one; the values
    as given where the paper's are not numbers (quoted accuracies)."""
    paper = [((lab, x), v) for lab, xs in study.paper.items() for x, v in xs.items()]
    if not paper:
        return "-"
    if not all(isinstance(v, (int, float)) for _, v in paper):
        return "; ".join(f"{name(p)}: {md_cell(str(v))}" for p, v in paper)
    run = sorted(((p, v) for p, v in paper if p in measured), key=lambda kv: kv[1])
    if not run:
        return "-"
    same = "same as here" if run[0][0] == best else f"here: {name(best)}"
    text = f"{name(run[0][0])} {run[0][1]:.1f}"
    if len(run) > 1:
        text += f", next {name(run[1][0])} {run[1][1]:.1f}"
    scope = "" if len(run) == len(paper) else f"; of the {len(run)} of its settings run here"
    return f"{text} ({same}{scope})"


def _setting_winner(study: Study, runs: list[dict], all_stats: dict, level: Level
                    ) -> list[str]:
    """The answer of a study in :data:`SETTING_STUDIES`: the setting with the lowest error, the
    next lowest and how sure, beside the paper's."""
    what, name = _setting_name(study)
    stats = {k: s for k, s in all_stats.items() if s["n"] > 0 and math.isfinite(s["mean"])}
    ranked = sorted(stats.items(), key=lambda kv: kv[1]["mean"])
    best, s = ranked[0]
    row = f"| **{name(best)}** {s['mean']:.2f} (n={s['n']}) | "
    if len(ranked) == 1:
        row += f"only one {what} has runs that count | - | - |"
    else:
        runner, r = ranked[1]
        row += (f"{name(runner)} {r['mean']:.2f} (n={r['n']}) | "
                f"{_gap_cells(s, r, level)} |")
    row += f" {_paper_setting(study, best, name, stats)} |"
    order = " < ".join(f"{name(k)} {v['mean']:.2f}" for k, v in ranked)
    return [f"### {study.name}: the {what} with the lowest test error", "",
            _setup_line(runs, stats), "",
            "| lowest error % (this run) | next lowest | gap (± t SE) | "
            f"P(lowest is really lower) | the paper ({_cite(study)}) |",
            "|---|---|---|---|---|", row, "",
            f"All, lowest error first: {order}.", ""]


def _all_flagged(name: str, runs: list[dict]) -> list[str]:
    """The lines for a study whose finished runs are all flagged (nothing counts: said, not
    "no runs"); none when it has no finished run."""
    done = [r for r in runs if r["status"] == "done"]
    if not done:
        return []
    return [f"### {name}: {len(done)} finished run{'s' if len(done) > 1 else ''}, every one "
            "flagged (diverged or unconverged) and left out", "",
            "No verdict or ranking without a run that counts: see the study's section for each "
            "run's flag; longer training (`--set epochs=...`) or another lr (`--set "
            "base_lr=...`) may let the runs converge.", ""]


def summary_lines(store: Store) -> list[str]:
    """The ``## Summary`` section of the report for ``store``, from the same point statistics
    and rules as the study tables (:mod:`normlab.lab.analysis`: the runs that count, the
    half-width a decisive gap must exceed, the probability that one error is really below
    another)."""
    lines = ["## Summary", ""]
    seen: list[dict] = []
    flagged_only = False
    for name in SUMMARY_STUDIES:
        runs = store.study_runs(name)
        stats = point_stats(runs)
        if not any(s["n"] > 0 for s in stats.values()):
            flagged = _all_flagged(name, runs)
            flagged_only |= bool(flagged)
            lines += flagged
            continue
        seen += runs
        lines += (_winners(STUDIES[name], runs, stats, setup_level(store.setup_info(name)))
                  + _costs(STUDIES[name], runs))
    answered = False
    for name in SETTING_STUDIES:
        runs = store.study_runs(name)
        stats = point_stats(runs)
        if any(st["n"] > 0 and math.isfinite(st["mean"]) for st in stats.values()):
            lines += _setting_winner(STUDIES[name], runs, stats,
                                     setup_level(store.setup_info(name)))
            answered = True
        elif not any(st["n"] > 0 for st in stats.values()):
            flagged = _all_flagged(name, runs)
            flagged_only |= bool(flagged)
            lines += flagged
    if not seen and not answered and not flagged_only:
        names = [*SUMMARY_STUDIES, *SETTING_STUDIES]
        return lines + [f"No {', '.join(names[:-1])} or {names[-1]} study has finished runs in "
                        "this store: `normlab reproduce` runs the batch-size study.", ""]
    return lines + _groups_line(seen)  # the GN of the batch and norms tables
