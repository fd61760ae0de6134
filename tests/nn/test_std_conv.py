"""WSConv2d and ScaledStdConv2d against float64 statements of their weight transforms."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.nn as nlnn
from formula import rel_err


def ws64(w, eps):
    w = w.double()
    flat = w.reshape(w.shape[0], -1)
    mu = flat.mean(1, keepdim=True)
    var = flat.var(1, unbiased=False, keepdim=True)
    return ((flat - mu) / torch.sqrt(var + eps)).reshape(w.shape)


@pytest.mark.parametrize("groups", [1, 2])  # depthwise-style grouping changes the fan-in
def test_wsconv2d(groups):
    conv = nlnn.WSConv2d(4, 6, 3, padding=1, groups=groups, eps=1e-5)
    with torch.no_grad():
        conv.weight.mul_(3).add_(0.7)  # off-centre weights
    x = torch.randn(2, 4, 7, 7)
    expected = F.conv2d(x.double(), ws64(conv.weight, 1e-5), conv.bias.double(), 1, 1, 1, groups)
    assert rel_err(conv(x), expected) < 1e-5
    w_hat = ws64(conv.weight, 1e-5).reshape(6, -1)
    assert torch.allclose(w_hat.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-12)


def test_scaled_std_conv2d_formula_and_gain_gradient():
    gamma = 1.7139588594
    conv = nlnn.ScaledStdConv2d(5, 8, 3, padding=1, gamma=gamma, eps=1e-6)
    with torch.no_grad():
        conv.weight.mul_(2).add_(0.3)
        conv.gain.copy_(torch.rand(8, 1, 1, 1) + 0.5)
    fan_in = 5 * 9
    expected_w = conv.gain.double() * gamma * ws64(conv.weight, 1e-6) / math.sqrt(fan_in)
    assert rel_err(conv.standardized_weight(), expected_w) < 1e-6
    x = torch.randn(2, 5, 6, 6)
    conv(x).square().sum().backward()
    assert conv.gain.grad is not None and conv.gain.grad.abs().sum() > 0
    assert [n for n, _ in conv.named_parameters()] == ["weight", "bias", "gain"]


def test_scaled_std_conv_preserves_variance_through_relu():
    # gamma in the weight scale undoes ReLU's variance loss ((1 - 1/pi) / 2 for N(0, 1) input) and
    # the zero-mean rows remove its mean, so Var(conv(relu(z))) is about 1 (NF-ResNets, REFERENCE
    # section 3): a statistical check with a wide layer (the zero padding at the border lowers it
    # by a few percent).
    torch.manual_seed(1)
    conv = nlnn.ScaledStdConv2d(256, 256, 3, padding=1, gamma=1.7139588594, bias=False)
    z = torch.randn(8, 256, 12, 12)
    with torch.no_grad():
        h = conv(torch.relu(z))
    assert h.var().item() == pytest.approx(1.0, abs=0.1)


def test_errors():
    with pytest.raises(ValueError, match="gamma must be a positive finite number, got -1"):
        nlnn.ScaledStdConv2d(4, 4, 3, gamma=-1)
    with pytest.raises(ValueError, match="eps must be a positive finite number, got 0"):
        nlnn.WSConv2d(4, 4, 3, eps=0)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")  # torch's own
def test_count_arguments_as_torchs_conv():
    # out_channels=0 builds in torch (an empty weight); ScaledStdConv2d indexed weight[0]
    theirs, ours = nn.Conv2d(3, 0, 3), nlnn.ScaledStdConv2d(3, 0, 3)
    assert ours.weight.shape == theirs.weight.shape and ours.fan_in == 27
    assert list(ours.state_dict()) == list(theirs.state_dict()) + ["gain"]


def test_scaled_std_conv_repr_names_a_non_default_gain_init():
    # gain_init sets the gain that reset_parameters() restores (0 for a zero-init residual
    # branch): a repr without it hides the argument; the default 1.0 stays out, as torch's
    # reprs leave defaults out
    conv = nlnn.ScaledStdConv2d(4, 6, 3, gamma=1.7139588594, gain_init=0.0)
    assert repr(conv).endswith("gamma=1.7139588594, eps=1e-06, gain_init=0.0)")
    assert "gain_init" not in repr(nlnn.ScaledStdConv2d(4, 6, 3))
