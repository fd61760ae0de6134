"""Lazy BN/IN (issue 13 item 8) against torch's lazy modules on the same input and seed: the
same inferred channels, parameters, buffers, outputs; they become normlab's classes."""

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from formula import off_centre

CASES = [  # one shape per dims, off-centre; 5 channels to infer
    (nlnn.LazyBatchNorm1d, nn.LazyBatchNorm1d, nlnn.BatchNorm1d, (6, 5, 7), {}),  # (N, C, L)
    (nlnn.LazyBatchNorm2d, nn.LazyBatchNorm2d, nlnn.BatchNorm2d, (4, 5, 6, 6), {}),  # (N, C, H, W)
    # 3-D, with momentum None: the cumulative average's counter is inferred too
    (nlnn.LazyBatchNorm3d, nn.LazyBatchNorm3d, nlnn.BatchNorm3d, (2, 5, 3, 4, 4), {"momentum": None}),
    # no affine, no running statistics: nothing to infer but the channel count
    (nlnn.LazyInstanceNorm1d, nn.LazyInstanceNorm1d, nlnn.InstanceNorm1d, (3, 5, 9), {}),
    # affine and running statistics: every lazy parameter and buffer is materialized
    (nlnn.LazyInstanceNorm2d, nn.LazyInstanceNorm2d, nlnn.InstanceNorm2d, (3, 5, 6, 6),
     {"affine": True, "track_running_stats": True}),
    (nlnn.LazyInstanceNorm3d, nn.LazyInstanceNorm3d, nlnn.InstanceNorm3d, (2, 5, 3, 4, 4),
     {"affine": True}),  # 3-D, affine without running statistics
]


@pytest.mark.parametrize("ours_cls,torch_cls,becomes,shape,kwargs", CASES)
def test_lazy_as_torch(ours_cls, torch_cls, becomes, shape, kwargs):
    ours, theirs = ours_cls(**kwargs), torch_cls(**kwargs)
    assert isinstance(ours, torch_cls) and ours.has_uninitialized_params()
    for seed in (0, 1):  # the first call materializes, the second runs the normlab class again
        torch.manual_seed(seed)
        x = off_centre(*shape)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert type(ours) is becomes and ours.num_features == theirs.num_features == shape[1]
    assert isinstance(ours, type(theirs))  # torch's became torch.nn.BatchNorm2d etc.
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, atol=1e-5, rtol=1e-5)


def test_lazy_in_a_model_materializes_and_scripting_names_it():
    model = nn.Sequential(nn.LazyConv2d(6, 3), nlnn.LazyBatchNorm2d())
    with pytest.raises(TypeError, match="LazyBatchNorm2d"):
        torch.jit.script(model)
    model(off_centre(2, 3, 8, 8))
    assert isinstance(model[1], nlnn.BatchNorm2d) and model[1].weight.shape == (6,)


# torch leaves num_features 0 where nothing is materialized at the first call (no affine, no
# running stats) or the state was loaded first; torch's BN never reads it, normlab's forward
# checks the channels against it and refused every call after the first
@pytest.mark.parametrize("kwargs,load", [({"affine": False, "track_running_stats": False}, False),
                                         ({}, True), ({"affine": False}, True)])
def test_num_features_set_where_torch_leaves_it_zero(kwargs, load):
    ours, theirs = nlnn.LazyBatchNorm2d(**kwargs), nn.LazyBatchNorm2d(**kwargs)
    if load:
        src = nn.BatchNorm2d(5, **kwargs)
        src(off_centre(4, 5, 3, 3))  # running statistics that are not the initial ones
        if src.weight is not None:
            with torch.no_grad():
                src.weight.uniform_(0.5, 1.5)
                src.bias.normal_()
        ours.load_state_dict(src.state_dict())
        theirs.load_state_dict(src.state_dict())
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        x = off_centre(4, 5, 3, 3)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert ours.num_features == 5 and type(ours) is nlnn.BatchNorm2d


def test_first_call_runs_normlabs_forward():
    # the first call ran torch's BN forward (the class switches inside the call): normlab's
    # documented acceptance of parameters in another dtype failed there with "mixed dtype"
    bn = nlnn.LazyBatchNorm2d(dtype=torch.float64)
    x = off_centre(4, 5, 3, 3)
    y = bn(x)
    want = nn.functional.batch_norm(x.double(), None, None, training=True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_mean, 0.1 * x.double().mean((0, 2, 3)))
