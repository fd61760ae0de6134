"""torch's fusion utilities on normlab BatchNorm (issue 13 item 3): fuse_modules,
fuse_modules_qat and fuse_conv_bn_eval give what they give for torch's own BN with the same
state."""

import copy

import pytest
import torch
from torch import nn
from torch.ao.quantization import fuse_modules, fuse_modules_qat
from torch.nn.utils.fusion import fuse_conv_bn_eval

import normlab.nn as nlnn
from formula import off_centre


def _pair(first, bn_torch, bn_ours, *rest):
    """The same model twice, once with torch's BN and once with normlab's, same state."""
    torch.manual_seed(0)
    theirs = nn.Sequential(first, bn_torch, *rest)
    with torch.no_grad():
        bn_torch.running_mean.normal_()
        bn_torch.running_var.uniform_(0.5, 2.0)
        bn_torch.weight.uniform_(0.5, 1.5)
        bn_torch.bias.normal_()
    ours = copy.deepcopy(theirs)
    ours[1] = bn_ours
    ours[1].load_state_dict(bn_torch.state_dict())
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize(
    "first,torch_bn,our_bn,shape,relu",
    # each conv dims torch's fuser knows, without and with the ReLU it folds in too; small
    # spatial sizes (a 3x3 kernel leaves a few positions), 3 -> 6 channels
    [(lambda: nn.Conv1d(3, 6, 3), nn.BatchNorm1d, nlnn.BatchNorm1d, (2, 3, 9), False),
     (lambda: nn.Conv1d(3, 6, 3), nn.BatchNorm1d, nlnn.BatchNorm1d, (2, 3, 9), True),
     (lambda: nn.Conv2d(3, 6, 3), nn.BatchNorm2d, nlnn.BatchNorm2d, (2, 3, 7, 7), False),
     (lambda: nn.Conv2d(3, 6, 3), nn.BatchNorm2d, nlnn.BatchNorm2d, (2, 3, 7, 7), True),
     (lambda: nn.Conv3d(3, 6, 3), nn.BatchNorm3d, nlnn.BatchNorm3d, (2, 3, 5, 5, 5), False),
     (lambda: nn.Conv3d(3, 6, 3), nn.BatchNorm3d, nlnn.BatchNorm3d, (2, 3, 5, 5, 5), True),
     (lambda: nn.Linear(5, 6), nn.BatchNorm1d, nlnn.BatchNorm1d, (4, 5), False)],  # no +ReLU fuser
)
def test_fuse_modules_in_eval_as_torch(first, torch_bn, our_bn, shape, relu):
    theirs, ours = _pair(first(), torch_bn(6), our_bn(6), *([nn.ReLU()] if relu else []))
    names = ["0", "1", "2"] if relu else ["0", "1"]
    fused_t = fuse_modules(theirs, [names])   # not in place: copies
    fused_o = fuse_modules(ours, [names])     # was "did not find fuser method"
    assert type(fused_o[0]) is type(fused_t[0]) and isinstance(fused_o[1], nn.Identity)
    x = off_centre(*shape)
    torch.testing.assert_close(fused_o(x), fused_t(x))
    torch.testing.assert_close(fused_o(x), ours(x), atol=1e-5, rtol=1e-5)


def test_fuse_conv_bn_eval_as_torch():
    theirs, ours = _pair(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nlnn.BatchNorm2d(6))
    fused_t = fuse_conv_bn_eval(theirs[0], theirs[1])
    fused_o = fuse_conv_bn_eval(ours[0], ours[1])
    torch.testing.assert_close(fused_o.weight, fused_t.weight)
    torch.testing.assert_close(fused_o.bias, fused_t.bias)
    x = off_centre(2, 3, 7, 7)
    torch.testing.assert_close(fused_o(x), ours(x), atol=1e-5, rtol=1e-5)


def test_fuse_modules_qat_builds_torchs_module_on_the_same_parameters():
    theirs, ours = _pair(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nlnn.BatchNorm2d(6), nn.ReLU())
    ours.train()
    bn_weight = ours[1].weight
    fused = fuse_modules_qat(ours, [["0", "1", "2"]], inplace=True)
    want = type(fuse_modules_qat(theirs.train(), [["0", "1", "2"]])[0])
    assert type(fused[0]) is want
    assert fused[0][1].weight is bn_weight  # the BN's own Parameter: an optimizer still sees it


