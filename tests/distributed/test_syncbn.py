"""SyncBatchNorm (normlab.nn.syncbn): 2 gloo processes against single-process BatchNorm over the
whole batch, and single-process behaviour (exactly normlab BatchNorm, drop-in state_dicts).

The 2-process cases run once (one spawn, module fixture) and each test checks one property.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import dist_harness  # noqa: E402
import dist_workers  # noqa: E402
from versions import TORCH_NORM_BIAS  # noqa: E402

import normlab  # noqa: E402
from normlab.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d  # noqa: E402
from normlab.nn.syncbn import SyncBatchNorm  # noqa: E402


def off_centre(*shape, dtype=torch.float64, scale=2.0, offset=3.0):
    """Random data, neither centred nor unit-scale, with per-channel offsets."""
    x = torch.randn(*shape, dtype=torch.float64) * scale + offset
    x = x + torch.randn(shape[1], dtype=torch.float64).reshape((1, -1) + (1,) * (len(shape) - 2))
    return x.to(dtype)


def make_case(name, shape, split, dtype=torch.float64, kwargs=None, offset=3.0, scale=2.0,
              **extra):
    c = shape[1]
    return dict(
        name=name, split=split, kwargs=kwargs or {},
        x=off_centre(*shape, dtype=dtype, offset=offset, scale=scale),
        x2=off_centre(*shape, dtype=dtype, offset=-offset / 3, scale=scale),
        r=torch.randn(*shape, dtype=dtype),  # upstream gradient: loss = sum(y * r)
        weight=(torch.rand(c, dtype=torch.float64) + 0.5).to(dtype),
        bias=torch.randn(c, dtype=torch.float64).to(dtype), **extra,
    )


# Each case is one reason: (shape, per-rank split, options)
CASES = [
    # the brief's case: 2 x 4 images, 4D, float64 so equality is tight
    ("equal_4d", (8, 4, 5, 6), [4, 4], torch.float64, {}, dict(plain_bn=True)),
    # unequal per-rank batches must be exact (Chan's combination, not a mean of means)
    ("unequal_4d", (8, 4, 5, 6), [3, 5], torch.float64, {}, dict(plain_bn=True)),
    # float32 path (statistics in float32 locally, combined in float64)
    ("float32_4d", (8, 4, 5, 6), [4, 4], torch.float32, {}, {}),
    # |mean| >> std in float32 (REFERENCE section 5: E[x^2] - E[x]^2 would lose every digit);
    # compared with a float64 reference on the same float32 values
    ("large_offset_float32", (8, 4, 5, 6), [3, 5], torch.float32, {},
     dict(offset=1e4, scale=1.0, ref64=True)),
    # bfloat16 input and parameters: statistics accumulated in float32, parameters cast for ATen
    ("bfloat16_4d", (8, 4, 5, 6), [3, 5], torch.bfloat16, {}, {}),
    # 2D (N, C) input, cumulative running average (momentum=None), no bias
    ("2d_cumulative_nobias", (8, 5), [5, 3], torch.float64, dict(momentum=None, bias=False), {}),
    # 3D (N, C, L) input without affine
    ("3d_noaffine", (8, 3, 7), [2, 6], torch.float64, dict(affine=False), {}),
    # 5D input without running statistics (batch statistics in eval too)
    ("5d_untracked", (8, 2, 3, 4, 5), [4, 4], torch.float64, dict(track_running_stats=False), {}),
    # channels_last input through the reference backend: any backend, layout kept
    ("channels_last_reference", (8, 4, 5, 6), [3, 5], torch.float64, {},
     dict(channels_last=True, backend="reference")),
    # 5D channels_last_3d input, unequal split: the synchronized path keeps that layout for the
    # output and the input gradient (only 4D channels_last was covered)
    ("channels_last_3d_5d", (4, 3, 2, 3, 4), [1, 3], torch.float64, {}, dict(channels_last=True)),
    # a rank with no samples still joins the collectives and contributes nothing
    ("empty_rank", (8, 3, 4, 4), [0, 8], torch.float64, {}, {}),
    # an explicit process_group argument
    ("process_group", (8, 4, 5, 6), [4, 4], torch.float64, {}, dict(process_group=True)),
    # a rank with a single sample of 2D input: one value per channel there, which per-process BN
    # refuses; the global statistics still have 8
    ("one_sample_rank_2d", (8, 5), [1, 7], torch.float64, {}, {}),
]

# the process_group argument is honoured: a group of this rank alone gives per-process BN
# (checked against torch.nn.BatchNorm2d on each rank's part, not against the global batch)
OWN_GROUP_CASE = ("own_group", (8, 4, 5, 6), [3, 5], torch.float64, {}, dict(process_group="own"))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    torch.manual_seed(1234)
    out = str(tmp_path_factory.mktemp("syncbn"))
    cases = [make_case(n, s, sp, dt, kw, **ex) for n, s, sp, dt, kw, ex in CASES + [OWN_GROUP_CASE]]
    torch.save(cases, os.path.join(out, "cases.pt"))
    dist_harness.run_workers(dist_workers.syncbn_worker, 2, out, timeout=90)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    return {c["name"]: c for c in cases}, ranks


def torch_bn(x, kwargs):
    """torch.nn's BatchNorm for x's dims with the case's options (an independent reference)."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    return cls[x.dim()](x.shape[1], dtype=x.dtype, **kwargs)


