"""The report opens with a summary that answers: the lowest-error normalization at each batch
size, by how much, how sure, what the paper found, and what each cost in the same runs."""

import math
import re
from statistics import NormalDist, fmean, stdev

import pytest
from scipy import stats as scipy_stats

from normlab.lab.report import write_report
from normlab.lab.store import Store
from normlab.lab.studies import get_study

GN8 = {"norm": "gn", "norm_kwargs": {"num_groups": 8}}
BASE = {"model": "resnet20", "data": "digits", "epochs": 3, "schedule": "cosine", "base_lr": 0.1,
        "weight_decay": 1e-4}


def _fill(tmp_path, errors, cost):
    """batch-size study: errors {(label, x): [error per seed]}, cost {label: (img/s, MiB)}."""
    with Store(tmp_path) as s:
        members = []
        for (label, x), errs in errors.items():
            for seed, err in enumerate(errs):
                rid = f"{label}-{x}-{seed}"
                cfg = {**BASE, "batch_size": x, "seed": seed,
                       **(GN8 if label == "GN" else {"norm": "bn"})}
                s.claim(rid, cfg)
                ips, mib = cost[label]
                s.record_epochs(rid, [{"epoch": 0, "test_error": err}],
                                {"images_per_s": ips * (1 + 0.1 * seed) if ips else None,
                                 "peak_memory_mb": mib, "device": "cpu (2 cores, 1 threads)",
                                 "backend": "native" if ips else None})
                s.finish(rid)
                members.append((rid, label, x))
        s.register("batch-size", "default", members)
    return write_report(tmp_path)[0].read_text()


def _row(text, start):
    return next(line for line in text.splitlines() if line.startswith(start))


def _welch(sa, sb, n):
    """Welch-Satterthwaite degrees of freedom of two points of n seeds with sds sa, sb."""
    qa, qb = sa * sa / n, sb * sb / n
    return (qa + qb) ** 2 / ((qa * qa + qb * qb) / (n - 1))


def _t(df):
    return scipy_stats.t.ppf(NormalDist().cdf(2.0), df)


def test_summary_opens_the_report_and_names_winner_gap_confidence_and_paper(tmp_path):
    # batch 32: BN clearly lower; batch 2: GN lower by less than the spread
    errors = {("BN", 32): [5.0, 5.2, 5.4], ("GN", 32): [8.0, 8.3, 8.6],
              ("BN", 2): [6.0, 7.0, 8.0], ("GN", 2): [6.5, 6.0, 7.0]}
    text = _fill(tmp_path, errors, {"BN": (1000.0, 120.0), "GN": (500.0, 150.0)})
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Summary"

    row32 = _row(text, "| 32 | ")
    assert "**BN** 5.20 (n=3)" in row32 and "GN 8.30 (n=3)" in row32
    # gap and its t interval from the spread over seeds: sd 0.2 -> floor 0.25, sd 0.3; Welch's
    # degrees of freedom, t at the one-sided tail of 2 normal SEs
    se = math.hypot(0.25 / math.sqrt(3), 0.3 / math.sqrt(3))
    t = _t(_welch(0.25, 0.3, 3))
    assert f"3.10 ± {t * se:.2f}" in row32 and ">99.9%, decisive" in row32
    assert "BN 23.6, GN 24.1: BN lowest by 0.5 (same as here)" in row32

    row2 = _row(text, "| 2 | ")
    gn, bn = [6.5, 6.0, 7.0], [6.0, 7.0, 8.0]
    d = fmean(bn) - fmean(gn)
    se = math.hypot(stdev(gn) / math.sqrt(3), stdev(bn) / math.sqrt(3))
    df = _welch(stdev(gn), stdev(bn), 3)
    assert "**GN** 6.50" in row2 and f"{d:.2f} ± {_t(df) * se:.2f}" in row2
    assert f"{scipy_stats.t.cdf(d / se, df):.1%}, not decisive" in row2
    assert "GN 24.1, BN 34.7: GN lowest by 10.6 (same as here)" in row2
    # the paper's numbers as the paper gives them (and as the report's paper table shows
    # them): GN's 24.0 at batch 8 read "GN 24, BN 24.8"
    from normlab.lab.summary import _paper_cell
    from normlab.lab.studies import STUDIES
    assert _paper_cell(STUDIES["batch-size"], 8, ["BN", "GN"], "GN").startswith("GN 24.0, BN 24.8")

    # cost in the same runs: mean img/s over seeds (x1.0, 1.1, 1.2), ratio to BN, MiB, backend
    cost = _row(text, "| GN | ")
    assert "550 img/s (0.50x), 150 MiB" in cost and cost.endswith("| native |")
    assert "1100 img/s, 120 MiB" in _row(text, "| BN | ")
    assert "GN here is GroupNorm with 8 groups" in text
    assert "without `num_groups` uses 32 groups" in text


