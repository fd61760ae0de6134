"""normlab in the small-batch detector / segmentation workflow: timm ``features_only`` backbones
and torchvision ResNets with frozen BN (FrozenBatchNorm2d), GN or SyncBN, an FPN with a GN
head, and the passes (fold_batchnorm, optimize) on them. Every check is against torch.nn,
torchvision or timm on the same input: random running statistics and affine, off-centre
data. Models are untrained (pretrained=False), inputs 64x64 so that each test takes seconds."""

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
import normlab.nn as nlnn
from normlab.factory import resolve_groups
from timm_import import import_timm

timm = import_timm()
import torchvision  # noqa: E402  (timm_import made it importable)
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBatchNorm2d  # noqa: E402
from timm.layers import BatchNormAct2d  # noqa: E402
from timm.models._features import FeatureHooks  # noqa: E402

# a batch of 2 (a detector's images per GPU), 3 channels (RGB), 64x64: 5 stride-2 levels down
# to 2x2, so every feature level of every backbone has more than one position
X = torch.randn(2, 3, 64, 64) * 2 + 0.5

BACKBONES = [
    ("resnet18", {"out_indices": (1, 2, 3, 4)}),  # C2-C5, the FPN input of detectron2's R-FPN
    ("resnet50", {"out_indices": (2, 3, 4)}),      # C3-C5 (RetinaNet / FCOS), bottleneck blocks
    ("efficientnet_b0", {}),                       # BatchNormAct2d with SiLU (EfficientDet)
    ("regnetx_002", {}),                           # BatchNormAct2d with ReLU
    ("resnet18", {"feature_cls": "dict"}),         # FeatureDictNet
    ("resnet18", {"feature_cls": "hook"}),         # FeatureHookNet (hooks on layer1..layer4)
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in BACKBONES]


def _trained_looking(model):
    """Random running statistics and affine in every BatchNorm (torchvision's frozen one
    included) and GroupNorm: not the identity init, means away from zero."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, TVFrozenBatchNorm2d)):
                m.running_mean.normal_(0.3, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.BatchNorm2d, TVFrozenBatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.1, 0.2)
    return model


def _backbone(name, kwargs):
    torch.manual_seed(0)
    return _trained_looking(timm.create_model(name, pretrained=False, features_only=True,
                                              **kwargs)).eval()


def _levels(out):
    """The feature maps of a features_only model's output (a list, or a dict by level)."""
    return list(out.values()) if isinstance(out, dict) else list(out)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _bn_count(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name,kwargs", BACKBONES, ids=IDS)
def test_frozen_backbone_is_the_eval_backbone_in_train_mode_too(name, kwargs):
    ref = _backbone(name, kwargs)
    with torch.no_grad():
        expected = _levels(ref(X))
    model = normlab.convert_norm(copy.deepcopy(ref), "frozenbn").train()
    assert type(model) is type(ref) and _bn_count(model) == 0
    assert len(model.normlab_conversion) == _bn_count(ref)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = _levels(model(X))
    assert len(out) == len(expected)
    for got, want in zip(out, expected):
        assert torch.equal(got, want)  # the same ATen call as BN's eval forward
    sum(o.mean() for o in out).backward()
    # frozen stays frozen: no statistic or affine moved, and they are buffers (no grads) as in
    # torchvision's FrozenBatchNorm2d; every other parameter trains as before
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, m in ref.named_parameters()
                         if not isinstance(ref.get_submodule(n.rsplit(".", 1)[0]), nn.BatchNorm2d)}
    assert all(model.get_parameter(n).grad is not None for n in trainable if "conv" in n)


