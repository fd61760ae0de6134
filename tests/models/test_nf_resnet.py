"""Normalizer-free ResNets: analytic beta (REFERENCE section 3), activation gamma, SkipInit,
zero-init gain, stochastic depth, every depth forward/backward."""

import math

import pytest
import torch
import torch.nn.functional as F

from normlab import models
from normlab.models.nf_resnet import (ACTIVATIONS, GAMMAS, _NFBlock, activation_gamma,
                                      analytic_betas)
from normlab.nn import ScaledStdConv2d

# REFERENCE section 3: 1/beta per block of NF-ResNet-50 with alpha = 0.2
RESNET50_INV_BETA = [1.0, .9806, .9623,
                     .9449, .9806, .9623, .9449,
                     .9285, .9806, .9623, .9449, .9285, .9129,
                     .8980, .9806, .9623]


def test_resnet50_inverse_betas_match_reference():
    m = models.create("nf_resnet50", width=8)
    inv = [1 / b for b in m.betas()]
    assert len(inv) == 16
    for got, want in zip(inv, RESNET50_INV_BETA):
        assert got == pytest.approx(want, abs=6e-5)


def test_expected_variance_resets_at_transitions():
    m = models.create("nf_resnet20", alpha=0.3)
    blocks = [b for b in m.modules() if isinstance(b, _NFBlock)]
    v = 1.0
    for b in blocks:
        assert b.beta == pytest.approx(math.sqrt(v))
        v = 1 + 0.09 if b.has_projection else v + 0.09
        assert b.expected_var == pytest.approx(v)
    assert [b.has_projection for b in blocks] == [False] * 3 + [True, False, False] * 2
    assert analytic_betas([b.has_projection for b in blocks], 0.3) == pytest.approx(m.betas())


def test_relu_gamma_closed_form_and_table():
    assert activation_gamma("relu", numeric=True) == pytest.approx(
        math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-7)
    assert activation_gamma("relu") == GAMMAS["relu"] == 1.7139588594


@pytest.mark.parametrize("name", sorted(GAMMAS))
def test_numeric_gamma_matches_official_empirical_values(name):
    # the official values are Monte-Carlo estimates (all ~0.05% above the exact integral)
    assert activation_gamma(name, numeric=True) == pytest.approx(GAMMAS[name], rel=1e-3)


def test_numeric_gamma_of_a_callable_against_monte_carlo():
    fn = lambda x: torch.relu(x) ** 2  # noqa: E731  not in the table
    z = torch.randn(4_000_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mc = 1 / fn(z).std().item()
    assert activation_gamma(fn) == pytest.approx(mc, rel=5e-3)


def test_gamma_makes_scaled_ws_conv_plus_activation_variance_preserving():
    # 1x1 conv (no padding effects), wide fan-in, unit-Gaussian input: Var(conv(act(z))) ~ 1
    for name in ("relu", "silu", "tanh"):
        g = activation_gamma(name)
        conv = ScaledStdConv2d(512, 512, 1, gamma=g)
        torch.nn.init.normal_(conv.weight)
        z = torch.randn(64, 512, 4, 4)
        with torch.no_grad():
            y = conv(ACTIVATIONS[name](z))
        assert y.var().item() == pytest.approx(1.0, rel=0.05), name


@pytest.mark.parametrize("bad, exc", [("swish2", ValueError), (3, TypeError)])
def test_bad_activation(bad, exc):
    with pytest.raises(exc):
        models.create("nf_resnet20", activation=bad)


@pytest.mark.parametrize("name, size, kw", [
    ("nf_resnet20", 8, {}), ("nf_resnet32", 8, {}), ("nf_resnet56", 8, {}),
    ("nf_resnet110", 8, {"width": 8}),
    ("nf_resnet18", 32, {}),                                   # full 7x7 stem + max pool
    ("nf_resnet34", 16, {"small_input": True, "width": 8}),
    ("nf_resnet50", 32, {"width": 8}),
    ("nf_resnet101", 8, {"width": 8}),                       # full stem: 2x2 after the pool
    ("nf_resnet20", 8, {"activation": "silu", "drop_rate": 0.2, "stochastic_depth": 0.1}),
    ("nf_resnet20", 8, {"activation": F.gelu}),                # callable: numeric gamma
    ("nf_resnet20", 8, {"std_conv": False, "skipinit": False}),
])
def test_every_nf_depth_forward_backward(name, size, kw):
    m = models.create(name, num_classes=6, **kw)
    m.train()
    y = m(torch.randn(2, 3, size, size) + 0.2)
    assert y.shape == (2, 6) and torch.isfinite(y).all()
    y.sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in m.modules())


