"""normlab as a diffusion-model user meets it: GroupNorm everywhere, GN -> SiLU pairs written
every way a UNet writes them, half precision with float32 norms, channels_last, torch.compile,
checkpoints. A small Stable-Diffusion-like UNet written here from torch.nn pieces (ResNet
blocks with a time embedding, attention blocks normalizing (N, C, H, W) and (N, C, H*W) input,
an upcast norm, a residual that reads a norm's output) is optimized and compared with itself
unoptimized; single GroupNorms are compared with torch.nn.GroupNorm on the same input and with
float64 gradcheck."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
import normlab.functional as NLF
import normlab.nn as nlnn
from formula import normalize64, off_centre, rel_err


def silu_sigmoid(x):
    """SiLU written out, as the original latent-diffusion code's ``nonlinearity``."""
    return x * torch.sigmoid(x)


_ACTS = {
    "F.silu": F.silu,
    "torch.nn.functional.silu": lambda x: torch.nn.functional.silu(x),
    "x * sigmoid(x)": silu_sigmoid,
    "sigmoid(x) * x": lambda x: torch.sigmoid(x) * x,
    "x.sigmoid().mul": lambda x: torch.mul(x, x.sigmoid()),
}


class ResBlock(nn.Module):
    """GN -> SiLU -> conv, time embedding added, GN -> SiLU -> dropout -> conv, shortcut."""

    def __init__(self, cin, cout, tdim, eps, act):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(32, cout, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.nonlinearity = nn.SiLU() if act == "module" else _ACTS[act]

    def forward(self, x, temb):
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        return self.shortcut(x) + h


class Attention(nn.Module):
    """GroupNorm on (N, C, H, W) then reshaped, or on the (N, C, H*W) view (optionally the
    upcast pattern: float32 norm, result back in the input's dtype); single-head attention."""

    def __init__(self, c, flat=False, upcast=False):
        super().__init__()
        self.group_norm = nn.GroupNorm(32, c, eps=1e-6)
        self.to_qkv = nn.Linear(c, 3 * c)
        self.to_out = nn.Linear(c, c)
        self.flat, self.upcast = flat, upcast

    def forward(self, x):
        n, c, h, w = x.shape
        if self.flat:
            y = x.view(n, c, h * w)
            y = self.group_norm(y.float()).to(x.dtype) if self.upcast else self.group_norm(y)
        else:
            y = self.group_norm(x).view(n, c, h * w)
        q, k, v = self.to_qkv(y.transpose(1, 2)).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.to_out(a).transpose(1, 2).reshape(n, c, h, w)


class NormWithResidual(nn.Module):
    """A norm whose output is read by the SiLU and by a residual add: not fusable."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(32, c)

    def forward(self, x):
        h = self.norm(x)
        return F.silu(h) + h


class TinyUNet(nn.Module):
    """Channels 64/128 (SD's are 320/640/1280: same 32 groups, fewer channels per group), two
    resolutions, a mid block, a skip connection, an output GN -> nn.SiLU -> conv."""

    def __init__(self, act="F.silu", ch=(64, 128), tdim=32):
        super().__init__()
        c0, c1 = ch
        self.time_embedding = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(),
                                            nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(4, c0, 3, padding=1)
        self.down1 = ResBlock(c0, c0, tdim, 1e-5, act)
        self.attn1 = Attention(c0, flat=True)
        self.downsample = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c1, tdim, 1e-6, act)
        self.attn2 = Attention(c1, flat=True, upcast=True)
        self.mid = ResBlock(c1, c1, tdim, 1e-6, act)
        self.residual = NormWithResidual(c1)
        self.upsample = nn.Sequential(nn.Upsample(scale_factor=2.0),
                                      nn.Conv2d(c1, c0, 3, padding=1))
        self.up1 = ResBlock(2 * c0, c0, tdim, 1e-5, act)
        self.attn3 = Attention(c0)
        self.conv_norm_out = nn.GroupNorm(32, c0)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(c0, 4, 3, padding=1)

    def forward(self, x, t):
        temb = self.time_embedding(t)
        h = self.conv_in(x)
        skip = self.attn1(self.down1(h, temb))
        h = self.attn2(self.down2(self.downsample(skip), temb))
        h = self.residual(self.mid(h, temb))
        h = self.up1(torch.cat([self.upsample(h), skip], 1), temb)
        h = self.attn3(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


# the ResNet blocks' and the output's GN -> SiLU pairs; the attention norms and the residual's
# are not followed by an activation alone
_PAIRS = ["down1.norm1", "down1.norm2", "down2.norm1", "down2.norm2", "mid.norm1", "mid.norm2",
          "up1.norm1", "up1.norm2", "conv_norm_out"]


def _unet(act="F.silu", seed=0):
    torch.manual_seed(seed)
    model = TinyUNet(act)
    with torch.no_grad():  # affine parameters far from (1, 0)
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.num_channels))
                m.bias.copy_(0.5 * torch.randn(m.num_channels))
    return model


def _inputs(dtype=torch.float32):
    x = off_centre(2, 4, 8, 8, dtype=dtype)  # N = 2 latents, 8x8 (a 64 px image's latent)
    t = torch.randn(2, 32).to(dtype)
    return x, t


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("act", ["module", *_ACTS])
def test_optimize_replaces_every_groupnorm_and_fuses_every_gn_silu_pair(act):
    # x * sigmoid(x) (and its orders) was left unfused, and the norm with a residual reader
    # was left without a word in the record
    model = _unet(act).eval()
    reference = copy.deepcopy(model)
    ours, record = normlab.optimize(model)
    assert len(record.replaced) == 13 and all(old == "GroupNorm" for _, old, _ in record.replaced)
    assert sorted(record.fused) == sorted((name, "silu", "fx") for name in _PAIRS), str(record)
    assert record.skipped == [("residual.norm", "not fused: the silu is not the only reader of "
                               "the norm's output (also read by add_8)")], str(record)
    assert not any(isinstance(m, nn.GroupNorm) and not isinstance(m, nlnn.GroupNorm)
                   for m in ours.modules())
    x, t = _inputs()
    with torch.no_grad():
        # silu(x) and x * sigmoid(x) round differently: a few float32 units
        assert _rel(ours(x, t), reference(x, t)) < (1e-6 if act == "module" or "silu" in act
                                                     else 1e-5)


def test_optimized_unet_trains_as_the_original():
    model = _unet().train()
    reference = copy.deepcopy(model)
    ours, _ = normlab.optimize(model)
    x, t = _inputs()
    y, want = ours(x, t), reference(x, t)
    assert _rel(y, want) < 1e-6
    g = torch.randn_like(want)
    y.backward(g)
    want.backward(g)
    theirs = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        assert _rel(p.grad, theirs[name].grad) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_optimized_unet_in_half_precision(dtype):
    # the model cast to half, the upcast norm kept in float32 (as diffusers keeps what it
    # upcasts): the same ATen kernels, the same bits
    model = _unet().eval().to(dtype)
    model.attn2.group_norm.float()
    reference = copy.deepcopy(model)
    ours, record = normlab.optimize(model)
    assert len(record.fused) == len(_PAIRS)
    x, t = _inputs(dtype)
    with torch.no_grad():
        y = ours(x, t)
        assert y.dtype == dtype
        torch.testing.assert_close(y, reference(x, t), rtol=0, atol=0)


def test_optimized_unet_under_bf16_autocast():
    model = _unet().eval()
    reference = copy.deepcopy(model)
    ours, _ = normlab.optimize(model)
    x, t = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = ours(x, t), reference(x, t)
    assert y.dtype == want.dtype
    torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_optimized_unet_channels_last():
    # normlab routes channels_last CPU GroupNorm around ATen's kernel: float rounding apart
    model = _unet().eval().to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    ours, _ = normlab.optimize(model)
    x, t = _inputs()
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert _rel(ours(x, t), reference(x, t)) < 1e-6


def test_state_dicts_load_both_ways_strictly():
    original = _unet(seed=1)
    optimized, _ = normlab.optimize(_unet(seed=2))
    optimized.load_state_dict(original.state_dict(), strict=True)
    fresh = _unet(seed=3)
    fresh.load_state_dict(optimized.state_dict(), strict=True)
    x, t = _inputs()
    with torch.no_grad():
        want = original.eval()(x, t)
        assert _rel(optimized.eval()(x, t), want) < 1e-6
        assert _rel(fresh.eval()(x, t), want) < 1e-6


def test_compiled_optimized_unet_has_no_graph_break():
    # fullgraph=True: a graph break is an error
    import torch._dynamo

    model = _unet().train()
    reference = copy.deepcopy(model)
    ours, _ = normlab.optimize(model)
    x, t = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    y, want = compiled(x, t), reference(x, t)
    assert _rel(y, want) < 1e-6
    y.sum().backward()
    want.sum().backward()
    theirs = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        assert _rel(p.grad, theirs[name].grad) < 1e-5, name
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# single GroupNorms at a diffusion UNet's shapes, against torch.nn.GroupNorm
# --------------------------------------------------------------------------------------------


def _pair(groups, c, eps=1e-5, affine=True):
    theirs = nn.GroupNorm(groups, c, eps, affine)
    if affine:
        with torch.no_grad():
            theirs.weight.copy_(1 + 0.5 * torch.randn(c))
            theirs.bias.copy_(0.5 * torch.randn(c))
    ours = nlnn.GroupNorm(groups, c, eps, affine)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("shape,eps,affine,channels_last", [
    ((2, 320, 64), 1e-6, True, False),          # attention norm on (N, C, H*W): 10 channels a group
    ((1, 320, 8, 8), 1e-5, True, False),        # SD's first block, one image per device
    ((2, 320, 8, 8), 1e-6, False, False),       # affine=False
    ((1, 1280, 1, 1), 1e-5, True, False),       # the bottleneck at 1x1: 40 values a group
    ((2, 1280, 2, 2), 1e-6, True, False),       # the bottleneck at 2x2
    ((1, 64, 3, 6, 6), 1e-5, True, False),      # video UNet: (N, C, frames, H, W)
    ((2, 320, 8, 8), 1e-5, True, True),         # channels_last
    ((1, 1280, 2, 2), 1e-6, True, True),        # channels_last bottleneck
    ((1, 64, 3, 6, 6), 1e-5, True, True),       # channels_last_3d video
])
def test_groupnorm_at_unet_shapes_matches_torch(shape, eps, affine, channels_last):
    ours, theirs = _pair(32, shape[1], eps, affine)
    x = off_centre(*shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, want = ours(xa), theirs(xb)
    assert y.dtype == want.dtype and y.stride() == want.stride()
    assert rel_err(y, want) < 1e-6
    g = torch.randn_like(want)
    y.backward(g)
    want.backward(g)
    assert rel_err(xa.grad, xb.grad) < 1e-5
    if affine:
        assert rel_err(ours.weight.grad, theirs.weight.grad) < 1e-5
        assert rel_err(ours.bias.grad, theirs.bias.grad) < 1e-5


@pytest.mark.parametrize("xdt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_input_with_float32_weights(xdt, channels_last):
    # torch.nn's rule on CPU: half in, half out, statistics in float32
    ours, theirs = _pair(32, 320)
    x = off_centre(2, 320, 8, 8, dtype=xdt)  # 10 channels a group, 640 values
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, want = ours(x), theirs(x)
    assert y.dtype == want.dtype == xdt and y.stride() == want.stride()
    if not channels_last:  # the same ATen kernel
        torch.testing.assert_close(y, want, rtol=0, atol=0)
    # at most torch's own error against the float64 formula (channels_last half input was
    # shifted in half precision: about twice torch's)
    exact = normalize64(x, 32, False, ours.weight.detach(), ours.bias.detach())
    assert rel_err(y, exact) <= rel_err(want, exact) * 1.05


@pytest.mark.parametrize("shape,groups", [
    ((2, 6, 5), 3),          # (N, C, L): the attention norm's 3-D input
    ((1, 4, 2, 2, 3), 2),    # 5-D video input, N = 1
    ((2, 8, 1, 1), 2),       # 1x1 spatial (the bottleneck's shape in small)
    ((1, 6, 3, 3), 3),       # N = 1
])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_gradcheck_float64(shape, groups, activation):
    x = (torch.randn(shape, dtype=torch.float64) + 2).requires_grad_()
    w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: NLF.group_norm(x, groups, w, b, 1e-6, activation=activation)
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_torch_group_norm_autocasts_to_float32_on_cuda():
    # what the next test emulates on the CPU: torch's dispatcher holds an autocast kernel
    # (float32 policy) for aten::group_norm on CUDA, none on the CPU
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("aten::group_norm", "AutocastCUDA")
    assert "cuda" in NLF._GROUP_NORM_FP32_AUTOCAST
    assert has("aten::group_norm", "AutocastCPU") == ("cpu" in NLF._GROUP_NORM_FP32_AUTOCAST)


@pytest.mark.parametrize("module", [True, False])
def test_group_norm_follows_torchs_float32_autocast(monkeypatch, module):
    # under CUDA autocast torch's GroupNorm computes half input in float32 and returns float32;
    # normlab's returned the half dtype. The CPU has no such policy, so it is emulated here by
    # naming the CPU among the devices where autocast runs group_norm in float32.
    monkeypatch.setattr(NLF, "_GROUP_NORM_FP32_AUTOCAST", frozenset({"cpu"}))
    ours, theirs = _pair(32, 64)
    ours.activation = "silu"
    x = off_centre(2, 64, 4, 4, dtype=torch.bfloat16)  # 2 channels a group
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if module:
            y = ours(x)
        else:
            y = NLF.group_norm(x, 32, ours.weight, ours.bias, activation="silu")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.silu(theirs(x.float())), rtol=0, atol=0)
    assert ours(x).dtype == torch.bfloat16  # autocast off: the input's dtype
