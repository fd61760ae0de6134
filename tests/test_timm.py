"""normlab against timm's own models and layers (issue 13 items 1, 2 and 8): convert_norm keeps
timm's fused activations and dropout, timm's FX feature extraction traces models built with
normlab layers, timm's distribute_bn sees normlab's SyncBatchNorm. Small models, random
initialization (pretrained=False), 64x64 inputs."""

import copy
import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn

import normlab
import normlab.nn as nlnn
from normlab.factory import resolve_groups
from timm_import import import_timm

timm = import_timm()
from timm.layers import BatchNormAct2d, GroupNormAct, SyncBatchNormAct  # noqa: E402
from timm.models import create_feature_extractor, get_graph_node_names  # noqa: E402

# efficientnet_b0: the model (SiLU fused into its BatchNormAct2d layers, fusable);
# regnety_002: ReLU, the smallest RegNet; mobilenetv3_small_050: hard-swish, which normlab does
# not fuse (the activation module is kept and run after the new norm)
MODELS = ["efficientnet_b0", "regnety_002", "mobilenetv3_small_050"]


@pytest.fixture(scope="module", params=MODELS)
def model_and_input(request):
    torch.manual_seed(0)
    model = _trained_looking(timm.create_model(request.param, pretrained=False).eval(), 0.1)
    return model, torch.randn(2, 3, 64, 64)


def _trained_looking(model, spread):
    """``model`` with random running statistics and affine in every BatchNorm2d (timm's
    norm-act layers included): not the identity init, means and biases ~ N(0, spread)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, spread)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, spread)
    return model


def _activation_counts(model):
    """How many of each activation a model applies: as modules, and fused into normlab norms."""
    counts = {}
    for m in model.modules():
        if isinstance(m, BatchNormAct2d) or isinstance(m, GroupNormAct):
            continue  # counted through their act submodule
        name = getattr(m, "activation", None) if hasattr(m, "num_features") or hasattr(
            m, "num_channels") else None
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
        for cls, key in ((nn.SiLU, "silu"), (nn.ReLU, "relu"), (nn.Hardswish, "hardswish")):
            if type(m) is cls:
                counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("to", ["bn", "frozenbn"])
def test_convert_to_bn_keeps_outputs_keys_and_activations(model_and_input, to):
    model, x = model_and_input
    converted = normlab.convert_norm(copy.deepcopy(model), to).eval()
    assert not any(isinstance(m, BatchNormAct2d) for m in converted.modules())
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), atol=1e-4, rtol=1e-4)
    keys = list(model.state_dict())
    if to == "frozenbn":  # a frozen BN has no batch counter (it loads BN state_dicts)
        keys = [k for k in keys if not k.endswith("num_batches_tracked")]
    assert list(converted.state_dict()) == keys
    assert _activation_counts(converted) == _activation_counts(model)


def _timm_group_norm_act(model):
    """The expected 'gn' conversion, built from timm's own GroupNormAct with each layer's
    activation (an independent statement of what convert_norm must compute)."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, BatchNormAct2d):
                c = child.num_features
                gn = GroupNormAct(c, resolve_groups(c, 32), eps=child.eps, apply_act=False)
                gn.act = child.act
                with torch.no_grad():
                    gn.weight.copy_(child.weight)
                    gn.bias.copy_(child.bias)
                setattr(m, child_name, gn)
            elif type(child) is nn.BatchNorm2d:
                gn = nn.GroupNorm(resolve_groups(child.num_features, 32), child.num_features,
                                  eps=child.eps)
                with torch.no_grad():
                    gn.weight.copy_(child.weight)
                    gn.bias.copy_(child.bias)
                setattr(m, child_name, gn)
    return model.eval()


def test_convert_to_gn_keeps_every_activation_as_timms_group_norm_act(model_and_input):
    model, x = model_and_input
    converted = normlab.convert_norm(copy.deepcopy(model), "gn").eval()
    expected = _timm_group_norm_act(model)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected(x), atol=1e-4, rtol=1e-4)
    assert _activation_counts(converted) == _activation_counts(model)