def test_the_costs_leave_out_the_flagged_runs_as_the_error_tables_do(tmp_path):
    # GN's seed 2 did not learn (test error near chance: flagged, left out of the error table);
    # the costs averaged it in all the same (img/s 500, 550, 600 -> 550 instead of 525), and a
    # point whose every run was flagged showed numbers its error cell does not
    text = _fill(tmp_path, {("BN", 32): [5.0, 5.2], ("GN", 32): [8.0, 8.3, 85.0],
                            ("GN", 2): [86.0, 87.0], ("BN", 2): [6.0, 6.5]},
                 {"BN": (1000.0, 120.0), "GN": (500.0, 150.0)})
    assert "(n=2; 1 unconverged left out)" in text  # the error table's cell
    gn = _row(text, "| GN | ")
    cells = gn.split(" | ")
    assert cells[1] == "525 img/s (0.50x), 150 MiB; 1 unconverged left out", gn
    assert cells[2] == "2 unconverged (left out)", gn
    assert "3 flagged runs (diverged or unconverged) are left out" in text
    assert _row(text, "| BN | ").split(" | ")[1] == "1050 img/s, 120 MiB"


def test_summary_says_what_was_not_recorded(tmp_path):
    # a store written before peak memory and backends were recorded
    text = _fill(tmp_path, {("BN", 32): [5.0], ("GN", 32): [6.0]},
                 {"BN": (None, None), "GN": (None, None)})
    assert "peak memory was not recorded" in text and "the backend was not recorded" in text
    assert "| BN | -, - MiB | - |" in text


@pytest.mark.parametrize("gap", [4.5, 13.0])
def test_one_seed_gives_no_probability_and_is_never_decisive(tmp_path, gap):
    # `--quick` (one seed per point): "94.2%, not decisive" read as measured, and with the
    # 2-point spread once assumed for one seed a 1-epoch run on a user's data (errors 46-60%)
    # called a 13-point gap ">99.9%, decisive"; one seed has no spread to weigh a gap against
    text = _fill(tmp_path, {("BN", 32): [22.0], ("GN", 32): [22.0 + gap], ("BN", 2): [5.0, 5.4],
                            ("GN", 2): [2.5, 2.9]}, {"BN": (1000.0, 1.0), "GN": (900.0, 1.0)})
    row32, row2 = _row(text, "| 32 | "), _row(text, "| 2 | ")
    assert (f"| {gap:.2f} | -, not decisive (a point has one seed: no spread; --seeds 2 or "
            "more) |") in row32, row32
    assert "%" not in row32.split(" | ")[4] and "one seed" not in row2, row2


def test_one_epoch_is_said_in_the_singular(tmp_path):
    # `--set epochs=1`: "1 epochs" in the summary and in the study's preset line
    with Store(tmp_path) as s:
        s.claim("r", {**BASE, "epochs": 1, "batch_size": 32, "seed": 0, "norm": "bn"})
        s.record_epochs("r", [{"epoch": 0, "test_error": 5.0}], {})
        s.finish("r")
        s.register("batch-size", "default", [("r", "BN", 32)])
    text = write_report(tmp_path)[0].read_text()
    assert "1 epochs" not in text
    assert "digits, 1 epoch, 1 seed(s)" in text and "data digits, 1 epoch, optimizer" in text


