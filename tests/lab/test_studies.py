"""Every study's run list is well formed and buildable; every optional series trains."""

import dataclasses

import pytest

from normlab.lab.config import ConfigError
from normlab.lab.store import Store
from normlab.lab.studies import STUDIES, get_study
from normlab.lab.summary import SETTING_STUDIES, SUMMARY_STUDIES
from normlab.lab.loop import train_run
from normlab.lab.recipe import preflight

# expected runs per seed: series x axis points
EXPECTED = {("batch-size", "default"): 10, ("batch-size", "quick"): 4,
            ("groups", "default"): 14, ("groups", "quick"): 6,
            ("norms", "default"): 5, ("norms", "quick"): 5,
            ("bn-dropout", "default"): 12, ("bn-dropout", "quick"): 8,
            ("nf", "default"): 10, ("nf", "quick"): 4,
            ("stats-batch", "default"): 6, ("stats-batch", "quick"): 3}


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
    assert [p.cfg.batch_size for p in pts] == [8 * n for n in (32, 16, 8, 4, 2)]  # 8 devices
    with pytest.raises(ConfigError, match="no variant"):
        get_study("norms").points({}, "quick", variants=["XN"])
    with pytest.raises(ConfigError, match="unknown study"):
        get_study("batchsize")
    assert sorted(STUDIES) == ["batch-size", "bn-dropout", "groups", "nf", "norms", "stats-batch"]


@pytest.mark.parametrize("variant", ["BRN", "GN+WS", "NF", "FRN", "EvoNorm-S0", "EvoNorm-B0"])
def test_optional_series_train(tmp_path, variant):
    # the optional batch-size series exercise BatchRenorm, weight standardization, NF + AGC and
    # the batch-independent alternatives (FRN, EvoNorm)
    user = {"data": "synthetic", "epochs": 1, "threads": 1,
            "data_kwargs": {"n_train": 64, "n_test": 32, "image_size": 8, "channels": 1,
                            "num_classes": 3}}
    # BRN and EvoNorm-B0 have no ghost-batch form: one device (the single-batch protocol)
    devices = 1 if variant in ("BRN", "EvoNorm-B0") else 2
    p = next(p for p in get_study("batch-size").points(user, "quick", 1, [variant], devices)
             if p.x == 2)
    with Store(tmp_path) as s:
        s.claim(p.cfg.run_id(), p.cfg.to_dict())
        res = train_run(p.cfg, s)
        assert s.run(p.cfg.run_id())["status"] == "done"
    assert 0 <= res["final_test_error"] <= 100


@pytest.mark.parametrize("name, user, needle", [
    ("batch-size", {"batch_size": 4}, "batch_size=4"),                 # the x axis itself
    ("nf", {"batch_size": 8}, "batch_size=8"),
    # norms' x is its batch, 32 (beside the paper's batch-32 table): batch_size=16 trained at
    # 16 under x = 32, and the summary and ls showed it as batch 32
    ("norms", {"batch_size": 16}, "batch_size=16"),
    ("norms", {"norm": "gn"}, "norm='gn'"),                            # what names a series
    ("batch-size", {"norm": "ln"}, "norm='ln'"),
    ("groups", {"norm_kwargs.num_groups": 4}, "norm_kwargs.num_groups=4"),
    # a whole table sets its keys (the others are kept): naming the axis key is the override
    ("groups", {"norm_kwargs": {"num_groups": 4, "eps": 1e-3}}, "norm_kwargs.num_groups=4"),
    ("bn-dropout", {"model_kwargs.dropout": 0.1}, "model_kwargs.dropout=0.1"),
])
def test_overriding_what_the_study_varies_is_an_error(name, user, needle):
    # a --set/--config value that replaces a study's axis or series-defining key would train
    # other configs under the study's labels (e.g. every "BN x=32" point at batch 4): refuse
    with pytest.raises(ConfigError, match=f"study {name!r} sets") as e:
        get_study(name).points(user, "quick")
    assert needle in str(e.value) and "--variants" in e.value.hint