@pytest.mark.parametrize("kw", [{"skipinit": True}, {"skipinit": False, "zero_init_last": True}])
def test_skipinit_and_zero_init_last_start_as_shortcut(kw):
    m = models.create("nf_resnet20", **kw)
    for b in (b for b in m.modules() if isinstance(b, _NFBlock)):
        x = torch.randn(2, b.conv1.in_channels, 8, 8) * 1.3 + 0.2
        with torch.no_grad():
            expect = b.shortcut(F.relu(x / b.beta)) if b.has_projection else x
            torch.testing.assert_close(b(x), expect)
    if kw["skipinit"]:
        gains = [b.skip_gain for b in m.modules() if isinstance(b, _NFBlock)]
        assert all(g.shape == () and g.item() == 0 for g in gains)


def test_block_computes_shortcut_plus_alpha_branch_of_x_over_beta():
    m = models.create("nf_resnet20", skipinit=False, alpha=0.2)
    b = m.stages[0][1]
    x = torch.randn(2, 16, 8, 8) * 1.1 + 0.3
    with torch.no_grad():
        h = F.relu(x / b.beta)
        ref = x + 0.2 * b.conv2(F.relu(b.conv1(h)))
        torch.testing.assert_close(b(x), ref)


def test_stochastic_depth_rates_are_linear_in_block_index():
    m = models.create("nf_resnet20", stochastic_depth=0.1)
    rates = [b.drop_path.p for b in m.modules() if isinstance(b, _NFBlock)]
    assert rates == pytest.approx([0.1 * i / 9 for i in range(9)])
    m2 = models.create("nf_resnet20", drop_path_rate=0.1)
    assert [b.drop_path.p for b in m2.modules() if isinstance(b, _NFBlock)] == rates
    with pytest.raises(ValueError, match="drop_path_rate"):
        models.create("nf_resnet20", stochastic_depth=0.1, drop_path_rate=0.2)


def test_drop_path_per_sample_and_eval_identity():
    from normlab.models import DropPath
    dp = DropPath(0.5)
    x = torch.randn(4000, 3) + 2.0
    dp.train()
    y = dp(x)
    kept = (y != 0).all(1)
    assert ((y == 0).all(1) | kept).all()                    # whole samples dropped
    torch.testing.assert_close(y[kept], x[kept] * 2)
    assert 0.45 < kept.float().mean() < 0.55
    dp.eval()
    assert dp(x) is x
    with pytest.raises(ValueError, match="1.0"):
        DropPath(1.0)


@pytest.mark.parametrize("kw, match", [({"alpha": 0}, "alpha"), ({"drop_rate": 1.5}, "drop_rate"),
                                       ({"gamma": -1.0}, "gamma"), ({"width": 0}, "width")])
def test_bad_nf_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        models.create("nf_resnet20", **kw)


def _scaled_ws_reference(conv, gamma):
    """W_hat = gain * gamma * (W - mean) / (std * sqrt(fan_in)), biased std over the fan-in
    (REFERENCE section 3), in float64, written without the layer's code."""
    w = conv.weight.detach().double()
    flat = w.reshape(w.shape[0], -1)
    fan_in = flat.shape[1]
    mean = flat.mean(1, keepdim=True)
    std = ((flat - mean) ** 2).mean(1, keepdim=True).add(conv.eps).sqrt()
    gain = conv.gain.detach().double().reshape(-1, 1)
    return (gain * gamma * (flat - mean) / (std * math.sqrt(fan_in))).reshape(w.shape)