def reference(case):
    """Single-process torch.nn BatchNorm over the whole batch: the same two training steps, the
    gradients of sum(y * r), then eval."""
    x_full = case["x"]
    if case.get("ref64"):
        case = dict(case, **{k: case[k].to(torch.float64) for k in ("x", "x2", "r", "weight",
                                                                    "bias")})
        x_full = case["x"]
    bn = torch_bn(x_full, case["kwargs"])
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(case["weight"])
        if bn.bias is not None:
            bn.bias.copy_(case["bias"])
    x = x_full.clone()
    if case.get("channels_last"):
        x = x.contiguous(memory_format=dist_workers.channels_last_of(x))
    x.requires_grad_(True)
    y = bn(x)
    (y * case["r"]).sum().backward()
    with torch.no_grad():
        bn(case["x2"])
        bn.eval()
        y_eval = bn(x.detach())
    return dict(y=y.detach(), grad_x=x.grad, y_eval=y_eval,
                grad_w=None if bn.weight is None else bn.weight.grad,
                grad_b=None if bn.bias is None else bn.bias.grad,
                running_mean=bn.running_mean, running_var=bn.running_var,
                num_batches_tracked=None if bn.num_batches_tracked is None
                else int(bn.num_batches_tracked))


def tol(case):
    if case.get("ref64"):  # float32 statistics at offset 1e4 against float64 ones
        return dict(rtol=1e-3, atol=2e-3, check_dtype=False)
    return {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
            # bf16 has 8 mantissa bits: one rounding of a value of magnitude ~3 is ~1.6e-2
            torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}[case["x"].dtype]


def per_rank(t, split):
    return [dist_workers.local_part(t, split, r) for r in range(2)]


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_syncbn_two_processes_equal_single_process_bn(two_process_run, name):
    cases, ranks = two_process_run
    if "bias" in cases[name]["kwargs"] and not TORCH_NORM_BIAS:
        pytest.skip("the reference is torch's BatchNorm with bias=, which this torch lacks")
    case, ref = cases[name], reference(cases[name])
    split = case["split"]
    for r, (y_ref, g_ref, ye_ref) in enumerate(zip(per_rank(ref["y"], split),
                                                   per_rank(ref["grad_x"], split),
                                                   per_rank(ref["y_eval"], split))):
        got = ranks[r][name]
        torch.testing.assert_close(got["y"], y_ref, **tol(case))
        torch.testing.assert_close(got["grad_x"], g_ref, **tol(case))
        if ref["running_mean"] is None:
            # no running statistics: eval normalizes with this process's own batch statistics
            # (as torch.nn.SyncBatchNorm: eval never communicates)
            x_local = dist_workers.local_part(case["x"], split, r)
            ye_ref = nn.functional.batch_norm(x_local, None, None, case["weight"], case["bias"],
                                              True, 0.0, 1e-5)
        torch.testing.assert_close(got["y_eval"], ye_ref, **tol(case))  # no collective in eval
        for key in ("running_mean", "running_var"):
            if ref[key] is None:
                assert got[key] is None
            else:
                torch.testing.assert_close(got[key], ref[key], **tol(case))
        assert got["num_batches_tracked"] == ref["num_batches_tracked"]
    # parameter gradients stay per process; their sum is the single-process gradient
    for key in ("grad_w", "grad_b"):
        if ref[key] is None:
            assert all(rk[name][key] is None for rk in ranks)
        else:
            total = ranks[0][name][key] + ranks[1][name][key]
            t = tol(case)
            if case.get("ref64"):
                # a sum over 240 elements of dy * x_hat, where x_hat carries the float32 rounding
                # of the mean at 1e4 (~5e-4): an absolute error up to ~1e-2 is representation
                t = dict(t, atol=1e-2)
            torch.testing.assert_close(total, ref[key], **t)
    if case.get("channels_last"):
        assert all(rk[name]["channels_last_out"] and rk[name]["channels_last_grad"] for rk in ranks)


@pytest.mark.parametrize("name", ["equal_4d", "unequal_4d"])
def test_plain_bn_over_the_same_split_differs(two_process_run, name):
    cases, ranks = two_process_run
    ref = reference(cases[name])
    for r, y_ref in enumerate(per_rank(ref["y"], cases[name]["split"])):
        gap = (ranks[r][name]["y_plain_bn"] - y_ref).abs().max().item()
        assert gap > 1e-2, f"per-process BN on rank {r} matched the global BN (gap {gap})"


