"""normlab.optimize: outputs equal before and after (float32, 1e-6 relative), state_dicts load
both ways, the record names what was replaced, fused and left; on small hand-built models, a
diffusers-style UNet ResNet block written here, and timm's resnet50 / efficientnet_b0 /
convnext_atto (pretrained=False, 64x64 inputs)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab import nn as nlnn
from normlab.optimize import optimize
from timm_import import import_timm
from pass_models import SequentialKeepingAll


def _randomize(model):
    """Non-trivial affine parameters and running statistics in every norm."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "running_var", None), torch.Tensor):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
            for name, p in m.named_parameters(recurse=False):
                if name in ("weight", "bias") and p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.2)
    return model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check(model, *inputs, train=False, rtol=1e-6):
    """optimize a copy of model; outputs equal, state_dicts interchangeable. Returns the
    optimized model and its record."""
    model = _randomize(model).train(train)
    reference = copy.deepcopy(model)
    state = copy.deepcopy(model.state_dict())
    ours, record = optimize(model)
    with torch.no_grad():
        expect, got = reference(*inputs), ours(*inputs)
    assert _rel(got, expect) < rtol, str(record)
    if train:  # the running statistics moved the same way (before the state_dicts reload them)
        buffers = dict(ours.named_buffers())
        for name, a in reference.named_buffers():
            torch.testing.assert_close(buffers[name], a, msg=name)
    assert set(ours.state_dict()) == set(state)
    ours.load_state_dict(state, strict=True)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, record


class UNetResBlock(nn.Module):
    """A diffusers-style UNet ResNet block: GroupNorm -> SiLU -> Conv, a time embedding added,
    GroupNorm -> SiLU -> (dropout) -> Conv, and a 1x1 shortcut; the activations are F.silu calls
    in forward, so only a torch.fx trace can fuse them."""

    def __init__(self, cin=32, cout=64, temb=16, groups=8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.conv_shortcut(x) + h


@pytest.mark.parametrize("train", [False, True])
def test_unet_resnet_block_fuses_the_silu_calls(train):
    block = UNetResBlock()
    x, temb = torch.randn(2, 32, 8, 8) + 0.5, torch.randn(2, 16)
    ours, record = _check(block, x, temb, train=train)
    assert isinstance(ours, torch.fx.GraphModule) and record.traced
    assert [(n, a, how) for n, a, how in record.fused] == [
        ("norm1", "silu", "fx"), ("norm2", "silu", "fx")]
    assert ours.norm1.activation == "silu" and isinstance(ours.norm1, nlnn.GroupNorm)
    # the original keeps its forward (F.silu calls) with unfused normlab norms: still correct
    assert isinstance(block.norm1, nlnn.GroupNorm) and block.norm1.activation is None
    assert ours.norm1.weight is block.norm1.weight
    # one F.silu call left: the time embedding's, which reads no norm
    assert ours.code.count("functional.silu(") == 1


def test_sequential_and_what_is_left():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(inplace=True),     # fused
        nn.Conv2d(16, 16, 3), nn.GroupNorm(4, 16), nn.GELU(approximate="tanh"),  # not exact GELU
        nn.InstanceNorm2d(16, affine=True), nn.SiLU(),                       # fused
        nn.Flatten(), nn.LayerNorm(16 * 6 * 6), nn.ReLU(),                   # LayerNorm takes none
    )
    ours, record = _check(model, torch.randn(2, 3, 10, 10))
    assert [type(m).__name__ for m in ours[:3]] == ["Conv2d", "BatchNorm2d", "Identity"]
    assert ours[1].activation == "relu" and isinstance(ours[1], nlnn.BatchNorm2d)
    assert isinstance(ours[4], nlnn.GroupNorm) and ours[4].activation is None
    assert isinstance(ours[6], nlnn.InstanceNorm2d) and ours[6].activation == "silu"
    assert isinstance(ours[9], nlnn.LayerNorm) and isinstance(ours[10], nn.ReLU)
    assert len(record.replaced) == 4
    assert record.fused == [("1", "relu", "sequential"), ("6", "silu", "sequential")]