def test_bottleneck_transition_block_against_functional_reference():
    # stage 2's first block: stride 2, width change, so the 1x1 shortcut conv takes act(x/beta)
    torch.manual_seed(3)
    m = models.create("nf_resnet50", width=4, skipinit=True).double()
    b = m.stages[1][0]
    assert b.has_projection and b.beta == pytest.approx(math.sqrt(1 + 3 * 0.04))
    with torch.no_grad():  # non-trivial gains, biases and SkipInit scalar
        for p in b.parameters():
            p.add_(torch.rand_like(p) * 0.5)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64) * 1.2 + 0.3
    g = GAMMAS["relu"]

    def conv(c, h):
        return F.conv2d(h, _scaled_ws_reference(c, g), c.bias.detach().double(), c.stride,
                        c.padding)

    h = F.relu(x / b.beta)
    skip = conv(b.shortcut, h)
    r = conv(b.conv3, F.relu(conv(b.conv2, F.relu(conv(b.conv1, h)))))
    ref = skip + 0.2 * b.skip_gain.detach() * r
    with torch.no_grad():
        torch.testing.assert_close(b(x), ref)
    # the stride sits on the 3x3 conv and the 1x1 shortcut conv
    assert (b.conv1.stride, b.conv2.stride, b.shortcut.stride) == ((1, 1), (2, 2), (2, 2))
    assert b.shortcut.kernel_size == (1, 1)


@pytest.mark.parametrize("name, activation, shortcuts", [
    ("nf_resnet20", "silu", 2),     # CIFAR stem (3x3); stages 2-3 have a shortcut conv
    ("nf_resnet18", "relu", 3),     # ImageNet stem (7x7 + pool), basic blocks
    ("nf_resnet50", "gelu", 4),     # bottlenecks: a shortcut conv in every stage
])
def test_every_conv_is_scaled_ws_with_the_activation_gamma(name, activation, shortcuts):
    m = models.create(name, width=4, activation=activation)
    convs = [(n, c) for n, c in m.named_modules() if isinstance(c, torch.nn.Conv2d)]
    assert convs and all(isinstance(c, ScaledStdConv2d) for _, c in convs)
    stem = [c for n, c in convs if n.startswith("stem.")]
    assert len(stem) == 1 and stem[0].gamma == 1.0            # its input is the image
    rest = [c for n, c in convs if not n.startswith("stem.")]
    assert all(c.gamma == GAMMAS[activation] for c in rest)   # every conv after an activation
    assert sum(n.endswith("shortcut") for n, _ in convs) == shortcuts


@pytest.mark.parametrize("key", ["skipinit", "zero_init_last", "std_conv", "small_input"])
def test_switches_must_be_bools(key):
    # "no" is truthy: skipinit="no" built a SkipInit model
    with pytest.raises(TypeError, match=rf"{key} must be a bool, got 'no'"):
        models.create("nf_resnet18" if key == "small_input" else "nf_resnet20", **{key: "no"})


def test_channels_last_gives_the_same_output_and_grads():
    torch.manual_seed(1)
    m = models.create("nf_resnet20", width=4, skipinit=False).double()
    twin = models.create("nf_resnet20", width=4, skipinit=False).double()
    twin.load_state_dict(m.state_dict())
    twin = twin.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y, y_cl = m(x), twin(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y)
    y.sum().backward()
    y_cl.sum().backward()
    for (n, p), q in zip(m.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=n)


def test_stochastic_depth_only_in_training():
    torch.manual_seed(2)
    m = models.create("nf_resnet20", width=4, skipinit=False, stochastic_depth=0.5)
    x = torch.randn(4, 3, 8, 8)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x))                 # eval: deterministic
        m.train()
        outs = [m(x) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])  # train: branches dropped


def test_first_stage_without_projection_does_not_reset():
    # ResNet-18's first block: 64 -> 64, stride 1, identity shortcut: the variance keeps growing
    # (a reset there, as after every stage's first block in some implementations, would make
    # beta too small for block 2 onwards)
    m = models.create("nf_resnet18", width=8)
    blocks = [b for b in m.modules() if isinstance(b, _NFBlock)]
    assert [b.has_projection for b in blocks] == [False, False] + [True, False] * 3
    inv = [1 / b for b in m.betas()]
    want = [1 / math.sqrt(v) for v in (1.0, 1.04, 1.08, 1.04, 1.08, 1.04, 1.08, 1.04)]
    assert inv == pytest.approx(want, abs=1e-12)
