"""normlab.nn.RMSNorm against torch.nn.RMSNorm (same state_dict, eps=None rule) and the float64
formula (Zhang & Sennrich 2019, eq. 4), gradients included."""

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nlnn
from formula import assert_same_param_grads, compare_step, off_centre, rel_err, rms_norm64


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize(
    "shape,normalized,kw",
    [
        ((4, 7, 16), 16, {}),                                # tokens x features, eps=None
        ((3, 5, 6), (5, 6), {"eps": 1e-6}),                  # two trailing dims, explicit eps
        ((2, 3, 8), 8, {"elementwise_affine": False}),       # no weight
    ],
)
def test_rmsnorm_matches_torch(backend, shape, normalized, kw):
    theirs = nn.RMSNorm(normalized, **kw)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.copy_(torch.rand_like(theirs.weight) + 0.5)
    ours = nlnn.RMSNorm(normalized, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert repr(ours) == repr(theirs) and isinstance(ours, nn.RMSNorm)
    x = torch.randn(shape) * 2 + 1
    with normlab.use_backend(backend):
        compare_step(ours, theirs, x, rtol=1e-6, atol=1e-6)
    assert_same_param_grads(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_eps_none_is_the_machine_epsilon_as_torch_takes_it(dtype):
    # tiny values: the mean square (~1e-14) is below float32's eps (1.2e-7), so eps decides.
    # torch takes the accumulation dtype's epsilon (float32's for bfloat16 input)
    x = (torch.rand(3, 32, dtype=torch.float64) * 1e-7 + 1e-8).to(dtype)
    ours = nlnn.RMSNorm(32)
    y = ours.to(dtype)(x)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expect = rms_norm64(x, [32], ours.weight, torch.finfo(acc).eps)
    tol = 1e-12 if dtype == torch.float64 else 10 * torch.finfo(dtype).eps
    assert rel_err(y, expect) < tol
    torch.testing.assert_close(y, nn.RMSNorm(32).to(dtype)(x))


def test_gradcheck_float64_against_formula():
    norm = nlnn.RMSNorm((3, 4), eps=1e-4, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(3, 4, dtype=torch.float64) + 0.5)
    x = (torch.randn(2, 5, 3, 4, dtype=torch.float64) + 1).requires_grad_()
    assert torch.autograd.gradcheck(norm, (x,))
    g = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    ours = torch.autograd.grad(norm(x), (x, norm.weight), g)
    ref = torch.autograd.grad(rms_norm64(x, [3, 4], norm.weight, 1e-4), (x, norm.weight), g)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r)


def test_constructor_device_dtype_reset_and_errors():
    norm = nlnn.RMSNorm(6, dtype=torch.float64, device="cpu")
    assert norm.weight.dtype == torch.float64 and norm.weight.shape == (6,)
    with torch.no_grad():
        norm.weight.mul_(3)
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"normalized_shape must be positive ints.*\(4, 0\)"):
        nlnn.RMSNorm((4, 0))
    with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence of ints, got 3.5"):
        nlnn.RMSNorm(3.5)
    with pytest.raises(ValueError, match="eps must be a positive finite number, got 0.0"):
        nlnn.RMSNorm(4, eps=0.0)
    with pytest.raises(ValueError, match=r"normalized_shape=\[4\] does not match .* shape \(2, 5\)"):
        nlnn.RMSNorm(4)(torch.randn(2, 5))


