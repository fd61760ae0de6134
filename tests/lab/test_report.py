"""Report verdicts are computed from the numbers: fed results where a claim holds, fails or is
within the spread, the verdict follows."""

import shutil

import pytest

import normlab.lab.store as store_mod
from normlab.lab.report import (INCONCLUSIVE, NO_USABLE_RUN, NOT_REPRODUCED, NOT_RUN, REPRODUCED,
                                verdict, write_report)
from normlab.lab.store import Store
from normlab.lab.studies import Claim, get_study


def _s(mean, sd=0.3, n=3):
    return {"mean": mean, "sd": sd, "n": n, "values": []}


LESS = Claim("GN beats BN at batch 2", "less", ("GN", 2), ("BN", 2), 0.0)


@pytest.mark.parametrize("gn, bn, expected", [
    (_s(24.0), _s(34.0), REPRODUCED),            # a clear gap in the claimed direction
    (_s(34.0), _s(24.0), NOT_REPRODUCED),        # a clear gap the other way
    (_s(24.0, 3.0), _s(25.0, 3.0), INCONCLUSIVE),  # gap within the spread
    (_s(24.0, n=1), _s(25.0, n=1), INCONCLUSIVE),  # one seed: no spread measured
    (_s(24.0, n=1), _s(40.0, n=1), INCONCLUSIVE),  # one seed, even a 16-point gap: no spread
])
def test_less(gn, bn, expected):
    assert verdict(LESS, {("GN", 2): gn, ("BN", 2): bn})[0] == expected


def test_less_with_margin_not_reached_is_not_reproduced():
    c = Claim("BN degrades by >= 5 points", "less", ("BN", 32), ("BN", 2), 5.0)
    assert verdict(c, {("BN", 32): _s(24.0), ("BN", 2): _s(25.0)})[0] == NOT_REPRODUCED
    assert verdict(c, {("BN", 32): _s(24.0), ("BN", 2): _s(34.0)})[0] == REPRODUCED


def test_flat_and_match():
    flat = Claim("GN flat", "flat", ("GN", 32), None, 1.0)
    ok = {("GN", x): _s(24.0 + 0.05 * i, sd=0.1) for i, x in enumerate([32, 16, 8, 4, 2])}
    assert verdict(flat, ok)[0] == REPRODUCED
    bad = {**ok, ("GN", 2): _s(30.0, sd=0.1)}
    v, why = verdict(flat, bad)
    assert v == NOT_REPRODUCED and "at 2 +" in why
    m = Claim("match", "match", ("A", 1), ("B", 1), 1.0)
    assert verdict(m, {("A", 1): _s(10.0, 0.1), ("B", 1): _s(10.2, 0.1)})[0] == REPRODUCED
    assert verdict(m, {("A", 1): _s(10.0, 0.1), ("B", 1): _s(15.0, 0.1)})[0] == NOT_REPRODUCED


def test_best_worst_and_missing_points():
    stats = {("both", 0.4): _s(20.0), ("none", 0.4): _s(30.0), ("conv", 0.0): _s(25.0)}
    best = Claim("both best", "best", ("both", 0.4))
    assert verdict(best, stats)[0] == REPRODUCED
    assert verdict(best, {**stats, ("conv", 0.0): _s(10.0)})[0] == NOT_REPRODUCED
    worst = Claim("IN worst", "worst", ("C/G", 1))
    assert verdict(worst, {("C/G", 1): _s(28.0), ("C/G", 16): _s(24.0)})[0] == REPRODUCED
    assert verdict(worst, {("C/G", 1): _s(20.0), ("C/G", 16): _s(24.0)})[0] == NOT_REPRODUCED
    assert verdict(LESS, {("GN", 2): _s(1.0)})[0] == NOT_RUN


def test_a_claim_whose_point_was_run_but_all_flagged_says_so():
    # "no finished run that counts for G at 32" read as if G at 32 was never run, while its
    # runs trained and were flagged (the table cell and the note under it say so)
    gone = {"mean": float("nan"), "sd": None, "n": 0, "values": [],
            "excluded": [{"run_id": "r", "seed": 0, "error": 88.0,
                          "flag": "unconverged (final train loss 2.6 not below its start 2.3)"}]}
    for stats, who in (({("GN", 2): gone, ("BN", 2): _s(5.0)}, "GN at 2"),
                       ({("GN", 2): _s(5.0), ("BN", 2): gone}, "BN at 2")):
        v, why = verdict(LESS, stats)
        assert v == NO_USABLE_RUN  # was "not run", beside numbers that said the runs ran
        assert why == f"every run of {who} flagged, left out (1 unconverged)", why
    assert verdict(LESS, {("GN", 2): _s(1.0)})[1] == "no finished run of BN at 2"


