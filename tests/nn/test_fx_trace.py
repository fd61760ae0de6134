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
        (lambda: nlnn.RMSNorm2d(6), (4, 6, 5, 5)),
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


# the module itself as the root of the trace, as `symbolic_trace(norm)`: torch's GroupNorm,
# LayerNorm, RMSNorm and Conv2d trace into their functional call; normlab's did not (an
# AttributeError naming the attribute '')
ROOTS = [
    (lambda m: m.GroupNorm(2, 6), (3, 6, 4)),                    # 2 groups of 3 channels, 1-D
    (lambda m: m.LayerNorm((5, 5)), (4, 6, 5, 5)),               # two trailing dims
    (lambda m: m.RMSNorm(5, eps=1e-5), (4, 6, 5)),               # the last dim
]


@pytest.mark.parametrize("make,shape", ROOTS)
def test_traced_as_the_root_as_torchs(make, shape):
    torch.manual_seed(0)
    ours, theirs = make(nlnn), make(nn)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    gm_ours, gm_theirs = torch.fx.symbolic_trace(ours), torch.fx.symbolic_trace(theirs)
    assert [n.op for n in gm_ours.graph.nodes] == [n.op for n in gm_theirs.graph.nodes]
    x = off_centre(*shape)
    torch.testing.assert_close(gm_ours(x), gm_theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: nlnn.WSConv2d(4, 6, 3, padding=1, padding_mode="reflect"),  # padding_mode's F.pad too
    lambda: nlnn.ScaledStdConv2d(4, 6, 3, groups=2, gamma=1.7),         # grouped, gain and gamma
    lambda: nlnn.FrozenBatchNorm2d(4, activation="relu"),               # buffers only, fused act
])
def test_traced_as_the_root_computes_the_module(make):
    torch.manual_seed(0)
    norm = make()
    with torch.no_grad():
        for t in list(norm.parameters()) + [b for b in norm.buffers() if b.is_floating_point()]:
            t.add_(torch.rand_like(t))
    gm = torch.fx.symbolic_trace(norm)
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    x = off_centre(2, 4, 5, 5)  # (2, 4, 5, 5): 4 input channels, room for a 3x3 kernel
    torch.testing.assert_close(gm(x), norm(x))


@pytest.mark.parametrize("make", [lambda m: m.BatchNorm2d(4), lambda m: m.InstanceNorm2d(4)])
def test_batch_statistics_modules_as_the_root_raise_torchs_trace_error(make):
    # torch's BatchNorm/InstanceNorm cannot be the root either (their forward branches on the
    # input): the same exception type, and ours names the module and the way out
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(make(nn))
    with pytest.raises(torch.fx.proxy.TraceError, match=r"(BatchNorm2d|InstanceNorm2d) cannot be the root.*Sequential"):
        torch.fx.symbolic_trace(make(nlnn))
