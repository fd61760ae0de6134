"""fold_batchnorm: outputs equal within float rounding after folding, on small hand-built
models, normlab's models (bn, brn, frozenbn) and timm's resnet18 / efficientnet_b0; what is
not folded is left and named; a model in training mode is refused."""

import pytest
import torch
from torch import nn

import normlab
from normlab import models
from normlab import nn as nlnn
from normlab.fold import fold_batchnorm
from timm_import import import_timm
from pass_models import SequentialKeepingAll
from formula import off_centre


def _randomize_norms(model):
    """Non-trivial statistics and affine in every BatchNorm (fresh ones are the identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "running_var", None), torch.Tensor):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                if isinstance(getattr(m, "weight", None), torch.Tensor):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.3)
    return model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check_folds(model, x, expect_folded, rtol=2e-6):
    model = _randomize_norms(model).eval()
    with torch.no_grad():
        before = model(x)
        model, record = fold_batchnorm(model)
        after = model(x)
    assert len(record.folded) == expect_folded, str(record)
    assert _rel(after, before) < rtol, str(record)
    return model, record


@pytest.mark.parametrize(
    "layers,x_shape",
    [
        ([nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()], (2, 3, 8, 8)),   # no bias
        ([nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8)], (2, 4, 6, 6)),                # grouped, bias
        ([nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)], (2, 3, 10)),                            # 1-d
        ([nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)], (2, 2, 5, 5, 5)),                       # 3-d
        ([nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False)], (2, 3, 8, 8)),            # no affine
        ([nn.Conv2d(3, 8, 3), nlnn.BatchNorm2d(8)], (2, 3, 8, 8)),                        # normlab BN
        ([nn.Conv2d(3, 8, 3), nlnn.BatchRenorm2d(8)], (2, 3, 8, 8)),                      # Batch Renorm (eval)
        ([nn.Conv2d(3, 8, 3), nlnn.FrozenBatchNorm2d(8)], (2, 3, 8, 8)),                  # FrozenBN
    ],
)
def test_folds_small_models(layers, x_shape):
    model, _ = _check_folds(nn.Sequential(*layers), torch.randn(x_shape) + 0.5, 1)
    assert isinstance(model[1], nn.Identity)
    assert model[0].bias is not None


def test_normlab_bn_with_fused_activation_keeps_the_activation():
    bn = nlnn.BatchNorm2d(8)
    bn.activation = "silu"
    model, _ = _check_folds(nn.Sequential(nn.Conv2d(3, 8, 3), bn), torch.randn(2, 3, 8, 8), 1)
    assert isinstance(model[1], nn.SiLU)


@pytest.mark.parametrize(
    "name,norm,kwargs,folded,traced",
    [
        # post-activation: every BN (stem, 18 in blocks, 2 shortcuts) follows a conv
        ("resnet20", "bn", {}, 21, True),
        ("resnet20", "brn", {}, 21, True),         # Batch Renorm in eval: its running statistics
        ("resnet20", "frozenbn", {}, 21, True),    # FrozenBatchNorm2d
        # pre-activation: only the BN after each block's first conv follows a conv
        ("preact_resnet20", "bn", {}, 9, True),
        # the BN + dropout CNN checks its input size in forward (not traceable): the BNs after
        # convs in its nn.Sequential stages are folded
        ("bn_dropout_cnn", "bn", {"image_size": (8, 8)}, 2, False),
    ],
)
def test_normlab_models(name, norm, kwargs, folded, traced):
    size = 8  # CIFAR-style nets: stage 3 is 2x2
    model = models.create(name, norm=norm, **kwargs)
    n_norms = sum(isinstance(getattr(m, "running_var", None), torch.Tensor) for m in model.modules())
    x = torch.randn(2, 3, size, size)
    model = _randomize_norms(model).eval()
    with torch.no_grad():
        before = model(x)
        model, record = fold_batchnorm(model)
        after = model(x)
    assert record.traced == traced
    assert len(record.folded) + len(record.skipped) == n_norms
    assert len(record.folded) == folded, str(record)
    assert _rel(after, before) < 2e-6


@pytest.mark.parametrize("name,folded", [("resnet18", 20), ("efficientnet_b0", 49)])
def test_timm_models(name, folded):
    timm = import_timm()
    model = timm.create_model(name, pretrained=False, num_classes=10)
    # 64x64: the smallest input that keeps every stage's map above 1x1
    _check_folds(model, torch.randn(2, 3, 64, 64), folded)


def test_training_mode_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    weight = model[0].weight.clone()
    with pytest.raises(ValueError, match="needs a model in eval mode; in training mode: <root>, 1"):
        fold_batchnorm(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match="in training mode: 1. Call model.eval"):
        fold_batchnorm(model)
    assert torch.equal(model[0].weight, weight) and isinstance(model[1], nn.BatchNorm2d)
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        fold_batchnorm(3)


class _ConvReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        z = self.conv(x)
        return self.bn(z) + z  # the conv output is read by the add too: folding would change it


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.extra = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.body(x)
        return self.extra(y) if y.sum() > 0 else y  # fx cannot trace this branch


def test_what_is_not_folded_is_left_and_named():
    model, record = _check_folds(_ConvReadTwice(), torch.randn(2, 3, 8, 8), 0)
    assert record.skipped == [("bn", "the output of 'conv' is read elsewhere too")]
    ws = nn.Sequential(nlnn.WSConv2d(3, 8, 3), nn.BatchNorm2d(8))  # standardizes its weight
    _, record = _check_folds(ws, torch.randn(2, 3, 8, 8), 0)
    assert "not the output of a Conv or Linear" in record.skipped[0][1]
    no_stats = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False))
    _, record = fold_batchnorm(no_stats.eval())
    assert not record.folded and "no running statistics" in record.skipped[0][1]


def test_untraceable_model_folds_sequential_neighbours():
    x = torch.randn(2, 3, 8, 8)
    model, record = _check_folds(_DataDependent(), x, 1)
    assert not record.traced and record.trace_error
    assert record.folded == [("body.0", "body.1")]
    assert record.skipped[0][0] == "extra"
    assert "could not be traced" in str(record)


def test_a_frozen_batchnorm_in_training_mode_still_folds():
    # its output does not depend on the mode (only the model's own flag is checked)
    model = _randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nlnn.FrozenBatchNorm2d(8))).eval()
    model[1].train()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        model, record = fold_batchnorm(model)
        assert record.folded == [("0", "1")] and _rel(model(x), before) < 2e-6


def _equal_in_float64(model, x, folded, example=False):
    """fold a float64 copy of ``model`` (with ``example_inputs=x`` if ``example``); outputs
    equal to the unfolded model's (1e-12 relative: only rounding differs); the record names
    ``folded`` pairs."""
    model = _randomize_norms(model).double().eval()
    x = x.double()
    with torch.no_grad():
        before = model(x)
        model, record = fold_batchnorm(model, example_inputs=x if example else None)
        assert _rel(model(x), before) < 1e-12, str(record)
    assert len(record.folded) == folded, str(record)
    return model, record


@pytest.mark.parametrize(
    "conv,x_shape",
    [
        (nn.ConvTranspose2d(3, 8, 3, stride=2), (2, 3, 5, 5)),                # upsampling, bias
        (nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), (2, 4, 5, 5)),    # out channels per group
        (nn.ConvTranspose1d(3, 4, 2, stride=2), (2, 3, 7)),                   # 1-d
    ],
)
def test_folds_conv_transpose(conv, x_shape):
    # a ConvTranspose weight is (in, out / groups, *kernel): the scale goes along dim 1
    norm = nn.BatchNorm1d(conv.out_channels) if conv.weight.dim() == 3 else nn.BatchNorm2d(
        conv.out_channels)
    model, _ = _equal_in_float64(nn.Sequential(conv, norm), torch.randn(x_shape) + 0.5, 1)
    assert isinstance(model[1], nn.Identity) and model[0].bias is not None


def test_channels_last_weight_keeps_its_layout():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
    model = model.to(memory_format=torch.channels_last)
    x = (torch.randn(2, 3, 7, 7) + 0.5).to(memory_format=torch.channels_last)  # 7x7: odd size
    model, _ = _equal_in_float64(model, x, 1)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.other = nn.Conv2d(3, 8, 1)
        self.other.weight = self.conv.weight  # tied: folding would rescale `other` too

    def forward(self, x):
        return self.bn(self.conv(x)) + self.other(x)


def _conv_bn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))


def _hooked(where, kind):
    model = _conv_bn()
    if kind == "pre":
        model[where].register_forward_pre_hook(lambda m, args: (args[0] * args[0],))
    else:
        model[where].register_forward_hook(lambda m, args, out: out * out)
    return model


@pytest.mark.parametrize(
    "make,reason",
    [
        # the old weight_norm recomputes conv.weight in a forward pre-hook: a folded weight is lost
        (lambda: nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8)),
         "'0' has forward_pre_hooks"),
        (lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3)),
                               nn.BatchNorm2d(8)), "weight of '0' is computed by a parametrization"),
        (_Tied, "a parameter of 'conv' is shared with another module (tied)"),
        (lambda: _hooked(0, "forward"), "'0' has forward_hooks"),   # would see the folded output
        (lambda: _hooked(1, "pre"), "it has forward_pre_hooks"),    # would no longer run
    ],
)
def test_a_fold_that_would_change_the_model_is_left(make, reason):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # nn.utils.weight_norm is deprecated
        model = make()
    _, record = _equal_in_float64(model, torch.randn(2, 3, 7, 7) + 0.5, 0)
    assert len(record.skipped) == 1 and reason in record.skipped[0][1], str(record)


class _SliceReader(nn.Module):
    """Reads the conv's output through a slice of its nn.Sequential (a container that is not
    installed in the model): traced through, so the second reader is seen."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        return self.f(x).mean((2, 3)) + self.f[:1](x).mean((2, 3))


