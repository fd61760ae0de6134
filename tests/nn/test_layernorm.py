"""normlab.nn.LayerNorm against torch.nn.LayerNorm; LayerNorm2d against the float64 formula."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
import normlab.nn as nlnn
from formula import assert_same_param_grads, compare_step, off_centre, rel_err


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize(
    "shape,normalized,kw",
    [
        ((4, 7, 16), 16, {}),                                   # tokens x features
        ((3, 5, 6), (5, 6), {}),                                # two trailing dims
        ((2, 3, 8), 8, {"bias": False}),                        # no bias
        ((2, 3, 8), 8, {"elementwise_affine": False}),          # no affine
        ((10,), 10, {}),                                        # a single vector
    ],
)
def test_layernorm_matches_torch(backend, shape, normalized, kw):
    theirs = nn.LayerNorm(normalized, **kw)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.copy_(torch.rand_like(theirs.weight) + 0.5)
            if theirs.bias is not None:
                theirs.bias.copy_(torch.randn_like(theirs.bias))
    ours = nlnn.LayerNorm(normalized, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = off_centre(*shape) if len(shape) > 1 else torch.randn(shape) * 2 + 3
    with normlab.use_backend(backend):
        compare_step(ours, theirs, x)
    assert_same_param_grads(ours, theirs)


def _ln2d_64(x, w, b, eps):
    x64 = x.double().movedim(1, -1)
    y = F.layer_norm(x64, (x.shape[1],), w.double(), b.double(), eps)
    return y.movedim(-1, 1)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((2, 8, 5, 6), "nchw"),           # permute + copy path
        ((2, 8, 5, 6), "channels_last"),  # free view path; layout must be kept
        ((3, 8, 7), "nchw"),              # one spatial dim
    ],
)
def test_layernorm2d(backend, shape, layout):
    norm = nlnn.LayerNorm2d(shape[1])
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[1]) + 0.5)
        norm.bias.copy_(torch.randn(shape[1]))
    x = off_centre(*shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    with normlab.use_backend(backend):
        y = norm(x)
    assert rel_err(y, _ln2d_64(x, norm.weight, norm.bias, norm.eps)) < 1e-6
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    # gradients against float64 autograd of the formula
    xa = x.detach().clone().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    g = torch.randn(shape)
    (norm(xa) * g).sum().backward()
    (_ln2d_64(x64, norm.weight.detach(), norm.bias.detach(), norm.eps) * g.double()).sum().backward()
    assert rel_err(xa.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_layernorm2d_channels_last_output(layout):
    """channels_last_output=True: the same values, returned as the permuted (N, H, W, C) result
    (channels_last strides, no copy back to NCHW), as timm's LayerNorm2d returns them."""
    plain, cl = nlnn.LayerNorm2d(8), nlnn.LayerNorm2d(8, channels_last_output=True)
    assert "channels_last_output=True" in repr(cl) and "channels_last" not in repr(plain)
    x = off_centre(2, 8, 5, 6)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    y = cl(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, plain(x))
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    g = torch.randn(2, 8, 5, 6)
    (cl(xa) * g).sum().backward()
    (plain(xb) * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)


def test_layernorm2d_errors():
    with pytest.raises(ValueError, match="num_channels must be a positive int, got 0"):
        nlnn.LayerNorm2d(0)
    with pytest.raises(ValueError, match="expects 8 channels"):
        nlnn.LayerNorm2d(8)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="eps must be a positive"):
        nlnn.LayerNorm(8, eps=-1.0)


def test_torch_layer_norm_autocasts_to_float32_on_cuda():
    # what the next test emulates on the CPU: the dispatcher holds an autocast kernel (torch's
    # documented float32 policy) for aten::layer_norm on CUDA, none on the CPU
    from normlab import functional as NLF

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("aten::layer_norm", "AutocastCUDA") and "cuda" in NLF._LAYER_NORM_FP32_AUTOCAST
    assert has("aten::layer_norm", "AutocastCPU") == ("cpu" in NLF._LAYER_NORM_FP32_AUTOCAST)


@pytest.mark.parametrize("kind", ["LayerNorm", "LayerNorm2d"])
def test_layer_norm_follows_torchs_float32_autocast(monkeypatch, kind):
    # under CUDA autocast torch's LayerNorm computes half input in float32 and returns float32;
    # normlab's returned the half dtype. The CPU has no such policy: emulated by naming the CPU
    # among the devices where autocast runs layer_norm in float32
    from normlab import functional as NLF

    monkeypatch.setattr(NLF, "_LAYER_NORM_FP32_AUTOCAST", frozenset({"cpu"}))
    torch.manual_seed(0)
    if kind == "LayerNorm":  # (batch 2, 5 tokens, 48 features): a transformer's LN
        ours, x = nlnn.LayerNorm(48), off_centre(2, 5, 48, dtype=torch.bfloat16)
        ref = lambda t: F.layer_norm(t, (48,), ours.weight, ours.bias, ours.eps)  # noqa: E731
    else:  # (2, 16, 3, 3): ConvNeXt's norm over channels, channels at dim 1
        ours, x = nlnn.LayerNorm2d(16), off_centre(2, 16, 3, 3, dtype=torch.bfloat16)
        ref = lambda t: F.layer_norm(t.permute(0, 2, 3, 1), (16,), ours.weight, ours.bias,  # noqa
                                     ours.eps).permute(0, 3, 1, 2)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(ours.weight.shape) * 0.5 + 1)
        ours.bias.copy_(torch.randn(ours.bias.shape) * 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref(x.float()), rtol=1e-5, atol=1e-5)
    assert ours(x).dtype == torch.bfloat16  # autocast off: the input's dtype