def test_unfusable_dropout_and_activation_run_after_the_new_norm():
    torch.manual_seed(0)
    layer = BatchNormAct2d(8, act_layer=nn.Hardswish, drop_layer=lambda: nn.Dropout(0.5))
    x = torch.randn(4, 8, 5, 5) + 1
    new = normlab.convert_norm(nn.Sequential(copy.deepcopy(layer)), "bn")[0]
    assert isinstance(new.act, nn.Hardswish) and isinstance(new.drop, nn.Dropout)
    torch.manual_seed(1)
    want = layer(x)  # training: batch statistics, then dropout, then hard-swish
    torch.manual_seed(1)
    torch.testing.assert_close(new(x), want, atol=1e-5, rtol=1e-5)
    assert list(new.state_dict()) == list(layer.state_dict())


class _PreActBlock(nn.Module):
    """x + act(norm(x)), as timm's pre-activation blocks (ResNetV2, DPN) feed their input both
    to a BatchNormAct2d and to the shortcut."""

    def __init__(self):
        super().__init__()
        self.norm = BatchNormAct2d(4)  # timm's default act: ReLU(inplace=True)

    def forward(self, x):
        return x + self.norm(x)


def test_norm_none_keeps_the_input_of_an_in_place_activation():
    # norm "none" is an nn.Identity, which returns its input: timm's in-place ReLU, run after
    # it, overwrote the block's input, so the shortcut added relu(x) (timm:resnetv2_50 and
    # timm:dpn48b computed other functions; dpn48b's backward raised). Reference: x + relu(x)
    block = normlab.convert_norm(_PreActBlock(), "none")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    x_in = x.detach().clone()
    y = block(x * 1)  # x * 1: not a leaf (an in-place op on a leaf that needs grad raises)
    torch.testing.assert_close(y, x_in + x_in.relu())
    y.sum().backward()
    torch.testing.assert_close(x.grad, 1 + (x_in > 0).float())


def test_sync_batchnorm_act_converts_with_its_activation():
    torch.manual_seed(0)
    model = timm.layers.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.SiLU))).eval()
    assert isinstance(model[1], SyncBatchNormAct)
    x = torch.randn(2, 3, 9, 9)
    for to in ("bn", "syncbn"):
        new = normlab.convert_norm(copy.deepcopy(model), to).eval()
        assert new[1].activation == "silu"
        torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name,kwargs",
    [("convnext_atto", {"norm_layer": nlnn.LayerNorm2d}),            # conv-net LayerNorm2d
     ("vit_tiny_patch16_224", {"norm_layer": nlnn.LayerNorm, "img_size": 32})],  # LayerNorm
)
def test_timm_fx_feature_extraction_with_normlab_layers(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    assert any(type(m) is kwargs["norm_layer"] for m in model.modules())
    nodes = get_graph_node_names(model)[1]
    extractor = create_feature_extractor(model, return_nodes=[nodes[-1]])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(next(iter(extractor(x).values())), model(x))


def test_timm_distribute_bn_sees_normlab_sync_batchnorm():
    from timm.utils import distribute_bn

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nlnn.SyncBatchNorm(4)).train()
        model(torch.randn(4, 3, 5, 5) + 2)
        before = model[1].running_mean.clone()
        distribute_bn(model, 1, reduce=True)  # averages the running buffers it finds by name
        torch.testing.assert_close(model[1].running_mean, before)
        assert not torch.equal(before, torch.zeros(4))  # the buffers it averaged were trained
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("to,groups", [
    (GroupNormAct, 8), (functools.partial(GroupNormAct, num_groups=2), 2), (BatchNormAct2d, None)])
def test_norm_act_target_runs_the_activation_once(to, groups):
    # a timm norm-act class as the target runs its own drop and act: convert_norm gave it the
    # BatchNormAct2d's hard-swish and also ran it again in a forward hook (hard-swish twice)
    torch.manual_seed(0)
    layer = BatchNormAct2d(8, act_layer=nn.Hardswish).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    new = normlab.convert_norm(nn.Sequential(copy.deepcopy(layer)), to)[0]
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64) + 1
    if groups is None:  # training mode: batch statistics
        want = nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0,
                                        layer.eps)
    else:
        want = nn.functional.group_norm(x, groups, layer.weight, layer.bias, layer.eps)
    torch.testing.assert_close(new(x), nn.functional.hardswish(want))
    assert isinstance(new.act, nn.Hardswish) and not new._forward_hooks