def test_report_states_a_failed_claim(tmp_path):
    # a store where BN is flat and GN collapses at batch 2: the paper's claims must fail
    errors = {("BN", 32): 5.0, ("BN", 2): 5.1, ("GN", 32): 5.2, ("GN", 2): 30.0}
    study = get_study("batch-size")
    members = []
    with Store(tmp_path) as s:
        for (label, x), err in errors.items():
            for seed in range(3):
                rid = f"{label}{x}s{seed}"
                s.claim(rid, {"model": "resnet20", "data": "digits", "epochs": 1, "schedule": "cosine",
                              "base_lr": 0.1, "weight_decay": 1e-4, "seed": seed})
                s.record_epochs(rid, [{"epoch": 0, "test_error": err + 0.1 * seed}], {})
                s.finish(rid)
                members.append((rid, label, x))
        s.register(study.name, "default", members)
    md, html = write_report(tmp_path)
    text = md.read_text()
    row = next(l for l in text.splitlines() if l.startswith("| GN beats BN at batch 2"))
    assert "**not reproduced**" in row
    row = next(l for l in text.splitlines() if l.startswith("| BN degrades at batch 2"))
    assert "**not reproduced**" in row
    row = next(l for l in text.splitlines() if l.startswith("| GN is insensitive"))
    assert "**not reproduced**" in row
    assert "| 5.10 ± 0.10 (n=3) |" in text   # BN at 32: mean and spread over seeds
    assert "23.6" in text                      # the paper's table beside ours
    h = html.read_text()
    assert "data:image/png;base64," in h and "not reproduced" in h
    assert (tmp_path / "figures" / "batch-size_error.png").is_file()
    assert (tmp_path / "figures" / "batch-size_error.svg").is_file()


def test_report_of_an_empty_store_says_there_is_nothing_yet(tmp_path):
    Store(tmp_path).close()
    md, _ = write_report(tmp_path)
    assert "No runs in this store yet" in md.read_text()


def test_report_lists_the_single_runs_of_normlab_train(tmp_path):
    # `normlab train` runs are in the store (study "train"): the report shows them
    with Store(tmp_path) as s:
        for rid, norm, err in (("r1", "gn", 12.5), ("r2", "bn", None)):
            s.claim(rid, {"model": "resnet20", "norm": norm, "data": "digits", "batch_size": 4,
                          "epochs": 2, "seed": 0})
            if err is not None:
                s.record_epochs(rid, [{"epoch": 0, "test_error": 13.0},
                                      {"epoch": 1, "test_error": err}], {})
                s.finish(rid)
            s.register("train", "single", [(rid, norm, 4)])
    text = write_report(tmp_path)[0].read_text()
    assert "## Single runs (`normlab train`)" in text
    assert "| gn | resnet20 | gn | digits | 4 | 0 | 2/2 | done | 12.50 |" in text
    assert "| bn | resnet20 | bn | digits | 4 | 0 | 0/2 | running | - |" in text


def test_the_single_runs_table_says_which_runs_were_tested_with_precise_bn(tmp_path):
    # `normlab train` and `normlab train --set precise_bn=50` into one OUT: two runs whose rows
    # were the same but for the test error, with nothing saying which was tested how
    with Store(tmp_path) as s:
        for rid, precise, err in (("r1", 0, 6.96), ("r2", 50, 6.69)):
            s.claim(rid, {"model": "resnet20", "norm": "bn", "data": "digits", "batch_size": 32,
                          "epochs": 1, "seed": 0, "precise_bn": precise})
            s.record_epochs(rid, [{"epoch": 0, "test_error": err}], {})
            s.finish(rid)
            s.register("train", "single", [(rid, "bn", 32)])
    text = write_report(tmp_path)[0].read_text()
    assert "| 1/1 | done | 6.96 |" in text, text
    assert "| 1/1 | done | 6.69 (PreciseBN statistics, 50 batches) |" in text, text


def test_the_single_runs_table_says_a_run_diverged(tmp_path):
    # `normlab train --lr 1000`: a NaN loss in epoch 0, the run stopped "diverged" (its line
    # said so, and `ls` does); the report's table called it "done" beside its 91% error
    with Store(tmp_path) as s:
        s.claim("r1", {"model": "resnet20", "norm": "bn", "data": "digits", "batch_size": 32,
                       "epochs": 2, "seed": 0})
        s.record_epochs("r1", [{"epoch": 0, "train_loss": float("nan"), "test_error": 91.09}],
                        {})
        s.finish("r1", error="non-finite training loss in epoch 0")
        s.register("train", "single", [("r1", "bn", 32)])
    text = write_report(tmp_path)[0].read_text()
    assert "| 1/2 | done, diverged (non-finite training loss in epoch 0) | 91.09 |" in text, text


def test_report_states_a_hand_set_lr_instead_of_the_scaling_rule(tmp_path):
    """`reproduce --set lr=0.05` trains every batch size at 0.05; the report said 'base lr 0.1
    x N x 1/32' (the rule it did not use), so a reader would credit the numbers to the GN
    recipe."""
    study = get_study("batch-size")
    with Store(tmp_path) as s:
        members = []
        for label, x in (("BN", 32), ("BN", 2)):
            rid = f"{label}{x}"
            s.claim(rid, {"model": "resnet20", "data": "digits", "epochs": 1, "schedule": "cosine",
                          "base_lr": 0.1, "lr": 0.05, "batch_size": x, "weight_decay": 1e-4,
                          "seed": 0})
            s.record_epochs(rid, [{"epoch": 0, "test_error": 5.0}], {})
            s.finish(rid)
            members.append((rid, label, x))
        s.register(study.name, "default", members)
    text = write_report(tmp_path)[0].read_text()
    assert "peak lr 0.05 set by hand (not scaled with the batch)" in text
    assert "base lr 0.1 x" not in text


