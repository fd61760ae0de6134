"""normlab's norms under torch.func (vmap, grad, jvp, functional_call), as torch.nn's.

Per-sample gradients (``vmap(grad(...))`` over ``functional_call``) are how DP-SGD and data
attribution run a model, and GroupNorm is the norm they use (BatchNorm mixes the samples);
forward-mode AD (``jvp``) is used by consistency-model training. Each check compares normlab's
module with torch.nn's on the same input and parameters, or with plain autograd one sample at a
time. Where torch.nn's module fails under a transform (GroupNorm's jvp on channels_last input),
normlab's is checked against torch.nn's on the same values in NCHW; BatchNorm in training fails
as torch.nn's does (test at the end).
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, replace_all_batch_norm_modules_, vmap

import normlab.nn as nlnn
from formula import off_centre

# (3, 8, 5, 5): 3 samples to map over, 8 channels in 4 groups, odd spatial size
SHAPE = (3, 8, 5, 5)
# (3, 7, 16): 3 samples of 7 tokens with 16 features
TOKENS = (3, 7, 16)

PAIRS = {  # name: (normlab module, torch.nn module, input shape)
    "gn": (lambda: nlnn.GroupNorm(4, 8), lambda: nn.GroupNorm(4, 8), SHAPE),
    "gn_relu": (lambda: nlnn.GroupNorm(4, 8, activation="relu"),
                lambda: nn.Sequential(nn.GroupNorm(4, 8), nn.ReLU()), SHAPE),
    "in": (lambda: nlnn.InstanceNorm2d(8, affine=True),
           lambda: nn.InstanceNorm2d(8, affine=True), SHAPE),
    "bn_eval": (lambda: nlnn.BatchNorm2d(8).eval(), lambda: nn.BatchNorm2d(8).eval(), SHAPE),
    "ln": (lambda: nlnn.LayerNorm(16), lambda: nn.LayerNorm(16), TOKENS),
    "rms": (lambda: nlnn.RMSNorm(16), lambda: nn.RMSNorm(16), TOKENS),
}


def _pair(name):
    make_ours, make_theirs, shape = PAIRS[name]
    torch.manual_seed(0)
    ours, theirs = make_ours(), make_theirs()
    with torch.no_grad():  # random affine and statistics, the same in both
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 and p is ours.weight else 0.0))
        for b in ours.buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5)
    (theirs[0] if isinstance(theirs, nn.Sequential) else theirs).load_state_dict(ours.state_dict())
    return ours, theirs, shape


def _input(shape, channels_last):
    x = off_centre(*shape)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


TRANSFORMS = {
    # per-sample forward: each sample alone as a batch of one
    "vmap": lambda m, x, t: vmap(lambda xi: m(xi.unsqueeze(0)).squeeze(0))(x),
    "grad": lambda m, x, t: grad(lambda xx: (m(xx) * t).sum())(x),
    "jvp": lambda m, x, t: jvp(m, (x,), (t,))[1],
    "per_sample_grad": lambda m, x, t: vmap(grad(
        lambda xi, ti: (m(xi.unsqueeze(0)) * ti.unsqueeze(0)).sum()))(x, t),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("name,channels_last", [
    pytest.param(name, cl, id=f"{name}-{'channels_last' if cl else 'contiguous'}")
    for name, (_, _, shape) in PAIRS.items() for cl in ((False, True) if len(shape) == 4 else (False,))
])
def test_transform_matches_torch_nn(name, channels_last, transform):
    ours, theirs, shape = _pair(name)
    x = _input(shape, channels_last)
    t = torch.randn(shape)
    fn = TRANSFORMS[transform]
    try:
        expected = fn(theirs, x, t)
    except RuntimeError as e:
        # torch.nn's GroupNorm fails under jvp on channels_last input (ATen's forward-AD formula
        # takes a view of it); normlab computes it: the same values as torch.nn on NCHW data
        assert transform == "jvp" and channels_last and name.startswith("gn"), e
        expected = fn(theirs, x.contiguous(), t)
    torch.testing.assert_close(fn(ours, x, t), expected, atol=2e-5, rtol=1e-5)


def test_per_sample_parameter_gradients_of_a_gn_net_equal_one_sample_at_a_time():
    """DP-SGD's per-sample gradients of a small conv net with GroupNorm, through functional_call
    under vmap(grad), in NCHW and channels_last: equal to plain autograd on each sample."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nlnn.GroupNorm(4, 8, activation="relu"),
                        nn.Conv2d(8, 8, 3, padding=1), nlnn.GroupNorm(2, 8),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    params = {k: v.detach() for k, v in net.named_parameters()}
    x, labels = off_centre(4, 3, 6, 6), torch.randint(0, 5, (4,))

    def loss(p, xi, yi):
        out = functional_call(net, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, xl, labels)
        for i in range(x.shape[0]):
            net.zero_grad()
            loss(dict(net.named_parameters()), xl[i], labels[i]).backward()
            for k, p in net.named_parameters():
                torch.testing.assert_close(per_sample[k][i], p.grad, atol=1e-5, rtol=1e-4)


def test_batchnorm_training_under_grad_transforms_is_torchs_and_the_usual_fix_works():
    """BatchNorm in training updates its running buffers in place: under grad/jvp torch.func
    refuses that for torch.nn's module and for normlab's alike, and torch.func's own fix
    (``replace_all_batch_norm_modules_``: no running statistics) makes both run, equal."""
    x, t = off_centre(*SHAPE), torch.randn(SHAPE)
    results = []
    for m in (nlnn.BatchNorm2d(8), nn.BatchNorm2d(8)):
        with pytest.raises(RuntimeError, match="in-place"):
            jvp(m, (x,), (t,))
        replace_all_batch_norm_modules_(m)
        results.append(jvp(m, (x,), (t,))[1])
    torch.testing.assert_close(results[0], results[1], atol=2e-5, rtol=1e-5)


OWN = {  # normlab's modules with no torch.nn twin: checked against autograd, one sample at a time
    "frn": lambda: nlnn.FilterResponseNorm2d(8),
    "evonorm_b0_eval": lambda: nlnn.EvoNorm2dB0(8).eval(),
    "evonorm_s0": lambda: nlnn.EvoNorm2dS0(8, group_size=2),
    "layernorm2d": lambda: nlnn.LayerNorm2d(8),
    "rmsnorm2d": lambda: nlnn.RMSNorm2d(8),
    "frozen_bn": lambda: nlnn.FrozenBatchNorm2d(8),
    "ws_conv": lambda: nlnn.WSConv2d(8, 8, 3, padding=1),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(OWN))
def test_per_sample_input_gradients_of_normlabs_own_layers(name, channels_last):
    torch.manual_seed(0)
    m = OWN[name]()
    x, t = _input(SHAPE, channels_last), torch.randn(SHAPE)
    per_sample = TRANSFORMS["per_sample_grad"](m, x, t)
    for i in range(SHAPE[0]):
        xi = x[i:i + 1].clone().requires_grad_()
        (m(xi) * t[i:i + 1]).sum().backward()
        torch.testing.assert_close(per_sample[i], xi.grad[0], atol=2e-5, rtol=1e-5)