def test_shared_norm_is_not_fused_and_training_matches():
    shared = nn.BatchNorm2d(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), shared, nn.ReLU(), shared)  # called twice
    ours, record = _check(model, torch.randn(4, 3, 5, 5), train=True)
    assert ours[1] is ours[3] and isinstance(ours[1], nlnn.BatchNorm2d)
    assert ours[1].activation is None and not record.fused


def test_rmsnorm_and_subclasses():
    class MyLN(nn.LayerNorm):  # its own forward: left alone
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8, eps=1e-5), MyLN(8))
    ours, record = _check(model, torch.randn(3, 8))
    assert isinstance(ours[1], nlnn.RMSNorm) and type(ours[2]) is MyLN
    assert [r[0] for r in record.replaced] == ["1"]


def test_model_that_is_a_norm_and_errors():
    norm, record = optimize(nn.GroupNorm(2, 4))
    assert isinstance(norm, nlnn.GroupNorm) and record.replaced[0][0] == ""
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        optimize("resnet")
    with pytest.raises(TypeError, match="trace must be a bool, got 'yes'"):
        optimize(nn.Identity(), trace="yes")


class _Stem(nn.Module):
    """A traced-through module reading a non-persistent buffer (an input std, as detectors keep
    their pixel statistics) and a plain tensor attribute: neither is in its state_dict."""

    def __init__(self):
        super().__init__()
        self.register_buffer("std", torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1),
                             persistent=False)
        self.conv = nn.Conv2d(3, 8, 3)
        self.scale = torch.tensor(2.0)

    def forward(self, x):
        return self.conv(x / self.std) * self.scale


class _NetWithStateFxDoesNotRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1),
                             persistent=False)
        self.stem = _Stem()
        self.bn = nn.BatchNorm2d(8)
        self.aux = nn.Sequential(nn.Linear(2, 2))  # a head forward does not call (its keys stay)

    def forward(self, x):
        return F.relu(self.bn(self.stem(x - self.mean)))  # F.relu: fused by the fx step alone


def test_fx_fusion_keeps_the_state_dict_keys_fx_would_change():
    # the GraphModule fx builds holds only what its graph reads, each tensor as a persistent
    # buffer: the keys of aux went missing and mean, stem.std, stem.scale appeared
    ours, record = _check(_NetWithStateFxDoesNotRead(), torch.randn(2, 3, 6, 6) + 1)
    assert isinstance(ours, torch.fx.GraphModule) and record.fused == [("bn", "relu", "fx")]
    assert "aux.0.weight" in ours.state_dict() and "mean" not in ours.state_dict()


def test_hooks_on_the_fx_fused_norm_do_not_reach_the_original_model():
    # the fused norm is a shallow copy of the model's norm: it shared the model norm's hook
    # dicts, so a hook registered on the GraphModule's norm ran with the original model too
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))  # F.relu: the fx step makes a new norm

    model = Net()
    ours, _ = optimize(model)
    assert ours.bn is not model.bn
    calls = []
    ours.bn.register_forward_hook(lambda *args: calls.append(1))
    ours.bn.register_state_dict_post_hook(lambda m, state, prefix, meta: state.clear())
    model(torch.randn(2, 3, 4, 4))
    assert calls == [] and "bn.running_mean" in model.state_dict()


def test_untraceable_model_keeps_module_level_fusions():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.SiLU())

        def forward(self, x):
            y = self.body(x)
            return y if y.sum() > 0 else -y  # data-dependent: fx cannot trace it

    ours, record = _check(Branchy(), torch.randn(2, 3, 6, 6))
    assert record.traced is False and record.trace_error
    assert record.fused == [("body.1", "silu", "sequential")]
    assert "not traceable by torch.fx" in str(record)