def test_bn_relu_and_torch_entries_untouched():
    from torch.ao.quantization.fuser_method_mappings import get_fuser_method
    assert get_fuser_method((nn.Conv2d, nn.BatchNorm2d)).__name__ == "fuse_conv_bn"
    _, ours = _pair(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nlnn.BatchNorm2d(6), nn.ReLU())
    fused = fuse_modules(ours, [["1", "2"]])
    x = off_centre(2, 6, 5, 5)
    torch.testing.assert_close(fused[1](x), torch.relu(ours[1](x)))


def test_a_bn_with_fused_activation_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nlnn.BatchNorm2d(6, activation="silu")).eval()
    with pytest.raises(ValueError, match="activation='silu'"):
        fuse_modules(model, [["0", "1"]])


class _Quantizable(nn.Module):
    """conv -> ReLU -> norm, between eager quantization's stubs: the norm not after a conv, so
    it is not fused but swapped on its own by convert (pre-activation ResNets, U-Nets)."""

    def __init__(self, norm, conv):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub
        self.quant, self.conv, self.relu = QuantStub(), conv, nn.ReLU()
        self.norm, self.dequant = norm, DeQuantStub()

    def forward(self, x):
        return self.dequant(self.norm(self.relu(self.conv(self.quant(x)))))


@pytest.mark.parametrize(
    "make,conv,shape",
    [(lambda m: m.BatchNorm2d(6), lambda: nn.Conv2d(3, 6, 3), (4, 3, 7, 7)),  # batch of 4
     (lambda m: m.BatchNorm3d(6), lambda: nn.Conv3d(3, 6, 3), (2, 3, 5, 5, 5)),  # 3-D maps
     (lambda m: m.GroupNorm(3, 6), lambda: nn.Conv2d(3, 6, 3), (4, 3, 7, 7)),  # 2 ch per group
     (lambda m: m.InstanceNorm2d(6, affine=True), lambda: nn.Conv2d(3, 6, 3),
      (4, 3, 7, 7)),  # per sample and channel: 5x5 positions each
     (lambda m: m.LayerNorm([6, 5, 5]), lambda: nn.Conv2d(3, 6, 3), (4, 3, 7, 7))],  # C, H, W
)
def test_eager_static_quantization_swaps_an_unfused_norm_as_torchs(make, conv, shape):
    # convert looks the float module's exact type up (nn.BatchNorm2d -> nnq.BatchNorm2d, ...):
    # normlab's was neither observed nor swapped, and got a quint8 tensor ("TypeError: input
    # must have a floating-point dtype ... got torch.quint8")
    from torch.ao.quantization import convert, get_default_qconfig, prepare

    torch.manual_seed(0)
    theirs = _Quantizable(make(nn), conv())
    with torch.no_grad():
        for name, t in theirs.norm.state_dict().items():
            if t.is_floating_point():  # random affine, running statistics off 0 and 1
                t.copy_(torch.rand_like(t) + 0.5 if "var" in name or "weight" in name
                        else torch.randn_like(t))
    ours = _Quantizable(make(nlnn), conv())
    ours.load_state_dict(theirs.state_dict())
    engine = torch.backends.quantized.engine
    x = off_centre(*shape)
    outs = []
    for model in (theirs, ours):
        model.eval().qconfig = get_default_qconfig(engine)
        prepared = prepare(model)
        prepared(x)  # calibration
        converted = convert(prepared)
        outs.append((type(converted.norm), converted(x)))
    (want_type, want), (got_type, got) = outs
    assert got_type is want_type  # torch's quantized module itself
    torch.testing.assert_close(got, want)


def test_eager_static_quantization_refuses_a_norm_with_fused_activation():
    from torch.ao.quantization import convert, get_default_qconfig, prepare

    model = _Quantizable(nlnn.GroupNorm(3, 6, activation="silu"), nn.Conv2d(3, 6, 3)).eval()
    model.qconfig = get_default_qconfig(torch.backends.quantized.engine)
    prepared = prepare(model)
    prepared(off_centre(2, 3, 7, 7))
    with pytest.raises(ValueError, match="activation='silu'"):
        convert(prepared)


