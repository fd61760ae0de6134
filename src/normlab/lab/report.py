"""report.md and a self-contained report.html, built from the results store only.

For every study in the store: our table (final test error %, mean ± sample standard deviation
over seeds, n) beside the paper's table (REFERENCE sections 1-4, cited), the figures, and one
verdict per qualitative claim, computed from the numbers by :mod:`normlab.lab.analysis` (which
runs count, the standard errors, the verdict rules and the seeds an open claim would need).
A table cell counts the runs its point left out by flag (diverged, unconverged), a note under the
table lists them, and the claims table gives the seeds behind each verdict and, for an open
claim, the seeds its observed spread would need.

A claim whose points were not run is "not run"; one whose point's runs were all flagged is "no
usable run". Nothing else is claimed.
"""

from __future__ import annotations

import base64
import html
import re
import time
from pathlib import Path
from typing import Optional

from rich.markup import escape

from normlab.lab.analysis import (INCONCLUSIVE, NO_USABLE_RUN, NOT_REPRODUCED, NOT_RUN,
                                  POWER_STOPPED, REPRODUCED, SD_FLOOR, SD_ONE_SEED, SEEDS_SHOWN,
                                  TAIL, UNMEASURED, Z,
                                  claims_status, critical, flags_text, level_for, point_stats,
                                  run_flag, setup_level, verdict)
from normlab.lab.config import RunConfig
from normlab.lab.markdown import md_cell as _md
from normlab.lab.outfiles import a_file, a_folder, subdir, write_text
from normlab.lab.plots import plot_study
from normlab.lab.progress import say
from normlab.lab.spp_verdicts import spp_section
from normlab.lab.store import Store, StoreError, unwritable
from normlab.lab.studies import STUDIES, Study
from normlab.lab.summary import (config_values, precise_bn_note, precise_bn_text,
                                  device_kind, emulated_devices, setup_differences,
                                  summary_lines)

# the verdict names and rules are analysis.py's, re-exported for the report's readers
__all__ = ["verdict", "write_report", "print_report", "check_report_places", "Z", "SD_FLOOR",
           "SD_ONE_SEED", "REPRODUCED", "NOT_REPRODUCED", "INCONCLUSIVE", "NOT_RUN",
           "NO_USABLE_RUN"]


def _fmt(s: Optional[dict], unfinished: str = "") -> str:
    """A table cell: ``mean ± sd (n=k)``, plus the flagged runs left out of it by kind
    (``; 1 unconverged left out``); a point whose every run is flagged says what they were
    (``2 unconverged (left out)``, ``1 diverged, 1 unconverged (left out)``). ``unfinished``:
    the point's runs that have no result yet (``1 failed, 1 not started``), said too."""
    if s is None:
        return unfinished or "-"
    flagged = flags_text(s["excluded"])
    more = f"; {unfinished}" if unfinished else ""
    if s["n"] == 0:
        return f"{flagged} (left out){more}"
    sd = f" ± {s['sd']:.2f}" if s["sd"] is not None else ""
    left_out = f"; {flagged} left out" if flagged else ""
    return f"{s['mean']:.2f}{sd} (n={s['n']}{left_out}{more})"


#: the states of a study's runs that have no result yet, in the order the report counts them
_UNFINISHED = ("failed", "interrupted", "training now", "not started")


def _unfinished(store: Store, study: str, runs: list[dict]) -> list[dict]:
    """The study's runs (its latest setup's) with no result yet, each as ``label``, ``x``,
    ``state`` (one of :data:`_UNFINISHED`) and ``line`` (the note's line): failed (with
    why), interrupted (a re-run resumes it), training now (a live owner), or registered and
    not started (the study stopped before it reached them: no row in ``runs`` yet)."""
    out = []
    for r in runs:
        if r["status"] == "done":
            continue
        state = ("failed" if r["status"] == "failed" else "training now"
                 if store.in_training(r) else "interrupted")
        why = (f": {_md(r['error'])}" if state == "failed" and r.get("error") else
               f" after epoch {r['epochs_done']}/{r['epochs']}" if state == "interrupted"
               else "")  # (epochs_done, epochs: numbers, checked when read)
        out.append({"label": r["label"], "x": r["x"], "state": state,
                    "line": f"- {_md(str(r['label']))} at {_md(r['x'])}, seed "
                            f"{_md(r['config'].get('seed', '?'))} (run {_md(str(r['run_id']))})"
                            f": {state}{why}"})
    claimed = {(r["run_id"], r["label"]) for r in runs}
    for m in store.study_members(study):
        if (m["run_id"], m["label"]) not in claimed:
            out.append({"label": m["label"], "x": m["x"], "state": "not started",
                        "line": f"- {_md(str(m['label']))} at {_md(m['x'])} (run "
                                f"{_md(str(m['run_id']))}): not started"})
    return out


