"""EvoNorm2dS0 and EvoNorm2dB0 against the float64 formulas of Liu et al. 2020 (Table 1),
gradients included; B0's running variance; timm's EvoNorm2dS0/B0 where timm is installed."""

import pytest
import torch

import normlab
import normlab.nn as nlnn
from formula import evonorm_b0_64, evonorm_s0_64, off_centre, rel_err
from timm_import import import_timm


def _randomized(module):
    with torch.no_grad():
        module.weight.copy_(torch.rand_like(module.weight) + 0.5)
        module.bias.copy_(torch.randn_like(module.bias))
        module.v.copy_(torch.randn_like(module.v))
    return module


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("groups", [4, 8])  # 2 channels per group; InstanceNorm-like groups
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_s0_matches_formula(backend, groups, layout):
    norm = _randomized(nlnn.EvoNorm2dS0(8, num_groups=groups))
    x = off_centre(3, 8, 5, 4)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    with normlab.use_backend(backend):
        y = norm(x)
    assert rel_err(y, evonorm_s0_64(x, norm.weight, norm.bias, norm.v, groups, norm.eps)) < 1e-6
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    torch.testing.assert_close(norm(x[2:]), y[2:])  # batch independent


def test_b0_train_eval_and_running_var():
    norm = _randomized(nlnn.EvoNorm2dB0(6, momentum=0.3))
    x = off_centre(4, 6, 5, 5)
    y = norm(x)
    assert rel_err(y, evonorm_b0_64(x, norm.weight, norm.bias, norm.v, norm.eps)) < 1e-6
    unbiased = x.double().var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(norm.running_var.double(), 0.7 * 1 + 0.3 * unbiased, rtol=1e-6, atol=0)
    norm.eval()
    xe = off_centre(1, 6, 5, 5)  # batch 1 in eval: the running variance stands in for it
    ye = norm(xe)
    expect = evonorm_b0_64(xe, norm.weight, norm.bias, norm.v, norm.eps, norm.running_var)
    assert rel_err(ye, expect) < 1e-6
    before = norm.running_var.clone()
    norm(xe)
    assert torch.equal(norm.running_var, before)