@pytest.mark.parametrize("name,kwargs", BACKBONES[:1] + BACKBONES[4:], ids=IDS[:1] + IDS[4:])
def test_gn_and_syncbn_backbones_against_torch_nn(name, kwargs):
    ref = _backbone(name, kwargs)
    # gn: every BatchNorm2d by torch.nn.GroupNorm with the group rule and the BN's affine
    # (timm's ResNets apply their ReLU outside the norm, so a plain swap is the reference)
    gn_ref = copy.deepcopy(ref)
    for parent in list(gn_ref.modules()):
        for key, child in list(parent._modules.items()):
            if isinstance(child, nn.BatchNorm2d):
                gn = nn.GroupNorm(resolve_groups(32, child.num_features), child.num_features)
                gn.load_state_dict({"weight": child.weight, "bias": child.bias})
                setattr(parent, key, gn)
    gn_model = normlab.convert_norm(copy.deepcopy(ref), "gn").train()
    gn_ref.train()
    for got, want in zip(_levels(gn_model(X)), _levels(gn_ref(X))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # syncbn without a process group: BN over the local batch, running statistics included
    sync = normlab.convert_norm(copy.deepcopy(ref), "syncbn").train()
    bn_ref = copy.deepcopy(ref).train()
    for got, want in zip(_levels(sync(X)), _levels(bn_ref(X))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want = bn_ref.state_dict()
    assert list(sync.state_dict()) == list(want)
    for k, got in sync.state_dict().items():
        torch.testing.assert_close(got, want[k], rtol=1e-5, atol=1e-6, msg=k)


def _hooked_backbone():
    """densenet121 as timm's FeatureHookNet: two of its feature points are norms
    (features_norm0, features_norm5), whose outputs timm's FeatureHooks record."""
    return _backbone("densenet121", {"feature_cls": "hook"})


@pytest.mark.parametrize("convert", [
    functools.partial(normlab.convert_norm, to="frozenbn"),
    functools.partial(normlab.convert_norm, to="syncbn"),
    nlnn.SyncBatchNorm.convert_sync_batchnorm,
], ids=["frozenbn", "syncbn", "convert_sync_batchnorm"])
def test_timm_feature_hooks_on_a_norm_move_to_its_replacement(convert):
    # without: the hooks stayed on the replaced norms, and the model returned 3 feature maps of 5
    ref = _hooked_backbone()
    with torch.no_grad():
        expected = _levels(ref(X))
    assert len(expected) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of the user's is dropped
        model = convert(copy.deepcopy(ref)).eval()
    with torch.no_grad():
        out = _levels(model(X))
    assert len(out) == len(expected)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hook_type", ["forward", "forward_pre"])
def test_feature_hook_sees_the_activation_a_converted_norm_act_keeps(hook_type):
    # hard-swish is not fused: it runs in a forward hook of the new norm, which must run before
    # timm's hook, as it ran inside BatchNormAct2d before the hook saw the output (not in place:
    # an in-place act would change what an earlier hook kept)
    torch.manual_seed(0)
    model = _trained_looking(nn.Sequential(
        nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.Hardswish, inplace=False),
        nn.Conv2d(8, 4, 1))).eval()
    hooks = FeatureHooks([{"module": "1", "hook_type": hook_type}], model.named_modules())
    with torch.no_grad():
        model(X)
        [expected] = hooks.get_output(X.device).values()
        normlab.convert_norm(model, "gn", num_groups=4)  # a train-independent target
        ref_gn = nn.GroupNorm(4, 8)
        ref_gn.load_state_dict({"weight": model[1].weight, "bias": model[1].bias})
        model(X)
        [got] = hooks.get_output(X.device).values()
        if hook_type == "forward":
            expected = F.hardswish(ref_gn(model[0](X)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_users_hook_on_a_norm_is_still_named_in_a_warning_next_to_timms():
    ref = _hooked_backbone()
    ref.features_norm5.register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="features_norm5") as record:
        normlab.convert_norm(ref, "frozenbn")
    assert len(record) == 1  # features_norm0 carries timm's hook only


def _torchvision_resnet50(norm_layer=None):
    torch.manual_seed(0)
    kwargs = {"norm_layer": norm_layer} if norm_layer else {}
    return torchvision.models.resnet50(weights=None, **kwargs)


def test_torchvision_resnet50_frozen_state_dicts_interchange_with_torchvisions():
    bn_model = _trained_looking(_torchvision_resnet50()).eval()
    ours = normlab.convert_norm(copy.deepcopy(bn_model), "frozenbn")
    theirs = _torchvision_resnet50(TVFrozenBatchNorm2d)
    theirs.load_state_dict(bn_model.state_dict())  # what torchvision does with a BN checkpoint
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ({n for n, _ in ours.named_parameters()} == {n for n, _ in theirs.named_parameters()})
    # both directions, strict, from fresh models
    fresh_ours = normlab.convert_norm(_torchvision_resnet50(), "frozenbn")
    fresh_ours.load_state_dict(theirs.state_dict(), strict=True)
    fresh_theirs = _torchvision_resnet50(TVFrozenBatchNorm2d)
    fresh_theirs.load_state_dict(ours.state_dict(), strict=True)
    # a normlab FrozenBatchNorm2d as torchvision's norm_layer builds the same model
    as_norm_layer = _torchvision_resnet50(nlnn.FrozenBatchNorm2d)
    as_norm_layer.load_state_dict(theirs.state_dict(), strict=True)
    assert all(m.eps == 1e-5 for m in theirs.modules() if isinstance(m, TVFrozenBatchNorm2d))
    with torch.no_grad():
        want = bn_model(X)
        assert torch.equal(ours(X), want) and torch.equal(fresh_ours(X), want)
        assert torch.equal(as_norm_layer(X), want)
        # torchvision applies x * scale + shift: the same eps, another rounding
        assert _rel(theirs(X), want) < 1e-5 and _rel(fresh_theirs(X), want) < 1e-5


def test_fold_and_optimize_of_frozen_backbones():
    ref = _backbone("efficientnet_b0", {})
    tv = _trained_looking(
        torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
            backbone_name="resnet18", weights=None, trainable_layers=3)).eval()
    for model in (ref, tv):
        with torch.no_grad():
            expected = _levels(model(X))
        for start in (model, normlab.convert_norm(copy.deepcopy(model), "frozenbn")):
            folded, record = normlab.fold_batchnorm(copy.deepcopy(start))
            assert record.traced and not record.skipped and record.folded, str(record)
            optimized, _ = normlab.optimize(copy.deepcopy(start).train())
            with torch.no_grad():
                for f, o, want in zip(_levels(folded(X)), _levels(optimized.eval()(X)), expected):
                    assert _rel(f, want) < 1e-5 and _rel(o, want) < 1e-5


class _UntraceableDetector(nn.Module):
    """A torchvision FPN backbone (BatchNorm2d, eval) under a forward torch.fx cannot trace, as
    a detector's (GeneralizedRCNN checks its inputs' values)."""

    def __init__(self):
        super().__init__()
        self.backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
            backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d)

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent: fx cannot trace it
            return self.backbone(x)
        return {}