# timm: (model, expected replaced norms, expected fusions by kind). 64x64 input: the smallest
# that keeps every stage above 1x1; eval and train mode both.
TIMM = [
    # 53 BatchNorm2d; bn1 -> act1 and bn2 -> (drop_block) -> act2 in each of 16 bottlenecks and
    # the stem's: 33 ReLU modules, reached through the fx trace
    ("resnet50", 53, {"fx": 33}),
    # 49 BatchNormAct2d (SiLU or none): the norm-act acts fused on replacement
    ("efficientnet_b0", 49, {"norm-act": 33}),
    # LayerNorm2d (stem, downsamples, blocks) and the head's LayerNorm2d; GELU follows a Linear
    ("convnext_atto", 17, {}),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name,replaced,fused", TIMM)
def test_timm_models(name, replaced, fused, train):
    timm = import_timm()
    model = timm.create_model(name, pretrained=False, num_classes=10)
    _, record = _check(model, torch.randn(2, 3, 64, 64), train=train)
    assert len(record.replaced) == replaced and not record.skipped, str(record)
    kinds = {}
    for _, _, how in record.fused:
        kinds[how] = kinds.get(how, 0) + 1
    assert kinds == fused, str(record)


def test_timm_layernorm2d_keeps_timms_output_strides():
    """timm's LayerNorm2d returns channels_last strides for NCHW input, so ConvNeXt's convs run
    channels_last; its normlab replacement returns the same strides (a copy back to NCHW made
    convnext_atto's CPU training step 1.2-1.4x slower)."""
    timm = import_timm()
    model = nn.Sequential(nn.Conv2d(3, 8, 1), timm.layers.LayerNorm2d(8), nn.Conv2d(8, 8, 3))
    x = torch.randn(2, 3, 6, 6)
    ours, record = _check(model, x)
    assert len(record.replaced) == 1 and ours[1].channels_last_output
    theirs = timm.layers.LayerNorm2d(8)
    theirs.load_state_dict(ours[1].state_dict())
    with torch.no_grad():
        h = ours[0](x)
        y, ref = ours[1](h), theirs(h)
    assert y.stride() == ref.stride() and torch.equal(y, ref)


def test_timm_rmsnorm2d_becomes_normlabs():
    # timm's RmsNorm2d (ConvNeXt-style RMS over the channels) has a normlab twin: replaced,
    # holding the same weight, with the same values (_check)
    timm = import_timm()
    model = nn.Sequential(nn.Conv2d(3, 8, 1), timm.layers.RmsNorm2d(8), nn.Conv2d(8, 8, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.rand(8) + 0.5)
    x = torch.randn(2, 3, 6, 6) + 1
    ours, record = _check(model, x)
    assert len(record.replaced) == 1 and type(ours[1]) is nlnn.RMSNorm2d
    assert ours[1].weight is model[1].weight


def test_frozen_and_sync_batchnorm_take_the_activation():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nlnn.SyncBatchNorm(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nlnn.FrozenBatchNorm2d(8), nn.GELU())
    ours, record = _check(model, torch.randn(4, 3, 5, 5), train=True)
    assert (ours[1].activation, ours[4].activation) == ("relu", "gelu")
    assert isinstance(ours[2], nn.Identity) and isinstance(ours[5], nn.Identity)


class _LoopReader(nn.Module):
    """Runs its nn.Sequential layer by layer and keeps the BN's output (pre-ReLU) as a feature:
    the ReLU after the BN is not the only reader of its output."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3))

    def forward(self, x):
        kept = None
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == 1:
                kept = x
        return kept.mean((2, 3)) + x.mean((2, 3))


class _SliceReader(_LoopReader):
    """Reads the BN's output through a slice ``features[:2]`` (a container the model does not
    hold)."""

    def forward(self, x):
        return self.features[:2](x).mean((2, 3)) + self.features(x).mean((2, 3))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("cls", [_LoopReader, _SliceReader])
def test_a_norm_read_elsewhere_is_not_fused_into(cls, train):
    ours, record = _check(cls(), torch.randn(2, 3, 8, 8) + 0.5, train=train)
    assert record.traced and not record.fused, str(record)
    assert isinstance(ours.features[2], nn.ReLU) and ours.features[1].activation is None


def _hooked_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())


def test_hooks_stay_and_keep_their_place():
    x = torch.randn(2, 3, 6, 6) + 0.5
    # a hook that changes the norm's output (before the ReLU): kept on the replacement, which
    # then takes no ReLU (the hook would see ReLU's output)
    model = _randomize(_hooked_model()).eval()
    handle = model[1].register_forward_hook(lambda m, args, out: out - 1.0)
    reference = copy.deepcopy(model)
    ours, record = optimize(model)
    with torch.no_grad():
        assert _rel(ours(x), reference(x)) < 1e-6
    assert isinstance(ours[1], nlnn.BatchNorm2d) and not record.fused
    assert record.skipped == [("1", "not fused: the norm has forward_hooks")]
    handle.remove()  # its handle still removes it from the replacement
    with torch.no_grad():  # forward(): the reference's BN without its hook
        torch.testing.assert_close(ours(x), F.relu(reference[1].forward(reference[0](x))))
    # a hook on the activation module: it still runs
    model, calls = _hooked_model().eval(), []
    model[2].register_forward_hook(lambda m, args, out: calls.append(out.shape))
    ours, record = optimize(model)
    ours(x)
    assert calls == [(2, 8, 4, 4)]  # 6x6 input, 3x3 conv
    assert record.skipped == [("1", "not fused: the activation has forward_hooks")]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


def test_hooks_a_graph_module_would_not_run_keep_the_model_unrewritten():
    x = torch.randn(2, 3, 6, 6) + 0.5
    seen = []
    # a feature hook on a block fx would trace through: the model is not traced
    model = nn.Sequential(_Block(), nn.Conv2d(8, 4, 1))
    model[0].register_forward_hook(lambda m, args, out: seen.append(out))
    ours, record = _check(model, x)
    assert ours is model and not record.traced and "'0' has forward_hooks" in record.trace_error
    seen.clear()
    ours(x)
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)  # not a proxy, and it ran
    # a hook on the root: traced, but no GraphModule replaces the model
    block = _Block()
    block.register_forward_hook(lambda m, args, out: seen.append(out))
    ours, record = _check(block, x)
    assert ours is block and record.traced and not record.fused
    assert record.skipped[0][0] == "" and "would not run" in record.skipped[0][1]


def test_a_timm_norm_act_whose_act_has_hooks_is_left():
    timm = import_timm()
    layer = timm.layers.BatchNormAct2d(8, act_layer=nn.ReLU)
    layer.act.register_forward_hook(lambda m, args, out: out * 2)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), layer)
    ours, record = _check(model, torch.randn(2, 3, 5, 5) + 0.5)
    assert ours[1] is layer and record.skipped == [("1", "its act module has hooks, which fusing would drop")]


def test_untraced_sequential_subclass_with_its_own_forward_is_not_fused():
    model = SequentialKeepingAll(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU())
    ours, record = _check(model, torch.randn(2, 3, 6, 6) + 0.5)
    assert record.traced is False and not record.fused and isinstance(ours[2], nn.ReLU)


def test_tracing_a_timm_norm_act_left_in_place_does_not_count_batches():
    # a BatchNormAct2d whose hard-swish optimize leaves is traced through (not a leaf), and its
    # forward counts num_batches_tracked on the real buffer: the two traces optimize runs made
    # it 3 after one training batch instead of 1 (the running average with momentum=None
    # follows that count); _check compares the buffers with the unoptimized model's
    timm = import_timm()
    model = nn.Sequential(nn.Conv2d(3, 8, 3),
                          timm.layers.BatchNormAct2d(8, momentum=None, act_layer=nn.Hardswish))
    ours, record = _check(model, torch.randn(4, 3, 6, 6), train=True)
    assert record.traced and record.skipped[0][0] == "1", str(record)


def test_a_model_built_in_inference_mode():
    # its buffers are inference tensors, which keep no version counter: the trace's check for
    # buffers it changed must not read one
    with torch.inference_mode():
        model = _randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval()
        reference = copy.deepcopy(model)
    ours, record = optimize(model)
    assert record.traced and record.fused == [("1", "relu", "sequential")]
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), reference(x))


class _TrainOnlyScale(nn.Module):
    """GroupNorm -> F.silu (an fx fusion), then a branch on ``self.training`` (as timm's
    DropPath has): a torch.fx graph keeps the branch of the mode it was traced in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, x):
        h = F.silu(self.norm(self.conv(x)))
        return h * 0.5 if self.training else h


