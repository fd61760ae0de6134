"""The recipe: schedule, weight standardization, preflight, weight decay groups, AGC."""

import copy

import pytest
import torch
from torch import nn

from normlab.lab.config import ConfigError, RunConfig
from normlab.lab.recipe import lr_at, preflight, weight_standardize_

# a small, fast run: 8x8 synthetic images, ResNet-20, 3 epochs of 12 steps
TINY = dict(data="synthetic", data_kwargs={"n_train": 96, "n_test": 64, "image_size": 8,
                                           "channels": 2, "num_classes": 4},
            batch_size=8, epochs=3, threads=1)


def test_lr_schedules():
    c = RunConfig(batch_size=16, epochs=10, schedule="step", milestones=(0.5, 0.75))
    assert [lr_at(c, t) for t in (0, 4.9, 5, 7.5)] == pytest.approx([0.05, 0.05, 0.005, 0.0005])
    c = RunConfig(batch_size=32, epochs=10, schedule="cosine", warmup_epochs=1)
    assert lr_at(c, 0.5) == pytest.approx(0.1 * 0.501)
    assert lr_at(c, 1) == pytest.approx(0.1) and lr_at(c, 5.5) == pytest.approx(0.05)
    assert lr_at(c, 10) == pytest.approx(0.0, abs=1e-12)
    # a warmup shorter than the 1e-3 epoch offset (or the last of over 1000 steps per warmup
    # epoch) started above the peak: 0.0005 warmup epochs gave 2x the peak at the first step
    c = RunConfig(batch_size=32, epochs=10, warmup_epochs=0.0005)
    assert lr_at(c, 0) == pytest.approx(0.1)
    c = RunConfig(batch_size=32, epochs=10, warmup_epochs=1)
    assert lr_at(c, 1 - 1 / 5004) <= 0.1  # ImageNet at batch 256: 5004 steps per epoch


def test_weight_standardize_swaps_every_conv():
    from normlab.nn import WSConv2d

    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 4, 1, bias=False)))
    w = m[0].weight.detach().clone()
    weight_standardize_(m)
    assert isinstance(m[0], WSConv2d) and isinstance(m[2][0], WSConv2d)
    assert torch.equal(m[0].weight, w) and m[2][0].bias is None
    y = m(torch.randn(2, 3, 6, 6))
    assert y.shape == (2, 4, 4, 4)