def test_summary_of_a_store_without_a_batch_study(tmp_path):
    Store(tmp_path).close()
    text = write_report(tmp_path)[0].read_text()
    assert "## Summary" in text
    assert "No batch-size, stats-batch, norms, nf, groups or bn-dropout study" in text


def test_the_norms_summary_ranks_every_series(tmp_path):
    study = get_study("norms")
    with Store(tmp_path) as s:
        members = []
        for label, err in (("LN", 30.0), ("BN", 5.0), ("IN", 20.0), ("GN", 10.0)):
            s.claim(label, {**BASE, "seed": 0})
            s.record_epochs(label, [{"epoch": 0, "test_error": err}], {})
            s.finish(label)
            members.append((label, label, 32))
        s.register(study.name, "default", members)
    text = write_report(tmp_path)[0].read_text()
    assert "at 32: BN 5.00 < GN 10.00 < IN 20.00 < LN 30.00" in text
    assert "BN 23.6, GN 24.1, LN 25.3, IN 28.4: BN lowest by 0.5" in text


def test_a_series_whose_every_run_was_flagged_is_named_not_called_unmeasured(tmp_path):
    """GN at batch 2 stuck near chance in both seeds: the summary must not say 'only BN
    measured' there; it says GN's runs were left out and why."""
    errors = {("BN", 32): [5.0, 5.2], ("GN", 32): [8.0, 8.3],
              ("BN", 2): [6.0, 7.0], ("GN", 2): [90.0, 91.0]}
    text = _fill(tmp_path, errors, {"BN": (1000.0, 120.0), "GN": (500.0, 150.0)})
    row2 = _row(text, "| 2 | ")
    assert "only BN measured" not in row2
    assert "only BN has runs that count (GN: 2 unconverged, left out)" in row2
    errors[("BN", 2)] = [92.0, 93.0]  # and a batch size where no run counts keeps its row
    assert "| 2 | no run counts (BN: 2 unconverged, left out; GN: 2 unconverged, left out) |" in (
        _fill(tmp_path / "none", errors, {"BN": (1000.0, 120.0), "GN": (500.0, 150.0)}))


def test_the_groups_study_gets_its_answer_in_the_summary(tmp_path):
    """A store with only the groups study: the summary names the group setting with the lowest
    error (G groups or C/G channels per group), the next lowest, the gap with its t interval
    and probability, and the paper's lowest (G = 32, 24.1; next C/G = 16, 24.2)."""
    errors = {("G", 32): [1.0, 1.4, 1.2], ("G", 1): [3.0, 3.5, 3.1],
              ("C/G", 16): [1.6, 2.0, 1.5], ("C/G", 1): [4.0, 4.4, 3.9]}
    _groups_store(tmp_path, errors)
    text = write_report(tmp_path)[0].read_text()
    assert "No batch-size" not in text and "GN here is GroupNorm" not in text
    row = _row(text, "| **G = 32** 1.20 (n=3) | ")
    a, b = errors[("G", 32)], errors[("C/G", 16)]
    d = fmean(b) - fmean(a)
    sa, sb = max(stdev(a), 0.25), stdev(b)  # G = 32's sd 0.2 is floored at 0.25
    se = math.hypot(sa / math.sqrt(3), sb / math.sqrt(3))
    df = _welch(sa, sb, 3)
    assert f"| C/G = 16 1.70 (n=3) | {d:.2f} ± {_t(df) * se:.2f} | " in row
    assert f"{scipy_stats.t.cdf(d / se, df):.1%}, not decisive" in row
    assert row.endswith("| G = 32 24.1, next C/G = 16 24.2 (same as here; of the 4 of its "
                        "settings run here) |"), row
    assert ("All, lowest error first: G = 32 1.20 < C/G = 16 1.70 < G = 1 3.20 < "
            "C/G = 1 4.10.") in text


