"""GhostBatchNorm1d/2d/3d (normlab.nn.ghost_batchnorm) in one process, against an independent
reference: torch.nn's BatchNorm applied to each slice of the batch separately (the per-process
BN of a DDP job), with slice 0's module carrying the running statistics. The K-process gloo
DDP equivalence is tests/distributed/test_ghost_batchnorm_ddp.py."""

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from formula import off_centre
from normlab.nn.ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

# (ghost class, torch class, input shape with batch K * n, n)
KINDS = [
    (GhostBatchNorm1d, nn.BatchNorm1d, (12, 5), 3),            # (N, C): 4 slices of 3 rows
    (GhostBatchNorm1d, nn.BatchNorm1d, (8, 5, 7), 2),          # (N, C, L): 4 slices of 2
    (GhostBatchNorm2d, nn.BatchNorm2d, (12, 5, 6, 3), 4),      # images, odd sizes, 3 slices
    (GhostBatchNorm2d, nn.BatchNorm2d, (8, 3, 4, 4), 1),       # one image per slice (batch 1/GPU)
    (GhostBatchNorm3d, nn.BatchNorm3d, (4, 5, 3, 4, 2), 2),    # volumes, 2 slices
]


def _setup(ghost_cls, torch_cls, c, n, **kw):
    """The ghost module and per-slice torch modules, all with the same random affine."""
    ghost = ghost_cls(c, virtual_batch=n, **kw)
    if ghost.weight is not None:
        with torch.no_grad():
            ghost.weight.copy_(torch.rand(c) + 0.5)
            ghost.bias.copy_(torch.randn(c))
    return ghost, lambda: _torch_copy(ghost, torch_cls, c, kw)


def _torch_copy(ghost, torch_cls, c, kw):
    m = torch_cls(c, **{k: v for k, v in kw.items() if k != "interleaved"})
    m.load_state_dict(ghost.state_dict(), strict=True)
    return m


def _slice(k, num_slices, n, interleaved):
    """The samples of slice k: k*n .. k*n + n - 1, or interleaved k, k + K, k + 2K, ..."""
    if interleaved:
        return torch.arange(k, num_slices * n, num_slices)
    return torch.arange(k * n, (k + 1) * n)


def _through_slices(fns, x, n, interleaved):
    """y with slice k of x through fns[k], put back in x's sample order."""
    idx = [_slice(k, len(fns), n, interleaved) for k in range(len(fns))]
    y = torch.cat([f(x[i]) for f, i in zip(fns, idx)])
    return y[torch.argsort(torch.cat(idx))]


def _per_slice_reference(slice_bns, x, n, g, interleaved=False):
    """Each slice through its own torch BN; loss sum(y * g). Returns y and dx."""
    x = x.clone().requires_grad_()
    y = _through_slices(slice_bns, x, n, interleaved)
    (y * g).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("ghost_cls,torch_cls,shape,n", KINDS)
@pytest.mark.parametrize(
    "kw",
    [
        {},                              # defaults
        {"momentum": None},              # cumulative running average
        {"momentum": 0.3, "eps": 1e-3},  # other constants
        {"affine": False},               # no weight/bias
        {"track_running_stats": False},  # batch statistics (per slice) in eval too
    ],
)
@pytest.mark.parametrize("interleaved", [False, True])  # consecutive / DistributedSampler slices
def test_equals_torch_bn_per_slice_over_several_steps(ghost_cls, torch_cls, shape, n, kw,
                                                      interleaved):
    k = shape[0] // n
    ghost, make = _setup(ghost_cls, torch_cls, shape[1], n, interleaved=interleaved, **kw)
    rank0 = make()  # slice 0's module: it keeps the running statistics, as rank 0 does
    for step in range(3):
        others = [make() for _ in range(k - 1)]  # the other ranks' BN, re-synced every step
        if rank0.running_mean is not None:  # DDP broadcasts rank 0's buffers before forward
            for m in others:
                m.load_state_dict(rank0.state_dict())
        x = off_centre(*shape, offset=step + 1.0)
        g = torch.randn(shape)
        y_ref, dx_ref = _per_slice_reference([rank0] + others, x, n, g, interleaved)
        xg = x.clone().requires_grad_()
        y = ghost(xg)
        (y * g).sum().backward()
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xg.grad, dx_ref, rtol=1e-4, atol=1e-4)
        if ghost.weight is not None:  # shared affine: the gradient sums over the slices
            for name in ("weight", "bias"):
                want = sum(getattr(m, name).grad for m in [rank0] + others)
                torch.testing.assert_close(getattr(ghost, name).grad, want, rtol=1e-4, atol=1e-4)
                getattr(ghost, name).grad = None
                for m in [rank0] + others:
                    getattr(m, name).grad = None
        for name, buf in rank0.named_buffers():
            torch.testing.assert_close(dict(ghost.named_buffers())[name], buf, rtol=1e-6, atol=1e-6)
    ghost.eval(), rank0.eval()
    x = off_centre(*shape, offset=-2.0)
    if rank0.running_mean is not None:  # eval: the running statistics, exactly BN
        torch.testing.assert_close(ghost(x), rank0(x), rtol=1e-5, atol=1e-5)
    else:  # no running statistics: batch statistics per slice, as each process would
        y_ref = _through_slices([make() for _ in range(k)], x, n, interleaved)
        torch.testing.assert_close(ghost(x), y_ref, rtol=1e-5, atol=1e-5)