@pytest.mark.parametrize("train", [False, True])
def test_a_mode_dependent_forward_is_not_rewritten(train):
    # optimize returned a GraphModule traced in one mode: after .train()/.eval() it still ran
    # that mode's branch (timm's resnet18 with drop_path_rate: stochastic depth in eval)
    model = _randomize(_TrainOnlyScale()).train(train)
    reference = copy.deepcopy(model)
    ours, record = optimize(model)
    assert not isinstance(ours, torch.fx.GraphModule) and not record.fused
    assert "depends on train/eval mode" in record.skipped[0][1], str(record)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        for mode in (train, not train):
            torch.testing.assert_close(ours.train(mode)(x), reference.train(mode)(x))


def test_a_subclass_of_a_torch_norm_is_left_and_named_in_the_record():
    """The docstring says such a subclass is left alone, recorded; it was left without a word
    (only torch's exact classes and timm's named ones are replaced). normlab's own norms,
    subclasses of torch's too, are not listed."""
    class ScaledBN(nn.BatchNorm2d):  # a forward of its own: replacing it would change the model
        def forward(self, x):
            return 2.0 * super().forward(x)

    class TaggedGN(nn.GroupNorm):    # torch's forward, but a class normlab does not know
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3), ScaledBN(8), TaggedGN(2, 8),
                          nlnn.BatchNorm2d(8)).eval()
    x = torch.randn(2, 3, 8, 8) + 0.5
    want = model(x)
    out, record = normlab.optimize(model)
    left = dict(record.skipped)
    assert "ScaledBN is a subclass of torch.nn.BatchNorm2d with a forward of its own" in left["1"]
    assert "TaggedGN is a subclass of torch.nn.GroupNorm of its own class" in left["2"]
    assert "3" not in left
    torch.testing.assert_close(out(x), want)