def _conv_bn_relu_pair(train):
    """conv -> BN -> ReLU -> conv with torch's BN and with normlab's, the same random state."""
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        theirs[1].running_mean.normal_()
        theirs[1].running_var.uniform_(0.5, 2.0)
        theirs[1].weight.uniform_(0.5, 1.5)
        theirs[1].bias.normal_()
    ours = copy.deepcopy(theirs)
    ours[1] = nlnn.BatchNorm2d(8)
    ours[1].load_state_dict(theirs[1].state_dict())
    return theirs.train(train), ours.train(train)


@pytest.mark.filterwarnings("ignore")  # torch 2.13 deprecates FX-mode quantization (torchao)
def test_fx_mode_quantization_leaves_normlabs_batchnorm_unfused_and_correct():
    """The documented limit (normlab.nn's docstring): FX-mode quantization and torch.fx's
    ``optimization.fuse`` match modules by exact type, so ``fuse_fx``, ``fuse`` and
    ``prepare_fx`` leave normlab's BN unfused; the fused model is still the model, and the
    converted one runs the BN in float32 between dequantize and quantize, as far from the
    float model as torch's fused conv-BN-ReLU is (int8 rounding)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, fuse_fx, prepare_fx
    from torch.fx.experimental.optimization import fuse

    theirs, ours = _conv_bn_relu_pair(False)
    x = off_centre(4, 3, 8, 8)
    for fused in (fuse_fx(copy.deepcopy(ours)), fuse(copy.deepcopy(ours))):
        assert isinstance(fused.get_submodule("1"), nlnn.BatchNorm2d)  # left, as documented
        torch.testing.assert_close(fused(x), ours(x))
    errors = []
    for model in (theirs, ours):
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        prepared(x)  # calibration
        converted = convert_fx(prepared)
        errors.append(((converted(x) - model(x)).norm() / model(x).norm()).item())
    assert isinstance(converted.get_submodule("1"), nlnn.BatchNorm2d)  # float, not quantized
    assert errors[1] < max(2 * errors[0], 0.02), errors  # int8 rounding: 1.5% in one check


def _pt2e_flow(model, x):
    """torchao's PT2E post-training flow with its X86 quantizer: export, prepare, calibrate,
    convert; the prepared graph's ops (before convert, which rewrites it in place), the
    converted graph's and its output."""
    pytest.importorskip("torchao.quantization.pt2e")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    def ops(gm):
        return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(copy.deepcopy(model), (x,)).module(), quantizer)
    prepared_ops = ops(prepared)
    prepared(x)  # calibration
    converted = convert_pt2e(prepared)
    return prepared_ops, ops(converted), converted(x)


@pytest.mark.filterwarnings("ignore")
def test_pt2e_quantization_treats_normlabs_batchnorm_as_torchs():
    """PT2E post-training quantization (torchao's ``prepare_pt2e`` + ``convert_pt2e``, what
    replaces FX-mode quantization): normlab's BN in eval gives the same prepared and converted
    graphs as torch's (the BN folded into the conv) and the same quantized output, bit for bit.
    Skips without torchao (not among the test dependencies). QAT (``prepare_qat_pt2e``, the
    conv-BN fusion in training; about 30 s a model on the CPU, so not run here) was checked by
    hand with torchao 0.18: the same prepared graph and output bits; its convert keeps normlab's
    ``num_batches_tracked += 1`` (torchao removes it only where the module's recorded class
    path is torch's BatchNorm2d), a harmless counter update. The exported ops that QAT matches
    on are compared with torch's in tests/test_tracing.py."""
    theirs, ours = _conv_bn_relu_pair(False)
    x = off_centre(4, 3, 8, 8)
    want_prepared, want_converted, want = _pt2e_flow(theirs, x)
    got_prepared, got_converted, got = _pt2e_flow(ours, x)
    assert got_prepared == want_prepared
    assert got_converted == want_converted
    torch.testing.assert_close(got, want, rtol=0, atol=0)
