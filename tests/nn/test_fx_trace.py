"""torch.fx symbolic tracing (torchvision feature extraction, FX quantization, fx fuse): normlab's
modules are recorded as single call_module nodes, as torch.nn's own norms are, and the traced
graph computes what the model does, in train and eval mode."""

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from formula import off_centre


def _models():
    return [
        (lambda: nlnn.BatchNorm2d(6), (4, 6, 5, 5)),
        (lambda: nlnn.BatchNorm2d(6, momentum=None), (4, 6, 5, 5)),
        (lambda: nlnn.BatchNorm1d(6), (4, 6)),
        (lambda: nlnn.InstanceNorm2d(6, affine=True, track_running_stats=True), (4, 6, 5, 5)),
        (lambda: nlnn.InstanceNorm1d(6), (6, 5)),  # unbatched
        (lambda: nlnn.GroupNorm(3, 6, activation="silu"), (4, 6, 5, 5)),
        (lambda: nlnn.LayerNorm([5, 5]), (4, 6, 5, 5)),
        (lambda: nlnn.LayerNorm2d(6), (4, 6, 5, 5)),
        (lambda: nlnn.FrozenBatchNorm2d(6), (4, 6, 5, 5)),
        (lambda: nlnn.BatchRenorm2d(6, warmup_steps=0, r_max_steps=0, d_max_steps=0), (4, 6, 5, 5)),
        (lambda: nlnn.SyncBatchNorm(6), (4, 6, 5, 5)),
        (lambda: nlnn.WSConv2d(6, 6, 3, padding=1), (4, 6, 5, 5)),
        (lambda: nlnn.ScaledStdConv2d(6, 6, 3, padding=1, gamma=1.7), (4, 6, 5, 5)),
        (lambda: nlnn.RMSNorm([5, 5]), (4, 6, 5, 5)),
        (lambda: nlnn.FilterResponseNorm2d(6), (4, 6, 5, 5)),
        (lambda: nlnn.EvoNorm2dS0(6, num_groups=3), (4, 6, 5, 5)),
        (lambda: nlnn.EvoNorm2dB0(6), (4, 6, 5, 5)),
    ]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("make,shape", _models())
def test_symbolic_trace_records_one_call_module(make, shape, train):
    torch.manual_seed(0)
    norm = make()
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    model = nn.Sequential(nn.Identity(), norm, nn.ReLU()).train(train)
    twin = nn.Sequential(nn.Identity(), make(), nn.ReLU()).train(train)
    twin.load_state_dict(model.state_dict())
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1", "2"]
    x = off_centre(*shape)
    torch.testing.assert_close(gm(x), twin(x))
    # the graph ran the real module: its buffers moved as the twin's did
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