def test_overrides_the_study_does_not_vary_still_apply():
    # the same value as the study's, and keys beside its own, are fine
    pts = get_study("batch-size").points({"norm": "gn", "norm_kwargs.num_groups": 4}, "quick",
                                         variants=["GN"])
    assert {(p.cfg.norm, p.cfg.norm_kwargs["num_groups"]) for p in pts} == {("gn", 4)}
    assert [p.cfg.batch_size for p in pts] == [8 * n for n in (32, 2)]
    pts = get_study("groups").points({"norm_kwargs.eps": 1e-3}, "quick")
    assert all(p.cfg.norm_kwargs["eps"] == 1e-3 for p in pts)
    assert {p.cfg.model for p in get_study("nf").points({"model": "nf_resnet32"}, "quick",
                                                        variants=["NF"])} == {"nf_resnet32"}


def test_a_series_that_cannot_take_an_override_is_named():
    # --set norm_kwargs.num_groups=4 reaches the BN series too: say which series fails and why
    pts = get_study("batch-size").points({"norm_kwargs.num_groups": 4}, "quick")
    with pytest.raises(ConfigError, match="^series 'BN': cannot build model 'resnet20': ") as e:
        preflight([p.cfg for p in pts])
    assert "num_groups" in str(e.value) and "--variants" in e.value.hint


@pytest.mark.parametrize("model", ["resnet20", "timm:resnet18"])  # a normlab model, a timm one
def test_a_model_without_the_options_a_study_varies_is_named_as_such(model):
    # bn-dropout varies bn_dropout_cnn's dropout/bn_conv/bn_dense: --model resnet20 failed in the
    # model builder, naming resnet20's own keywords and not what the study needs
    with pytest.raises(ConfigError, match=f"study 'bn-dropout' varies model_kwargs bn_conv, "
                                          f"bn_dense, dropout of its model 'bn_dropout_cnn', and "
                                          f"model '{model}' does not take them") as e:
        get_study("bn-dropout").points({"model": model}, "quick")
    assert "drop --model" in e.value.hint
    pts = get_study("bn-dropout").points({"model": "BN_Dropout_CNN"}, "quick")  # its own model
    assert {p.cfg.model for p in pts} == {"bn_dropout_cnn"}


def test_the_per_device_protocol_emulates_k_devices():
    """N images per device on K devices (Wu & He section 4): SGD batch K x N, lr 0.1 x N/32,
    BN statistics per N (ghostbn); GN unchanged but for the batch and lr."""
    pts = {(p.label, p.x): p.cfg for p in get_study("batch-size").points({}, "default", 1,
                                                                          devices=4)}
    bn2, gn2 = pts[("BN", 2)], pts[("GN", 2)]
    assert (bn2.batch_size, bn2.lr, bn2.norm, bn2.norm_kwargs) == (8, 0.1 * 2 / 32, "ghostbn",
                                                                   {"virtual_batch": 2, "interleaved": True})
    assert (gn2.batch_size, gn2.lr, gn2.norm, gn2.norm_kwargs) == (8, 0.1 * 2 / 32, "gn",
                                                                   {"num_groups": 8})
    one = {(p.label, p.x): p.cfg for p in get_study("batch-size").points({}, "default", 1,
                                                                          devices=1)}
    assert (one[("BN", 2)].batch_size, one[("BN", 2)].lr, one[("BN", 2)].norm) == (2, None, "bn")
    setups = {p.setup for d in (1, 4, 8) for p in get_study("batch-size").points({}, "quick", 1,
                                                                                 devices=d)}
    assert len(setups) == 3  # another protocol is another table
    assert get_study("batch-size").protocol(4)["sgd_batch"] == "4 x N"


@pytest.mark.parametrize("key, value", [("virtual_batch", 4), ("interleaved", False)])
def test_a_users_ghost_batch_setting_is_refused_not_replaced(key, value):
    # `--set norm_kwargs.virtual_batch=4` on BN under 8 emulated devices trained statistics per
    # 32 images at x=32 (the emulation's own value replaced the user's) under the label BN
    with pytest.raises(ConfigError, match=rf"norm_kwargs.{key}={value!r}: 8 emulated devices "
                                          r"set BN's statistics batch themselves \(32 images"):
        get_study("batch-size").points({"norm_kwargs": {key: value}}, "quick", 1, devices=8,
                                       variants=["BN"])


