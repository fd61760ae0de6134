"""ResNets with every norm: forward/backward shapes, depth counts, zero_init_last, orders."""

import functools

import pytest
import torch
from torch import nn

from normlab import models
from normlab import nn as nlnn
from normlab.models.resnet import ResNet, _Block

# every create_norm name; syncbn runs here without a process group (then it is BN)
NORMS = ["bn", "syncbn", "gn", "ln", "in", "brn", "frozenbn", "none", "ln2d"]

# (model, kwargs, input size): the smallest depth of each family and block type for the norm
# matrix. CIFAR-style nets run on 8x8 (digits-sized: stage 3 is 2x2, enough values for IN);
# ImageNet-style ones on 16x16 with the small-input stem (stage 4 is 2x2), small widths for speed.
MATRIX = [
    ("resnet20", {}, 8),                                        # post-activation basic blocks
    ("preact_resnet20", {}, 8),                                 # pre-activation basic blocks
    ("preact_resnet20", {"order": "act_norm"}, 8),              # ReLU-BN-Conv order
    ("resnet18", {"small_input": True, "width": 16}, 16),       # ImageNet basic blocks
    ("resnet50", {"small_input": True, "width": 8}, 16),        # ImageNet bottlenecks
    ("resnet50", {"small_input": True, "width": 8, "preact": True}, 16),  # pre-act bottleneck
]


def _fwd_bwd(model, x, num_classes):
    y = model(x)
    assert y.shape == (x.shape[0], num_classes)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name, kw, size", MATRIX)
def test_every_resnet_with_every_norm(name, kw, size, norm):
    model = models.create(name, norm=norm, num_classes=5, in_chans=3, **kw)
    x = torch.randn(2, 3, size, size) * 2.0 + 0.7
    _fwd_bwd(model, x, 5)


# each remaining depth once, at its default width, default norm (bn): checks the stage layout.
# ImageNet-style nets use the small-input stem on 16x16 (stage 4 is 2x2); the full 7x7 + pool
# stem is run on 32x32 with batch 4, because there stage 4 is 1x1 and BN over 2 values per
# channel through 100 layers overflows the gradient (in torch.nn too).
@pytest.mark.parametrize("name, size, batch, kw", [
    ("resnet32", 8, 2, {}), ("resnet56", 8, 2, {}), ("resnet110", 8, 2, {}),
    ("preact_resnet32", 8, 2, {}), ("preact_resnet56", 8, 2, {}), ("preact_resnet110", 8, 2, {}),
    ("resnet18", 16, 2, {"small_input": True}), ("resnet34", 16, 2, {"small_input": True}),
    ("resnet101", 16, 2, {"small_input": True}),
    ("resnet50", 32, 4, {}),                                         # full ImageNet stem
])
def test_each_depth(name, size, batch, kw):
    model = models.create(name, num_classes=3, **kw)
    _fwd_bwd(model, torch.randn(batch, 3, size, size) + 0.3, 3)


def _weighted_layers(model: ResNet) -> int:
    """Convs on the main path plus the classifier: the 'depth' of a ResNet."""
    shortcut = {id(m) for b in model.modules() if isinstance(b, _Block)
                for m in b.shortcut.modules()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and id(m) not in shortcut]
    return len(convs) + 1


@pytest.mark.parametrize("name, depth", [
    ("resnet20", 20), ("resnet110", 110), ("preact_resnet56", 56), ("resnet18", 18),
    ("resnet34", 34), ("resnet50", 50), ("resnet101", 101),
])
def test_depth_counts_weighted_layers(name, depth):
    assert _weighted_layers(models.create(name, width=4)) == depth


@pytest.mark.parametrize("name, width, channels", [
    ("resnet20", 16, 64), ("resnet20", 8, 32), ("resnet18", 64, 512), ("resnet50", 64, 2048),
])
def test_width_sets_the_feature_channels(name, width, channels):
    m = models.create(name, width=width)
    assert m.num_features == channels and m.fc.in_features == channels


def test_norm_accepts_name_class_and_partial():
    m1 = models.create("resnet20", norm="gn", norm_kwargs={"num_groups": 8})
    gns = [m for m in m1.modules() if isinstance(m, nlnn.GroupNorm)]
    assert gns and all(g.num_groups == 8 for g in gns)
    m2 = models.create("resnet20", norm=nn.BatchNorm2d)
    assert any(type(m) is nn.BatchNorm2d for m in m2.modules())
    m3 = models.create("resnet20", norm=functools.partial(nlnn.GroupNorm, 4))
    assert all(g.num_groups == 4 for g in m3.modules() if isinstance(g, nlnn.GroupNorm))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in m3.modules())