def _count_text(rows: list[dict]) -> str:
    """``1 failed, 2 not started``: the rows counted by state."""
    return ", ".join(f"{n} {state}" for state in _UNFINISHED
                     if (n := sum(r["state"] == state for r in rows)))


def _unfinished_lines(rows: list[dict]) -> list[str]:
    """The note under the table: each run with no result yet, and what gives it one."""
    if not rows:
        return []
    return (["", "Runs without a result, not in the means, bars and verdicts (the same "
                 "`normlab reproduce` command again retries the failed ones, resumes the "
                 "interrupted ones from their last epoch and trains those not started; "
                 "`normlab ls` lists the runs):", ""]
            + [r["line"] for r in rows])


def _flagged_lines(stats: dict) -> list[str]:
    """The note under the table: each flagged run, the point it belongs to and its flag."""
    rows = [(key, e) for key, s in stats.items() for e in s["excluded"]]
    if not rows:
        return []
    return (["", "Flagged runs, kept in the store and left out of the means, bars and verdicts:", ""]
            + [f"- {_md(str(lab))} at {_md(x)}, seed {_md(e['seed'])} "
               f"(run {_md(str(e['run_id']))}): test error "
               f"{e['error']:.2f}%, {_md(e['flag'])}" for (lab, x), e in rows])


def _seeds_cell(st: dict) -> str:
    """Seeds per point behind a claim's verdict (``2-6`` when its points have 2 to 6); for an
    open one, how many the observed spread would need at every point
    (:func:`normlab.lab.analysis.seeds_needed`) or why that is unknown."""
    if st["verdict"] in UNMEASURED:
        return "-"
    # the fewest to the most seeds among the claim's points: "6; about 6 would decide it" read
    # as if 6 seeds were there, where the verdict's other point had 2
    fewest = st.get("fewest_seeds", st["seeds"])
    seeds = str(st["seeds"]) if fewest == st["seeds"] else f"{fewest}-{st['seeds']}"
    if st["verdict"] != INCONCLUSIVE:
        return seeds
    need = st["seeds_needed"]
    if need and need > SEEDS_SHOWN:
        return (f"{seeds}; over {SEEDS_SHOWN} would decide it (the difference is close "
                "to the claim's boundary)")
    if need:
        return f"{seeds}; about {need} would decide it"
    if fewest < 2:
        return f"{seeds}; unknown how many would decide it (a point has one seed: no spread)"
    return (f"{seeds}; no count follows from these runs: the difference is on the "
            "claim's boundary (equal means, or a gap equal to the claim's margin)")


def _batches(runs: list[dict]) -> list[int]:
    """The images per process the runs used, largest first."""
    return sorted({int(r["config"].get("batch_size", RunConfig.batch_size)) for r in runs},
                  reverse=True)


def _processes_line(runs: list[dict], cfg: dict) -> str:
    """How the batch was split: images per process, number of processes, lr rule."""
    worlds = sorted({int(r["config"].get("world_size", 1)) for r in runs})
    batches = _batches(runs)
    n = "N" if len(batches) > 1 else str(batches[0])
    w = "/".join(str(x) for x in worlds)
    statistics = ("" if worlds == [1] else "; BN statistics per process, SyncBN over all "
                  "processes, GN/LN/IN per sample")
    fixed = sorted({float(r["config"]["lr"]) for r in runs
                    if r["config"].get("lr") is not None}, reverse=True)
    scaled = f"base lr {cfg.get('base_lr', RunConfig.base_lr)} x {n} x {w}/32"
    rule = scaled
    if fixed:  # --set lr=...: one peak lr at every batch size, not the scaling rule
        rule = (f"peak lr {', '.join(f'{v:g}' for v in fixed)} set by hand (not scaled with "
                "the batch)")
        if any(r["config"].get("lr") is None for r in runs):
            rule += f"; the other runs {scaled}"
    return (f"**Images per process: {', '.join(map(str, batches))}; processes: {w}** (global "
            f"batch {n} x {w}), {rule}{statistics}.")


