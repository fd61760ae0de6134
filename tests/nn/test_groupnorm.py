"""normlab.nn.GroupNorm against torch.nn.GroupNorm and the float64 formula; group_size=, activation=."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
import normlab.nn as nlnn
from formula import assert_same_param_grads, compare_step, normalize64, off_centre, rel_err


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize(
    "groups,shape",
    [
        (4, (3, 8, 5, 5)),        # 2 channels per group
        (1, (2, 6, 4, 3)),        # LayerNorm over (C, H, W)
        (6, (2, 6, 7)),           # InstanceNorm, one spatial dim
        (3, (4, 9)),              # no spatial dims
        (2, (2, 4, 2, 3, 3)),     # 3 spatial dims
        # 4 spatial dims: the docstring promises any number (normalize flattens the 4th on)
        (2, (2, 4, 2, 3, 2, 3)),
    ],
)
def test_matches_torch(backend, groups, shape):
    c = shape[1]
    theirs = nn.GroupNorm(groups, c)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(c) + 0.5)
        theirs.bias.copy_(torch.randn(c))
    ours = nlnn.GroupNorm(groups, c)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = off_centre(*shape)
    with normlab.use_backend(backend):
        compare_step(ours, theirs, x)
    assert_same_param_grads(ours, theirs)
    ours.eval()  # no train/eval difference
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_group_size_and_activation():
    gn = nlnn.GroupNorm(num_channels=12, group_size=4, activation="silu")
    assert gn.num_groups == 3
    with torch.no_grad():
        gn.weight.copy_(torch.rand(12) + 0.5)
        gn.bias.copy_(torch.randn(12))
    x = off_centre(2, 12, 4, 4, dtype=torch.float64)
    gn = gn.double()
    expected = normalize64(x, 3, False, gn.weight, gn.bias, activation="silu")
    assert rel_err(gn(x), expected) < 1e-10
    assert "activation='silu'" in repr(gn)


def test_channels_last_bf16():
    gn = nlnn.GroupNorm(4, 16)
    x = off_centre(2, 16, 6, 6, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    y = gn(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, F.group_norm(x.float(), 4)) < 1e-2


def test_state_dict_round_trip_and_bias_false():
    ours = nlnn.GroupNorm(2, 4)
    back = nn.GroupNorm(2, 4)
    back.load_state_dict(ours.state_dict(), strict=True)
    no_bias = nlnn.GroupNorm(2, 4, bias=False)
    assert no_bias.bias is None and [n for n, _ in no_bias.named_parameters()] == ["weight"]
    x = off_centre(2, 4, 3, 3)
    torch.testing.assert_close(no_bias(x), F.group_norm(x, 2, no_bias.weight))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: nlnn.GroupNorm(5, 12), ValueError, "num_channels=12 is not divisible by num_groups=5"),
        (lambda: nlnn.GroupNorm(num_channels=12, group_size=5), ValueError, "num_channels=12 is not divisible by group_size=5"),
        (lambda: nlnn.GroupNorm(4, 12, group_size=3), ValueError, "exactly one of num_groups and group_size"),
        (lambda: nlnn.GroupNorm(4, 12, eps=0), ValueError, "eps must be a positive finite number, got 0"),
        (lambda: nlnn.GroupNorm(4, 12, activation="swish"), ValueError, "unknown activation 'swish'"),
        (lambda: nlnn.GroupNorm(0, 12), ValueError, "num_groups must be >= 1, got 0"),
    ],
)
def test_construction_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_call_errors():
    gn = nlnn.GroupNorm(4, 12)
    with pytest.raises(ValueError, match=r"expects 12 channels.*with 8 channels"):
        gn(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="at least 2 dims"):
        gn(torch.randn(12))