@pytest.mark.parametrize("make,folded,left", [
    (lambda: _backbone("resnet18", {"feature_cls": "hook"}), 19, ["body.bn1"]),  # stem pair in body
    (lambda: _trained_looking(_UntraceableDetector()).eval(), 20, []),
], ids=["feature_hook_net", "untraceable_detector"])
def test_fold_of_an_untraceable_model_traces_its_submodules(make, folded, left):
    # without: the trace of the whole model failed (hooks on the stages, control flow), and only
    # nn.Sequential neighbours were folded (the 3 downsample pairs of 20)
    model = normlab.convert_norm(make(), "frozenbn")
    with torch.no_grad():
        expected = _levels(model(X))
        model, record = normlab.fold_batchnorm(model)
        for got, want in zip(_levels(model(X)), expected):
            assert _rel(got, want) < 1e-5
    assert not record.traced and len(record.folded) == folded, str(record)
    assert record.traced_parts and "submodules traced instead" in str(record)
    assert [name for name, _ in record.skipped] == left
    assert all("could not be traced" in why for _, why in record.skipped)


class _FPN(nn.Module):
    """Lateral 1x1 convs, top-down nearest upsampling, 3x3 output convs with a norm and ReLU."""

    def __init__(self, channels, out, norm):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out, 1) for c in channels)
        self.output = nn.ModuleList(
            nn.Sequential(nn.Conv2d(out, out, 3, padding=1, bias=False), norm(out), nn.ReLU())
            for _ in channels)

    def forward(self, feats):
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:])
        return [conv(t) for conv, t in zip(self.output, lat)]


class _Detector(nn.Module):
    """A timm backbone (C3-C5), an FPN and a head tower shared by the levels (RetinaNet's,
    FCOS's), each conv followed by a norm and ReLU."""

    def __init__(self, norm):
        super().__init__()
        self.backbone = timm.create_model("resnet18", pretrained=False, features_only=True,
                                          out_indices=(2, 3, 4))
        self.fpn = _FPN(self.backbone.feature_info.channels(), 32, norm)
        self.tower = nn.Sequential(*[m for _ in range(2) for m in
                                     (nn.Conv2d(32, 32, 3, padding=1), norm(32), nn.ReLU())])
        self.logits = nn.Conv2d(32, 5, 3, padding=1)

    def forward(self, x):
        return [self.logits(self.tower(f)) for f in self.fpn(self.backbone(x))]