def test_a_label_cannot_inject_markdown_into_the_report(tmp_path):
    """Issue 14 item 8: a newline in `--set label=` injected lines into report.md (a heading,
    table rows). A label is one table cell of literal text, in report.md and report.html."""
    label = "GN\n## injected heading\n| fake | row |\n**bold** `code` <b>x</b> [l](u) _i_"
    with Store(tmp_path) as s:
        for rid, lab, study in (("r1", label, "train"), ("r2", label, "batch-size")):
            s.claim(rid, {"model": "resnet20", "norm": "gn", "data": "digits", "batch_size": 4,
                          "epochs": 1, "seed": 0, "schedule": "cosine", "base_lr": 0.1,
                          "weight_decay": 1e-4})
            s.record_epochs(rid, [{"epoch": 0, "test_error": 12.5}], {})
            s.finish(rid)
            s.register(study, "default", [(rid, lab, 4)])
    md_path, html_path = write_report(tmp_path)
    md = md_path.read_text().splitlines()
    assert not any(line.startswith(("## injected", "| fake")) for line in md)
    rows = [line for line in md if "injected" in line]
    # the study table, the single runs, and the summary (lowest error, cost) of batch-size
    assert len(rows) == 5 and all("GN \\#\\# injected heading \\| fake" in r for r in rows)
    assert sum(r.startswith("| GN \\#\\# injected heading \\| fake") for r in rows) == 3
    h = html_path.read_text()
    literal = ("GN ## injected heading | fake | row | **bold** `code` &lt;b&gt;x&lt;/b&gt; "
               "[l](u) _i_")
    assert h.count(f"<td>{literal}</td>") == 3, h
    assert "<h2>injected" not in h and "<b>bold</b>" not in h and "<b>x</b>" not in h


def test_report_cells_name_the_flag_of_the_runs_left_out(tmp_path):
    """Issue 12 item 2: a point whose runs were all unconverged (near chance) read "diverged".
    Each cell says which flags left runs out: unconverged, diverged, or both, with counts."""
    study = get_study("batch-size")
    runs = {("BN", 32): [(0.3, None), (2.5, None), (85.0, None)],   # one near chance (>= 81%)
            ("GN", 32): [(86.0, None), (88.0, None)],               # every run near chance
            ("GN", 2): [(40.0, "diverged: non-finite training loss in epoch 1"), (87.0, None)]}
    with Store(tmp_path) as s:
        members = []
        for (label, x), results in runs.items():
            for seed, (err, error) in enumerate(results):
                rid = f"{label}{x}s{seed}"
                s.claim(rid, {"model": "resnet20", "data": "digits", "epochs": 1,
                              "schedule": "cosine", "base_lr": 0.1, "weight_decay": 1e-4,
                              "seed": seed})
                s.record_epochs(rid, [{"epoch": 0, "test_error": err}], {})
                s.finish(rid, "done", error)
                members.append((rid, label, x))
        s.register(study.name, "default", members)
    text = write_report(tmp_path)[0].read_text()
    table = text.split("### Test error (%)")[1].split("###")[0].splitlines()
    bn = next(l for l in table if l.startswith("| BN |"))
    gn = next(l for l in table if l.startswith("| GN |"))
    assert "| 1.40 ± 1.56 (n=2; 1 unconverged left out) |" in bn
    assert "| 2 unconverged (left out) |" in gn and "| 1 diverged, 1 unconverged (left out) |" in gn
    assert "- GN at 32, seed 1 (run GN32s1): test error 88.00%, unconverged (test error 88.0% " \
           "near chance, 90%)" in text
    assert "- GN at 2, seed 0 (run GN2s0): test error 40.00%, diverged (diverged: non-finite " \
           "training loss in epoch 1)" in text
    # GN at 32 trained and was flagged: its claim is "no usable run", not "not run"
    row = next(l for l in text.splitlines() if l.startswith("| BN beats GN at the largest"))
    assert "| **no usable run** | every run of GN at 32 flagged, left out (2 unconverged) | - |" \
        in row, row


def test_an_open_claim_states_the_seeds_its_spread_would_need(tmp_path):
    # BN@32 1.0/1.5, GN@32 1.3/1.8: d = 0.3, sd 0.354 each, se_d = 0.354 -> inconclusive;
    # the fewest n with t(df 2(n - 1)) sqrt(0.25 / n) < 0.3: 13 seeds per point (t(24) = 2.11;
    # the normal count floor(4 x 0.25 / 0.3^2) + 1 = 12)
    study = get_study("batch-size")
    with Store(tmp_path) as s:
        members = []
        for (label, errs) in (("BN", (1.0, 1.5)), ("GN", (1.3, 1.8))):
            for seed, err in enumerate(errs):
                rid = f"{label}s{seed}"
                s.claim(rid, {"model": "resnet20", "data": "digits", "epochs": 1,
                              "schedule": "cosine", "base_lr": 0.1, "weight_decay": 1e-4,
                              "seed": seed})
                s.record_epochs(rid, [{"epoch": 0, "test_error": err}], {})
                s.finish(rid)
                members.append((rid, label, 32))
        s.register(study.name, "default", members)
    text = write_report(tmp_path)[0].read_text()
    row = next(l for l in text.splitlines() if l.startswith("| BN beats GN at the largest"))
    assert "**inconclusive**" in row and "| 2; about 13 would decide it |" in row
    row = next(l for l in text.splitlines() if l.startswith("| GN beats BN at batch 2"))
    assert "**not run**" in row and "| - |" in row


