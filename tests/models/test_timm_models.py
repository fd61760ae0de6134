"""``normlab.models.create("timm:<name>", norm=...)``: timm's own models, their BatchNorms (or,
in a LayerNorm model, their LayerNorms) replaced.

The reference is timm itself: the same model built by timm with the norm given as its
``norm_layer`` (torch.nn's GroupNorm or RMSNorm, timm's RmsNorm2d), from the same seed, must
compute the same function as the one normlab builds by conversion; with ``norm="bn"`` (``"ln"``
for a LayerNorm model) the model must be timm's own, layer by layer.
"""

import importlib.metadata
import sys

import pytest
import torch
from torch import nn

from normlab import models
from normlab.models import timm_models
from normlab.nn import BatchNorm2d, GroupNorm
from timm_import import import_timm


@pytest.fixture(scope="module")
def timm():
    return import_timm()


def _torch_gn8(num_channels, **kwargs):  # a function: timm maps a partial of nn.GroupNorm to its own
    return nn.GroupNorm(8, num_channels, **kwargs)


def _train_outputs(model, x):
    torch.manual_seed(5)
    return model.train()(x)


def test_gn_is_timms_model_built_with_groupnorm(timm):
    # 2 images of 1 x 16 x 16 (random, off-centre): resnet10t's deep stem keeps a 4 x 4 map to its
    # last stage, so every GroupNorm sees more than one value per group
    x = torch.randn(2, 1, 16, 16) * 1.5 + 0.7
    torch.manual_seed(0)
    ours = models.create("timm:resnet10t", norm="gn", norm_kwargs={"num_groups": 8},
                         num_classes=5, in_chans=1)
    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", num_classes=5, in_chans=1, norm_layer=_torch_gn8)
    n_ref = sum(isinstance(m, nn.GroupNorm) for m in ref.modules())
    assert sum(isinstance(m, GroupNorm) for m in ours.modules()) == n_ref == 14
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ours.modules())
    theirs = dict(ref.named_parameters())
    assert list(dict(ours.named_parameters())) == list(theirs)
    with torch.no_grad():  # timm zero-inits each block's last norm: random affine parameters
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                theirs[name].copy_(torch.randn_like(p) * 0.5 + 1.0)
            p.copy_(theirs[name])
    torch.testing.assert_close(_train_outputs(ours, x), _train_outputs(ref, x),
                               rtol=1e-4, atol=1e-5)


def test_bn_is_timms_own_model_with_normlab_batchnorm(timm):
    # 4 images of 3 x 24 x 24: batch statistics over 4 x spatial values in every layer
    x = torch.randn(4, 3, 24, 24) - 0.4
    torch.manual_seed(1)
    ours = models.create("timm:resnet10t", num_classes=3)  # norm left out: bn
    torch.manual_seed(1)
    ref = timm.create_model("resnet10t", num_classes=3)
    bns = [m for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) is BatchNorm2d for m in bns)
    assert list(ours.state_dict()) == list(ref.state_dict())  # a timm checkpoint loads as it is
    torch.testing.assert_close(_train_outputs(ours, x), _train_outputs(ref, x))
    for a, b in zip(ours.buffers(), ref.buffers()):  # running statistics updated alike
        torch.testing.assert_close(a, b)


def test_norm_act_layers_keep_their_activation(timm):
    # efficientnet_b0 normalizes with timm's BatchNormAct2d (BN + SiLU); 2 images of 3 x 32 x 32
    torch.manual_seed(2)
    ours = models.create("timm:efficientnet_b0", norm="gn", norm_kwargs={"num_groups": 8},
                         num_classes=4)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
               for m in timm.create_model("efficientnet_b0").modules())
    assert len(ours.normlab_conversion) == n_bn
    acts = {getattr(m, "activation", None) for m in ours.modules() if isinstance(m, GroupNorm)}
    assert "silu" in acts  # fused into the GroupNorm, not dropped
    assert ours.eval()(torch.randn(2, 3, 32, 32) + 0.3).shape == (2, 4)


def test_norm_none_as_none_builds_without_norms(timm):
    # norm=None means "none" for normlab's builders, and `normlab spp NAME:norm=none` passes None
    # (its key=value parser reads none as None): a timm model raised "norm must be a name ...,
    # got NoneType" from its first BatchNorm. Reference: the same model built with norm="none"
    torch.manual_seed(3)
    ours = models.create("timm:resnet10t", norm=None, num_classes=3, in_chans=1)
    torch.manual_seed(3)
    ref = models.create("timm:resnet10t", norm="none", num_classes=3, in_chans=1)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ours.modules())
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["abc", [8], [("num_groups", 8)]])
def test_norm_kwargs_must_be_a_dict(timm, bad):
    # as for normlab's own models: `normlab spp timm:resnet10t:norm_kwargs=abc` said only
    # "dictionary update sequence element #0 has length 1", and a list of pairs was taken
    with pytest.raises(TypeError, match=r"norm_kwargs must be a dict, got (str|list)"):
        models.create("timm:resnet10t", norm="gn", norm_kwargs=bad)
    with pytest.raises(TypeError, match=r"norm_kwargs must be a dict, got (str|list)"):
        models.create("resnet20", norm="gn", norm_kwargs=bad)  # the registry's own rule


def test_names_are_one_spelling():
    assert models.canonical_model(" TIMM: ResNet18 ") == "timm:resnet18"
    assert models.canonical_model("ResNet20") == "resnet20"
    assert models.model_uses_norm("timm:resnet18") and not models.is_normalizer_free("timm:x")