@pytest.mark.parametrize("to", ["frozenbn", "bn", "gn"])
def test_timm_frozen_batchnorms_are_converted(to):
    # timm.layers.freeze_batch_norm_2d gives torchvision's FrozenBatchNorm2d and timm's
    # FrozenBatchNormAct2d, which convert_norm did not recognise: nothing was replaced
    from timm.layers import freeze_batch_norm_2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 1), BatchNormAct2d(8, act_layer=nn.SiLU),
                          nn.Conv2d(8, 8, 1), BatchNormAct2d(8, act_layer=nn.Hardswish))
    _trained_looking(model, 0.3)
    frozen = freeze_batch_norm_2d(copy.deepcopy(model).eval())
    converted = normlab.convert_norm(copy.deepcopy(frozen), to)
    assert len(converted.normlab_conversion) == 3
    assert [type(converted[i]).__module__.split(".")[0] for i in (1, 3, 5)] == ["normlab"] * 3
    x = torch.randn(2, 3, 7, 7)
    if to == "gn":  # the affine carried over, the statistics now GN's own
        want = _timm_group_norm_act(model)(x)
    else:
        want = model.eval()(x)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), want)


def test_timm_fx_feature_extraction_of_a_converted_model():
    # mobilenetv3's hard-swish stays in a forward hook of each converted norm; timm's FX
    # feature extraction traced it twice (0.65 absolute error in the logits)
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    model = normlab.convert_norm(model, "gn").eval()
    extractor = create_feature_extractor(model, return_nodes=[get_graph_node_names(model)[1][-1]])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(next(iter(extractor(x).values())), model(x))


@pytest.mark.parametrize("act", [nn.SiLU, nn.Hardswish])
def test_normlab_convert_sync_batchnorm_keeps_timms_activation(act):
    # SyncBatchNorm.convert_sync_batchnorm made a plain SyncBatchNorm of a BatchNormAct2d and
    # dropped its act (torch's classmethod does the same; timm has its own for that reason)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=act)).train()
    x = torch.randn(4, 3, 7, 7)
    new = nlnn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(new[1]) is nlnn.SyncBatchNorm
    torch.testing.assert_close(new(x), model(x))  # training: batch statistics, then the act


@pytest.mark.parametrize("to", ["frozenbn", "gn"])
def test_converting_a_converted_norm_act_again_keeps_its_act_without_a_warning(to):
    # the forward hook convert_norm gave the first replacement for hard-swish is rebuilt on the
    # second; the warning that named it as a user's hook left behind was wrong
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.Hardswish)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 1.5)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    once = normlab.convert_norm(copy.deepcopy(model), "bn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the 8-channel layer's one channel per group (32 asked) is named, rightly, in another
        warnings.filterwarnings("ignore", message=r"convert_norm: .* one channel per group")
        twice = normlab.convert_norm(copy.deepcopy(once), to)
    x = torch.randn(2, 3, 7, 7)
    want = model(x) if to == "frozenbn" else _timm_group_norm_act(model)(x)
    with torch.no_grad():
        torch.testing.assert_close(twice(x), want)


def test_convert_sync_batchnorm_of_a_converted_norm_act_keeps_its_act_without_a_warning():
    # convert_sync_batchnorm warned about the forward hook convert_norm gave the first
    # replacement for hard-swish (not a user's hook: the SyncBatchNorm gets the act again)
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.Hardswish)).train()
    once = normlab.convert_norm(copy.deepcopy(model), "bn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        synced = nlnn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(once))
    assert type(synced[1]) is nlnn.SyncBatchNorm
    x = torch.randn(4, 3, 7, 7) + 1.5
    torch.testing.assert_close(synced(x), model(x))  # training: batch statistics, then the act


def _split_bn_model():
    """timm's convert_splitbn_model (3 splits) of a conv net with a plain BatchNorm2d and a
    BatchNormAct2d (hard-swish: its drop and act go to the SplitBatchNorm2d), then a conv and a
    BatchNorm2d added after the split: every BatchNorm, main and aux, with statistics and
    affine of its own."""
    from timm.layers import convert_splitbn_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), BatchNormAct2d(8, act_layer=nn.Hardswish))
    model = nn.Sequential(convert_splitbn_model(model, num_splits=3), nn.Conv2d(8, 4, 1),
                          nn.BatchNorm2d(4))
    return _trained_looking(model, 0.3)