def test_report_states_the_emulated_device_protocol_its_runs_used(tmp_path):
    """Runs of the per-device protocol (8 emulated devices: SGD batch 8 x N, lr 0.1 x N/32
    written into each config, BN through ghost batches) were described from their configs as
    'Images per process: 256, ...; processes: 1 ... peak lr set by hand', which is not what ran.
    The report states the protocol the store recorded with the study's setup."""
    study = get_study("batch-size")
    protocol = study.protocol(8)
    with Store(tmp_path) as s:
        members = []
        for x in (32, 2):  # the emulation's configs: 8 x N images per step, lr set from N
            rid = f"BN{x}"
            s.claim(rid, {"model": "resnet20", "data": "digits", "epochs": 1, "schedule": "cosine",
                          "base_lr": 0.1, "lr": 0.1 * x / 32, "batch_size": 8 * x,
                          "norm": "ghostbn", "norm_kwargs": {"virtual_batch": x},
                          "weight_decay": 1e-4, "seed": 0})
            s.record_epochs(rid, [{"epoch": 0, "test_error": 5.0}], {})
            s.finish(rid)
            members.append((rid, "BN", x))
        s.register(study.name, "default", members, info={"protocol": protocol})
    text = write_report(tmp_path)[0].read_text()
    assert "**Protocol: per device, 8 emulated devices on one process**" in text
    assert "SGD batch 8 x N images, lr base\\_lr x N / 32" in text
    assert "set by hand" not in text and "Images per process: 256" not in text


def test_a_seed_count_beyond_reason_is_said_as_such():
    from normlab.lab.report import _seeds_cell
    open_claim = {"verdict": "inconclusive", "seeds": 5}
    assert _seeds_cell({**open_claim, "seeds_needed": 12}) == "5; about 12 would decide it"
    assert _seeds_cell({**open_claim, "seeds_needed": 57_249}).startswith(
        "5; over 1000 would decide it (the difference is close to the claim's boundary)")
    assert "a point has one seed" in _seeds_cell({**open_claim, "seeds_needed": None,
                                                  "fewest_seeds": 1})
    boundary = "on the claim's boundary (equal means, or a gap equal to the claim's margin)"
    assert boundary in _seeds_cell({**open_claim, "seeds_needed": None, "fewest_seeds": 3})


def test_no_stored_string_can_inject_markdown_or_html(tmp_path):
    """A store from elsewhere holds any text: config values, the device, versions and the
    recorded protocol went into report.md as written (a newline made a heading, a '|' a cell),
    beside the labels that were already escaped. Every stored string is literal text now."""
    evil = "x\n# injected | cell <script>alert(1)</script>"
    with Store(tmp_path) as s:
        for rid, study in (("r1", "train"), ("r2", "batch-size")):
            s.claim(rid, {"model": evil, "norm": evil, "data": evil, "batch_size": 4,
                          "epochs": 1, "seed": 0, "schedule": evil, "weight_decay": 1e-4})
            s.record_epochs(rid, [{"epoch": 0, "test_error": 12.5}],
                            {"device": evil, "versions": {evil: evil}})
            s.finish(rid)
            s.register(study, "default", [(rid, "GN", 4)],
                       info={"protocol": {k: evil for k in ("name", "devices", "sgd_batch", "lr",
                                                            "statistics", "source")}})
    md_path, html_path = write_report(tmp_path)
    md = md_path.read_text()
    assert not any(line.startswith("# injected") for line in md.splitlines())
    assert md.count("x \\# injected \\| cell \\<script\\>") >= 10, md
    h = html_path.read_text()
    assert "<script" not in h and "<h1>injected" not in h
    assert h.count("x # injected | cell &lt;script&gt;alert(1)&lt;/script&gt;") >= 10, h


def test_control_characters_in_stored_text_are_shown_as_escapes(tmp_path):
    """A label (or any stored string) holding an ANSI escape sequence or a bell went into
    report.md and report.html byte for byte: `cat report.md` recoloured or cleared the
    terminal. Control characters are written as their escapes (\\x1b), as on the console."""
    evil = "GN\x1b[2J\x1b[31mred\x07\x9b1m"
    with Store(tmp_path) as s:
        s.claim("r1", {"model": "resnet20", "norm": "gn", "data": "digits", "batch_size": 4,
                       "epochs": 1, "seed": 0, "schedule": evil, "weight_decay": 1e-4})
        s.record_epochs("r1", [{"epoch": 0, "test_error": 12.5}], {"device": evil})
        s.finish("r1")
        s.register("batch-size", "default", [("r1", evil, 4)])
    md_path, html_path = write_report(tmp_path)
    for text in (md_path.read_text(), html_path.read_text()):
        assert not any(ch in text for ch in "\x1b\x07\x9b")
    assert "GN\\\\x1b\\[2J\\\\x1b\\[31mred\\\\x07\\\\x9b1m" in md_path.read_text()
    assert "GN\\x1b[2J\\x1b[31mred\\x07\\x9b1m" in html_path.read_text()