@pytest.mark.parametrize("which", ["s0", "b0_train", "b0_eval"])
def test_gradcheck_and_gradients_equal_formula(which):
    if which == "s0":
        norm = _randomized(nlnn.EvoNorm2dS0(4, num_groups=2, eps=1e-3, dtype=torch.float64))
        formula = lambda x: evonorm_s0_64(x, norm.weight, norm.bias, norm.v, 2, 1e-3)
    else:
        norm = _randomized(nlnn.EvoNorm2dB0(4, eps=1e-3, dtype=torch.float64))
        norm.momentum = 0.0  # gradcheck calls forward many times: keep the running var fixed
        if which == "b0_eval":
            norm.running_var.copy_(torch.rand(4, dtype=torch.float64) + 0.5)
            norm.eval()
        rv = None if which == "b0_train" else norm.running_var
        formula = lambda x: evonorm_b0_64(x, norm.weight, norm.bias, norm.v, 1e-3, rv)
    x = off_centre(3, 4, 3, 3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(norm, (x,))
    g = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    params = (x, norm.weight, norm.bias, norm.v)
    ours = torch.autograd.grad(norm(x), params, g)
    ref = torch.autograd.grad(formula(x), params, g)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_computed_in_float32(dtype):
    norm = _randomized(nlnn.EvoNorm2dS0(8, num_groups=4))
    x = off_centre(2, 8, 6, 6, dtype=dtype)
    y = norm(x)
    expect = evonorm_s0_64(x, norm.weight, norm.bias, norm.v, 4, norm.eps)
    assert y.dtype == dtype
    assert rel_err(y, expect) < 2 * torch.finfo(dtype).eps


def test_constructors_state_and_errors():
    s0 = nlnn.EvoNorm2dS0(64, dtype=torch.float64)
    assert s0.num_groups == 32 and s0.v.dtype == torch.float64
    assert nlnn.EvoNorm2dS0(64, group_size=16).num_groups == 4
    assert repr(s0) == "EvoNorm2dS0(64, num_groups=32, eps=1e-05)"
    assert sorted(s0.state_dict()) == ["bias", "v", "weight"]
    b0 = nlnn.EvoNorm2dB0(8)
    assert sorted(b0.state_dict()) == ["bias", "running_var", "v", "weight"]
    assert repr(b0) == "EvoNorm2dB0(8, eps=1e-05, momentum=0.1)"
    with torch.no_grad():
        b0.v.zero_()
        b0.running_var.fill_(3.0)
    b0.reset_parameters()
    assert torch.equal(b0.v, torch.ones(8)) and torch.equal(b0.running_var, torch.ones(8))
    with pytest.raises(ValueError, match="num_channels=12 is not divisible by num_groups=5"):
        nlnn.EvoNorm2dS0(12, num_groups=5)
    with pytest.raises(ValueError, match="num_features=12 is not divisible by group_size=5"):
        nlnn.EvoNorm2dS0(12, group_size=5)
    with pytest.raises(ValueError, match="momentum must be a number in \\[0, 1\\], got 1.5"):
        nlnn.EvoNorm2dB0(8, momentum=1.5)
    with pytest.raises(ValueError, match="(?i)expected more than 1 value per channel"):
        nlnn.EvoNorm2dB0(4)(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match=r"expects 4-D input .* got shape \(2, 4\)"):
        nlnn.EvoNorm2dS0(4, num_groups=2)(torch.randn(2, 4))


@pytest.mark.parametrize("which", ["s0", "b0"])
def test_same_as_timm(which):
    timm = import_timm()
    if which == "s0":
        theirs = timm.layers.EvoNorm2dS0(8, groups=4, eps=1e-5)
        ours = nlnn.EvoNorm2dS0(8, num_groups=4)
    else:
        theirs = timm.layers.EvoNorm2dB0(8, eps=1e-5)
        ours = nlnn.EvoNorm2dB0(8)
    _randomized(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = off_centre(3, 8, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    if which == "b0":
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        ours.eval(), theirs.eval()
        torch.testing.assert_close(ours(x[:1]), theirs(x[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["s0", "b0"])
def test_empty_batch_gives_an_empty_output_and_keeps_the_running_var(which):
    """N = 0 (a detector's empty crop batch) in training: an empty output and gradient, as
    torch's BatchNorm gives, and B0's running variance untouched (no statistics to average)."""
    norm = nlnn.EvoNorm2dS0(8, num_groups=4) if which == "s0" else nlnn.EvoNorm2dB0(8)
    norm.train()
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x = torch.randn(0, 8, 3, 3, requires_grad=True)
    y = norm(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.nn.BatchNorm2d(8)(torch.randn(0, 8, 3, 3)).shape == y.shape  # torch's answer
    for k, v in norm.state_dict().items():
        assert torch.equal(v, before[k]), k


def _graph_nodes(t):
    """The names of the autograd nodes behind t."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return names


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_b0_maximum_backward_without_bool_masks(layout):
    """B0's denominator max(batch std, v x + instance std) with a gradient on a plain call runs
    the multiply-only maximum (torch's backward: where and masked_fill on bool masks, 10x slower
    on the CPU); the gradients equal the float64 formula's."""
    norm = _randomized(nlnn.EvoNorm2dB0(8))
    norm.momentum = 0.0
    x = off_centre(8, 8, 16, 16)  # MAXIMUM_MIN_NUMEL elements: smaller ones keep torch's
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(x.shape)
    y = norm(x)
    assert "_MaximumBackward" in _graph_nodes(y) and "MaximumBackward0" not in _graph_nodes(y)
    params = (x, norm.weight, norm.bias, norm.v)
    ours = torch.autograd.grad(y, params, g)
    ref = torch.autograd.grad(evonorm_b0_64(x, norm.weight, norm.bias, norm.v, norm.eps),
                              params, g.double())
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-5, atol=1e-5)


def test_maximum_split_at_ties_equals_torchs():
    """normlab.nn._direct.maximum: torch.maximum's output and gradients, bit for bit, at ties
    (half each) and with broadcasting (the smaller operand's gradient summed to its shape);
    below MAXIMUM_MIN_NUMEL elements it is torch.maximum itself."""
    from normlab.nn._direct import MAXIMUM_MIN_NUMEL, maximum

    torch.manual_seed(0)
    b = torch.randn(1, 8, 1, 1, requires_grad=True)
    a = torch.randn(8, 8, 16, 16)
    a[:, :, :4] = b.detach()  # ties
    a.requires_grad_()
    assert a.numel() >= MAXIMUM_MIN_NUMEL
    g = torch.randn(a.shape)
    z = maximum(a, b)
    assert type(z.grad_fn).__name__ == "_MaximumBackward"
    ours = torch.autograd.grad(z, (a, b), g)
    ref_z = torch.maximum(a, b)
    ref = torch.autograd.grad(ref_z, (a, b), g)
    assert torch.equal(z, ref_z)
    for o, r in zip(ours, ref):
        assert torch.equal(o, r)
    torch.testing.assert_close(ours[0][:, :, :4], g[:, :, :4] / 2, rtol=0, atol=0)
    small = maximum(a[:1, :1, :2], b[:, :1])
    assert type(small.grad_fn).__name__ == "MaximumBackward0"