def _protocol_line(protocol: Optional[dict], runs: list[dict]) -> str:
    """The protocol the study's runs used, as the store recorded it (:meth:`Study.protocol`);
    empty for the single-batch protocol and stores written before protocols were recorded
    (then :func:`_processes_line` describes the runs from their configs)."""
    if not protocol or protocol.get("name") == "single batch":
        return ""
    field = lambda key: _md(protocol.get(key, "?"))  # noqa: E731 - stored text, inert
    source = f" ({field('source')})" if protocol.get("source") else ""
    rest = (f"SGD batch {field('sgd_batch')} images, lr {field('lr')}; "
            f"statistics: {field('statistics')}{source}.")
    if protocol.get("processes"):  # real processes are the devices
        batches = _batches(runs)
        return (f"**Images per process: {', '.join(map(str, batches))}; processes: "
                f"{field('processes')}**. **Protocol: {field('name')}**: {rest}")
    return (f"**Protocol: {field('name')}, {field('devices')} emulated devices on "
            f"one process**: {rest}")


def _power_line(power: Optional[dict], preset: str = "") -> str:
    """What the study's power rounds did, as the store recorded it (lab/power.py's record; its
    values shown as inert text); empty when none ran (a study run under torchrun, or a store
    from before the rounds were recorded)."""
    if not power:
        return ""
    if "stopped" not in power:  # the looks were planned, the rounds never ended
        # the store cannot tell a study in progress (a report written meanwhile, `--to`)
        # from one that was stopped
        return ("Power rounds: not finished (the study is still running, or was interrupted: "
                "running it again goes on from the stored runs)." + _level_text(power.get("looks")))
    before = power.get("before") if isinstance(power.get("before"), dict) else {}
    earlier = (f"earlier invocations' {_md(str(before.get('rounds')))} round(s) added "
               f"{_md(str(before.get('runs_added')))} run(s)" if before.get("rounds") else "")
    if power.get("budget_runs") == 0:
        if earlier:  # a re-run without rounds: the seeds the earlier ones added are still here
            return (f"Power rounds: none this time (a budget of 0 runs); {earlier}. "
                    "`--budget-runs N` adds seeds where claims are open."
                    + _level_text(power.get("looks")))
        why = "`--quick`'s default" if preset == "quick" else "`--budget-runs 0`"
        return (f"Power rounds: none (a budget of 0 runs, {why}; `--budget-runs N` "
                "adds seeds where claims are open)." + _level_text(power.get("looks")))
    field = lambda key: _md(str(power.get(key, "?")))  # noqa: E731 - stored text, inert
    did = (f"{field('rounds')} round(s) added {field('runs_added')} run(s)"
           if power.get("rounds") else "none ran") + (f"; {earlier}" if earlier else "")
    budget = [f"{field('budget_runs')} runs" if power.get("budget_runs") is not None else None,
              f"{field('budget_minutes')} minutes"
              if power.get("budget_minutes") is not None else None,
              f"up to {field('max_seeds')} seeds per point"]
    stopped = power.get("stopped")
    why = POWER_STOPPED.get(stopped) if isinstance(stopped, str) else None
    line = (f"Power rounds: {did} (budget: {', '.join(b for b in budget if b)}); stopped: "
            f"{_md(why or str(stopped))}.")
    if stopped in ("budget-runs", "budget-minutes"):
        line += (" Running the study again with a larger budget goes on from these runs (the "
                 "finished ones are kept).")
    return line + _level_text(power.get("looks"))