def _split_reference_check(new, reference, x):
    """``new`` computes what timm's split-BN ``reference`` computes, in training (each third of
    the batch through its own BatchNorm, running statistics updated alike) and in eval, and
    holds the same state_dict keys."""
    assert list(new.state_dict()) == list(reference.state_dict())
    for mode in (True, False):
        new.train(mode)
        reference.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(new(x), reference(x))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(new.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("convert", ["bn", "gn", "frozenbn", "syncbn", "sync_classmethod"])
def test_split_batchnorms_are_left_whole_by_the_conversions(convert):
    # convert_norm and convert_sync_batchnorm replaced each SplitBatchNorm2d by one norm over the
    # whole batch and lost its aux_bn (their state_dict keys too); they are now left, named
    from formula import off_centre

    model = _split_bn_model()
    reference = copy.deepcopy(model)
    left = r"left 2 timm SplitBatchNorm2d layer\(s\) as they are \('0.1', '0.4'\)"
    with pytest.warns(UserWarning, match=left):
        if convert == "sync_classmethod":
            new = nlnn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            new = normlab.convert_norm(model, convert)
            summary = new.normlab_conversion
            assert [r.name for r in summary.replaced] == ["2"]  # the BatchNorm after the split
            assert [name for name, _ in summary.left] == ["0.1", "0.4"]
            assert "left 0.4: timm's SplitBatchNorm2d" in str(summary)
    assert type(new[0][1]).__name__ == type(new[0][4]).__name__ == "SplitBatchNorm2d"
    if convert in ("bn", "syncbn", "sync_classmethod"):  # the one BN after the split: same output
        _split_reference_check(new, reference, off_centre(6, 3, 7, 7))
    else:
        _split_reference_check(new[0], reference[0], off_centre(6, 3, 7, 7))


def test_fold_batchnorm_folds_split_batchnorms_as_their_eval_forward():
    # a SplitBatchNorm2d in eval mode is its main BatchNorm (then its drop and act): folded
    # like one; it was traced through (not traceable: torch's input check) and nothing folded
    from formula import off_centre

    model = _split_bn_model().double().eval()
    x = off_centre(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        folded, record = normlab.fold_batchnorm(model)
        assert record.traced and len(record.folded) == 3 and not record.skipped, str(record)
        torch.testing.assert_close(folded(x), want, rtol=1e-12, atol=1e-12)
    assert isinstance(folded[0][4], nn.Hardswish)
    assert not any("aux_bn" in key for key in folded.state_dict())


def test_optimize_keeps_split_batchnorms_and_their_outputs():
    # the aux BNs (torch.nn.BatchNorm2d, called by the SplitBatchNorm2d) become normlab's, the
    # SplitBatchNorm2d itself stays: train and eval outputs, running statistics and keys as timm's
    from formula import off_centre

    model = _split_bn_model()
    reference = copy.deepcopy(model)
    new, record = normlab.optimize(model)
    assert type(new[0][1]).__name__ == "SplitBatchNorm2d"
    assert isinstance(new[0][1].aux_bn[0], nlnn.BatchNorm2d)
    _split_reference_check(new, reference, off_centre(6, 3, 7, 7))


def test_readme_advice_on_timms_freeze_sync_and_reparameterize():
    # README (Drop-in): timm's freeze_batch_norm_2d and convert_sync_batchnorm (and torch's
    # nn.SyncBatchNorm.convert_sync_batchnorm) drop a normlab BatchNorm's fused activation,
    # normlab's conversions keep it; timm's reparameterize_model takes normlab's BatchNorm2d
    # and asserts torch.nn.BatchNorm2d (so: reparameterize first)
    from formula import off_centre
    from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d
    from timm.models.byobnet import RepVggBlock
    from timm.utils import reparameterize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nlnn.BatchNorm2d(8, activation="silu"))
    model = _trained_looking(model, 0.3).double().eval()
    x = off_centre(4, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        bn = model[1]
        no_act = nn.functional.batch_norm(model[0](x), bn.running_mean, bn.running_var, bn.weight,
                                          bn.bias, False, 0.0, bn.eps)
        torch.testing.assert_close(want, nn.functional.silu(no_act))
        # the activation is gone; torch's own classmethod too (its SyncBatchNorm runs on the
        # CPU in eval)
        for timms in (freeze_batch_norm_2d, convert_sync_batchnorm,
                      nn.SyncBatchNorm.convert_sync_batchnorm):
            converted = timms(copy.deepcopy(model)).eval()
            assert not hasattr(converted[1], "activation")
            torch.testing.assert_close(converted(x), no_act)
        frozen = normlab.convert_norm(copy.deepcopy(model), "frozenbn")
        synced = nlnn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
        for ours in (frozen, synced):
            assert ours[1].activation == "silu"
            torch.testing.assert_close(ours(x), want)

        block = _trained_looking(nn.Sequential(RepVggBlock(8, 8)), 0.3).double().eval()
        x = off_centre(2, 8, 7, 7, dtype=torch.float64)
        want = block(x)
        optimized, _ = normlab.optimize(copy.deepcopy(block))
        assert isinstance(optimized[0].identity, nlnn.BatchNorm2d)
        fused = reparameterize_model(optimized)
        assert fused[0].reparam_conv is not None
        torch.testing.assert_close(fused(x), want, rtol=1e-12, atol=1e-12)
        with pytest.raises(AssertionError):  # FrozenBatchNorm2d is no torch.nn.BatchNorm2d
            reparameterize_model(normlab.convert_norm(copy.deepcopy(block), "frozenbn"))


@pytest.mark.parametrize("to", [GroupNormAct, functools.partial(GroupNormAct, act_layer=nn.SiLU)])
def test_a_norm_act_target_adds_no_activation_after_a_plain_batchnorm(to):
    # a plain BatchNorm2d (timm's resnet18 has only those) converted to timm's GroupNormAct got
    # the class's default act (ReLU, or the partial's SiLU) after every norm, the last one of
    # each block before the residual add too: 0.48 relative error against timm's own GN build
    torch.manual_seed(0)
    model = normlab.convert_norm(timm.create_model("resnet18", pretrained=False), to,
                                 num_groups=8)
    reference = timm.create_model("resnet18", pretrained=False,
                                  norm_layer=functools.partial(timm.layers.GroupNorm, num_groups=8))
    with torch.no_grad():  # random affine, not timm's init (zero_init_last zeroes some weights)
        for key, value in reference.state_dict().items():
            if key.endswith(("bn1.weight", "bn2.weight", "bn3.weight")):
                value.uniform_(0.5, 1.5)
            elif key.endswith(("bn1.bias", "bn2.bias", "bn3.bias")):
                value.normal_(0, 0.3)
    model.load_state_dict(reference.state_dict())  # the same keys
    x = torch.randn(2, 3, 32, 32) * 2 + 1
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))