def test_the_stats_batch_study_holds_the_sgd_batch():
    st = get_study("stats-batch")
    pts = st.points({}, "default", 1)
    assert {(p.cfg.batch_size, p.cfg.lr) for p in pts} == {(256, 0.1)}
    assert {p.x: p.cfg.norm_kwargs.get("virtual_batch") for p in pts if p.label == "BN"} == {
        32: 32, 16: 16, 8: 8, 4: 4, 2: 2}
    assert [p.x for p in pts if p.label == "GN"] == [32]  # GN does not see the statistics batch
    # its BN at 32 is the batch-size study's BN at 32: one run in a shared store
    bs = {(p.label, p.x): p.cfg.run_id() for p in get_study("batch-size").points({}, "default", 1)}
    assert bs[("BN", 32)] == next(p.cfg.run_id() for p in pts if p.label == "BN" and p.x == 32)


@pytest.mark.parametrize("study, user, devices, needle", [
    ("bn-dropout", {}, 2, "no per-device batch"),            # its batch is not per device
    ("batch-size", {"world_size": 2}, 2, "processes are the devices"),
    ("batch-size", {}, 0, "devices must be a positive int, got 0"),
])
def test_bad_devices(study, user, devices, needle):
    with pytest.raises(ConfigError, match=needle):
        get_study(study).points(user, "quick", devices=devices)


@pytest.mark.parametrize("variant, name", [("BRN", "Batch Renorm"), ("EvoNorm-B0", "EvoNorm-B0")])
def test_batch_statistics_without_a_ghost_form_are_refused(variant, name):
    # their statistics would run over the whole K x N batch, not per device
    with pytest.raises(ConfigError, match=f"{name} has no per-slice") as e:
        get_study("batch-size").points({}, "quick", variants=[variant])
    assert "--devices 1" in e.value.hint


def test_seeds_per_point_for_power_rounds():
    pts = get_study("norms").points({}, "quick", seeds_at={("BN", 32): 3})
    assert sorted(p.cfg.seed for p in pts if p.label == "BN") == [0, 1, 2]
    assert [p.cfg.seed for p in pts if p.label == "LN"] == [0]  # the preset's one seed


def test_seeds_past_the_seed_limit_are_refused_before_any_run():
    # seed + i for i < seeds: the last one past 2**32 was refused only when its run trained,
    # after the earlier seeds' runs; the power rounds' counts (seeds_at) are checked too
    last = 2**32 - 1
    assert [p.cfg.seed for p in get_study("norms").points({"seed": last}, "quick",
                                                           variants=["BN"])] == [last]
    with pytest.raises(ConfigError, match=f"seed {last} with 2 seeds per point reaches seed "
                                          f"{last + 1}") as e:
        get_study("norms").points({"seed": last}, "quick", seeds=2)
    assert f"at most {2**32 - 2}" in e.value.hint
    with pytest.raises(ConfigError, match="with 3 seeds per point"):
        get_study("norms").points({"seed": last - 1}, "quick", seeds_at={("BN", 32): 3})


def test_norms_and_groups_keep_one_batch_of_32_by_default():
    """Their BN statistics are over 32 images either way (the paper's per-GPU batch); one
    device keeps 45 SGD steps per epoch on digits (8 devices: 5, where LN and no-norm did not
    converge in 20 epochs; docs/datasets.md)."""
    for name in ("norms", "groups"):
        cfgs = [p.cfg for p in get_study(name).points({}, "quick", 1)]
        assert {(c.batch_size, c.lr) for c in cfgs} == {(32, None)}
    assert {p.cfg.batch_size for p in get_study("norms").points({}, "quick", 1, devices=8)} == {
        256}


