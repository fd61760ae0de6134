"""The BN + dropout ablation CNN (REFERENCE section 4): layout, switches, sizes, norms."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab import models
from normlab.models.bn_dropout_cnn import BNDropoutCNN


def test_matches_a_hand_written_forward_without_norm_and_dropout():
    # independent reference: the architecture written out with torch.nn.functional
    m = models.create("bn_dropout_cnn", bn_conv=False, bn_dense=False, dropout=0.0).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64) + 0.5
    c1, c2 = m.features[0][0], m.features[1][0]
    h = F.max_pool2d(F.relu(F.conv2d(x, c1.weight, c1.bias, padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, c2.weight, c2.bias, padding=2)), 2)
    d = m.dense[0]
    h = F.relu(F.linear(h.flatten(1), d.weight, d.bias))
    ref = F.linear(h, m.fc.weight, m.fc.bias)
    torch.testing.assert_close(m(x), ref)
    layout = (c1.kernel_size, c1.out_channels, c2.out_channels, d.out_features)
    assert layout == ((5, 5), 32, 64, 1024)


# (in_chans, size): 8x8 one-channel digits (default image_size 8) and 32x32 CIFAR (default 32)
@pytest.mark.parametrize("in_chans, size", [(1, 8), (3, 32)])
@pytest.mark.parametrize("bn_conv", [False, True])
@pytest.mark.parametrize("bn_dense", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_every_configuration_runs(in_chans, size, bn_conv, bn_dense, dropout):
    m = models.create("bn_dropout_cnn", in_chans=in_chans, bn_conv=bn_conv, bn_dense=bn_dense,
                      dropout=dropout)
    y = m(torch.randn(2, in_chans, size, size) + 0.3)
    assert y.shape == (2, 10)
    y.sum().backward()
    n_bn = sum(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    assert n_bn == 2 * bn_conv + bn_dense
    assert m.dense[-1].p == dropout


@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "brn", "frozenbn", "none", "ln2d"])
def test_every_norm_on_conv_and_dense(norm):
    m = models.create("bn_dropout_cnn", norm=norm, in_chans=1, num_classes=4)
    y = m(torch.randn(2, 1, 8, 8) * 3 + 1)
    assert y.shape == (2, 4) and torch.isfinite(y).all()
    y.sum().backward()


def test_instance_norm_only_on_convs():
    m = models.create("bn_dropout_cnn", norm="in", bn_dense=False, in_chans=1)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="norm='in'"):
        models.create("bn_dropout_cnn", norm="in")


def test_dense_bn_is_batchnorm1d_over_the_batch():
    m = BNDropoutCNN(in_chans=1, bn_conv=False, dropout=0.0).double()
    m.train()
    h = torch.randn(5, 1024, dtype=torch.float64) * 2 + 3
    out = m.dense[1](h)
    ref = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(out, ref)


def test_wrong_input_size_names_the_image_size_to_use():
    m = models.create("bn_dropout_cnn")  # built for 32x32
    with pytest.raises(ValueError, match=r"image_size=\(16, 16\)"):
        m(torch.randn(2, 3, 16, 16))
    m = models.create("bn_dropout_cnn", image_size=16)
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("kw, exc, match", [
    ({"dropout": 1.0}, ValueError, "dropout"),
    ({"dropout": -0.1}, ValueError, "dropout"),
    ({"bn_conv": "yes"}, TypeError, "bn_conv"),
    ({"image_size": 2}, ValueError, "image_size"),
    ({"hidden": 0}, ValueError, "hidden"),
])
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        models.create("bn_dropout_cnn", **kw)