def _torch_rms(dim, **kwargs):  # ViT's own eps; a function, so timm takes it as it is
    return nn.RMSNorm(dim, eps=1e-6)


# a 2-block ViT on 1 x 8 x 8 images in 2 x 2 patches (16 tokens of 192 features); ConvNeXt-atto
# on 1 x 32 x 32 (its LayerNorm2d over the channels, the head's too)
VIT = ("vit_tiny_patch16_224", dict(img_size=8, patch_size=2, depth=2, in_chans=1), (8, 8))
CONVNEXT = ("convnext_atto", dict(in_chans=1), (32, 32))


@pytest.mark.parametrize("model, norm, norm_layer, count", [
    (VIT, "ln", None, 5),                 # timm's own ViT: its LayerNorm, eps 1e-6
    (VIT, "rms", _torch_rms, 5),          # norm1, norm2 of 2 blocks and the final norm
    (VIT, "none", nn.Identity, 5),
    (CONVNEXT, "ln", None, 17),           # timm's own ConvNeXt: LayerNorm2d
    (CONVNEXT, "rms", "RmsNorm2d", 17),   # stem, 4 downsamples/stages' blocks, the head
])
def test_layernorm_models_are_timms_built_with_that_norm(timm, model, norm, norm_layer, count):
    name, kwargs, size = model
    if isinstance(norm_layer, str):
        norm_layer = getattr(timm.layers, norm_layer)
    extra = {} if norm_layer is None else {"norm_layer": norm_layer}
    torch.manual_seed(0)
    ours = models.create(f"timm:{name}", norm=norm, num_classes=5, **kwargs)
    torch.manual_seed(0)
    ref = timm.create_model(name, num_classes=5, **kwargs, **extra)
    assert len(ours.normlab_conversion) == count and not ours.normlab_conversion.left
    assert list(ours.state_dict()) == list(ref.state_dict())  # a timm checkpoint loads as it is
    with torch.no_grad():  # random norm weights: every LayerNorm/RMSNorm shows
        for p in ours.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 1, *size) * 1.5 + 0.7
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, kwargs, match", [
    # timm's NF-ResNet has neither BatchNorm nor LayerNorm: nothing for the norm to replace
    ("timm:nf_resnet26", {}, "'nf_resnet26' has no BatchNorm or LayerNorm layer"),
    # a ViT's LayerNorms take ln, rms or none: the others need a batch or channel groups
    ("timm:vit_tiny_patch16_224", {"norm": "gn"}, "where norm 'gn' has no form; it takes ln, "
                                                  "rms, none"),
    ("timm:vit_tiny_patch16_224", {"norm": "bn"}, "norm 'bn' has no form"),  # the default too
    ("timm:vit_tiny_patch16_224", {"norm": "rms", "norm_kwargs": {"num_groups": 8}},
     r"norm 'rms' in place of its LayerNorms takes no norm_kwargs, got \{'num_groups': 8\}"),
    # PoolFormer: one LayerNorm2d and 24 GroupNorm1 (GN over all channels); a partial swap
    ("timm:poolformer_s12", {"norm": "rms"}, r"and with other norm layers "
                                             r"\(stages.0.blocks.0.norm1: GroupNorm1 and 23 more"),
    ("timm:resnet_18", {}, "unknown timm model 'resnet_18'.*did you mean 'resnet18'"),
    ("timm:", {}, "names no timm model"),
    # a tag timm does not have: timm's RuntimeError reached the lab as an unexpected error
    # (hint: "re-run the same command to resume"); a bad name is a ValueError naming it
    ("timm:resnet10t.a1_in1k", {},
     "'resnet10t' has no pretrained tag 'a1_in1k'.*did you mean 'resnet10t.c3_in1k'"),
    ("timm:resnet18", {"pretrained": True}, "pretrained is not taken"),
    # timm checks its arguments with assert: the AssertionError escaped the lab's model errors
    # as a traceback; a ValueError naming the arguments and timm's check (its message, or the
    # assert's line where it has none)
    ("timm:resnet10t", {"global_pool": "bogus"},
     "refused its arguments .*global_pool='bogus'\\): Invalid pool type: bogus"),
    ("timm:resnet10t", {"output_stride": 7}, "assert output_stride in \\(8, 16, 32\\)"),
    ("timm:resnet18", {"checkpoint_path": "x.pth"}, "checkpoint_path is not taken"),
])
def test_bad_names_and_arguments(timm, name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.create(name, **kwargs)


def test_status_says_when_timm_is_installed_but_does_not_import(monkeypatch):
    # `normlab --version` and `ls --models` said "timm 1.0.31 installed" from the package's
    # metadata while every --model timm:<name> failed on a torchvision built for another torch
    def broken():
        raise ImportError("importing timm failed: operator torchvision::nms does not exist")

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.0.31")
    monkeypatch.setattr(timm_models, "import_timm", broken)
    assert timm_models.timm_status() == ("timm 1.0.31 installed but not importable: importing "
                                         "timm failed: operator torchvision::nms does not exist")
    monkeypatch.setattr(timm_models, "import_timm", lambda: None)
    assert timm_models.timm_status() == "timm 1.0.31 installed"


def test_without_timm_an_importerror_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` finds uninstalled
    with pytest.raises(ImportError, match="pip install timm"):
        models.create("timm:resnet18")
    assert timm_models.timm_status().startswith("timm ")