class _SharedUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        bn = nn.BatchNorm2d(8)
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 1), bn, nn.Conv2d(8, 8, 1), bn)  # bn twice

    def forward(self, x):
        y = self.seq(x)
        return y if y.sum() > -1e9 else -y  # data-dependent: fx cannot trace it


def test_slices_are_traced_and_shared_modules_are_not_folded_untraced():
    _, record = _equal_in_float64(_SliceReader(), torch.randn(2, 3, 7, 7) + 0.5, 0)
    assert record.traced and record.skipped == [("f.1", "the conv or the norm is called more than once")]
    _, record = _equal_in_float64(_SharedUntraceable(), torch.randn(2, 8, 5, 5) + 0.5, 0)
    assert not record.traced and "under more than one name" in record.skipped[0][1]


@pytest.mark.parametrize("to", ["bn", "frozenbn", nn.BatchNorm2d])
def test_convert_norms_kept_timm_activation_stays_after_the_fold(to):
    # convert_norm runs a timm norm-act layer's unfusable act (hard-swish) in a forward hook of
    # the new norm; folding that norm keeps the act (it was dropped: 78x relative error on
    # mobilenetv3_small_050)
    timm = import_timm()
    layer = timm.layers.BatchNormAct2d(8, act_layer=nn.Hardswish)
    model = normlab.convert_norm(nn.Sequential(nn.Conv2d(3, 8, 3), layer), to)
    model, record = _equal_in_float64(model, torch.randn(2, 3, 7, 7) + 0.5, 1)
    assert isinstance(model[1], nn.Hardswish) and not record.skipped