@pytest.mark.parametrize("name, kw", [
    ("resnet20", {}),                                   # post-act: block(x) = relu(x)
    ("preact_resnet20", {}),                            # pre-act: block(x) = x
    ("preact_resnet20", {"order": "act_norm"}),         # ReLU-BN-Conv: block(x) = x
    ("resnet50", {"width": 8}),                         # bottleneck, post-act
])
def test_zero_init_last_makes_identity_blocks(name, kw):
    model = models.create(name, norm="gn", zero_init_last=True, **kw)
    model.train()
    blocks = [b for b in model.modules() if isinstance(b, _Block) and not b.has_projection]
    assert blocks
    for b in blocks:
        cin = b.conv1.in_channels
        x = torch.randn(2, cin, 6, 6) + 0.4
        expected = x if model.preact else torch.relu(x)
        torch.testing.assert_close(b(x), expected, rtol=0, atol=0)
        assert b.last_norm().weight.abs().sum() == 0
    # and without it, no block is the identity
    model = models.create(name, norm="gn", **kw)
    b = next(b for b in model.modules() if isinstance(b, _Block) and not b.has_projection)
    x = torch.randn(2, b.conv1.in_channels, 6, 6)
    assert not torch.allclose(b(x), x if model.preact else torch.relu(x))


def test_order_selects_norm_act_or_act_norm():
    a = models.create("preact_resnet20", norm="bn")
    b = models.create("preact_resnet20", norm="bn", order="act_norm")
    blk_a, blk_b = a.stages[0][0], b.stages[0][0]
    blk_b.load_state_dict(blk_a.state_dict())
    x = torch.randn(4, 16, 8, 8) + 1.0
    bn = blk_a.norm1
    torch.testing.assert_close(blk_a.pre(bn, x), torch.relu(bn(x)))
    torch.testing.assert_close(blk_b.pre(bn, x), bn(torch.relu(x)))
    assert not torch.allclose(blk_a(x), blk_b(x))


@pytest.mark.parametrize("name, kw, match", [
    ("resnet20", {"order": "act_norm"}, "pre-activation"),
    ("preact_resnet20", {"order": "bn_first"}, "bn_first"),
    ("resnet18", {"order": "act_norm"}, "pre-activation"),
])
def test_bad_order(name, kw, match):
    with pytest.raises(ValueError, match=match):
        models.create(name, **kw)


def test_projection_only_at_transitions():
    m = models.create("resnet20")
    proj = [[b.has_projection for b in stage] for stage in m.stages]
    assert proj == [[False] * 3, [True, False, False], [True, False, False]]
    m = models.create("resnet50", width=8)
    assert [stage[0].has_projection for stage in m.stages] == [True] * 4


# post- and pre-activation, basic and bottleneck: each zeroes its own last norm's gamma
@pytest.mark.parametrize("name, kw", [
    ("resnet20", {}), ("preact_resnet20", {}), ("resnet50", {"width": 4}),
    ("resnet50", {"width": 4, "preact": True}),
])
def test_zero_init_last_leaves_a_frozen_gamma_alone(name, kw):
    # FrozenBatchNorm's gamma is a buffer that never trains: zeroing it switched every residual
    # branch off for good (the network was its shortcuts only, however long it trained)
    model = models.create(name, norm="frozenbn", zero_init_last=True, **kw)
    lasts = [b.last_norm() for b in model.modules() if isinstance(b, _Block)]
    assert lasts and all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in lasts)
    # a learnable gamma in the same place is zeroed, and is a parameter the optimizer sees
    model = models.create(name, norm="bn", zero_init_last=True, **kw)
    lasts = [b.last_norm() for b in model.modules() if isinstance(b, _Block)]
    assert all(isinstance(n.weight, nn.Parameter) and n.weight.abs().sum() == 0 for n in lasts)


@pytest.mark.parametrize("name, kw", [
    ("resnet20", {"zero_init_last": 1}),        # truthy non-bools were taken as True
    ("resnet20", {"preact": "no"}),             # "no" is truthy: a pre-activation net
    ("resnet18", {"small_input": "yes"}),
])
def test_switches_must_be_bools(name, kw):
    (key,) = kw
    with pytest.raises(TypeError, match=rf"{key} must be a bool, got {kw[key]!r}"):
        models.create(name, **kw)


# each family once: post- and pre-activation blocks, basic and bottleneck, with BN (running
# statistics differ in memory format handling) and GN (per-sample statistics)
@pytest.mark.parametrize("norm", ["bn", "gn"])
@pytest.mark.parametrize("name, kw, size", [
    ("resnet20", {}, 8), ("preact_resnet20", {}, 8),
    ("resnet50", {"width": 4, "small_input": True}, 8),
])
def test_channels_last_input_gives_the_same_output_and_grads(name, kw, size, norm):
    model = models.create(name, norm=norm, norm_kwargs={"num_groups": 4} if norm == "gn" else None,
                          num_classes=4, **kw).double()
    twin = models.create(name, norm=norm, num_classes=4,
                         norm_kwargs={"num_groups": 4} if norm == "gn" else None, **kw).double()
    twin.load_state_dict(model.state_dict())
    twin = twin.to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, size, size, dtype=torch.float64) + 0.3
    y = model(x)
    y_cl = twin(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y)
    y.square().sum().backward()
    y_cl.square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=n)
