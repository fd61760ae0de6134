"""torch.jit.script on normlab modules: a clear, documented TypeError (torch.nn's modules script;
normlab's forward dispatches among Python backends, which TorchScript cannot compile)."""

import pytest
import torch
from torch import nn

import normlab.nn as nlnn

# torch 2.13 deprecates torch.jit.script itself; what is tested here is normlab's own error
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

# one instance of every module class: each carries the hook itself (no shared base class)
MODULES = [
    lambda: nlnn.BatchNorm2d(4), lambda: nlnn.BatchNorm1d(4), lambda: nlnn.BatchNorm3d(4),
    lambda: nlnn.BatchRenorm2d(4), lambda: nlnn.BatchRenorm1d(4),
    lambda: nlnn.FrozenBatchNorm2d(4), lambda: nlnn.GroupNorm(2, 4),
    lambda: nlnn.InstanceNorm2d(4), lambda: nlnn.LayerNorm(4), lambda: nlnn.LayerNorm2d(4),
    lambda: nlnn.RMSNorm2d(4),
    lambda: nlnn.WSConv2d(4, 4, 3), lambda: nlnn.ScaledStdConv2d(4, 4, 3),
    lambda: nlnn.RMSNorm(4), lambda: nlnn.FilterResponseNorm2d(4),
    lambda: nlnn.EvoNorm2dS0(4, num_groups=2), lambda: nlnn.EvoNorm2dB0(4),
]


@pytest.mark.parametrize("make", MODULES)
def test_script_raises_type_error_naming_the_module(make):
    module = make()
    name = type(module).__name__
    message = rf"normlab\.nn\.\w+\.{name} cannot be compiled by torch\.jit\.script"
    with pytest.raises(TypeError, match=message):
        torch.jit.script(module)
    # nested in a torch.nn model: the same error, before TorchScript reaches the forward
    with pytest.raises(TypeError, match=rf"{name} cannot be compiled by torch\.jit\.script"):
        torch.jit.script(nn.Sequential(nn.Identity(), module))


def test_export_works_instead():
    bn = nlnn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4))
        bn.weight.copy_(torch.rand(4) + 0.5)
    x = torch.randn(2, 4, 3, 3) + 2
    ep = torch.export.export(bn, (x,))
    torch.testing.assert_close(ep.module()(x), nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


# torch.jit.trace records sizes as 0-d tensors: BN and IN pass x.shape[1] as their group count
@pytest.mark.parametrize("make,train", [
    (lambda: nlnn.BatchNorm2d(4), True),         # batch statistics, G = C from the input's shape
    (lambda: nlnn.BatchNorm2d(4), False),        # running statistics
    (lambda: nlnn.InstanceNorm2d(4, affine=True), True),  # G = C, per sample
    (lambda: nlnn.GroupNorm(2, 4), True),        # G fixed at construction
])
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_matches_eager_on_another_batch(make, train):
    torch.manual_seed(0)
    module = make().train(train)
    traced = torch.jit.trace(module, torch.randn(2, 4, 3, 5) + 1, check_trace=False)
    x = 3 + 2 * torch.randn(3, 4, 6, 2)  # another batch and spatial size than traced with
    torch.testing.assert_close(traced(x), module(x))