def test_untraced_sequential_subclass_with_its_own_forward_is_not_folded():
    model = SequentialKeepingAll(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    _, record = _equal_in_float64(model, torch.randn(2, 3, 7, 7) + 0.5, 0)
    assert not record.traced and record.skipped[0][0] == "1"


class _ScaledSyncBatchNorm(nn.SyncBatchNorm):
    """A SyncBatchNorm subclass with a forward of its own (its output is not the BN's)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_sync_batchnorm_act_keeps_its_activation_and_a_subclass_forward_is_left():
    # timm's SyncBatchNormAct (what timm.layers.convert_sync_batchnorm makes of BatchNormAct2d)
    # subclasses torch's SyncBatchNorm: it was folded as a plain BN and its act dropped (0.57
    # absolute error here); a SyncBatchNorm subclass with its own forward was folded the same way
    timm = import_timm()
    layer = timm.layers.BatchNormAct2d(8, act_layer=nn.Hardswish)
    model = timm.layers.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), layer))
    assert type(model[1]).__name__ == "SyncBatchNormAct"
    model, record = _equal_in_float64(model, torch.randn(2, 3, 7, 7) + 0.5, 1)
    assert isinstance(model[1], nn.Hardswish) and not record.skipped
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _ScaledSyncBatchNorm(8))
    _, record = _equal_in_float64(model, torch.randn(2, 3, 7, 7) + 0.5, 0)
    # named in the record (it was left without a word: fx traces into its forward)
    assert record.skipped == [("1", "_ScaledSyncBatchNorm subclasses a torch BatchNorm with a "
                                    "forward of its own, which a fold cannot know")]


_LINEAR_UNKNOWN = "'0' is a Linear: the norm normalizes dim 1"


def test_linear_batchnorm_folds_on_2d_output_given_example_inputs():
    # (N, C) output: dim 1 is the Linear's output features; checked on the example input
    model, record = _equal_in_float64(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)),
                                      off_centre(4, 5), 1, example=True)
    assert isinstance(model[1], nn.Identity) and not record.skipped
    # without example_inputs the rank is unknown: left, with the reason
    _, record = _equal_in_float64(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)),
                                  off_centre(4, 5), 0)
    assert record.skipped[0][0] == "1" and _LINEAR_UNKNOWN in record.skipped[0][1]
    assert "pass example_inputs= to check and fold" in record.skipped[0][1]


@pytest.mark.parametrize("example", [False, True])
def test_linear_batchnorm_on_3d_output_is_not_folded(example):
    # Linear(C, L) on (N, L, C) input gives (N, L, L): BatchNorm1d(L) normalizes dim 1 (the
    # L positions), not the Linear's output features (dim 2). It was folded as if over the
    # features: 0.6 relative error, without a word
    n, length, c = 4, 6, 5
    x = off_centre(n, length, c)
    model, record = _equal_in_float64(nn.Sequential(nn.Linear(c, length), nn.BatchNorm1d(length)),
                                      x, 0, example=example)
    assert isinstance(model[1], nn.BatchNorm1d) and len(record.skipped) == 1
    if example:
        assert record.skipped[0][1] == ("its input on example_inputs is 3-D: dim 1, which it "
                                        "normalizes, holds the outputs of '0' only on 2-D input")
    else:
        assert _LINEAR_UNKNOWN in record.skipped[0][1]


def test_example_inputs_check_convs_too():
    # an unbatched Conv1d input (C, L) gives (C_out, L): BatchNorm1d takes that as (N, C) and
    # normalizes over L. Without example_inputs a conv's input is taken to be batched (folded
    # then, documented); with them the rank decides
    model = nn.Sequential(nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8))
    _, record = _equal_in_float64(model, off_centre(3, 8), 0, example=True)
    assert "is 2-D: dim 1, which it normalizes, holds the outputs of '0' only on 3-D" in str(record)
    model = nn.Sequential(nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8))  # batched: folded
    _equal_in_float64(model, off_centre(2, 3, 8), 1, example=True)


class _LinearOnABranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7))

    def forward(self, x):
        return self.body(x) if x.sum() > 0 else x  # data-dependent: fx cannot trace it


def test_a_norm_not_run_on_example_inputs_is_left_and_bad_example_inputs_are_refused():
    model = _randomize_norms(_LinearOnABranch()).eval()
    _, record = fold_batchnorm(model, example_inputs=(-off_centre(4, 5),))  # body not run
    assert not record.traced and record.skipped == [
        ("body.1", "not run on example_inputs, so the rank of its input is unknown")]
    assert not model.body[0]._forward_pre_hooks and not model.body[1]._forward_pre_hooks
    with pytest.raises(TypeError, match="example_inputs must be a Tensor or a tuple of the "
                                        "model's positional inputs, got dict"):
        fold_batchnorm(model, example_inputs={"x": off_centre(4, 5)})


def test_an_uninitialized_lazy_pair_is_left_with_the_reason():
    # torch's LazyConv2d + LazyBatchNorm2d before their first forward: the fold read the
    # norm's UninitializedBuffer (and the trace cloned it) and raised torch's "Attempted to use
    # an uninitialized parameter"; now the pair is left, saying to run a forward pass first
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.LazyBatchNorm2d()).eval()
    model, record = fold_batchnorm(model)
    assert not record.folded and "not initialized yet" in record.skipped[0][1], str(record)
    x = off_centre(2, 3, 6, 6)
    model(x)  # materialized: Conv2d + BatchNorm2d, which then fold
    _check_folds(model, x, expect_folded=1)


def test_a_model_on_the_meta_device_folds_its_structure():
    # the trace's save-and-restore of buffers compared meta tensors (torch.equal has no meta
    # kernel): NotImplementedError. On meta the fold gives the folded structure (a conv with a
    # bias, the norm an Identity), into which a folded model's state_dict loads
    def build():
        return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
    with torch.device("meta"):
        model = build().eval()
    model, record = fold_batchnorm(model)
    assert len(record.folded) == 1, str(record)
    folded, _ = fold_batchnorm(_randomize_norms(build()).eval())
    model.to_empty(device="cpu").load_state_dict(folded.state_dict(), strict=True)
    x = off_centre(2, 3, 6, 6)
    torch.testing.assert_close(model(x), folded(x))