def test_process_group_argument_is_honoured(two_process_run):
    cases, ranks = two_process_run
    case = cases[OWN_GROUP_CASE[0]]
    for r in range(2):
        own = dict(case, x=dist_workers.local_part(case["x"], case["split"], r),
                   x2=dist_workers.local_part(case["x2"], case["split"], r),
                   r=dist_workers.local_part(case["r"], case["split"], r))
        ref, got = reference(own), ranks[r][OWN_GROUP_CASE[0]]
        for key in ("y", "grad_x", "y_eval", "running_mean", "running_var", "grad_w", "grad_b"):
            torch.testing.assert_close(got[key], ref[key], **tol(case), msg=lambda m: f"{key}: {m}")


def test_too_few_values_over_all_processes_raises_on_every_rank(two_process_run):
    _, ranks = two_process_run
    for r in range(2):
        msg = ranks[r]["too_few"]
        assert msg is not None and "more than 1 value per channel" in msg and "1 value" in msg


def test_a_group_this_process_is_not_in_is_named(two_process_run):
    _, ranks = two_process_run
    for r in range(2):
        msg = ranks[r]["not_a_member"]
        assert msg is not None and msg.startswith("ValueError: "), msg
        assert f"this process (rank {r}) is not a member of process_group" in msg, msg


def test_sync_backward_passes_gradcheck(two_process_run):
    _, ranks = two_process_run
    assert ranks[0]["gradcheck"] is True and ranks[1]["gradcheck"] is True


# --------------------------------------------------------------------------------------------
# single process: no process group -> exactly normlab BatchNorm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,bn_cls",
    [((6, 3), BatchNorm1d),            # 2D (N, C)
     ((6, 3, 7), BatchNorm1d),         # 3D (N, C, L)
     ((4, 3, 5, 6), BatchNorm2d),      # 4D images
     ((3, 3, 2, 4, 5), BatchNorm3d)],  # 5D volumes
)
def test_without_process_group_equals_batchnorm(shape, bn_cls):
    x = off_centre(*shape, dtype=torch.float32)
    sync, bn = SyncBatchNorm(3), bn_cls(3)
    with torch.no_grad():
        for m in (sync, bn):
            m.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = sync(xa), bn(xb)
    r = torch.randn_like(ya)
    (ya * r).sum().backward()
    (yb * r).sum().backward()
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    assert torch.equal(sync.weight.grad, bn.weight.grad)
    assert torch.equal(sync.running_var, bn.running_var)
    sync.eval(), bn.eval()
    assert torch.equal(sync(x), bn(x))


def test_state_dict_loads_strictly_both_ways():
    bn = nn.BatchNorm2d(5)
    bn(off_centre(4, 5, 3, 3, dtype=torch.float32))  # non-trivial running stats
    sync = SyncBatchNorm(5)
    sync.load_state_dict(bn.state_dict(), strict=True)
    back = nn.BatchNorm2d(5)
    back.load_state_dict(sync.state_dict(), strict=True)
    assert list(sync.state_dict()) == list(bn.state_dict())
    assert torch.equal(back.running_mean, bn.running_mean)


def test_factory_and_convert_norm_build_it():
    assert isinstance(normlab.create_norm("syncbn", 8), SyncBatchNorm)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.2), nn.ReLU())
    model[1](off_centre(2, 8, 4, 4, dtype=torch.float32))
    stats = model[1].running_mean.clone()
    converted = normlab.convert_norm(model, "syncbn")
    assert isinstance(converted[1], SyncBatchNorm) and converted[1].momentum == 0.2
    assert torch.equal(converted[1].running_mean, stats)
    again = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(4)))
    assert isinstance(again[0], SyncBatchNorm)


@pytest.mark.parametrize(
    "build,err,needle",
    [(lambda: SyncBatchNorm(0), ValueError, "0"),                       # no channels
     (lambda: SyncBatchNorm(3, momentum=2.0), ValueError, "2.0"),       # momentum out of range
     (lambda: SyncBatchNorm(3, eps=-1.0), ValueError, "-1.0"),          # eps must be > 0
     (lambda: SyncBatchNorm(3, process_group="world"), TypeError, "str")],  # not a group
)
def test_bad_constructor_arguments(build, err, needle):
    with pytest.raises(err, match=needle):
        build()


def test_numpy_momentum_is_a_number():
    """A momentum read from a numpy config (np.float32(0.1)) is a number in [0, 1], as for
    torch's BatchNorm; it was refused as not an int or float."""
    np = pytest.importorskip("numpy")
    assert SyncBatchNorm(3, momentum=np.float32(0.1)).momentum == pytest.approx(0.1)
    with pytest.raises(ValueError, match="1.5"):
        SyncBatchNorm(3, momentum=np.float64(1.5))


@pytest.mark.parametrize(
    "x,err,needle",
    [(torch.randn(4), ValueError, r"\(4,\)"),                  # 1D: no channel dim
     (torch.randn(1, 3, 1, 1, 1, 2), ValueError, "6D"),        # 6D: too many dims
     (torch.randn(4, 5, 2), ValueError, "5 channels"),         # wrong channel count
     (torch.ones(4, 3, dtype=torch.int64), TypeError, "int64")],  # integer input
)
def test_bad_inputs(x, err, needle):
    with pytest.raises(err, match=needle):
        SyncBatchNorm(3)(x)
