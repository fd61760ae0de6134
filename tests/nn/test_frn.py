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