@pytest.mark.parametrize("precise", [0, 40])
def test_report_says_when_runs_were_tested_with_precise_bn_statistics(tmp_path, precise):
    """`--set precise_bn=B` changes every test error of a BN series: the summary and the
    study's section say so, and a study without it says nothing of it."""
    study = get_study("batch-size")
    with Store(tmp_path) as s:
        members = []
        for label, x in (("BN", 32), ("GN", 32), ("BN", 2), ("GN", 2)):
            rid = f"{label}{x}"
            s.claim(rid, {"model": "resnet20", "data": "digits", "epochs": 1, "schedule": "cosine",
                          "batch_size": x, "weight_decay": 1e-4, "seed": 0,
                          "norm": label.lower(), "precise_bn": precise})
            s.record_epochs(rid, [{"epoch": 0, "test_error": 5.0 + x / 10}], {})
            s.finish(rid)
            members.append((rid, label, x))
        s.register(study.name, "default", members)
    text = write_report(tmp_path)[0].read_text()
    said = "running statistic recomputed over 40 training batches"
    assert text.count(said) == (2 if precise else 0)  # the summary and the study's section
    # 40 may be more than an epoch has (digits at 32 images: 45 batches; at 2: 719): the
    # loader's epoch is all there is, which the text said nothing of
    assert text.count(said + " (all of an epoch's where it has fewer)") == text.count(said)
    assert ("PreciseBN" in text) == bool(precise)


def test_a_stored_label_or_preset_cannot_inject_markdown_through_the_claims_or_preset_line(
        tmp_path):
    """A best claim's numbers name its closest rival by its stored label, and the study's line
    names its stored preset: both went into report.md as written, so a newline in either made
    a heading and a '|' split the claims row. They are literal text, as every other cell."""
    evil = "ev\n## injected | cell"
    with Store(tmp_path) as s:
        members = []
        for rid, label, err in (("a", "conv+dense", 20.0), ("b", evil, 30.0)):
            s.claim(rid, {"model": "bn_dropout_cnn", "data": "digits", "epochs": 1, "seed": 0})
            s.record_epochs(rid, [{"epoch": 0, "test_error": err}], {})
            s.finish(rid)
            members.append((rid, label, 0.4))
        s.register("bn-dropout", "pre\n# injected preset", members)
    md_path, html_path = write_report(tmp_path)
    md = md_path.read_text().splitlines()
    assert not any(line.startswith(("## injected", "# injected")) for line in md), md
    row = next(line for line in md if line.startswith("| BN on conv and dense layers"))
    assert "closest rival ev \\#\\# injected \\| cell@0.4 30.00" in row, row
    assert "Preset `pre \\# injected preset`: 2/2 runs done" in md_path.read_text()
    h = html_path.read_text()
    assert "<h2>injected" not in h and "<h1>injected" not in h
    assert "<td>conv+dense@0.4 20.00; closest rival ev ## injected | cell@0.4 30.00" in h


def test_the_seeds_of_a_claim_whose_points_have_unequal_seeds_are_a_range(tmp_path):
    """BN at 32 with 6 seeds, BN at 2 with 2 (power rounds give seeds point by point): the
    claims table said "6; about 4 would decide it", as if more seeds than needed were there
    already. Its points have 2 to 6: "2-6; about 4 would decide it"."""
    errs = {("BN", 32): [1.0, 1.1, 1.05, 1.3, 0.9, 1.2], ("BN", 2): [0.8, 1.5]}
    with Store(tmp_path) as s:
        members = []
        for (label, x), es in errs.items():
            for seed, err in enumerate(es):
                rid = f"{label}{x}s{seed}"
                s.claim(rid, {"model": "resnet20", "data": "digits", "epochs": 1, "seed": seed})
                s.record_epochs(rid, [{"epoch": 0, "test_error": err}], {})
                s.finish(rid)
                members.append((rid, label, x))
        s.register("batch-size", "default", members)
    text = write_report(tmp_path)[0].read_text()
    row = next(l for l in text.splitlines() if l.startswith("| BN degrades at batch 2"))
    # d = 1.15 - 1.09 = 0.06, 0.94 short of the margin: sds 0.143 (floored 0.25) and 0.495;
    # t(Welch df) sqrt((0.25^2 + 0.495^2) / n) is 1.07 at n = 3, 0.76 at n = 4 (scipy)
    assert "**inconclusive**" in row and "| 2-6; about 4 would decide it |" in row, row


def test_a_stored_string_ending_in_a_backslash_keeps_the_html_markup_after_it(tmp_path):
    """report.md escapes a backslash as '\\\\'; the HTML writer took the second backslash of
    that pair for the escape of the '**' after it, so a label ending in a backslash left the
    summary's bold open ('<b>C:\\** 5.00 ...</b>') and a model name ending in one shifted every
    code span of its line. An escaped backslash is one literal backslash, the markup after it
    is markup."""
    with Store(tmp_path) as s:
        s.claim("r", {"model": "m\\", "data": "digits", "epochs": 1, "seed": 0, "batch_size": 4})
        s.record_epochs("r", [{"epoch": 0, "test_error": 5.0}], {})
        s.finish("r")
        s.register("batch-size", "default", [("r", "C:\\", 4)])
    h = write_report(tmp_path)[1].read_text()
    assert "<td><b>C:\\</b> 5.00 (n=1)</td>" in h, h
    assert "**" not in h and "<b>C:\\** " not in h