@pytest.mark.parametrize("study", ["nf", "batch-size"])
def test_an_nf_series_on_the_users_model_trains_its_normalizer_free_twin(study):
    # --model resnet56 once trained the NF series as resnet56 with its norms removed (no Scaled
    # WS, no analytic scaling) and reported it as the NF-ResNet
    pts = get_study(study).points({"model": "ResNet56"}, preset="quick", variants=["BN", "NF"])
    models_of = {(p.label, p.cfg.model) for p in pts}
    assert models_of == {("BN", "resnet56"), ("NF", "nf_resnet56")}
    pre = get_study(study).points({"model": "preact_resnet32"}, preset="quick", variants=["NF"])
    assert {p.cfg.model for p in pre} == {"nf_resnet32"}
    with pytest.raises(ConfigError, match="'timm:resnet18' has no normalizer-free counterpart"):
        get_study(study).points({"model": "timm:resnet18"}, preset="quick", variants=["NF"])
    assert {p.cfg.model for p in get_study(study).points({"model": "timm:resnet18"},
                                                         preset="quick", variants=["BN"])
            } == {"timm:resnet18"}


def test_the_groups_study_says_which_of_its_points_train_the_same_model():
    # on ResNet-20's 16/32/64 channels G = 64 is InstanceNorm in every layer, as C/G = 1 is,
    # and C/G = 64 LayerNorm, as G = 1 is: the report showed four settings where the paper's
    # ResNet-50 has four and this model two, without saying so
    from normlab.lab.recipe import build_model
    from normlab.nn.groupnorm import GroupNorm

    study = get_study("groups")
    cfgs = {(p.label, p.x): p.cfg for p in study.points({}, "default", seeds=1)}

    def layers(key):
        model = build_model(cfgs[key], 10, 1, 8)
        return [(m.num_channels, m.num_groups) for m in model.modules()
                if isinstance(m, GroupNorm)]

    assert layers(("G", 64)) == layers(("C/G", 1)) and all(c == g for c, g in layers(("G", 64)))
    assert layers(("G", 1)) == layers(("C/G", 64)) and all(g == 1 for _, g in layers(("G", 1)))
    assert layers(("G", 32)) != layers(("C/G", 1))
    text = " ".join(study.description.split())
    assert ("G = 64 and C/G = 1 train the same model (InstanceNorm in every layer), as do G = 1 "
            "and C/G = 64 (LayerNorm in every layer)") in text


def test_the_nf_study_says_whose_agc_its_nf_runs_use_and_how_to_drop_it():
    # its NF runs clip gradients (AGC lambda 0.04) and its claims cite the ICLR 2021 NF-ResNets,
    # which trained without AGC (it came with the NFNets paper, ICML 2021): the report read as
    # if the paper's NF-ResNets had used it
    study = get_study("nf")
    text = " ".join(study.description.split())
    assert "AGC is from the later NFNets paper (Brock, De, Smith & Simonyan, ICML 2021" in text
    assert "ICLR 2021" in study.paper_source and "`--set agc=null` drops it" in text
    nf = {p.label: p.cfg.agc for p in study.points({}, "quick", seeds=1)}
    assert nf == {"BN": None, "NF": 0.04}
    assert {p.cfg.agc for p in study.points({"agc": None}, "quick", seeds=1)} == {None}


def test_how_the_report_shows_a_study_is_one_field_each_and_checked():
    # the report's per-study rules (x drawn largest first, the figure, the summary's answer) live
    # on Study; plots and summary had them as name lists of their own
    assert [n for n, s in STUDIES.items() if s.x_descending] == ["batch-size", "nf"]
    assert {n: s.figure for n, s in STUDIES.items() if s.figure != "lines"} == {
        "norms": "bars", "bn-dropout": "grid"}
    assert SUMMARY_STUDIES == ("batch-size", "stats-batch", "norms", "nf")
    assert SETTING_STUDIES == ("groups", "bn-dropout")
    with pytest.raises(ValueError, match="figure 'pie' is not one of"):
        dataclasses.replace(STUDIES["norms"], figure="pie")
