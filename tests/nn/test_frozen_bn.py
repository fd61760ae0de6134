"""FrozenBatchNorm2d: bit-for-bit BN eval output, BN state_dicts, nothing trains."""

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nlnn
from formula import off_centre
from versions import needs_torch_norm_bias


def _trained_bn(c=6):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c) + 0.5)
        bn.bias.copy_(torch.randn(c))
    for _ in range(3):
        bn(off_centre(4, c, 5, 5))
    return bn.eval()


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_exactly_bn_eval(backend):
    bn = _trained_bn()
    ours_bn = nlnn.BatchNorm2d(6).eval()
    ours_bn.load_state_dict(bn.state_dict())
    frozen = nlnn.FrozenBatchNorm2d.from_batchnorm(bn)
    x = off_centre(3, 6, 4, 4)
    with normlab.use_backend(backend):
        assert torch.equal(frozen(x), ours_bn(x))
        frozen.train()  # train mode changes nothing
        assert torch.equal(frozen(x), ours_bn(x))
    if backend == "native":
        assert torch.equal(frozen(x), bn(x))  # the same ATen call as torch's BN eval


def test_state_dict_from_bn_and_no_parameters():
    bn = _trained_bn()
    frozen = nlnn.FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict(), strict=True)  # num_batches_tracked is dropped
    assert list(frozen.parameters()) == []
    torch.testing.assert_close(frozen.running_var, bn.running_var)
    x = off_centre(2, 6, 3, 3).requires_grad_()
    frozen(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_errors():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        nlnn.FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="expects 6 channels"):
        nlnn.FrozenBatchNorm2d(6)(torch.randn(2, 5, 3, 3))
    with pytest.raises(TypeError, match="from_batchnorm needs a BatchNorm module, got GroupNorm"):
        nlnn.FrozenBatchNorm2d.from_batchnorm(nn.GroupNorm(2, 4))


@needs_torch_norm_bias
def test_from_batchnorm_without_bias_equals_the_eval_batchnorm():
    """torch's BatchNorm2d(bias=False) (a weight, no bias): the frozen copy keeps a zero bias
    and gives the eval BatchNorm's output (it raised copying a None bias)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8, bias=False).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.running_mean.normal_(3.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    frozen = nlnn.FrozenBatchNorm2d.from_batchnorm(bn)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64) + 3
    assert torch.equal(frozen.bias, torch.zeros_like(frozen.bias))
    assert torch.allclose(frozen(x), bn(x), rtol=0, atol=1e-12)
    converted = normlab.convert_norm(torch.nn.Sequential(bn), "frozenbn")
    assert torch.allclose(converted(x), bn(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_from_batchnorm_keeps_normlab_fused_activation(act):
    # a normlab BatchNorm2d(activation=...) frozen: the activation was dropped (2.9 absolute
    # error for silu here), so the copy was not the BN's eval output
    torch.manual_seed(0)
    bn = nlnn.BatchNorm2d(6, activation=act).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_(1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    frozen = nlnn.FrozenBatchNorm2d.from_batchnorm(bn)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64) + 1
    plain = nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                     False, 0.0, bn.eps)
    want = {"relu": torch.relu, "silu": nn.functional.silu, "gelu": nn.functional.gelu}[act](plain)
    assert frozen.activation == act
    torch.testing.assert_close(frozen(x), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_input_one_multiply_backward(dtype):
    """From FROZEN_BN_MIN_NUMEL elements a plain call with a gradient runs the Function whose
    backward is dy * gamma / sqrt(var + eps): the output is BN's eval bits, the input gradient
    the float64 formula's, and a second derivative (create_graph) still works."""
    from normlab.nn._direct import FROZEN_BN_MIN_NUMEL

    bn = _trained_bn(8).to(dtype)
    frozen = nlnn.FrozenBatchNorm2d.from_batchnorm(bn)
    side = int((FROZEN_BN_MIN_NUMEL // 16) ** 0.5) + 1  # (2, 8, side, side) >= the minimum
    x = off_centre(2, 8, side, side, dtype=dtype).requires_grad_()
    g = torch.randn(x.shape, dtype=dtype)
    y = frozen(x)
    assert type(y.grad_fn).__name__ == "_FrozenBatchNormBackward"
    assert torch.equal(y, bn(x))
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    tol = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-14, 1e-14)}[dtype]
    torch.testing.assert_close(gx.double(), g.double() * scale.reshape(1, -1, 1, 1),
                               atol=tol[0], rtol=tol[1])
    # linear in dy: the gradient of <gx, h> with respect to g is h * scale
    h = torch.randn_like(g)
    g.requires_grad_()
    (gx,) = torch.autograd.grad(frozen(x), x, g, create_graph=True)
    (gg,) = torch.autograd.grad((gx * h).sum(), g)
    torch.testing.assert_close(gg.double(), h.double() * scale.reshape(1, -1, 1, 1),
                               atol=tol[0], rtol=tol[1])


def test_small_input_keeps_atens_backward():
    """Below FROZEN_BN_MIN_NUMEL the Function's Python costs more than it saves: ATen's own
    eval-mode batch norm records the backward, as before."""
    frozen = nlnn.FrozenBatchNorm2d.from_batchnorm(_trained_bn())
    x = off_centre(2, 6, 4, 4).requires_grad_()
    assert type(frozen(x).grad_fn).__name__ != "_FrozenBatchNormBackward"


def test_plain_call_runs_atens_batch_norm_directly(monkeypatch):
    """Where native is in force, a plain call runs the ATen op native would (torch.batch_norm in
    eval mode) without the operator's layers: the same bits; another backend still goes
    through normalize_fixed."""
    bn = _trained_bn()
    frozen = nlnn.FrozenBatchNorm2d.from_batchnorm(bn)
    x = off_centre(2, 6, 4, 4)
    calls = []
    real = normlab.functional.normalize_fixed
    monkeypatch.setattr(normlab.functional, "normalize_fixed",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(frozen(x), bn(x)) and not calls
    xg = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    g = torch.randn(x.shape)
    frozen(xg).backward(g)
    bn(xb).backward(g)
    assert torch.equal(xg.grad, xb.grad) and not calls  # small input: ATen's backward too
    with normlab.use_backend("reference"):
        frozen(x)
    assert calls
