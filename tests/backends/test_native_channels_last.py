"""The native backend on channels_last CPU input (src/normlab/backends/native_channels_last.py):
GN, IN and LayerNorm over C at offset 1000 - output, statistics and gradients against the float64
formula (tests/formula.py), the forward-only path, a recorded backward, half precision - on both
of its paths (the sums path and ATen's kernel on shifted input, each forced through the size
rule's limits), and the size rule itself at its edges."""

import math

import pytest
import torch

import normlab.functional as NF
from normlab.backends import native_channels_last as ncl, use_backend
from normlab.backends.native_channels_last import ATEN_VECTORIZED_POSITIONS
from formula import group_norm64, rel_err

# float32 rounding at offset 1000: one ulp of 1000 is 6.1e-5 (see tests/test_torch_parity.py)
ULP_1000 = 1000 * torch.finfo(torch.float32).eps / 2


def _case(shape, dtype=torch.float32, offset=1000.0, seed=0):
    """x = offset + randn in channels_last(_3d), random affine, a random output gradient."""
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = (offset + torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[1], generator=gen, dtype=torch.float64)).to(dtype)
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=fmt), w, b, dy.contiguous(memory_format=fmt)


@pytest.fixture(params=["sums", "shifted"])
def path(request, monkeypatch):
    """Forces one path through the size rule's limits: every width and size to the sums path,
    or none."""
    limits = (math.inf, 0) if request.param == "sums" else (0, 0)
    for dtype in list(ncl.SUMS_PATH_LIMITS):
        monkeypatch.setitem(ncl.SUMS_PATH_LIMITS, dtype, limits)
    return request.param


def _path_of(y):
    """Which path made y (with grad): the sums path's autograd.Function or ATen's kernel."""
    return "sums" if "ChannelsLastGroupNorm" in type(y.grad_fn).__name__ else "shifted"


def _native(x, groups, w, b, dy):
    """y and the gradients of (y * dy).sum() w.r.t. x, w, b on the native backend."""
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with use_backend("native"):
        y = NF.group_norm(xr, groups, wr, br)
    y.backward(dy)
    return y.detach(), xr.grad, wr.grad, br.grad


def _float64(x, groups, w, b, dy):
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    y = group_norm64(xr, groups, wr, br)
    y.backward(dy.double())
    return y.detach(), xr.grad, wr.grad, br.grad


# (shape, groups); why each is here:
CASES = [
    ((2, 6, 16, 16), 3),     # GN, 2 channels per group, 256 positions (< ATen's 1024 switch)
    ((2, 6, 16, 16), 6),     # IN (G = C): a group is one channel column of the rows view
    ((2, 6, 16, 16), 1),     # LayerNorm over (C, H, W): one group spans all channels
    ((1, 4, 32, 32), 2),     # 1024 positions: with grad the sums path, not ATen's forward
    ((2, 4, 3, 4, 4), 2),    # 5-D channels_last_3d
]


@pytest.mark.parametrize("shape,groups", CASES)
def test_float32_at_offset_matches_the_formula(shape, groups, path):
    x, w, b, dy = _case(shape)
    xr = x.clone().requires_grad_()
    assert _path_of(NF.group_norm(xr, groups, w, b, backend="native")) == path
    y, dx, dw, db = _native(x, groups, w, b, dy)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    y64, dx64, dw64, db64 = _float64(x, groups, w, b, dy)
    assert (y.double() - y64).abs().max().item() < 3 * 2 * ULP_1000
    # measured 1e-7 - 8e-7 on these inputs, shifted ATen kernel 1e-7 - 1.1e-6 at one thread and
    # up to 3.4e-6 (dw) at two, whose sums run in another order (ATen's NCHW kernel on the same
    # input: 1e-5 - 7e-4)
    for name, got, want in (("y", y, y64), ("dx", dx, dx64), ("dw", dw, dw64), ("db", db, db64)):
        assert rel_err(got, want) < 5e-6, (name, rel_err(got, want))


# 2 channels per group over 256 positions; IN-like groups of 1 channel over 1024 positions
@pytest.mark.parametrize("shape,groups", [((2, 6, 16, 16), 3), ((1, 4, 32, 32), 4)])
def test_bfloat16_as_accurate_as_the_nchw_path(shape, groups, path):
    # bf16 input: float32 statistics; errors are bf16 rounding, no worse than contiguous input
    x, w, b, dy = _case(shape, torch.bfloat16, offset=100.0)
    cl = _native(x, groups, w, b, dy)
    nchw = _native(x.contiguous(), groups, w, b, dy.contiguous())
    ref = _float64(x, groups, w, b, dy)
    for name, a, n, r in zip(("y", "dx", "dw", "db"), cl, nchw, ref):
        assert rel_err(a, r) <= 1.5 * rel_err(n, r) + 1e-3, (name, rel_err(a, r), rel_err(n, r))


