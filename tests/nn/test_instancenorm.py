"""normlab.nn.InstanceNorm1d/2d/3d against torch.nn."""

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from formula import assert_same_param_grads, compare_step, off_centre


@pytest.mark.parametrize(
    "ours_cls,torch_cls,shape,c",
    [
        (nlnn.InstanceNorm1d, nn.InstanceNorm1d, (3, 4, 9), 4),      # (N, C, L)
        (nlnn.InstanceNorm1d, nn.InstanceNorm1d, (4, 9), 4),         # unbatched (C, L)
        (nlnn.InstanceNorm2d, nn.InstanceNorm2d, (3, 4, 5, 6), 4),   # H != W
        (nlnn.InstanceNorm2d, nn.InstanceNorm2d, (4, 5, 6), 4),      # unbatched (C, H, W)
        (nlnn.InstanceNorm3d, nn.InstanceNorm3d, (2, 4, 3, 3, 4), 4),  # (N, C, D, H, W)
    ],
)
@pytest.mark.parametrize(
    "kw", [{}, {"affine": True}, {"affine": True, "track_running_stats": True, "momentum": 0.2}]
)
def test_matches_torch(ours_cls, torch_cls, shape, c, kw):
    theirs, ours = torch_cls(c, **kw), ours_cls(c, **kw)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.copy_(torch.rand(c) + 0.5)
            theirs.bias.copy_(torch.randn(c))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for step in range(2):
        compare_step(ours, theirs, off_centre(*shape, offset=step + 2.0))
    assert_same_param_grads(ours, theirs)
    for name, buf in theirs.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buf, rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    x = off_centre(*shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_one_spatial_element_in_training_is_an_error():
    norm = nlnn.InstanceNorm2d(4)
    with pytest.raises(ValueError, match=r"more than 1 spatial element.*\(2, 4, 1, 1\)"):
        norm(torch.randn(2, 4, 1, 1))


# 3 channels for a module of 4 with running statistics: torch raises RuntimeError ("running_mean
# should contain 6 elements not 8"); normlab raised a plain ValueError, which code written for
# torch (except RuntimeError) does not catch
@pytest.mark.parametrize("train", [True, False])
def test_wrong_channel_count_with_running_stats_is_torchs_runtime_error(train):
    x = off_centre(2, 3, 5, 5)
    theirs = nn.InstanceNorm2d(4, track_running_stats=True).train(train)
    ours = nlnn.InstanceNorm2d(4, track_running_stats=True).train(train)
    with pytest.raises(RuntimeError):
        theirs(x)
    text = r"running_mean must have shape \(3,\).*got (shape )?\(4,\)"
    with pytest.raises(RuntimeError, match=text) as err:
        ours(x)
    assert isinstance(err.value, ValueError)