def test_the_bn_dropout_study_names_its_best_configuration(tmp_path):
    """bn-dropout's answer: the configuration (BN placement, dropout) with the lowest error,
    the next lowest with its t interval, and the paper's values as quoted (accuracies, not
    numbers to rank)."""
    errors = {("conv+dense", 0.4): [20.0, 21.0], ("none", 0.4): [40.0, 42.0],
              ("conv", 0.0): [25.0, 26.5]}
    with Store(tmp_path) as s:
        members = []
        for (label, x), errs in errors.items():
            for seed, err in enumerate(errs):
                rid = f"{label}-{x}-{seed}"
                s.claim(rid, {**BASE, "model": "bn_dropout_cnn", "seed": seed,
                              "model_kwargs": {"dropout": x}})
                s.record_epochs(rid, [{"epoch": 0, "test_error": err}], {})
                s.finish(rid)
                members.append((rid, label, x))
        s.register("bn-dropout", "default", members)
    text = write_report(tmp_path)[0].read_text()
    assert "### bn-dropout: the configuration with the lowest test error" in text
    row = _row(text, "| **BN conv+dense, dropout 0.4** 20.50 (n=2) | ")
    a, b = errors[("conv+dense", 0.4)], errors[("conv", 0.0)]
    sa, sb = stdev(a), stdev(b)
    se = math.hypot(sa / math.sqrt(2), sb / math.sqrt(2))
    assert (f"| BN conv, dropout 0 25.75 (n=2) | {fmean(b) - fmean(a):.2f} ± "
            f"{_t(_welch(sa, sb, 2)) * se:.2f} | ") in row
    # (the quoted text is a markdown cell: its ~, < and > escaped)
    assert ("BN conv+dense, dropout 0.4: \\~25 (acc \\~0.75); BN none, dropout 0.4: \\> 40 "
            "(acc \\< 0.6)") in row


def test_a_half_width_beyond_100_points_is_shown_as_such():
    """At an early look of power rounds (4.22 normal standard errors at 2 seeds of looks 2-8)
    with one or two degrees of freedom, t is in the thousands: '± 1741.69' points of error,
    where no two error rates differ by more than 100. Shown as '>100'; a usual one as is."""
    from normlab.lab.analysis import half_width_text, interval, level_for

    a = {"mean": 1.11, "sd": 0.79, "n": 2, "excluded": []}
    b = {"mean": 1.34, "sd": 0.46, "n": 5, "excluded": []}
    _, _, h = interval(a, b, level_for((2, 8)))
    assert h > 100 and half_width_text(h) == ">100"
    assert half_width_text(0.987) == "0.99" and half_width_text(100.0) == "100.00"


def test_model_names_in_the_summary_are_not_code_spans_holding_escapes(tmp_path):
    """The summary wrote the models as a code span of escaped text, `nf\\_resnet20 / resnet20`:
    markdown shows a code span's content as written, so report.md named a model nf\\_resnet20
    that does not exist. The names are plain escaped text, as in the study's own line."""
    with Store(tmp_path) as s:
        members = []
        for label, model in (("BN", "resnet20"), ("NF", "nf_resnet20")):
            s.claim(label, {**BASE, "model": model, "batch_size": 32, "seed": 0})
            s.record_epochs(label, [{"epoch": 0, "test_error": 5.0}], {})
            s.finish(label)
            members.append((label, label, 32))
        s.register("nf", "default", members)
    md_path, html_path = write_report(tmp_path)
    text = md_path.read_text()
    assert "nf\\_resnet20 / resnet20 on digits, 3 epochs" in text, text
    assert not re.search(r"`[^`\n]*\\[^`\n]*`", text)  # no code span holds an escape
    assert "nf_resnet20 / resnet20 on digits, 3 epochs" in html_path.read_text()