def test_running_statistics_follow_slice_zero_only():
    """Slices with other statistics leave the running averages alone: they are slice 0's."""
    ghost = GhostBatchNorm2d(3, virtual_batch=2)
    x = off_centre(6, 3, 4, 4)
    x[2:] = x[2:] * 5 + 40  # slices 1 and 2 far from slice 0
    ghost(x)
    alone = nn.BatchNorm2d(3)
    alone(x[:2])
    torch.testing.assert_close(ghost.running_mean, alone.running_mean)
    torch.testing.assert_close(ghost.running_var, alone.running_var)
    whole = nn.BatchNorm2d(3)
    whole(x)
    assert (ghost.running_mean - whole.running_mean).abs().max() > 1.0


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_checkpoint_recompute_moves_the_buffers_as_torch_bn_on_slice_zero(interleaved, momentum):
    """Why: under non-reentrant torch.utils.checkpoint the recompute stops at the last tensor
    saved for backward. torch's BatchNorm (rank 0's module, on slice 0) updates its buffers
    inside its op, so the recompute moves them a second time; GhostBN copied slice 0's part
    back after its op, which the recompute never reached: buffers moved once, batches counted
    twice (with momentum=None the cumulative average then used the wrong weights)."""
    from torch.utils.checkpoint import checkpoint

    ghost, make = _setup(GhostBatchNorm2d, nn.BatchNorm2d, 3, 2, interleaved=interleaved,
                         momentum=momentum)
    rank0 = make()
    for step in range(2):
        x = off_centre(6, 3, 4, 4, offset=step + 1.0).requires_grad_()
        idx = _slice(0, 3, 2, interleaved)
        for module, inp in ((ghost, x), (rank0, x[idx])):  # the norm ends the segment
            checkpoint(module, inp, use_reentrant=False).square().sum().backward()
        for name, buf in rank0.named_buffers():
            torch.testing.assert_close(dict(ghost.named_buffers())[name], buf, rtol=1e-6,
                                       atol=1e-6)
    assert int(ghost.num_batches_tracked) == 4  # forward and recompute, as torch's


def test_one_slice_is_exactly_batchnorm():
    """virtual_batch == batch: one slice, the BN code path, bit for bit."""
    x = off_centre(4, 6, 5, 5)
    ghost, bn = GhostBatchNorm2d(6, virtual_batch=4), nlnn.BatchNorm2d(6)
    bn.load_state_dict(ghost.state_dict())
    assert torch.equal(ghost(x), bn(x))
    assert torch.equal(ghost.running_var, bn.running_var)


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(interleaved):
    x = off_centre(6, 2, 3, dtype=torch.float64).requires_grad_()
    ghost = GhostBatchNorm1d(2, virtual_batch=3, dtype=torch.float64, interleaved=interleaved)
    with torch.no_grad():
        ghost.weight.copy_(torch.tensor([0.7, 1.6], dtype=torch.float64))
        ghost.bias.copy_(torch.tensor([0.2, -0.5], dtype=torch.float64))
    assert torch.autograd.gradcheck(ghost, (x,))


