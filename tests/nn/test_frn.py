"""FilterResponseNorm2d (+TLU) against the float64 formula of Singh & Krishnan 2020 (eqs. 1-3),
gradients included; against timm's FilterResponseNormTlu2d where timm is installed."""

import pytest
import torch

import normlab
import normlab.nn as nlnn
from formula import frn64, off_centre, rel_err
from timm_import import import_timm


def _randomized(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p is module.weight else 0.0))
    return module


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("tlu", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_matches_formula(backend, tlu, layout):
    frn = _randomized(nlnn.FilterResponseNorm2d(6, tlu=tlu))
    x = off_centre(3, 6, 5, 4)  # small, off-centre: FRN does not subtract the mean
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    with normlab.use_backend(backend):
        z = frn(x)
    assert rel_err(z, frn64(x, frn.weight, frn.bias, frn.tau, frn.eps)) < 1e-6
    assert z.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    # batch independence: one sample alone gives the same output
    with normlab.use_backend(backend):
        torch.testing.assert_close(frn(x[1:2]), z[1:2])


def test_gradcheck_and_gradients_equal_formula():
    frn = _randomized(nlnn.FilterResponseNorm2d(4, eps=1e-3, dtype=torch.float64))
    x = off_centre(2, 4, 3, 3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(frn, (x,))
    g = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    params = (x, frn.weight, frn.bias, frn.tau)
    ours = torch.autograd.grad(frn(x), params, g)
    ref = torch.autograd.grad(frn64(x, frn.weight, frn.bias, frn.tau, 1e-3), params, g)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r)


def test_constructor_state_and_errors():
    frn = nlnn.FilterResponseNorm2d(8, dtype=torch.float64)
    assert sorted(frn.state_dict()) == ["bias", "tau", "weight"]
    assert frn.weight.dtype == torch.float64
    assert repr(frn) == "FilterResponseNorm2d(8, eps=1e-06, tlu=True)"
    assert nlnn.FilterResponseNorm2d(8, tlu=False).tau is None
    with torch.no_grad():
        frn.tau.fill_(2.0)
    frn.reset_parameters()
    assert not frn.tau.any() and torch.equal(frn.weight, torch.ones(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_features must be a positive int, got 0"):
        nlnn.FilterResponseNorm2d(0)
    with pytest.raises(ValueError, match="eps must be a positive finite number, got -1"):
        nlnn.FilterResponseNorm2d(4, eps=-1)
    with pytest.raises(ValueError, match=r"expects 4-D input \(N, C, H, W\), got shape \(2, 4, 5\)"):
        nlnn.FilterResponseNorm2d(4)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="expects 4 channels .* with 3 channels"):
        nlnn.FilterResponseNorm2d(4)(torch.randn(2, 3, 5, 5))


def test_same_as_timm():
    timm_frn = import_timm().layers.FilterResponseNormTlu2d
    theirs = _randomized(timm_frn(6, eps=1e-6))
    ours = nlnn.FilterResponseNorm2d(6)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = off_centre(2, 6, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("make", [
    lambda c: nlnn.FilterResponseNorm2d(c), lambda c: nlnn.EvoNorm2dB0(c),
    lambda c: nlnn.EvoNorm2dS0(c, num_groups=1), lambda c: nlnn.FrozenBatchNorm2d(c),
    lambda c: nlnn.LayerNorm2d(c), lambda c: nlnn.RMSNorm2d(c),
])
def test_a_float_channel_count_is_a_type_error_as_in_torch(make):
    # the extras have no torch namesake: the rule is torch.nn.BatchNorm2d's (4.0 -> TypeError)
    with pytest.raises(TypeError):
        torch.nn.BatchNorm2d(4.0)
    with pytest.raises(TypeError, match=r"must be a positive int, got 4\.0"):
        make(4.0)


def _tied(frn, n=3, c=6, hw=4):
    """Input with zero rows (x = 0 gives y = beta there) and tau = beta on every other channel:
    exact ties y == tau, as a bias-free conv of a zero background gives FRN at init."""
    x = off_centre(n, c, hw, hw)
    x[:, :, :1] = 0.0
    with torch.no_grad():
        frn.tau.copy_(torch.where(torch.arange(c) % 2 == 0, frn.bias, frn.bias - 1.0))
    return x.requires_grad_()


def _operator_route(frn, x):
    """FRN + TLU through the operator and torch.maximum (the module's code before its direct
    route): the reference for bits."""
    y = normlab.functional.normalize(x, frn.num_features, False, frn.weight, frn.bias, frn.eps,
                                     center=False)
    return torch.maximum(y, frn.tau.reshape(1, -1, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_route_same_output_bits_closed_form_backward(dtype):
    """A plain CPU call takes the direct route (one autograd node for FRN + TLU, a closed-form
    backward); output and parameter gradients are the operator route's bits, ties included,
    and the input gradient equals the float64 formula's."""
    frn = _randomized(nlnn.FilterResponseNorm2d(6, dtype=dtype))
    x = _tied(frn).to(dtype).detach().requires_grad_()
    g = torch.randn(x.shape, dtype=dtype)
    z = frn(x)
    assert type(z.grad_fn).__name__ == "_FrnTluBackward"
    params = (x, frn.weight, frn.bias, frn.tau)
    ours = torch.autograd.grad(z, params, g)
    ref_z = _operator_route(frn, x)
    ref = torch.autograd.grad(ref_z, params, g)
    assert torch.equal(z, ref_z)
    for a, r in zip(ours[1:], ref[1:]):
        assert torch.equal(a, r)
    x64 = x.detach().double().requires_grad_()
    z64 = frn64(x64, frn.weight, frn.bias, frn.tau, frn.eps)
    (gx64,) = torch.autograd.grad(z64, x64, g.double())
    tol = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-12)}[dtype]
    torch.testing.assert_close(ours[0].double(), gx64, atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_tlu_gradient_at_ties_is_split_in_halves_as_torch_maximum(layout):
    """At y == tau torch's maximum gives y and tau half of the gradient each; the TLU's own
    backward (direct route for NCHW, the multiply-only maximum for channels_last) keeps that."""
    frn = _randomized(nlnn.FilterResponseNorm2d(4))
    x = torch.zeros(2, 4, 3, 3)  # y = beta everywhere
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.no_grad():
        frn.tau.copy_(frn.bias)  # every position a tie
    g = torch.rand(2, 4, 3, 3) + 0.5
    dbias, dtau = torch.autograd.grad(frn(x), (frn.bias, frn.tau), g)
    half = g.sum((0, 2, 3)) / 2
    torch.testing.assert_close(dbias, half)
    torch.testing.assert_close(dtau, half)


def test_second_derivative_through_the_direct_route():
    """create_graph through the direct route (a gradient penalty): gradgradcheck in float64."""
    frn = _randomized(nlnn.FilterResponseNorm2d(3, eps=1e-3, dtype=torch.float64))
    x = off_centre(2, 3, 3, 3, dtype=torch.float64).requires_grad_()
    assert type(frn(x).grad_fn).__name__ == "_FrnTluBackward"
    assert torch.autograd.gradgradcheck(frn, (x,))
