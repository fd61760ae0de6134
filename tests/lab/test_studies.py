"""Every study's run list is well formed and buildable; every optional series trains."""

import pytest

from normlab.lab.config import ConfigError
from normlab.lab.store import Store
from normlab.lab.studies import STUDIES, get_study
from normlab.lab.trainer import preflight, train_run

# expected runs per seed: series x axis points
EXPECTED = {("batch-size", "default"): 10, ("batch-size", "quick"): 10,
            ("groups", "default"): 14, ("groups", "quick"): 6,
            ("norms", "default"): 5, ("norms", "quick"): 5,
            ("bn-dropout", "default"): 12, ("bn-dropout", "quick"): 12,
            ("nf", "default"): 10, ("nf", "quick"): 6}


@pytest.mark.parametrize("name, preset", sorted(EXPECTED))
def test_points_are_distinct_and_buildable(name, preset):
    st = get_study(name)
    pts = st.points({}, preset, seeds=2)
    assert len(pts) == 2 * EXPECTED[(name, preset)]
    assert len({p.cfg.run_id() for p in pts}) == len(pts)  # no two points share a run
    assert {p.cfg.seed for p in pts} == {0, 1}
    assert {(c.a[0]) for c in st.claims} <= set(st.variants)
    preflight([p.cfg for p in pts])  # dataset loads, every model/norm combination builds


def test_user_overrides_win_and_unknown_variants_fail():
    pts = get_study("batch-size").points({"epochs": 1, "data": "synthetic", "seed": 5}, "default",
                                         seeds=1, variants=["GN"])
    assert {p.cfg.epochs for p in pts} == {1} and {p.cfg.seed for p in pts} == {5}
    assert {p.cfg.data for p in pts} == {"synthetic"}
    assert [p.cfg.batch_size for p in pts] == [32, 16, 8, 4, 2]
    with pytest.raises(ConfigError, match="no variant"):
        get_study("norms").points({}, "quick", variants=["XN"])
    with pytest.raises(ConfigError, match="unknown study"):
        get_study("batchsize")
    assert sorted(STUDIES) == ["batch-size", "bn-dropout", "groups", "nf", "norms"]


@pytest.mark.parametrize("variant", ["BRN", "GN+WS", "NF"])
def test_optional_series_train(tmp_path, variant):
    # the optional batch-size series exercise BatchRenorm, weight standardization and NF + AGC
    user = {"data": "synthetic", "epochs": 1, "threads": 1,
            "data_kwargs": {"n_train": 64, "n_test": 32, "image_size": 8, "channels": 1,
                            "num_classes": 3}}
    p = next(p for p in get_study("batch-size").points(user, "quick", 1, [variant])
             if p.x == 8)
    with Store(tmp_path) as s:
        s.claim(p.cfg.run_id(), p.cfg.to_dict())
        res = train_run(p.cfg, s)
        assert s.run(p.cfg.run_id())["status"] == "done"
    assert 0 <= res["final_test_error"] <= 100