def test_a_norm_act_target_keeps_each_layers_own_activation_in_a_mixed_model():
    # beside the plain BatchNorm2d (no activation after the fix), a BatchNormAct2d keeps its
    # hard-swish: checked against torch's group_norm written out by hand
    torch.manual_seed(0)
    model = _trained_looking(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 1), BatchNormAct2d(8, act_layer=nn.Hardswish)), 0.3).double()
    new = normlab.convert_norm(copy.deepcopy(model), GroupNormAct, num_groups=4)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64) * 2 + 1
    f = nn.functional
    y = f.group_norm(model[0](x), 4, model[1].weight, model[1].bias, model[1].eps)
    y = f.hardswish(f.group_norm(model[2](y), 4, model[3].weight, model[3].bias, model[3].eps))
    with torch.no_grad():
        torch.testing.assert_close(new(x), y)


def _twin_models(norm_layer_pair, arch="resnet18"):
    """timm's ``arch`` built with torch's norm and with normlab's (the same random init and
    state): timm passes ``norm_layer`` to the blocks that take a plain norm class."""
    models = []
    for norm_layer in norm_layer_pair:
        torch.manual_seed(0)
        models.append(timm.create_model(arch, pretrained=False, num_classes=4,
                                        norm_layer=norm_layer))
    _trained_looking(models[0], 0.3)
    models[1].load_state_dict(models[0].state_dict())
    return models


def test_timm_grad_checkpointing_trains_as_with_torchs_batchnorm():
    """``model.set_grad_checkpointing()`` (timm's checkpoint_seq over the stages): a training
    step of resnet18 built with normlab's BatchNorm2d gives torch.nn's output, gradients and
    running statistics (the recompute moves them again, as torch's BN)."""
    from formula import off_centre

    x = off_centre(2, 3, 32, 32)
    runs = []
    for model in _twin_models((nn.BatchNorm2d, nlnn.BatchNorm2d)):
        model.train().set_grad_checkpointing(True)
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        runs.append((y, [p.grad for p in model.parameters()], model.state_dict()))
    assert isinstance(model.bn1, nlnn.BatchNorm2d)  # (the last model: normlab's)
    (want, want_grads, want_state), (got, got_grads, got_state) = runs
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    for key, w in want_state.items():
        torch.testing.assert_close(got_state[key], w, msg=key)


