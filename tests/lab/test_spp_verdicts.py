"""The report's signal-propagation verdicts follow the numbers: records built where a shape holds,
fails, or is missing give reproduced / not reproduced / not run; the report shows them."""

import pytest

from normlab.lab.report import write_report
from normlab.lab.spp_verdicts import (ANALYTIC_TOLERANCE, NOT_REPRODUCED, NOT_RUN, REPRODUCED,
                                      SPP_CLAIMS, follows_analytic, mean_shift_grows)
from normlab.lab.store import Store

ALPHA2 = 0.04


def _nf(scale=1.0, reset=True, stages=3, blocks=4):
    """NF + Scaled WS records: stem, then ``stages`` x ``blocks``; analytic v = 1 + k alpha^2,
    reset at the first block of every stage after the first; measured = scale * analytic (no
    drop at transitions when ``reset`` is False)."""
    recs = [{"depth": 0, "name": "stem", "avg_sq_mean": 1e-4, "avg_var": 1.0,
             "residual_var": None, "expected_var": None}]
    v, carry = 1.0, 1.0
    for s in range(stages):
        for b in range(blocks):
            v = (1.0 if (s > 0 and b == 0) else v) + ALPHA2
            carry = carry + ALPHA2 if not reset else None
            measured = scale * (v if reset else carry)
            recs.append({"depth": len(recs), "name": f"stages.{s}.{b}", "avg_sq_mean": 1e-3,
                         "avg_var": measured, "residual_var": 1.0, "expected_var": v})
    return recs


def _growing(sq, stages=3, blocks=4):
    """Records whose squared mean is ``sq(stage, block)``."""
    return [{"depth": 0, "name": "stem", "avg_sq_mean": 1e-5, "avg_var": 0.3,
             "residual_var": None}] + [
        {"depth": 1 + s * blocks + b, "name": f"stages.{s}.{b}", "avg_sq_mean": sq(s, b),
         "avg_var": 1.0 + b, "residual_var": 1.0} for s in range(stages) for b in range(blocks)]


def test_follows_analytic():
    assert follows_analytic(_nf())[0] == REPRODUCED
    assert follows_analytic(_nf(scale=0.9))[0] == REPRODUCED            # within 20%
    v, why = follows_analytic(_nf(scale=1 - ANALYTIC_TOLERANCE - 0.05))  # 25% low
    assert v == NOT_REPRODUCED and "-25%" in why
    v, why = follows_analytic(_nf(reset=False))    # keeps growing through the transitions
    assert v == NOT_REPRODUCED and "drops at 0/2 transitions" in why
    flat = [{**r, "avg_var": 1.0} for r in _nf()]  # SkipInit-like: no growth at all
    assert "rises over 0/3 stages" in follows_analytic(flat)[1]
    assert follows_analytic([{**r, "expected_var": None} for r in _nf()])[0] == NOT_RUN


def test_follows_analytic_with_one_block_stages():
    # nf_cifar_resnet(8): three one-block stages, each after the first a reset, so the analytic
    # variance is 1 + alpha^2 at every block (equal, not lower, at the transitions); measured
    # values ~10% below it and not monotone (as measured: 1.01, 0.98, 0.90) follow it, with no
    # stage long enough to rise over
    recs = _nf(stages=3, blocks=1)
    assert [r["expected_var"] for r in recs[1:]] == pytest.approx([1 + ALPHA2] * 3)
    for r, m in zip(recs[1:], (1.01, 0.98, 0.90)):
        r["avg_var"] = m
    v, why = follows_analytic(recs)
    assert v == REPRODUCED and "drops at 0/0 transitions" in why and "rises over 0/0" in why


def test_mean_shift_grows():
    v, why = mean_shift_grows(_growing(lambda s, b: 0.2 * (1 + s) * (1 + b)))
    assert v == REPRODUCED and "12x" in why and "rises over 3/3 stages" in why
    # 40x overall (0.1 -> 4.0), but the middle stage falls: not "grows" in every stage
    falls = {0: lambda b: 0.1 * (1 + b), 1: lambda b: 1.0 - 0.1 * b, 2: lambda b: 1.0 + b}
    v, why = mean_shift_grows(_growing(lambda s, b: falls[s](b)))
    assert v == NOT_REPRODUCED and "rises over 2/3 stages" in why
    assert mean_shift_grows(_growing(lambda s, b: 0.5))[0] == NOT_REPRODUCED   # flat


def test_explodes():
    explodes = next(c.check for c in SPP_CLAIMS if c.architecture == "no normalization (He init)")
    big = _growing(lambda s, b: 10.0 ** (s + b))      # 1 -> 1e5
    assert explodes(big)[0] == REPRODUCED
    assert explodes(_growing(lambda s, b: 1.0 + s + b))[0] == NOT_REPRODUCED   # 6x


def test_report_gives_each_measured_kind_its_verdict(tmp_path):
    with Store(tmp_path) as s:
        s.record_spp("nf", _nf(), architecture="NF + Scaled WS")
        s.record_spp("bnrelu", _growing(lambda st, b: 0.2 * (1 + b)), architecture="BN-ReLU-Conv")
        s.record_spp("old", _growing(lambda st, b: 1.0))   # a store row without a kind
    text = write_report(tmp_path)[0].read_text()
    rows = {line.split(" | ")[1]: line for line in text.splitlines()
            if line.startswith("| ") and " | **" in line}
    assert "**reproduced**" in rows["nf"] and "drops at 2/2 transitions" in rows["nf"]
    assert "**reproduced**" in rows["bnrelu"]
    assert "| - | **not run** | no model of the kind 'no normalization (He init)' measured" in text
    assert "The kind of old was not recorded" in text
    assert (tmp_path / "figures" / "spp.png").is_file()


@pytest.mark.parametrize("claim", SPP_CLAIMS, ids=lambda c: c.architecture)
def test_every_claim_names_an_example_of_its_kind(claim):
    from normlab import models, spp
    name, _, spec = claim.example.partition(":")
    kw = dict(kv.split("=") for kv in spec.split(",")) if spec else {}
    kw = {k: {"false": False, "true": True}.get(v, v) for k, v in kw.items()}
    assert spp.describe(models.create(name.replace("56", "20"), **kw)) == claim.architecture


def test_a_measurement_the_store_holds_as_null_is_named_not_a_traceback(tmp_path):
    """A non-finite measurement is stored as NULL (SQLite has no NaN): the report still writes,
    and the model's rows say which block lacks which value instead of dividing None."""
    nf = _nf()
    nf[5]["avg_var"] = float("nan")
    unnormalized = _growing(lambda s, b: 10.0 ** (s + b))
    unnormalized[-1]["avg_sq_mean"] = float("nan")
    with Store(tmp_path) as s:
        s.record_spp("nf", nf, architecture="NF + Scaled WS")
        s.record_spp("plain", unnormalized, architecture="no normalization (He init)")
    text = write_report(tmp_path)[0].read_text()
    rows = {line.split(" | ")[1]: line for line in text.splitlines()
            if line.startswith("| ") and " | **" in line}
    assert "**not run**" in rows["nf"] and "no measured avg\\_var at stages.1.0" in rows["nf"]
    assert "**not run**" in rows["plain"] and "avg\\_sq\\_mean at stages.2.3" in rows["plain"]
    assert (tmp_path / "figures" / "spp.png").is_file()