def test_the_study_line_names_every_model_its_runs_trained(tmp_path):
    """The nf study trains BN on resnet20 and NF on nf_resnet20; its section said "model
    resnet20" (the first run's), a model half its runs did not train."""
    with Store(tmp_path) as s:
        members = []
        for label, model in (("BN", "resnet20"), ("NF", "nf_resnet20")):
            s.claim(label, {"model": model, "data": "digits", "epochs": 1, "seed": 0,
                            "schedule": "cosine", "weight_decay": 1e-4, "batch_size": 32})
            s.record_epochs(label, [{"epoch": 0, "test_error": 5.0}], {})
            s.finish(label)
            members.append((label, label, 32))
        s.register("nf", "default", members)
    text = write_report(tmp_path)[0].read_text()
    # (optimizer: the configs predate the field, so they trained with SGD)
    assert ("2/2 runs done; model nf\\_resnet20 / resnet20, data digits, 1 epoch, optimizer sgd, "
            "schedule cosine, weight decay 0.0001.") in text, text


def test_the_study_line_names_the_optimizer(tmp_path):
    # --set optimizer=adamw (a transformer's study): the section said "schedule cosine, weight
    # decay 0.05" without saying that the decay was AdamW's
    with Store(tmp_path) as s:
        s.claim("r", {"model": "timm:vit_tiny_patch16_224", "data": "digits", "epochs": 1,
                      "seed": 0, "optimizer": "adamw", "schedule": "cosine",
                      "weight_decay": 0.05, "batch_size": 32})
        s.record_epochs("r", [{"epoch": 0, "test_error": 5.0}], {})
        s.finish("r")
        s.register("norms", "default", [("r", "LN", 32)])
    text = write_report(tmp_path)[0].read_text()
    assert "1 epoch, optimizer adamw, schedule cosine, weight decay 0.05." in text, text


def test_the_environment_is_the_latest_run_that_recorded_one(tmp_path):
    """A run claimed after the finished ones (a report written while a study runs, or a run
    that failed before its first epoch) records no device or versions: the Environment said
    "device: None; versions: " beside finished runs that had recorded them, and the summary's
    cost line "device: None"."""
    with Store(tmp_path) as s:
        s.claim("done", {"model": "resnet20", "data": "digits", "epochs": 1, "seed": 0,
                         "batch_size": 32, "norm": "bn"})
        s.record_epochs("done", [{"epoch": 0, "test_error": 5.0}],
                        {"device": "cpu (2 cores)", "versions": {"torch": "2.0"}})
        s.finish("done")
        s.claim("later", {"model": "resnet20", "data": "digits", "epochs": 1, "seed": 1,
                          "batch_size": 32, "norm": "bn"})
        s.record_epochs("later", [{"epoch": 0, "test_error": 6.0}], {})  # no device recorded
        s.finish("later")
        s.register("batch-size", "default", [("done", "BN", 32), ("later", "BN", 32)])
    text = write_report(tmp_path)[0].read_text()
    assert "None" not in text
    assert "## Environment\n\ndevice: cpu (2 cores); versions: torch 2.0\n" in text, text
    assert "peak memory; device: cpu (2 cores)):" in text


def test_an_entity_or_a_strikethrough_in_a_label_is_literal_text(tmp_path):
    """A label 'a&lt;b ~~c~~' read 'a<b' with 'c' struck through wherever report.md is shown
    (markdown decodes entities; '~~' is GitHub's strikethrough): the stored text, literally."""
    label = "a&lt;b ~~c~~"
    with Store(tmp_path) as s:
        s.claim("r", {"model": "resnet20", "data": "digits", "epochs": 1, "seed": 0})
        s.record_epochs("r", [{"epoch": 0, "test_error": 5.0}], {})
        s.finish("r")
        s.register("batch-size", "default", [("r", label, 4)])
    md_path, html_path = write_report(tmp_path)
    assert "| a\\&lt;b \\~\\~c\\~\\~ | 5.00 (n=1) |" in md_path.read_text()
    assert "<td>a&amp;lt;b ~~c~~</td>" in html_path.read_text()


def test_a_report_written_while_a_study_trains_reads_one_state_of_the_store(tmp_path,
                                                                          monkeypatch):
    # `normlab report` beside a training study read each section at its own moment: a run
    # finished between the summary and the study's section was counted in one and not in the
    # other ("(4 runs)" above a "5/5 runs done" table, a summary mean of n=2 beside n=3)
    import normlab.lab.report as report

    def finish(s, rid, label, seed, err):
        s.claim(rid, {"model": "resnet20", "data": "digits", "epochs": 1, "seed": seed})
        s.record_epochs(rid, [{"epoch": 0, "test_error": err, "train_loss": 1.0}], {})
        s.finish(rid)
        s.register("batch-size", "quick", [(rid, label, 32)])

    with Store(tmp_path) as s:
        for i, (label, seed, err) in enumerate([("BN", 0, 5.0), ("BN", 1, 5.2), ("GN", 0, 6.0),
                                                ("GN", 1, 6.4)]):
            finish(s, f"r{i}", label, seed, err)
    summary = report.summary_lines

    def summary_then_another_run_ends(store):
        lines = summary(store)
        with Store(tmp_path) as other:  # another process's study finishes a run meanwhile
            finish(other, "late", "BN", 2, 9.0)
        return lines

    monkeypatch.setattr(report, "summary_lines", summary_then_another_run_ends)
    text = write_report(tmp_path, tmp_path / "rep")[0].read_text()
    assert "(4 runs)" in text and "4/4 runs done" in text, text
    assert "**BN** 5.10 (n=2)" in text and "| BN | 5.10 ± 0.14 (n=2) |" in text, text
    with Store(tmp_path, read_only=True) as s:  # the run did land: the next report has it
        assert s.run("late")["status"] == "done"