def test_timm_model_ema_and_averaged_model_give_torchs_bits():
    """The README's claim: timm's ModelEmaV3 (parameters and buffers, warmup off) and torch's
    AveragedModel (an EMA of the parameters, buffers copied) over two SGD steps of a model
    holding normlab's BN give the same bits as the model holding torch.nn's."""
    from formula import off_centre
    from timm.utils import ModelEmaV3
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    x = off_centre(4, 3, 16, 16)
    states = []
    for model in _twin_models((nn.BatchNorm2d, nlnn.BatchNorm2d)):
        model.train()
        ema = ModelEmaV3(model, decay=0.9)
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            ema.update(model, step=step)
            averaged.update_parameters(model)
        states.append((ema.module.state_dict(), averaged.module.state_dict()))
    for want, got in zip(*states):
        for key, w in want.items():
            torch.testing.assert_close(got[key], w, rtol=0, atol=0, msg=key)


def test_timm_param_groups_weight_decay_groups_normlabs_norms_as_torchs():
    """The README's claim: timm's ``param_groups_weight_decay`` (parameters of at most 1 dim
    and biases are not decayed) groups each norm's parameters as torch.nn's twin's (LayerNorm
    and RMSNorm over (C, H, W): a 3-D weight, decayed, for both), and puts normlab's own norms'
    parameters in the no-decay group, FRN's ``tau`` and EvoNorm's ``v`` included."""
    from timm.optim import param_groups_weight_decay

    def no_decay(model):
        groups = param_groups_weight_decay(model, 0.05)
        ids = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
        return {name for name, p in model.named_parameters() if id(p) in ids}

    def twins(m):
        return [m.BatchNorm2d(8), m.GroupNorm(4, 8), m.InstanceNorm2d(8, affine=True),
                m.SyncBatchNorm(8), m.LayerNorm([8, 4, 4]), m.RMSNorm([8, 4, 4]),
                m.LayerNorm(4), m.RMSNorm(4)]

    ours, theirs = (nn.Sequential(nn.Conv2d(8, 8, 3), *twins(m)) for m in (nlnn, nn))
    assert no_decay(ours) == no_decay(theirs)
    own = nn.Sequential(nn.Conv2d(8, 8, 3), nlnn.LayerNorm2d(8), nlnn.RMSNorm2d(8),
                        nlnn.FilterResponseNorm2d(8), nlnn.EvoNorm2dS0(8, num_groups=4),
                        nlnn.EvoNorm2dB0(8), nlnn.BatchRenorm2d(8),
                        nlnn.GhostBatchNorm2d(8, virtual_batch=2))
    names = {name for name, _ in own.named_parameters()}
    assert no_decay(own) == names - {"0.weight"}
    assert {"3.tau", "4.v", "5.v"} <= names


def test_unfreezing_normlabs_frozen_batchnorm_is_convert_norm_to_bn():
    """timm's ``unfreeze_batch_norm_2d`` turns torchvision's FrozenBatchNorm2d (what timm's
    ``freeze_batch_norm_2d`` builds) back into BatchNorm2d, but leaves normlab's
    FrozenBatchNorm2d (another class) frozen, without a word; ``normlab.convert_norm(model,
    "bn")`` is its unfreeze: the same eval output, trainable affine and training step as
    timm's freeze/unfreeze round trip on torch's BN."""
    from formula import off_centre
    from timm.layers import freeze_batch_norm_2d, unfreeze_batch_norm_2d

    model, _ = _twin_models((nn.BatchNorm2d, nn.BatchNorm2d))
    x = off_centre(2, 3, 32, 32)
    theirs = unfreeze_batch_norm_2d(freeze_batch_norm_2d(copy.deepcopy(model)))
    frozen = normlab.convert_norm(copy.deepcopy(model), "frozenbn")
    assert isinstance(unfreeze_batch_norm_2d(frozen).bn1, nlnn.FrozenBatchNorm2d)  # left
    ours = normlab.convert_norm(frozen, "bn")
    assert isinstance(ours.bn1, nlnn.BatchNorm2d) and ours.bn1.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    torch.testing.assert_close(ours.train()(x), theirs.train()(x))
    for key, want in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], want, msg=key)
