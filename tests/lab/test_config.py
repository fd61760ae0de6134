"""RunConfig: defaults follow the GN paper's recipe, overrides parse, bad values are named."""

import json

import pytest

from normlab.lab.config import ConfigError, RunConfig, apply_overrides, load_config_file, parse_set


def test_lr_scales_linearly_with_batch():
    # the GN paper's rule: 0.1 * N / 32
    assert RunConfig(batch_size=32).effective_lr() == pytest.approx(0.1)
    assert RunConfig(batch_size=2).effective_lr() == pytest.approx(0.1 * 2 / 32)
    assert RunConfig(batch_size=2, lr=0.5).effective_lr() == 0.5


def test_run_id_depends_on_results_not_presentation():
    a = RunConfig(norm="gn", batch_size=4)
    assert a.run_id() == RunConfig(norm="gn", batch_size=4).run_id()
    assert a.run_id() == a.replace(label="GN", threads=3).run_id()  # label/threads: not results
    assert a.run_id() != a.replace(seed=1).run_id()
    assert a.run_id() != a.replace(norm_kwargs={"num_groups": 8}).run_id()


def test_parse_set_and_apply_dotted_keys():
    over = parse_set(["epochs=3", "norm_kwargs.num_groups=8", "schedule=step", "lr=1",
                      "milestones=[0.3, 0.6]", "ws=true", "amp=off"])
    cfg = apply_overrides(RunConfig(norm="gn"), over)
    assert (cfg.epochs, cfg.norm_kwargs, cfg.schedule, cfg.lr, cfg.ws, cfg.amp) == \
        (3, {"num_groups": 8}, "step", 1.0, True, "off")
    assert cfg.milestones == (0.3, 0.6)


def test_set_norm_none_is_the_norm_named_none():
    # "none" was read as null for every key, so `--set norm=none` said "norm must be str, got
    # NoneType"; a plain string field keeps the word, an Optional one still reads it as None
    assert apply_overrides(RunConfig(), parse_set(["norm=None"])).norm == "none"
    assert parse_set(["lr=none", "label=none"]) == {"lr": None, "label": "none"}


@pytest.mark.parametrize("item, needle", [
    ("batch_size=-1", "batch_size must be a positive int, got -1"),
    ("batch_size=2.5", "batch_size must be int"),
    ("epochs=0", "epochs must be a positive int, got 0"),
    ("schedule=linear", "unknown schedule 'linear'"),
    ("norm=batchnormz", "unknown norm 'batchnormz'"),
    ("data=mnist", "unknown data 'mnist'"),
    ("momentum=1.5", "momentum must be in [0, 1), got 1.5"),
    ("nope=1", "unknown config key 'nope'"),
    ("lr=-0.1", "lr must be a positive finite number, got -0.1"),
    ("milestones=[1.5]", "milestones must be fractions"),
    # not a list: a number (was "'float' object is not iterable"), a string (was split into
    # characters)
    ("milestones=0.5", "milestones must be a list of fractions in (0, 1), got 0.5"),
    ("milestones=half", "milestones must be a list of fractions in (0, 1), got 'half'"),
    # a choice read as a boolean: name the choices, not the type
    ("augment=yes", "unknown augment True"),
    # seeds torch cannot take once the per-epoch seeds are derived (the run failed after it
    # started), and a negative one, outside the same [0, 2**32) rule
    ("seed=100000000000000000000", "seed must be an int in [0, 2**32), got 1000000000000000000"),
    ("seed=-1", "seed must be an int in [0, 2**32), got -1"),
    # ints past 64 bits: epochs=10**23 was an OverflowError traceback from the store's INTEGER
    # column once the run list was built; precise_bn=10**23 failed the run after its first
    # epoch (islice's stop must fit sys.maxsize)
    ("epochs=100000000000000000000000", "epochs must be at most 2**63 - 1 (a 64-bit int), got "
                                        "100000000000000000000000"),
    ("precise_bn=100000000000000000000000", "precise_bn must be at most 2**63 - 1 (a 64-bit "
                                            "int), got 100000000000000000000000"),
    ("train_limit=100000000000000000000000", "train_limit must be at most 2**63 - 1"),
    # a blank norm (`--set norm=$NORM`, `--norm ""` with the variable unset) was create_norm's
    # alias of "none": the run trained without normalization, recorded as norm none
    ("norm=", "norm is empty (''); is a shell variable unset?"),
    # a shell-quoting slip: unquoted keys are not JSON, so the value stayed a string
    ("model_kwargs={img_size:8}", "got str '{img_size:8}' (not valid JSON: quote the keys"),
    ("norm_kwargs={num_groups: 4", "(not valid JSON"),
    ("norm= ", "norm is empty"),
])
def test_bad_values_name_the_value(item, needle):
    with pytest.raises(ConfigError) as e:
        apply_overrides(RunConfig(), parse_set([item]))
    assert needle in str(e.value)


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["epochs"])