def test_a_study_whose_every_run_is_flagged_is_said_not_missing(tmp_path):
    # four finished runs near chance (a 1-epoch study on a user's data): the summary said "No
    # batch-size ... study has finished runs in this store: `normlab reproduce` runs the
    # batch-size study", the command the user had just run
    text = _fill(tmp_path, {("BN", 32): [85.0], ("GN", 32): [86.0], ("BN", 2): [87.0],
                            ("GN", 2): [88.0]}, {"BN": (1000.0, 1.0), "GN": (900.0, 1.0)})
    summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert ("### batch-size: 4 finished runs, every one flagged (diverged or unconverged) and "
            "left out") in summary, summary
    assert "has finished runs in this store" not in summary, summary


def test_the_stats_batch_study_is_summarized_with_gn_at_every_statistics_batch(tmp_path):
    """A store holding only the stats-batch study opened its report with "No batch-size, norms,
    nf, groups or bn-dropout study has finished runs in this store": the study's answer (BN or
    GN at each statistics batch) was in no summary. GN, which takes no statistics over the
    batch, is one run at 32; its claims compare it with BN at every statistics batch, and so
    does the summary (its cost too)."""
    errors = {("BN", 32): [5.0, 5.4], ("BN", 2): [9.0, 9.6], ("GN", 32): [6.0, 6.2]}
    with Store(tmp_path) as s:
        members = []
        for (label, x), errs in errors.items():
            for seed, err in enumerate(errs):
                rid = f"{label}-{x}-{seed}"
                s.claim(rid, {**BASE, "batch_size": 256, "seed": seed,
                              **(GN8 if label == "GN" else {"norm": "ghostbn"})})
                s.record_epochs(rid, [{"epoch": 0, "test_error": err}],
                                {"images_per_s": 100.0 if label == "BN" else 80.0,
                                 "peak_memory_mb": 10.0, "device": "cpu", "backend": "native"})
                s.finish(rid)
                members.append((rid, label, x))
        s.register("stats-batch", "default", members)
    text = write_report(tmp_path)[0].read_text()
    assert "No batch-size" not in text
    assert "### stats-batch: lowest test error at each BN statistics batch" in text
    assert _row(text, "| 32 |").startswith("| 32 | **BN** 5.20 (n=2) | GN 6.10 (n=2) | 0.90 ± ")
    assert _row(text, "| 2 |").startswith("| 2 | **GN** 6.10 (n=2) | BN 9.30 (n=2) | 3.20 ± ")
    assert "GN takes no statistics over the batch: its runs at 32 stand in every row" in text
    assert _row(text, "| GN |") == ("| GN | 80 img/s (0.80x), 10 MiB | 80 img/s (0.80x), 10 MiB "
                                    "| native |")


def test_the_groups_paper_cell_ranks_the_settings_run_here(tmp_path):
    """The paper's lowest two settings were taken over all 14 of its settings: a study run at
    G = 8, 1 and C/G = 1 (here G = 8 lowest) read "G = 32 24.1, next C/G = 16 24.2 (here:
    G = 8)", a disagreement with settings never run. Now the paper's lowest of those run."""
    errors = {("G", 8): [1.0, 1.4], ("G", 1): [3.0, 3.5], ("C/G", 1): [4.0, 4.4]}
    _groups_store(tmp_path, errors)
    row = _row(write_report(tmp_path)[0].read_text(), "| **G = 8** 1.20 (n=2) | ")
    assert row.endswith("| G = 8 24.4, next G = 1 25.3 (same as here; of the 3 of its settings "
                        "run here) |"), row


def _groups_store(tmp_path, errors):
    """A store holding the groups study: a finished run per seed of each (label, x) in
    ``errors`` (G: num_groups = x; C/G: group_size = x) at the error given."""
    with Store(tmp_path) as s:
        members = []
        for (label, x), errs in errors.items():
            for seed, err in enumerate(errs):
                rid = f"{label}-{x}-{seed}"
                kw = {"num_groups": x} if label == "G" else {"group_size": x}
                s.claim(rid, {**BASE, "batch_size": 32, "seed": seed, "norm": "gn",
                              "norm_kwargs": kw})
                s.record_epochs(rid, [{"epoch": 0, "test_error": err}], {})
                s.finish(rid)
                members.append((rid, label, x))
        s.register("groups", "default", members)