def test_the_study_section_counts_and_lists_the_runs_without_a_result(tmp_path):
    # a study stopped part-way (a failed run, one killed mid-training, two never reached):
    # its section said "2/3 runs done, 1 failed" of 6 registered runs, the GN row was gone
    # (no GN run had a row yet) and a failed point was a bare "-", with nothing saying which
    # run failed, why, or that re-running the command retries it
    with Store(tmp_path) as s:
        cfg = lambda seed: {"model": "resnet20", "data": "digits", "epochs": 4, "seed": seed}
        members = [("bn32", "BN", 32), ("bn2", "BN", 2), ("bn2b", "BN", 2), ("gn32", "GN", 32),
                   ("gn2", "GN", 2), ("gn2b", "GN", 2)]
        s.register("batch-size", "quick", members)
        for rid, seed in (("bn32", 0), ("bn2", 0)):
            s.claim(rid, cfg(seed))
            s.record_epochs(rid, [{"epoch": 0, "test_error": 5.0, "train_loss": 1.0}], {})
            s.finish(rid)
        s.claim("bn2b", cfg(1))
        s.finish("bn2b", "failed", "RuntimeError: boom at step 0")
        s.claim("gn32", cfg(0))
        s.record_epochs("gn32", [{"epoch": 0, "test_error": 9.0, "train_loss": 1.0}], {})
        s.release("gn32")  # interrupted after its first epoch
    text = write_report(tmp_path)[0].read_text()
    assert "Preset `quick`: 2/6 runs done, 1 failed, 1 interrupted, 2 not started;" in text, text
    assert "| BN | 5.00 (n=1) | 5.00 (n=1; 1 failed) |" in text, text
    assert "| GN | 1 interrupted | 2 not started |" in text, text
    assert "- BN at 2, seed 1 (run bn2b): failed: RuntimeError: boom at step 0" in text, text
    assert "- GN at 32, seed 0 (run gn32): interrupted after epoch 1/4" in text, text
    assert "- GN at 2 (run gn2b): not started" in text and "retries the failed ones" in text


def _stored_setup(out, user, err):
    """``batch-size --quick`` on the setup ``user``, its runs finished with test error ``err``."""
    st = get_study("batch-size")
    pts = st.points(user, "quick", 1)
    with Store(out) as s:
        s.register(st.name, "quick", [(p.cfg.run_id(), p.label, p.x) for p in pts],
                   setup=pts[0].setup)
        for p in pts:
            if s.claim(p.cfg.run_id(), p.cfg.to_dict()) != "done":
                s.record_epochs(p.cfg.run_id(), [{"epoch": 0, "test_error": err,
                                                  "train_loss": 1.0}], {})
                s.finish(p.cfg.run_id())
    return pts


def test_the_section_names_the_earlier_setups_it_does_not_show(tmp_path):
    # one --out over weeks: the study on digits, then on synthetic, then on synthetic for 2
    # epochs. The section showed the last setup alone, with no word that the store held 8 more
    # runs of the study, nor on what; `normlab ls` marked them all "earlier setup" alike
    from typer.testing import CliRunner

    from normlab.lab.cli import app

    digits = _stored_setup(tmp_path, {"epochs": 1}, 5.0)
    synthetic = _stored_setup(tmp_path, {"epochs": 1, "data": "synthetic"}, 40.0)
    _stored_setup(tmp_path, {"epochs": 2, "data": "synthetic"}, 30.0)
    text = write_report(tmp_path)[0].read_text()
    assert ("Not in this section: 8 runs of this study that the store holds on 2 earlier "
            "setups (data digits, epochs 1: 4 runs; data synthetic, epochs 1: 4 runs; this "
            "section's: data synthetic, epochs 2).") in text, text
    assert "| BN | 30.00 (n=1) | 30.00 (n=1) |" in text, text  # the last setup's runs only
    assert "with a setup's options and `--budget-runs 0` shows that setup here again" in text
    out = CliRunner().invoke(app, ["ls", str(tmp_path)], terminal_width=300).output
    for points, setup in ((digits, "data digits, epochs 1"),
                          (synthetic, "data synthetic, epochs 1")):
        for p in points:
            row = next(line for line in out.splitlines() if p.cfg.run_id() in line)
            assert f"(earlier setup: {setup}; not in the report)" in row, row