def test_config_files_json_and_toml(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"epochs": 2, "norm_kwargs": {"group_size": 4}}))
    t = tmp_path / "c.toml"
    t.write_text('epochs = 5\nnorm = "gn"\n[norm_kwargs]\nnum_groups = 4\n')
    assert apply_overrides(RunConfig(), load_config_file(j)).norm_kwargs == {"group_size": 4}
    cfg = apply_overrides(RunConfig(), load_config_file(t))
    assert (cfg.epochs, cfg.norm, cfg.norm_kwargs) == (5, "gn", {"num_groups": 4})
    bad = tmp_path / "c.yaml"
    bad.write_text("x: 1")
    with pytest.raises(ConfigError, match="must end in .json or .toml"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.json")


@pytest.mark.parametrize("data", ["digits", "synthetic"])
def test_a_data_dir_for_a_built_in_dataset_is_an_error(data):
    # it was ignored, silently: a forgotten --data cifar10 trained on digits (under a new run id)
    with pytest.raises(ConfigError, match=f"dataset {data!r} reads no files") as e:
        apply_overrides(RunConfig(), {"data": data, "data_dir": "/some/cifar"})
    assert "--data cifar10" in e.value.hint


def test_disk_datasets_need_a_data_dir():
    with pytest.raises(ConfigError, match="no --data-dir"):
        RunConfig(data="cifar10").validate()


@pytest.mark.parametrize("given, data, norm", [
    ({"data": "Digits"}, "digits", "bn"),
    ({"data": " MNIST5K ", "norm": "GN"}, "mnist5k", "gn"),
    ({"data": "Synthetic", "norm": " GroupNorm"}, "synthetic", "gn"),  # an alias, any case
])
def test_dataset_and_norm_names_in_any_case_are_recorded_as_the_registry_spells_them(
        given, data, norm):
    # as study names: `--data Digits` was "unknown data 'Digits'", and `--norm GN` was stored
    # as "GN", another run id (and label) than `--norm gn` for the same computation
    cfg = apply_overrides(RunConfig(), given)
    assert (cfg.data, cfg.norm) == (data, norm)
    assert cfg.run_id() == RunConfig(data=data, norm=norm).run_id()


def test_normalizer_free_models_record_norm_none():
    # an NF model takes no norm: the default "bn" is recorded as "none", so the default and an
    # explicit "none" are one run (same config and run id), built directly or through overrides
    default = apply_overrides(RunConfig(), {"model": "nf_resnet18"})
    explicit = apply_overrides(RunConfig(), {"model": "nf_resnet18", "norm": "none"})
    assert default.norm == explicit.norm == "none"
    assert default.run_id() == explicit.run_id() == RunConfig(model="nf_resnet18").run_id()
    assert RunConfig(model="resnet20").norm == "bn"  # models with a norm keep the default
    # a bn config switched to an NF model (the BN series of a study run with --model nf_*)
    assert apply_overrides(RunConfig(norm="bn"), {"model": "nf_resnet20"}).norm == "none"


@pytest.mark.parametrize("norm, flag", [
    ("gn", "--norm"),            # a real norm for an NF model
    ("bn", "--set norm=..."),    # even bn, when the user asked for it, is not silently dropped
])
def test_explicit_norm_for_nf_model_is_rejected_naming_the_flag(norm, flag):
    with pytest.raises(ConfigError) as e:
        apply_overrides(RunConfig(), {"model": "nf_resnet20", "norm": norm}, norm_flag=flag)
    assert f"'nf_resnet20' is normalizer-free and takes no norm, got norm={norm!r}" in str(e.value)
    assert f"drop {flag}" in e.value.hint
    with pytest.raises(ConfigError, match="normalizer-free"):
        RunConfig(model="nf_resnet20", norm="gn").validate()


def test_default_device_is_auto_and_ids_follow_what_it_resolves_to(monkeypatch):
    import torch

    cfg = RunConfig(norm="gn")
    assert cfg.device == "auto"
    # on a CPU-only machine "auto" is the CPU: the same run as an explicit "cpu" (and as runs
    # stored when "cpu" was the default)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cfg.run_id() == cfg.replace(device="cpu").run_id() != cfg.replace(device="cuda").run_id()
    # with a GPU "auto" is CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cfg.run_id() == cfg.replace(device="cuda").run_id() != cfg.replace(device="cpu").run_id()
    assert cfg.to_dict()["device"] == "auto"  # stored as asked


def test_an_int_for_a_float_field_is_the_same_run():
    """RunConfig(lr=1) and RunConfig(lr=1.0) train the same run; the id hashed the JSON '1' vs
    '1.0', so a study built in Python with ints re-trained runs the CLI had finished (the CLI
    converts ints to floats, the constructor does not)."""
    ints = RunConfig(lr=1, base_lr=1, momentum=0, weight_decay=0, warmup_epochs=1, agc=1)
    floats = RunConfig(lr=1.0, base_lr=1.0, momentum=0.0, weight_decay=0.0, warmup_epochs=1.0,
                       agc=1.0)
    assert ints.run_id() == floats.run_id()
    assert RunConfig(lr=1).run_id() != RunConfig(lr=2).run_id()  # values still count


def test_a_model_has_one_spelling():
    # --model ResNet20 and --model resnet20 built the same model but were two runs (two run ids,
    # two report tables)
    a, b = RunConfig(model=" ResNet20"), RunConfig(model="resnet20")
    assert a.model == "resnet20" and a.identity() == b.identity()
    assert RunConfig(model="TIMM:ResNet18").model == "timm:resnet18"


def test_a_config_file_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    # a file without read permission (or an I/O error reading it) was a PermissionError /
    # OSError traceback: no ConfigError caught it
    import os
    import pathlib

    c = tmp_path / "c.toml"
    c.write_text("epochs = 3\n")
    read_text = pathlib.Path.read_text

    def refuse(self, *a, **kw):
        if self == c:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "read_text", refuse)
    with pytest.raises(ConfigError, match=r"cannot read config file '.*c\.toml': Permission "
                                          r"denied") as e:
        load_config_file(c)
    assert "readable" in e.value.hint
    # a FIFO (or another file that is not a regular one) exists: it "does not exist" was wrong
    fifo = tmp_path / "f.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config_file(fifo)