def test_detector_with_gn_fpn_and_head_trains_as_torch_nn():
    # reference: torch.nn GroupNorm(8, 32) in FPN and head, torchvision's FrozenBatchNorm2d in
    # the backbone (timm's freeze_batch_norm_2d)
    torch.manual_seed(0)
    ref = _trained_looking(_Detector(lambda c: nn.GroupNorm(8, c)))
    ref.backbone = timm.layers.freeze_batch_norm_2d(ref.backbone)
    # normlab: built with BatchNorm2d, converted part by part, then optimized as a whole
    model = _Detector(nn.BatchNorm2d)
    model.load_state_dict(ref.state_dict(), strict=False)  # convs and the BNs' init
    model.backbone = normlab.convert_norm(model.backbone, "frozenbn")
    model.fpn = normlab.convert_norm(model.fpn, "gn", num_groups=8)
    model.tower = normlab.convert_norm(model.tower, "gn", num_groups=8)
    model.load_state_dict(ref.state_dict(), strict=True)
    model, record = normlab.optimize(model)
    assert record.fused, str(record)
    for m in (ref, model):
        m.train()
        for p in m.backbone.conv1.parameters():  # detectron2's freeze_at: the stem's conv
            p.requires_grad_(False)
    outs = []
    for m in (ref, model):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        out = m(X)
        sum((o.square()).mean() for o in out).backward()
        opt.step()
        outs.append(out)
    for got, want in zip(outs[1], outs[0]):
        assert _rel(got, want) < 1e-5
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, p in ref.named_parameters() if p.grad is not None}
    for n, p in ref.named_parameters():
        if p.grad is not None:
            assert _rel(grads[n], p.grad) < 1e-4, n
    want = ref.state_dict()
    assert set(model.state_dict()) == set(want)
    for k, got in model.state_dict().items():
        torch.testing.assert_close(got, want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_frozen_backbone_under_torchs_sync_conversion_and_jit_trace():
    ref = _backbone("efficientnet_b0", {})
    with torch.no_grad():
        expected = _levels(ref(X))
    frozen = normlab.convert_norm(copy.deepcopy(ref), "frozenbn")
    # Lightning's sync_batchnorm=True: the frozen norms are no BatchNorms to it, and stay frozen
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(frozen).train()
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # normlab's shape checks
        traced = torch.jit.trace(synced, X, strict=False)
    with torch.no_grad():
        for a, b, want in zip(_levels(synced(X)), _levels(traced(X)), expected):
            assert torch.equal(a, want) and torch.equal(b, want)


def test_optimize_replaces_torchvisions_frozen_bn_and_fuses_its_relu():
    # a torchvision ResNet-18 with torchvision's FrozenBatchNorm2d (a detector's frozen backbone):
    # optimize said "0 replaced, 0 fused, 0 left" and left it all as it was
    TVFrozen = TVFrozenBatchNorm2d
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, norm_layer=TVFrozen, num_classes=5)
    with torch.no_grad():  # random frozen statistics and affine: an identity would hide errors
        for m in model.modules():
            if isinstance(m, TVFrozen):
                c = m.weight.shape[0]
                m.weight.copy_(torch.rand(c) + 0.5)
                m.bias.copy_(torch.randn(c) * 0.2)
                m.running_mean.copy_(torch.randn(c) * 0.3)
                m.running_var.copy_(torch.rand(c) + 0.5)
    x = torch.randn(2, 3, 64, 64) + 0.5  # 2 images at 64 px: 2 x 2 maps in the last stage
    keys, ref = list(model.state_dict()), model.eval()(x)
    out, record = normlab.optimize(model)
    n_frozen = 20  # resnet18: bn1, 2 per basic block x 8, 3 downsample
    assert sum(r[1] == "FrozenBatchNorm2d" for r in record.replaced) == n_frozen
    assert not any(isinstance(m, TVFrozen) for m in out.modules())
    assert len(record.fused) == 9  # bn1 and each block's bn1 take the ReLU after them
    assert list(out.state_dict()) == keys
    torch.testing.assert_close(out.eval()(x), ref, rtol=1e-5, atol=1e-5)


def test_optimize_replaces_timms_frozen_norm_act_and_keeps_its_activation():
    # regnetx_002 frozen by timm (BatchNormAct2d -> FrozenBatchNormAct2d, ReLU inside)
    from timm.layers import freeze_batch_norm_2d

    torch.manual_seed(1)
    model = freeze_batch_norm_2d(timm.create_model("regnetx_002", num_classes=3))
    frozen = [m for m in model.modules() if type(m).__name__ == "FrozenBatchNormAct2d"]
    with torch.no_grad():
        for m in frozen:
            c = m.weight.shape[0]
            m.weight.copy_(torch.rand(c) + 0.5)
            m.running_mean.copy_(torch.randn(c) * 0.3)
            m.running_var.copy_(torch.rand(c) + 0.5)
    ref = model.eval()(X)
    out, record = normlab.optimize(model)
    assert sum(r[1] == "FrozenBatchNormAct2d" for r in record.replaced) == len(frozen) > 0
    assert not any(type(m).__name__ == "FrozenBatchNormAct2d" for m in out.modules())
    torch.testing.assert_close(out.eval()(X), ref, rtol=1e-5, atol=1e-5)