@pytest.mark.parametrize("interleaved", [False, True])
def test_channels_last_kept(interleaved):
    x = off_centre(8, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    ghost = GhostBatchNorm2d(4, virtual_batch=2, interleaved=interleaved)
    with torch.no_grad():
        ghost.weight.copy_(torch.rand(4) + 0.5)
        ghost.bias.copy_(torch.randn(4))
    y = ghost(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    bn = [lambda s: nn.functional.batch_norm(s, None, None, ghost.weight, ghost.bias, True)] * 4
    torch.testing.assert_close(y, _through_slices(bn, x, 2, interleaved), rtol=1e-5, atol=1e-5)


def test_interleaved_slices_are_not_the_consecutive_ones():
    """The two slicings give different outputs on a batch whose consecutive halves differ, so
    the parametrized tests above tell them apart."""
    x = off_centre(8, 3, 4, 4)
    x[4:] = x[4:] * 3 + 10
    a = GhostBatchNorm2d(3, virtual_batch=4)(x)
    b = GhostBatchNorm2d(3, virtual_batch=4, interleaved=True)(x)
    assert (a - b).abs().max() > 0.5


def test_interleaved_is_a_bool_and_shown_in_repr():
    with pytest.raises(TypeError, match="interleaved must be a bool, got 'yes'"):
        GhostBatchNorm2d(3, virtual_batch=2, interleaved="yes")
    assert "interleaved=True" in repr(GhostBatchNorm2d(3, virtual_batch=2, interleaved=True))
    assert "interleaved" not in repr(GhostBatchNorm2d(3, virtual_batch=2))


def test_state_dict_is_batchnorms_and_isinstance():
    bn = nn.BatchNorm2d(5)
    bn(off_centre(4, 5, 3, 3))
    ghost = GhostBatchNorm2d(5, virtual_batch=2)
    ghost.load_state_dict(bn.state_dict(), strict=True)
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ghost.state_dict(), strict=True)
    assert list(ghost.state_dict()) == list(bn.state_dict())
    assert torch.equal(back.running_mean, bn.running_mean)
    assert isinstance(ghost, nn.BatchNorm2d) and isinstance(ghost, nlnn.BatchNorm2d)
    assert "virtual_batch=2" in repr(ghost)


@pytest.mark.parametrize(
    "build,needle",
    [(lambda: GhostBatchNorm2d(4, virtual_batch=0), "virtual_batch must be a positive int, got 0"),
     (lambda: GhostBatchNorm2d(4, virtual_batch=2.0), "got 2.0"),   # a float is not a count
     (lambda: GhostBatchNorm2d(4, virtual_batch=True), "got True")],  # nor a bool
)
def test_bad_virtual_batch(build, needle):
    with pytest.raises(ValueError, match=needle):
        build()


def test_batch_not_a_multiple_of_the_virtual_batch():
    with pytest.raises(ValueError, match=r"\(10 samples.*virtual_batch=4"):
        GhostBatchNorm2d(3, virtual_batch=4)(off_centre(10, 3, 2, 2))
    # eval with running statistics takes any batch
    assert GhostBatchNorm2d(3, virtual_batch=4).eval()(off_centre(10, 3, 2, 2)).shape[0] == 10


def test_one_value_per_slice_and_channel():
    with pytest.raises(ValueError, match="virtual_batch=1 gives 1 value"):
        GhostBatchNorm1d(3, virtual_batch=1)(off_centre(4, 3))


def test_factory_and_convert_norm_build_it():
    import normlab

    built = normlab.create_norm("ghostbn", 8, virtual_batch=2, dims=1)
    assert isinstance(built, GhostBatchNorm1d) and built.virtual_batch == 2
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.2), nn.ReLU())
    model[1](off_centre(2, 8, 4, 4))
    stats = model[1].running_mean.clone()
    converted = normlab.convert_norm(model, "ghostbn", virtual_batch=4)
    assert isinstance(converted[1], GhostBatchNorm2d) and converted[1].momentum == 0.2
    assert converted[1].virtual_batch == 4 and torch.equal(converted[1].running_mean, stats)


def test_fused_activation_per_slice():
    x = off_centre(8, 3, 4, 4)
    ghost = GhostBatchNorm2d(3, virtual_batch=4, activation="silu")
    ref = torch.cat([nn.functional.silu(nn.functional.batch_norm(
        x[i:i + 4], None, None, ghost.weight, ghost.bias, True)) for i in (0, 4)])
    torch.testing.assert_close(ghost(x), ref, rtol=1e-5, atol=1e-5)
    assert "activation='silu'" in repr(ghost)


def test_empty_batch_in_training_is_batchnorms():
    # (0, 3, 4, 4): no sample (a last, empty batch); was "num_groups must be >= 1, got 0"
    ghost, bn = GhostBatchNorm2d(3, virtual_batch=2), nn.BatchNorm2d(3)
    bn.load_state_dict(ghost.state_dict())
    x = off_centre(0, 3, 4, 4)
    y, want = ghost(x), bn(x)
    assert y.shape == want.shape == (0, 3, 4, 4)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[k], v, msg=k)