def test_a_model_with_uninitialized_lazy_modules():
    # torch's LazyConv2d and LazyBatchNorm2d before their first forward: their buffers are
    # UninitializedBuffers, which the trace's save-and-restore of buffers cloned ("Attempted to
    # use an uninitialized parameter in clone"); now nothing is replaced and the model runs
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.LazyBatchNorm2d(), nn.ReLU())
    out, record = optimize(model)
    assert not record.replaced and not record.fused, str(record)
    x = torch.randn(2, 3, 6, 6) + 3.0
    out(x)  # initialized: torch's Conv2d and BatchNorm2d (a lazy model cannot be deep-copied)
    twin = _randomize(copy.deepcopy(out)).eval()
    out.load_state_dict(twin.state_dict())
    # the same model now optimizes as any other
    out, record = optimize(out.eval())
    assert record.fused == [("1", "relu", "sequential")], str(record)
    torch.testing.assert_close(out(x), twin(x))


def test_a_model_built_on_the_meta_device():
    # built on the meta device to load its weights later (a large model's usual start): the
    # trace's check for buffers it changed ran torch.equal on meta tensors (NotImplementedError
    # "aten::equal ... Meta tensors"); replacing norms and fusing activations needs no values
    def build():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8), nn.SiLU())
    with torch.device("meta"):
        model = build()
    ours, record = optimize(model)
    assert len(record.replaced) == 2 and len(record.fused) == 2, str(record)
    ours.to_empty(device="cpu")
    reference = _randomize(build()).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 6, 6) + 3.0
    torch.testing.assert_close(ours.eval()(x), reference(x))