@pytest.mark.parametrize("changes, needle", [
    ({"model": "resnet7"}, "unknown model 'resnet7'"),
    ({"batch_size": 1000}, "batch_size 1000 is larger than the 96"),
    # BN over 1 image of 1x1 maps (2x2 images, ResNet-20's last stage) failed every run at its
    # first step, each re-run again ("re-run the same command to retry them")
    ({"batch_size": 1, "data_kwargs": {**TINY["data_kwargs"], "image_size": 2}},
     r"model 'resnet20' with norm 'bn' cannot train on 2x2 images of synthetic, 1 image per "
     r"statistics batch: layer 'stages.1.0.norm1' \(BatchNorm2d\) normalizes 1x1 feature "
     r"maps \(Expected more than 1 value per channel when training"),
])
def test_preflight_names_the_problem(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        preflight([RunConfig(**{**TINY, **changes})])


def test_a_batch_larger_than_the_data_names_the_ways_out():
    # under emulated devices the 256 is 8 devices x 32 images, which the user never typed:
    # the hint "lower the batch size" could not be followed (a study refuses --set batch_size)
    with pytest.raises(ConfigError, match="batch_size 1000 is larger than the 96") as e:
        preflight([RunConfig(**{**TINY, "batch_size": 1000})])
    assert "--devices K" in e.value.hint and "train_limit" in e.value.hint


def test_instance_norm_on_1x1_maps_is_refused_before_anything_trains(tmp_path):
    # InstanceNorm over a 1x1 map (4x4 images: ResNet-20's last stage; digits' 8x8 images under
    # a stride-32 timm model) raised at the IN run's first step, after the study's other runs
    # had trained; now the study is refused up front, naming model, norm, layer and map size
    small = {**TINY["data_kwargs"], "image_size": 4}
    with pytest.raises(ConfigError, match=r"model 'resnet20' with norm 'in' cannot train on 4x4 "
                                          r"images of synthetic: layer 'stages.2.0.norm1' "
                                          r"\(InstanceNorm2d\) normalizes 1x1 feature maps") as e:
        preflight([RunConfig(**{**TINY, "norm": "in", "data_kwargs": small})])
    assert "data_kwargs.image_size" in e.value.hint and "--variants" in e.value.hint
    preflight([RunConfig(**{**TINY, "norm": "in"})])  # 8x8 images: 2x2 maps, it trains
    preflight([RunConfig(**{**TINY, "norm": "gn", "data_kwargs": small})])  # GN needs no map
    # an emulated device's statistics batch of 2 images (ghost batches) over 1x1 maps trains
    preflight([RunConfig(**{**TINY, "norm": "ghostbn", "data_kwargs": small,
                            "norm_kwargs": {"virtual_batch": 2, "interleaved": True}})])

    from typer.testing import CliRunner

    from normlab.lab.cli import app

    r = CliRunner().invoke(app, ["reproduce", "norms", "--quick", "--variants", "BN,IN",
                                 "--data", "synthetic", "--set", "data_kwargs.image_size=4",
                                 "--set", "data_kwargs.n_train=64", "--jobs", "1",
                                 "--out", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error: series 'IN': model 'resnet20' "
                                                    "with norm 'in'"), r.output
    assert "'stages.2.0.norm1'" in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not (tmp_path / "results.sqlite").exists()  # refused before BN's run trained


def test_a_model_too_large_for_memory_is_named(monkeypatch):
    # model_kwargs.width=100000: the allocator's error was "re-run the same command to resume"
    # with exit 1, though every re-run fails the same way (a real one would take the test
    # machine's memory, so the model constructor raises it)
    from normlab import models

    def too_large(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 360000000000 bytes")

    monkeypatch.setattr(models, "create", too_large)
    with pytest.raises(ConfigError, match=r"model 'resnet20' with model_kwargs \{'width': "
                                          r"100000\} does not fit in memory") as e:
        preflight([RunConfig(**{**TINY, "model_kwargs": {"width": 100000}})])
    assert "lower model_kwargs" in e.value.hint


@pytest.mark.parametrize("norm, kw, needle", [
    ("gn", {"num_groups": 3}, "norm_kwargs.num_groups=3 does not divide the 16 channels of "
                              "layer 'stem.1' of model 'resnet20': the group rule would train 2 "
                              "groups there, not the 3"),
    ("gn", {"group_size": 5}, "norm_kwargs.group_size=5 does not divide the 16 channels of "
                              "layer 'stem.1' of model 'resnet20': the group rule would train 4 "
                              "channels per group there"),
    ("evonorm_s0", {"num_groups": 12}, "norm_kwargs.num_groups=12 does not divide the 16"),
])
def test_a_group_count_that_does_not_divide_a_layers_channels_is_refused(norm, kw, needle):
    # GN with num_groups=3 on ResNet-20's 16/32/64 channels trained 2 groups in every layer,
    # silently, recorded and reported as "GroupNorm with 3 groups"
    with pytest.raises(ConfigError) as e:
        preflight([RunConfig(**{**TINY, "norm": norm, "norm_kwargs": kw})])
    assert needle in str(e.value), str(e.value)
    assert "16, 32, 64 channels" in e.value.hint and "(1, 2, 4, 8, 16)" in e.value.hint
    # a divisor trains as asked; a count at or above a layer's channels is the documented
    # rule (one channel per group there: the groups study's G = 64 and C/G = 64)
    for ok in ({"num_groups": 8}, {"num_groups": 64}, {"group_size": 64}, {"num_groups": 2}):
        preflight([RunConfig(**{**TINY, "norm": norm, "norm_kwargs": ok})])
    preflight([RunConfig(**{**TINY, "norm": "gn"})])  # create_norm's default 32: IN at 16
    # no count asked for: the default 32 goes through the group rule as create_norm documents
    # it (48 channels: 24 groups), on timm models with such widths too; asked for, it is refused
    wide = {**TINY, "norm": "gn", "model_kwargs": {"width": 48}}
    preflight([RunConfig(**wide)])
    with pytest.raises(ConfigError, match="num_groups=32 does not divide the 48 channels"):
        preflight([RunConfig(**{**wide, "norm_kwargs": {"num_groups": 32}})])


def test_preflight_lets_batch_size_1_through_where_it_trains():
    preflight([RunConfig(**{**TINY, "batch_size": 1})])  # 8x8 images: 2x2 maps at the end
    preflight([RunConfig(**{**TINY, "batch_size": 1, "norm": "ln",
                            "data_kwargs": {**TINY["data_kwargs"], "image_size": 2}})])


def test_preflight_checks_the_process_count_the_runs_will_train_on():
    # a BN run defined for 2 processes cannot train on 1 (per-process statistics): said before
    # anything is written, instead of failing each run (in --jobs workers: with tracebacks)
    cfg = RunConfig(**{**TINY, "batch_size": 8, "world_size": 2})
    with pytest.raises(ConfigError, match="is defined for 2 process"):
        preflight([cfg], world=1)
    preflight([cfg], world=2)
    preflight([cfg.replace(norm="gn")], world=1)  # GN keeps the global batch on any count


def test_an_evonorm_b0_run_keeps_its_process_count():
    # EvoNorm-B0 divides by a batch variance taken over each process's images, as BN does: a
    # run defined for 2 processes x 8 images resumed on 1 process of 16 would normalize over
    # 16 images, another run under the same id (it went through as GN does)
    cfg = RunConfig(**{**TINY, "norm": "evonorm_b0", "batch_size": 8, "world_size": 2})
    with pytest.raises(ConfigError, match="normalizes over each process's batch"):
        preflight([cfg], world=1)
    preflight([cfg], world=2)
    preflight([cfg.replace(norm="evonorm_s0")], world=1)  # S0: per-sample group statistics


def test_reproduce_with_a_world_size_it_cannot_train_is_refused_up_front(tmp_path):
    from typer.testing import CliRunner

    from normlab.lab.cli import app

    r = CliRunner().invoke(app, ["reproduce", "norms", "--quick", "--variants", "BN",
                                 "--set", "world_size=2", "--jobs", "2", "--out", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error:"), r.output
    assert "is defined for 2 process(es)" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "results.sqlite").exists()  # nothing recorded as failed


def _decay_of(opt):
    return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("model_kwargs", [
    {},                    # default NF-ResNet: SkipInit scalars present
    {"skipinit": False},   # no SkipInit scalars: gains and biases still excluded
])
def test_nf_models_do_not_decay_gains_biases_or_skipinit(model_kwargs):
    from normlab.lab.recipe import build_model, build_optimizer

    cfg = RunConfig(model="nf_resnet20", model_kwargs=model_kwargs, weight_decay=5e-4)
    model = build_model(cfg, 4, 3)
    decay = _decay_of(build_optimizer(cfg, model))
    named = dict(model.named_parameters())
    assert set(decay) == {id(p) for p in named.values()}  # every parameter in exactly one group
    kinds = {}
    for n, p in named.items():
        leaf = n.rpartition(".")[2]
        kinds.setdefault(leaf, set()).add(decay[id(p)])
    assert kinds["gain"] == kinds["bias"] == {0.0}                  # (C,1,1,1) gains, biases
    assert kinds.get("skip_gain", {0.0}) == {0.0}
    assert ("skip_gain" in kinds) == model_kwargs.get("skipinit", True)
    conv_and_fc = {decay[id(p)] for n, p in named.items() if n.endswith("weight")}
    assert conv_and_fc == {5e-4}                                     # weights keep decay


def test_models_with_a_norm_decay_everything():
    # the GN paper decays every parameter, gamma and beta included (REFERENCE section 1)
    from normlab.lab.recipe import build_model, build_optimizer

    cfg = RunConfig(model="resnet20", norm="gn", norm_kwargs={"num_groups": 4}, weight_decay=3e-4)
    model = build_model(cfg, 4, 3)
    opt = build_optimizer(cfg, model)
    assert len(opt.param_groups) == 1
    assert set(_decay_of(opt).values()) == {3e-4}


def test_nf_weight_decay_step_leaves_gains_alone():
    # one SGD step with zero gradients: decayed weights shrink by lr * wd, excluded ones stay put
    from normlab.lab.recipe import build_model, build_optimizer

    cfg = RunConfig(model="nf_resnet20", weight_decay=0.1, lr=0.5, momentum=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, 4, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p) + 0.5)  # off zero so decay would show
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        leaf = n.rpartition(".")[2]
        expect = before[n] if (p.dim() <= 1 or leaf in ("gain", "skip_gain")) else \
            before[n] * (1 - 0.5 * 0.1)
        torch.testing.assert_close(p.detach(), expect, msg=n)


def test_adamw_is_torchs_adamw_with_the_runs_lr_and_decay():
    # optimizer=adamw (transformers): one step equals torch.optim.AdamW's on a copy of the same
    # model, with the run's peak lr, its weight decay and the NF groups as with SGD
    from normlab.lab.recipe import build_model, build_optimizer

    cfg = RunConfig(model="nf_resnet20", optimizer="adamw", lr=0.01, weight_decay=0.05)
    torch.manual_seed(0)
    model = build_model(cfg, 4, 3)
    opt = build_optimizer(cfg, model)
    assert type(opt) is torch.optim.AdamW and {g["lr"] for g in opt.param_groups} == {0.01}
    assert set(_decay_of(opt).values()) == {0.05, 0.0}  # gains and biases undecayed, as SGD's
    twin = copy.deepcopy(model)
    ref = torch.optim.AdamW([{"params": g["params_twin"], "weight_decay": g["weight_decay"]}
                             for g in _twin_groups(opt, model, twin)], lr=0.01)
    for m in (model, twin):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.3)
    opt.step()
    ref.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    assert RunConfig().run_id() == RunConfig(optimizer="sgd").run_id()  # stored ids unchanged
    assert RunConfig().run_id() != RunConfig(optimizer="adamw").run_id()
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'"):
        RunConfig(optimizer="adam").validate()


def _twin_groups(opt, model, twin):
    """``opt``'s groups with each parameter replaced by the same-named one of ``twin``."""
    index = {id(p): n for n, p in model.named_parameters()}
    named = dict(twin.named_parameters())
    return [{**g, "params_twin": [named[index[id(p)]] for p in g["params"]]}
            for g in opt.param_groups]


def test_agc_leaves_the_classifier_and_refuses_a_model_without_one():
    from normlab.lab.recipe import agc_fn as _agc_fn, build_model

    cfg = RunConfig(model="nf_resnet20", agc=0.01)
    torch.manual_seed(1)
    model = build_model(cfg, 4, 3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 100.0  # far above lambda * ||W||: everything clipped
    fc_grad = model.fc.weight.grad.clone()
    conv = model.stem[0]
    conv_grad = conv.weight.grad.clone()
    _agc_fn(cfg, model)()
    assert torch.equal(model.fc.weight.grad, fc_grad)            # classifier untouched
    assert conv.weight.grad.norm() < conv_grad.norm() / 10        # the rest clipped

    class Headless(nn.Module):  # no get_classifier(), no fc, not a Sequential
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    with pytest.raises(ConfigError, match="agc: cannot tell which layer of model 'nf_resnet20' "
                                          "is the classifier") as e:
        _agc_fn(cfg, Headless())
    assert "get_classifier()" in e.value.hint
    # a timm model's classifier is get_classifier()'s, here `classifier` (the lab refused it:
    # it looked for `fc`)
    from timm_import import import_timm

    import_timm()
    cfg = RunConfig(model="timm:mobilenetv3_small_050", agc=0.01)
    model = build_model(cfg, 4, 3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 100.0
    head_grad = model.classifier.weight.grad.clone()
    stem_grad = model.conv_stem.weight.grad.clone()
    _agc_fn(cfg, model)()
    assert torch.equal(model.classifier.weight.grad, head_grad)
    assert model.conv_stem.weight.grad.norm() < stem_grad.norm() / 10


def test_weight_standardize_refuses_a_conv_subclass_it_would_change():
    class SamePadConv(nn.Conv2d):  # like timm's Conv2dSame: its own padding in forward
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    m = nn.Sequential(nn.Conv2d(3, 8, 3), SamePadConv(8, 4, 3))
    with pytest.raises(ConfigError, match=r"cannot weight-standardize '1' \(.*SamePadConv\)"):
        weight_standardize_(m)
    assert type(m[0]) is nn.Conv2d  # nothing swapped before the refusal


def test_timm_models_build_with_the_norm_and_ws_and_are_refused_without_batchnorm():
    from timm_import import import_timm

    import_timm()
    from normlab.lab.recipe import build_model
    from normlab.nn import GroupNorm, WSConv2d

    cfg = RunConfig(**{**TINY, "model": "TIMM:ResNet10t", "norm": "gn",
                       "norm_kwargs": {"num_groups": 8}, "ws": True})
    assert cfg.model == "timm:resnet10t"  # one spelling: one run id, one report table
    m = build_model(cfg, num_classes=4, in_chans=2)
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert convs and all(isinstance(c, WSConv2d) for c in convs)
    assert sum(isinstance(g, GroupNorm) for g in m.modules()) == 14  # every BN of resnet10t
    assert m(torch.randn(2, 2, 8, 8) + 1).shape == (2, 4)
    with pytest.raises(ConfigError, match="'nf_resnet26' has no BatchNorm or LayerNorm layer"):
        preflight([RunConfig(**{**TINY, "model": "timm:nf_resnet26"})])
    with pytest.raises(ConfigError, match=r"cannot weight-standardize 'conv_stem' \(.*Conv2dSame"):
        build_model(RunConfig(**{**TINY, "model": "timm:tf_efficientnet_b0", "ws": True}), 4, 2)


def test_a_timm_model_without_timm_is_one_config_error(monkeypatch):
    import sys

    from normlab.lab.recipe import build_model

    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` finds uninstalled
    with pytest.raises(ConfigError, match="cannot build model 'timm:resnet18': timm models need "
                                          "the timm package") as e:
        build_model(RunConfig(**{**TINY, "model": "timm:resnet18"}), num_classes=4, in_chans=2)
    assert "torchvision built for this torch" in e.value.hint