def test_statistics_and_dtype_as_the_nchw_path():
    x, w, b, _ = _case((2, 6, 16, 16))
    x.requires_grad_()
    _, mean, rstd = NF.normalize(x, 3, False, w, b, backend="native", return_stats=True)
    _, mean_n, rstd_n = NF.normalize(x.detach().contiguous(), 3, False, w, b, backend="native",
                                     return_stats=True)
    xg = x.detach().double().reshape(2, 3, -1)
    var64, mean64 = torch.var_mean(xg, dim=2, correction=0)
    assert mean.dtype == mean_n.dtype and rstd.dtype == rstd_n.dtype
    assert (mean.double() - mean64).abs().max() < 2 * ULP_1000
    assert rel_err(rstd, torch.rsqrt(var64 + 1e-5)) < 1e-5


def test_forward_only_at_many_positions_uses_aten_and_stays_accurate(path):
    # no grad and >= 1024 positions: ATen's vectorized channels_last forward on shifted input,
    # even where the size rule picks the sums path for training calls
    x, w, b, _ = _case((2, 4, 32, 32))
    assert 32 * 32 >= ATEN_VECTORIZED_POSITIONS
    with torch.no_grad():
        y, mean, rstd = NF.normalize(x, 2, False, w, b, backend="native", return_stats=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert (y.double() - group_norm64(x, 2, w, b)).abs().max().item() < 3 * 2 * ULP_1000
    xr = x.clone().requires_grad_()  # with grad: the forced path, the same statistics
    y_g, mean_g, rstd_g = NF.normalize(xr, 2, False, w, b, backend="native", return_stats=True)
    assert _path_of(y_g) == path
    assert (mean - mean_g).abs().max() < 2 * ULP_1000 and rel_err(rstd, rstd_g) < 1e-5


def test_output_gradient_in_another_layout(path):
    # an NCHW output gradient (here from multiplying by an NCHW tensor) and an expanded one
    x, w, b, dy = _case((2, 6, 16, 16))
    y, dx, _, _ = _native(x, 3, w, b, dy.contiguous())
    assert rel_err(dx, _float64(x, 3, w, b, dy)[1]) < 3e-6
    xr = x.detach().clone().requires_grad_()
    NF.group_norm(xr, 3, w, b, backend="native").sum().backward()  # dy = ones, expanded
    assert rel_err(xr.grad, _float64(x, 3, w, b, torch.ones_like(dy))[1]) < 3e-5


def test_gradient_penalty_second_order_matches_the_formula(path):
    # create_graph=True: the backward is recorded (ATen's differentiable ops on shifted input)
    x, w, b, dy = _case((2, 6, 4, 4), offset=10.0)

    def penalty_grads(f, x, w, b):
        xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        (gx,) = torch.autograd.grad((f(xr, wr, b) * dy.to(xr.dtype)).sum(), xr, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (xr, wr))

    ours = penalty_grads(lambda xr, wr, b: NF.group_norm(xr, 3, wr, b, backend="native"), x, w, b)
    ref = penalty_grads(lambda xr, wr, b: group_norm64(xr, 3, wr, b), x.double(), w.double(),
                        b.double())
    for got, want in zip(ours, ref):
        assert rel_err(got, want) < 1e-4


def test_nan_and_inf_stay_in_their_group(path):
    x, w, b, dy = _case((2, 6, 8, 8))
    x[0, 1, 2, 3] = math.nan  # sample 0, group 0
    x[1, 4, 0, 0] = math.inf  # sample 1, group 2: the group's shift element itself
    y, dx, _, _ = _native(x, 3, w, b, dy)
    assert torch.isnan(y[0, :2]).all() and not torch.isfinite(y[1, 4:]).any()
    clean = [(0, slice(2, 6)), (1, slice(0, 4))]
    y64, dx64, _, _ = _float64(x, 3, w, b, dy)
    for n, ch in clean:
        assert torch.isfinite(dx[n, ch]).all()
        assert rel_err(y[n, ch], y64[n, ch]) < 3e-6 and rel_err(dx[n, ch], dx64[n, ch]) < 3e-6


def test_no_affine_and_forward_only_below_1024_positions(path):
    # weight and bias None (the sums path then spreads rstd over the channels itself); the same
    # forward without grad (the sums path's forward outside autograd below 1024 positions)
    x, _, _, dy = _case((2, 6, 8, 8))
    xr = x.clone().requires_grad_()
    y_none = NF.group_norm(xr, 3, backend="native")
    y_none.backward(dy)
    assert _path_of(y_none) == path
    y64, dx64, _, _ = _float64(x, 3, torch.ones(6), torch.zeros(6), dy)
    assert rel_err(y_none, y64) < 3e-6 and rel_err(xr.grad, dx64) < 3e-6
    with torch.no_grad():
        y_fwd = NF.group_norm(x, 3, backend="native")
    assert y_fwd.is_contiguous(memory_format=torch.channels_last) and rel_err(y_fwd, y64) < 3e-6


def test_output_can_be_modified_in_place(path):
    # y is a tensor of its own, not a view made inside the autograd.Function: an in-place
    # activation after the norm (nn.ReLU(inplace=True)) works and its gradient is right
    x, w, b, dy = _case((2, 6, 8, 8))
    xr = x.clone().requires_grad_()
    y = NF.group_norm(xr, 3, w, b, backend="native")
    assert not y._is_view()
    y.relu_().backward(dy)
    xd = x.double().requires_grad_()
    group_norm64(xd, 3, w.double(), b.double()).relu().backward(dy.double())
    assert rel_err(xr.grad, xd.grad) < 3e-6


# The size rule's edges (C/G below max_cpg and x.numel() >= numel_per_cpg * C/G take the sums
# path; a quarter of that for a forward alone, below 1024 positions), on shapes built from the
# limits: (1, C, 1, positions), 2 groups with grad, 16 without (to stay below 1024 positions).
@pytest.mark.parametrize("backward", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_size_rule_edges_pick_the_path_the_rule_says(dtype, backward, monkeypatch):
    max_cpg, numel_per_cpg = ncl.SUMS_PATH_LIMITS[dtype]
    groups = 2 if backward else 16
    at_edge = numel_per_cpg // (1 if backward else ncl.FORWARD_ONLY_DIVISOR) // groups
    sums_forward = ncl._forward
    calls = []

    def spy(*args):  # the sums path's forward, with grad or without
        calls.append(args[0].shape)
        return sums_forward(*args)

    monkeypatch.setattr(ncl, "_forward", spy)

    def path_for(cpg, positions):
        x = _case((1, groups * cpg, 1, positions), dtype, offset=100.0)[0]
        calls.clear()
        with torch.set_grad_enabled(backward):
            y = NF.group_norm(x.requires_grad_(backward), groups, backend="native")
        assert y.is_contiguous(memory_format=torch.channels_last)
        return "sums" if calls else "shifted"

    for cpg in (1, max_cpg - 1):  # the narrowest and the widest groups the rule sends to sums
        assert path_for(cpg, at_edge) == "sums"  # numel_per_cpg * cpg elements (/ 4) exactly
        assert path_for(cpg, at_edge - 1) == "shifted"  # groups * cpg elements fewer
    assert path_for(max_cpg, at_edge) == "shifted"  # one channel per group more
    if not backward:  # 1024 positions: ATen's vectorized forward however narrow the groups
        assert path_for(1, ATEN_VECTORIZED_POSITIONS) == "shifted"


# A trainable norm whose gradient w.r.t. its input is not asked for: ATen's CPU channels_last
# backward, asked for dweight/dbias without dx, crashes the process (torch.nn's GroupNorm too,
# torch 2.13). The probe runs in a subprocess so that the crash is a failure, not the end of
# the test run.
_FROZEN_INPUT_PROBE = """
import torch, normlab.functional as NF
x = (100 + torch.randn(3, 8, 5, 5)).contiguous(memory_format=torch.channels_last)
w = torch.randn(8, requires_grad=True)
b = torch.randn(8, requires_grad=True)
NF.group_norm(x, 4, w, b, backend="native").sum().backward()      # x does not require grad
xr = x.clone().requires_grad_()
torch.autograd.grad(NF.group_norm(xr, 4, w, b, backend="native").sum(), [w])  # dw alone
print("ok")
"""


def test_trainable_affine_on_an_input_without_grad(path):
    """A GroupNorm after a frozen backbone (its input does not require grad), or
    ``torch.autograd.grad`` of the weight alone: it crashed the process (segmentation fault)
    on ATen's kernel on shifted input; dweight and dbias now match the float64 formula, and
    with create_graph a penalty on dweight differentiated in x too."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _FROZEN_INPUT_PROBE], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
    x, w, b, dy = _case((2, 6, 8, 8), offset=10.0)
    ref_y, ref_dx, ref_dw, ref_db = _float64(x, 3, w, b, dy)
    for needs in ("wb", "w", "b"):  # the input without grad; weight and/or bias trainable
        wr, br = w.clone().requires_grad_("w" in needs), b.clone().requires_grad_("b" in needs)
        y = NF.group_norm(x, 3, wr, br, backend="native")
        assert _path_of(y) == path
        y.backward(dy)
        assert rel_err(y, ref_y) < 3e-6
        assert ("w" not in needs or rel_err(wr.grad, ref_dw) < 3e-6) and (
            "b" not in needs or rel_err(br.grad, ref_db) < 3e-6)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()  # dw alone, x with grad
    (dw,) = torch.autograd.grad((NF.group_norm(xr, 3, wr, b, backend="native") * dy).sum(), [wr])
    assert rel_err(dw, ref_dw) < 3e-6
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()  # create_graph: dw alone,
    (dw,) = torch.autograd.grad((NF.group_norm(xr, 3, wr, b, backend="native") * dy).sum(), [wr],
                                create_graph=True)  # then a penalty on it differentiated in x
    (ddx,) = torch.autograd.grad(dw.square().sum(), [xr])
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    (dw64,) = torch.autograd.grad((group_norm64(x64, 3, w64, b.double()) * dy.double()).sum(),
                                  [w64], create_graph=True)
    (ddx64,) = torch.autograd.grad(dw64.square().sum(), [x64])
    assert rel_err(dw, dw64) < 3e-6 and rel_err(ddx, ddx64) < 1e-4