def test_milestones_in_any_order_are_one_run():
    # the step schedule counts the milestones passed, so [0.75, 0.5] computes what [0.5, 0.75]
    # does: it was another run id (trained again) and another setup
    a = apply_overrides(RunConfig(), parse_set(["schedule=step", "milestones=[0.75, 0.5]"]))
    b = apply_overrides(RunConfig(), parse_set(["schedule=step", "milestones=[0.5, 0.75]"]))
    assert a.milestones == (0.5, 0.75)
    assert a.run_id() == b.run_id()


def test_a_step_schedule_without_milestones_is_an_error():
    # it trained at a constant lr under the name "step"
    with pytest.raises(ConfigError, match=r"schedule 'step' needs at least one milestone"):
        apply_overrides(RunConfig(), parse_set(["schedule=step", "milestones=[]"]))
    assert apply_overrides(RunConfig(), parse_set(["milestones=[]"])).milestones == ()  # cosine


@pytest.mark.parametrize("item, path", [
    ("norm_kwargs.momentum=NaN", "norm_kwargs.momentum"),  # trained a run of NaN statistics
    ('model_kwargs={"widths": [16, NaN]}', "model_kwargs.widths[1]"),
])
def test_a_nan_in_a_table_is_an_error_naming_it(item, path):
    with pytest.raises(ConfigError) as e:
        apply_overrides(RunConfig(), parse_set([item]))
    assert str(e.value) == f"{path} is NaN"
    # an infinity may mean something (Batch Renorm's r_max = inf is plain BN): it passes
    assert apply_overrides(RunConfig(norm="brn"), parse_set(["norm_kwargs.r_max=Infinity"]))


def test_choices_in_any_case_are_one_run():
    # as dataset names: `--set optimizer=SGD` was "unknown optimizer 'SGD'"
    given = apply_overrides(RunConfig(), parse_set(
        ["optimizer= AdamW", "schedule=Step", "device=CPU", "amp=OFF", "augment=On"]))
    plain = apply_overrides(RunConfig(), parse_set(
        ["optimizer=adamw", "schedule=step", "device=cpu", "amp=off", "augment=on"]))
    assert (given.optimizer, given.schedule, given.device, given.amp, given.augment) == \
        ("adamw", "step", "cpu", "off", "on")
    assert given.run_id() == plain.run_id()


def test_a_table_override_sets_its_keys_and_keeps_a_series_own():
    # `--set 'norm_kwargs={"eps": 1e-3}'` replaced the whole table: the batch-size study's GN
    # series lost its num_groups=8 and trained GN with 32 groups under the label GN
    from normlab.lab.studies import get_study
    pts = get_study("batch-size").points(parse_set(['norm_kwargs={"eps": 0.001}']), "quick",
                                         seeds=1)
    gn = [p.cfg.norm_kwargs for p in pts if p.label == "GN"]
    assert gn and all(k["num_groups"] == 8 and k["eps"] == 0.001 for k in gn)
    assert all(p.cfg.norm_kwargs["eps"] == 0.001 for p in pts if p.label == "BN")