def test_a_report_number_is_derived_again_from_the_csv_exports(tmp_path):
    # runs.csv had no study, point, setup or flag: with a study on two setups and a flagged
    # run in one --out, a user could not tell from the CSVs which runs a cell's mean is over
    # (the mean of every BN run at 32 in runs.csv was 24.00, the report's 5.10)
    import csv
    import statistics

    _stored_setup(tmp_path, {"epochs": 1, "data": "synthetic"}, 50.0)  # an earlier setup
    study = get_study("batch-size")
    pts = study.points({"epochs": 2}, "quick", 3)
    with Store(tmp_path) as s:
        s.register(study.name, "quick", [(p.cfg.run_id(), p.label, p.x) for p in pts],
                   setup=pts[0].setup)
        for p in pts:
            s.claim(p.cfg.run_id(), p.cfg.to_dict())
            stuck = (p.label, p.x, p.cfg.seed) == ("BN", 32, 2)  # its loss never fell
            s.record_epochs(p.cfg.run_id(), [
                {"epoch": e, "train_loss": 2.0 if stuck else 2.0 - e,
                 "test_error": 5.0 + 0.1 * p.cfg.seed} for e in range(2)], {})
            s.finish(p.cfg.run_id())
    text = write_report(tmp_path)[0].read_text()
    cell = "5.05 ± 0.07 (n=2; 1 unconverged left out)"
    assert f"| BN | {cell} |" in text, text
    with open(tmp_path / "runs.csv", newline="") as f:
        runs = {r["run_id"]: r for r in csv.DictReader(f)}
    with open(tmp_path / "studies.csv", newline="") as f:
        members = list(csv.DictReader(f))
    values = [float(runs[m["run_id"]]["final_test_error"]) for m in members
              if (m["study"], m["in_report"], m["label"], m["x"]) == ("batch-size", "True", "BN",
                                                                     "32")
              and runs[m["run_id"]]["status"] == "done" and not runs[m["run_id"]]["flag"]]
    assert f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)}" \
        in cell
    flagged = [r for r in runs.values() if r["flag"]]
    assert len(flagged) == 1 and "not below its start" in flagged[0]["flag"], flagged
    earlier = {m["setup"] for m in members if m["in_report"] == "False"}
    assert len(earlier) == 1 and earlier != {m["setup"] for m in members
                                              if m["in_report"] == "True"}


def test_a_report_checks_each_stored_config_once(tmp_path, monkeypatch):
    # every read of a run checked its config field by field (typing.get_type_hints per key):
    # a report of 1000 runs spent 27 s on it, 95 s once the report also named earlier setups
    # and unfinished runs; now each config text is checked once while the store is open
    import normlab.lab.store as store_mod

    _stored_setup(tmp_path, {"epochs": 1}, 5.0)
    _stored_setup(tmp_path, {"epochs": 2}, 6.0)  # 8 runs on 2 setups
    checked = []
    check = store_mod.run_config
    monkeypatch.setattr(store_mod, "run_config",
                        lambda path, rid, raw: checked.append(rid) or check(path, rid, raw))
    write_report(tmp_path)
    assert sorted(checked) == sorted(set(checked)) and len(checked) == 8, checked


def _report_files(out):
    """report.md but its time line, and the exports, as text."""
    md = [line for line in (out / "report.md").read_text().splitlines()
          if not line.startswith("Generated ")]
    return {"report.md": md, **{n: (out / n).read_text() for n in ("runs.csv", "studies.csv")}}


def test_a_report_reads_the_study_members_once_per_snapshot_and_writes_the_same(tmp_path,
                                                                                 monkeypatch):
    # a report asked the store for a study's members O(studies) times (study_members,
    # setup_info, memberships), each reading and hashing every member's config: 15 reads of
    # 1000 members for 2 studies; now once per snapshot (the report's and the exports')
    out, reference = tmp_path / "out", tmp_path / "reference"
    _stored_setup(out, {"epochs": 1}, 5.0)
    _stored_setup(out, {"epochs": 2}, 6.0)  # 8 runs on 2 setups
    st = get_study("norms")
    pts = st.points({"epochs": 1}, "quick", 1)
    with Store(out) as s:
        s.register(st.name, "quick", [(p.cfg.run_id(), p.label, p.x) for p in pts],
                   setup=pts[0].setup)
        for k, p in enumerate(pts[:-1]):  # the last point never claimed
            s.claim(p.cfg.run_id(), p.cfg.to_dict())
            s.record_epochs(p.cfg.run_id(), [{"epoch": 0, "test_error": 20.0 + 3.7 * k,
                                              "train_loss": 1.0}], {})
            s.finish(p.cfg.run_id())
        members = len(s.memberships())
    shutil.copytree(out, reference)
    hashed = []
    settings = store_mod._settings
    with monkeypatch.context() as m:
        m.setattr(store_mod, "_settings", lambda c: hashed.append(1) or settings(c))
        write_report(out)
    assert len(hashed) == 2 * (members - 1), (len(hashed), members)  # the report, the exports
    with monkeypatch.context() as m:  # the reference: the members read at every call
        m.setattr(Store, "_members", lambda self, study=None: self._read_members(study))
        write_report(reference)
    assert _report_files(out) == _report_files(reference)


def test_the_single_runs_table_says_why_a_run_failed_and_which_was_interrupted(tmp_path):
    # a `normlab train` run that raised, and one killed mid-training: the table said "failed"
    # without why, and "running" for a run no process trains (a re-run resumes it)
    with Store(tmp_path) as s:
        for rid in ("broken", "killed"):
            s.claim(rid, {"model": "resnet20", "norm": "bn", "data": "digits", "batch_size": 4,
                          "epochs": 2, "seed": 0})
            s.register("train", "single", [(rid, "bn", 4)])
        s.finish("broken", "failed", "RuntimeError: CUDA error: an illegal memory access")
        s.release("killed")
    text = write_report(tmp_path)[0].read_text()
    assert "| 0/2 | failed: RuntimeError: CUDA error: an illegal memory access | - |" in text, text
    assert "| 0/2 | interrupted | - |" in text, text