class _SharedHead(nn.Module):
    """A RetinaNet/FCOS-style head: one conv-GN-ReLU tower run on every pyramid level."""

    def __init__(self, relu_on_every_call=True):
        super().__init__()
        self.tower = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.gn = nn.GroupNorm(4, 16)
        self.relu_on_every_call = relu_on_every_call

    def forward(self, x):
        levels = [x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4)]
        outs = [self.tower(f) for f in levels]
        shared = [self.gn(o) for o in outs]  # a second shared norm, its ReLU on some calls only
        shared = [F.relu(s) if self.relu_on_every_call or i == 0 else s
                  for i, s in enumerate(shared)]
        return torch.cat([s.flatten(1) for s in shared], 1)


@pytest.mark.parametrize("relu_on_every_call", [True, False])
def test_a_norm_shared_by_every_level_of_a_head_is_fused_at_every_call(relu_on_every_call):
    # 3 levels of 2 images of 16 x 8 x 8 (8, 4 and 2 px: the GroupNorm sees 4 channels a group)
    torch.manual_seed(0)
    model = _SharedHead(relu_on_every_call)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.randn(16) * 0.5 + 1)
                m.bias.copy_(torch.randn(16) * 0.5)
    x = torch.randn(2, 16, 8, 8) * 2 + 1
    ref = model(x)
    out, record = normlab.optimize(model)
    fused = {name for name, _, _ in record.fused}
    assert {"tower.1", "tower.4"} <= fused  # one module, three calls, each followed by a ReLU
    if relu_on_every_call:
        assert "gn" in fused
    else:
        assert "gn" not in fused and ("gn", "not fused: the norm is called 3 times, and the relu "
                                            "follows 1 of them") in record.skipped
    torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-5)


class _TracedNet(nn.Module):
    """Fusions only a trace finds (F.relu after a BN, SiLU written out after a GN), and a
    conv-BN pair to fold: optimize returns a torch.fx.GraphModule whose graph calls normlab."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.gn = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = self.gn(self.conv2(y))
        return y * torch.sigmoid(y)


@pytest.mark.parametrize("passes", ["optimize", "fold_batchnorm", "both"])
def test_a_passed_model_saves_whole_and_loads(passes, tmp_path):
    """``torch.save(model)`` of what the passes return (a GraphModule with normlab's fused
    norms, a folded model), ``torch.load(weights_only=False)`` in a fresh object, pickle and
    deepcopy: the same outputs, in eval and (for optimize) in training."""
    import pickle

    torch.manual_seed(0)
    model = _randomize(_TracedNet()).eval()
    if passes in ("optimize", "both"):
        model, record = optimize(model)
        assert isinstance(model, torch.fx.GraphModule) and isinstance(model.bn, nlnn.BatchNorm2d)
    if passes in ("fold_batchnorm", "both"):
        model, record = normlab.fold_batchnorm(model)
        assert record.folded
    torch.save(model, tmp_path / "model.pt")
    copies = [torch.load(tmp_path / "model.pt", weights_only=False),
              pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    x = torch.randn(2, 3, 6, 6) * 2 + 1
    for train in ([False, True] if passes == "optimize" else [False]):
        want = copy.deepcopy(model).train(train)(x)
        for other in copies:
            # (a GraphModule's class is made per instance: its base and the submodules' classes)
            assert type(other).__mro__[1:] == type(model).__mro__[1:]
            assert [type(m) for m in other.modules()][1:] == [type(m) for m in model.modules()][1:]
            torch.testing.assert_close(other.train(train)(x), want, rtol=0, atol=0)