def _level_text(looks: Optional[list[int]]) -> str:
    """The level the claims below are judged at, when rounds could look more than once."""
    if not looks or looks[1] <= looks[0]:
        return ""
    level = level_for(looks)
    shown = sorted({looks[0], (looks[0] + looks[1]) // 2, looks[1]})
    at = ", ".join(f"{level(n):.2f} at {n}" for n in shown)
    return (f" Every look at a claim is another chance to call equal points different, so its "
            f"verdict is set for looks after each seed from {looks[0]} to {looks[1]} per point: "
            f"decisive beyond c sqrt({looks[1]} / n) normal standard errors at n seeds per point "
            f"({at}; t at the seeds' degrees of freedom) instead of {Z:g} at every look, "
            f"O'Brien and Fleming's boundary for those looks, which keeps the chance of ever "
            f"calling two equal points different at one look's {TAIL:.2%}.")


def _earlier_setups_lines(store: Store, study: str) -> list[str]:
    """A line naming the study's runs that the store holds on earlier setups (other data,
    model, ``--set`` values or preset), which this section does not show, each setup by what
    tells it from this one (:func:`normlab.lab.summary.setup_differences`); none when there
    are none."""
    members = [m for m in store.memberships() if m["study"] == study]
    current = {m["run_id"] for m in members if m["current"]}
    groups: dict[tuple, dict] = {}
    for m in members:
        g = groups.setdefault((m["preset"], m["setup"], m["current"]), {
            "configs": [], "runs": set(), "preset": m["preset"], "setup": m["setup"],
            "devices": emulated_devices(m["protocol"]), "ran_on": set()})
        r = store.run(m["run_id"])
        if r is not None:
            g["configs"].append(r["config"])
            g["ran_on"] |= {device_kind(r.get("device"))} - {None}
        g["runs"].add(m["run_id"])
    earlier = {k: g for k, g in groups.items() if not k[2] and g["runs"] - current}
    if not earlier:
        return []
    texts = setup_differences(groups)
    here = next((texts[k] for k in groups if k[2]), "")
    n = len(set().union(*(g["runs"] for g in earlier.values())) - current)
    runs = lambda k: len(earlier[k]["runs"] - current)  # noqa: E731
    each = "; ".join(f"{_md(texts[k])}: {runs(k)} run{'s' if runs(k) > 1 else ''}"
                     for k in earlier)
    return [f"Not in this section: {n} run{'s' if n > 1 else ''} of this study that the store "
            f"holds on {len(earlier)} earlier setup{'s' if len(earlier) > 1 else ''} ({each}; "
            f"this section's: {_md(here)}). `normlab ls` marks them; re-running the study "
            "with a setup's options and `--budget-runs 0` shows that setup here again (its "
            "finished runs are skipped), and another `--out` keeps a report per setup.", ""]


def _study_section(store: Store, study: Study, fig_dir: Path) -> tuple[list[str], list[Path]]:
    runs = store.study_runs(study.name)
    if not runs:
        return [], []
    stats = point_stats(runs)
    preset = runs[0]["preset"]
    cfg = runs[0]["config"]
    done = sum(r["status"] == "done" for r in runs)
    unfinished = _unfinished(store, study.name, runs)
    total = done + len(unfinished)
    info = store.setup_info(study.name, preset)
    epochs = config_values(runs, "epochs")  # every run's, as model and data: not the first's
    lines = [f"## {study.name}: {study.title}", "", study.description, "",
             f"Preset `{_md(preset)}`: {done}/{total} runs done"
             + (f", {_count_text(unfinished)}" if unfinished else "")
             + f"; model {config_values(runs, 'model')}, data {config_values(runs, 'data')}, "
               f"{epochs} epoch{'' if epochs == '1' else 's'}, "
               f"optimizer {config_values(runs, 'optimizer', 'sgd')}, "  # (stored before: SGD)
               f"schedule {config_values(runs, 'schedule')}, "
               f"weight decay {config_values(runs, 'weight_decay')}"
             + (f"; {precise_bn_text(runs)}." if precise_bn_text(runs) else "."), "",
             _protocol_line(info.get("protocol"), runs) or _processes_line(runs, cfg), ""]
    power = _power_line(info.get("power"), preset)
    lines += [power, ""] if power else []
    lines += _earlier_setups_lines(store, study.name)
    present = {r["label"] for r in runs} | {u["label"] for u in unfinished}
    labels = [v for v in study.variants if v in present] + sorted(present - set(study.variants))
    xs = sorted({r["x"] for r in runs} | {u["x"] for u in unfinished}, reverse=study.x_log2)
    lines += [f"### Test error (%), this run, mean ± sd over seeds ({study.axis})", "",
              "| series | " + " | ".join(_md(x) for x in xs) + " |",
              "|---|" + "---|" * len(xs)]
    for lab in labels:
        lines.append(f"| {_md(lab)} | " + " | ".join(
            _fmt(stats.get((lab, x)), _count_text([u for u in unfinished
                                                   if (u["label"], u["x"]) == (lab, x)]))
            for x in xs) + " |")
    lines += _flagged_lines(stats)
    lines += _unfinished_lines(unfinished)
    if study.paper:
        pxs = sorted({x for d in study.paper.values() for x in d}, reverse=study.x_log2)
        lines += ["", f"### The paper's numbers: {study.paper_source}", "",
                  "| series | " + " | ".join(str(x) for x in pxs) + " |", "|---|" + "---|" * len(pxs)]
        for lab, d in study.paper.items():
            lines.append(f"| {lab} | " + " | ".join(str(d.get(x, "-")) for x in pxs) + " |")
    else:
        lines += ["", f"Paper: {study.paper_source}."]
    lines += ["", "### Claims", "", "| claim | verdict | numbers (error %) | seeds per point | "
              "source |", "|---|---|---|---|---|"]
    for c, st in zip(study.claims, claims_status(study, stats, setup_level(info))):
        # the numbers name the points compared, stored labels among them (a best claim's rivals)
        lines.append(f"| {c.text} | **{st['verdict']}** | {_md(st['why'])} | {_seeds_cell(st)} | "
                     f"{c.source} |")
    figs = plot_study(store, study, fig_dir)
    pngs = [p for p in figs if p.suffix == ".png"]
    lines += [""] + [f"![{p.stem}](figures/{p.name})" for p in pngs] + [""]
    return lines, pngs


def _single_runs_section(store: Store) -> list[str]:
    """The runs of ``normlab train`` (study "train"): one row each, no claims."""
    runs = store.study_runs("train")
    if not runs:
        return []
    lines = ["## Single runs (`normlab train`)", "",
             "| label | model | norm | data | images per process | seed | epochs | status | "
             "test error % |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c, err = r["config"], r["final_test_error"]
        w = int(c.get("world_size", 1))
        batch = f"{c.get('batch_size')}" + (f" x {w} processes" if w > 1 else "")
        flag = run_flag(r) if r["status"] == "done" else None  # diverged, unconverged: say so
        status = (f"done, {flag}" if flag else  # a failed run's why; a run nobody trains
                  f"failed: {r['error']}" if r["status"] == "failed" and r.get("error") else
                  "interrupted" if r["status"] == "running" and not store.in_training(r)
                  else r["status"])  # resumes when its command is run again
        cells = [r["label"], c.get("model"), c.get("norm"), c.get("data"), batch, c.get("seed"),
                 f"{r['epochs_done']}/{r['epochs']}", status,
                 ("-" if err is None else f"{err:.2f}") + precise_bn_note(c)]
        lines.append("| " + " | ".join(_md(v) for v in cells) + " |")  # stored text: inert
    return lines + [""]


def _environment_lines(runs: list[dict]) -> list[str]:
    """The device and versions of the latest run that recorded them: a run that failed or was
    claimed before its first epoch (a report written while a study runs) has none."""
    recorded = [r for r in runs if r.get("device") or r.get("versions")]
    r = recorded[-1] if recorded else {}
    versions = ", ".join(_md(f"{k} {v}") for k, v in sorted((r.get("versions") or {}).items()))
    return ["## Environment", "", f"device: {_md(r.get('device') or '-')}; versions: "
            f"{versions or '-'}", ""]


#: the files :func:`write_report` writes into its directory, and its figures folder
REPORT_FILES = ("report.md", "report.html")
FIGURES = "figures"


def check_report_places(dest: Path) -> None:
    """A ConfigError, before a study trains, when :func:`write_report` could not write into
    ``dest`` at the end: a folder at a report file's name, a file at ``figures``."""
    for name in REPORT_FILES:
        a_file(dest / name)
    a_folder(dest / FIGURES, dest)


def _markdown(store: Store, fig_dir: Path) -> str:
    """report.md's text from ``store`` (figures drawn into ``fig_dir``)."""
    names = [s for s, _ in store.studies()]
    lines = ["# normlab report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{store.path.name}` "
             f"({len(store.runs())} runs).", ""]
    lines += summary_lines(store)
    lines += ["Verdicts are computed from the stored numbers: a difference counts only when it "
             "exceeds t standard errors (run-to-run spread over seeds, at least "
             f"{SD_FLOOR} points; a point with one seed has no spread, so no difference "
             "with it is decisive), "
             "t being Student's at Welch's degrees of freedom for the one-sided tail of "
             f"{Z:g} normal standard errors ({critical(2):.1f} at 2 seeds per point, "
             f"{critical(4):.1f} at 3, {Z:g} with many; a study whose power rounds may look "
             "again after each added seed uses "
             "the stricter level its section names); a claimed margin (\"at least 1 point\") "
             "is met when the whole interval, the difference less t standard errors, clears "
             "it. "
             "The papers' numbers come from their own models and data (ImageNet ResNets "
             "for the GN, FRN, EvoNorm and NF papers, a small CNN on CIFAR-10 for BN + "
             "dropout); compare orderings, not values.", ""]
    for name in dict.fromkeys(names):
        if name not in STUDIES:
            continue
        lines += _study_section(store, STUDIES[name], fig_dir)[0]
    if "train" in names:
        lines += _single_runs_section(store)
    spp_records = store.spp()
    if spp_records:
        lines += spp_section(spp_records, fig_dir)
    runs = store.runs()
    if not runs and not spp_records:
        lines += ["No runs in this store yet: `normlab reproduce --out DIR` runs a study, "
                  "`normlab spp MODEL --out DIR` records signal propagation.", ""]
    if runs:
        lines += _environment_lines(runs)
    return "\n".join(lines)


def write_report(out_dir: Path | str, to: Path | str | None = None) -> tuple[Path, Path]:
    """Write ``OUT/report.md``, ``OUT/report.html`` and ``OUT/figures/*`` from ``OUT``'s store
    (opened read-only), and refresh the CSV/JSON exports; with ``to``, the report and figures go
    to that directory and ``OUT`` is only read. Returns (md path, html path)."""
    out_dir = Path(out_dir)
    dest = out_dir if to is None else Path(to)
    store = Store(out_dir, read_only=True)
    try:
        why = unwritable(dest)
        if why is not None:
            raise StoreError(f"cannot write the report into {str(dest)!r}: {why}",
                             hint="pass --to DIR to write it elsewhere (the store is only read)")
        fig_dir = subdir(dest, FIGURES)  # a real folder inside dest, not a link out of it
        with store.snapshot():  # one state of the store, however others write meanwhile
            md = _markdown(store, fig_dir)
        md_path = dest / REPORT_FILES[0]
        write_text(md_path, md)
        html_path = dest / REPORT_FILES[1]
        write_text(html_path, _to_html(md, fig_dir))
        if to is None:
            store.export(flag=run_flag)
    finally:
        store.close()
    return md_path, html_path


def print_report(out: Path, to: Optional[Path] = None) -> None:
    """Write OUT's report (into ``to`` when given) and say where it is."""
    md, html_path = write_report(out, to)
    say(escape(f"report: {md} and {html_path}"))


#: report.md's inline text, token by token: a backslash-escaped character (``\\|``, ``\\\\``:
#: text, so an escaped backslash before ``**`` does not hide the markup), bold and code markers,
#: a cell separator, and runs of plain text
_TOKENS = re.compile(r"\\.|\*\*|[`|]|[^\\*`|]+|.", re.S)
_MARKUP = {"**": "b", "`": "code"}


def _cells(row: str) -> list[str]:
    """A table row's cells (``| a | b\\|c |`` -> ``[" a ", " b\\|c "]``), their escapes kept."""
    cells = [""]
    for tok in _TOKENS.findall(row):
        if tok == "|":
            cells.append("")
        else:
            cells[-1] += tok
    cells = cells[1:] if row.startswith("|") else cells
    return cells[:-1] if cells and cells[-1] == "" else cells  # "" after the closing "|"


def _to_html(md: str, fig_dir: Path) -> str:
    """A small markdown-to-HTML for what this report uses (headings, tables, images, bold)."""
    body: list[str] = []
    table: list[str] = []

    def inline(t: str) -> str:
        out, open_tags = [], []
        for tok in _TOKENS.findall(t):
            tag = _MARKUP.get(tok)
            if tag is None:  # text; a backslash-escaped character is text (_md)
                out.append(html.escape(tok[1:] if len(tok) == 2 and tok[0] == "\\" else tok))
            elif open_tags and open_tags[-1] == tag:
                out.append(f"</{open_tags.pop()}>")
            else:
                out.append(f"<{tag}>")
                open_tags.append(tag)
        return "".join(out) + "".join(f"</{tag}>" for tag in reversed(open_tags))

    def flush() -> None:
        if table:
            rows = [_cells(r.strip()) for r in table if not set(r) <= set("|-")]
            head, rest = rows[0], rows[1:]
            body.append("<table><tr>" + "".join(f"<th>{inline(c.strip())}</th>" for c in head)
                        + "</tr>" + "".join("<tr>" + "".join(f"<td>{inline(c.strip())}</td>"
                                                             for c in r) + "</tr>" for r in rest)
                        + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("![") and "](" in line:
            name = line[line.index("](") + 2:-1].split("/")[-1]
            p = fig_dir / name
            if p.is_file() and not p.is_symlink():  # only the figures written just now
                b64 = base64.b64encode(p.read_bytes()).decode()
                body.append(f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}"></p>')
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:13px}img{max-width:100%}code{background:#f3f3f3}")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>normlab report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