def test_fx_trace_and_compile():
    model = nn.Sequential(nn.Linear(8, 8), nlnn.RMSNorm(8))
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize(
    "make_x",
    [lambda: off_centre(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),  # was NCHW out
     lambda: off_centre(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d),
     lambda: off_centre(2, 5, 4).transpose(1, 2),   # a strided 3-D input: contiguous out
     lambda: off_centre(2, 3, 4, 10)[..., ::2]],    # not dense: contiguous out
)
@pytest.mark.parametrize("trailing", [1, 2])
def test_output_layout_is_torchs(make_x, trailing):
    x = make_x()
    shape = list(x.shape[-trailing:])
    theirs, ours = nn.RMSNorm(shape), nlnn.RMSNorm(shape)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(shape) + 0.5)
        ours.weight.copy_(theirs.weight)
    want, got = theirs(x), ours(x)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_rms_norm_follows_torchs_float32_autocast(monkeypatch):
    # under CUDA autocast torch runs rms_norm in float32 (the dispatcher holds its autocast
    # kernel there, none on the CPU) and returns float32; normlab's returned the half dtype.
    # Emulated on the CPU by naming it among the devices where autocast does so
    from normlab import functional as NLF

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("aten::rms_norm", "AutocastCUDA") and "cuda" in NLF._RMS_NORM_FP32_AUTOCAST
    monkeypatch.setattr(NLF, "_RMS_NORM_FP32_AUTOCAST", frozenset({"cpu"}))
    torch.manual_seed(0)
    ours = nlnn.RMSNorm(64)  # an LLM's pre-norm over 64 features; 2 x 7 tokens of off-centre data
    with torch.no_grad():
        ours.weight.copy_(torch.randn(64) * 0.5 + 1)
    x = off_centre(2, 7, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x.float(), (64,), ours.weight),
                               rtol=1e-5, atol=1e-5)
    assert ours(x).dtype == torch.bfloat16  # autocast off: the input's dtype


def _rms2d_64(x, weight, eps):
    """RMSNorm2d's formula in float64: eq. 4 over the C values at each position."""
    return rms_norm64(x.movedim(1, -1), (x.shape[1],), weight, eps).movedim(-1, 1)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((2, 8, 5, 6), "nchw"),           # permute, normalized as rows of C, copied back
        ((2, 8, 5, 6), "channels_last"),  # a free view; the layout must be kept
        ((3, 8, 7), "nchw"),              # one spatial dim
    ],
)
def test_rmsnorm2d_against_the_formula(backend, shape, layout):
    norm = nlnn.RMSNorm2d(shape[1])
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[1]) + 0.5)
    x = off_centre(*shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    xa = x.detach().clone().requires_grad_()
    with normlab.use_backend(backend):
        y = norm(xa)
    assert rel_err(y, _rms2d_64(x, norm.weight, norm.eps)) < 1e-6
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    g = torch.randn(shape)
    (y * g).sum().backward()
    (_rms2d_64(x64, w64, norm.eps) * g.double()).sum().backward()
    assert rel_err(xa.grad, x64.grad) < 1e-5
    assert rel_err(norm.weight.grad, w64.grad) < 1e-5


def test_rmsnorm2d_equals_timms_rmsnorm2d():
    # timm's RmsNorm2d (ConvNeXt-style nets): the same parameter, state_dict key and values
    from timm_import import import_timm

    theirs = import_timm().layers.RmsNorm2d(6)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(6) + 0.5)
    ours = nlnn.RMSNorm2d(6)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = off_centre(2, 6, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_rmsnorm2d_constructor_and_errors():
    norm = nlnn.RMSNorm2d(4, eps=1e-5, affine=False, dtype=torch.float64)
    assert norm.weight is None and list(norm.state_dict()) == []
    assert repr(norm) == "RMSNorm2d(4, eps=1e-05, affine=False)"
    w = nlnn.RMSNorm2d(4, dtype=torch.float64).weight
    assert w.dtype == torch.float64 and torch.equal(w, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_channels must be a positive int, got 0"):
        nlnn.RMSNorm2d(0)
    with pytest.raises(ValueError, match="eps must be a positive"):
        nlnn.RMSNorm2d(4, eps=0.0)
    with pytest.raises(ValueError, match=r"RMSNorm2d expects 4 channels \(dim 1\), got input of "
                                         r"shape \(2, 3, 5, 5\)"):
        norm(torch.randn(2, 3, 5, 5, dtype=torch.float64))
