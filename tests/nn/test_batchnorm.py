"""normlab.nn.BatchNorm1d/2d/3d against torch.nn: outputs, gradients, running statistics over several
steps, momentum=None, track_running_stats=False, eval, state_dict round trips, layouts, errors."""

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from formula import assert_same_param_grads, compare_step, off_centre, rel_err

# (normlab class, torch class, input shape)
KINDS = [
    (nlnn.BatchNorm1d, nn.BatchNorm1d, (6, 5)),          # (N, C): features only
    (nlnn.BatchNorm1d, nn.BatchNorm1d, (4, 5, 7)),       # (N, C, L)
    (nlnn.BatchNorm2d, nn.BatchNorm2d, (4, 5, 6, 3)),    # images, odd sizes
    (nlnn.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 4, 2)), # volumes
]


def _pair(ours_cls, torch_cls, c, **kw):
    theirs = torch_cls(c, **kw)
    ours = ours_cls(c, **kw)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.copy_(torch.rand(c) + 0.5)
            theirs.bias.copy_(torch.randn(c))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("ours_cls,torch_cls,shape", KINDS)
@pytest.mark.parametrize(
    "kw",
    [
        {},                                # defaults
        {"momentum": None},                # cumulative moving average
        {"momentum": 0.3, "eps": 1e-3},    # other constants
        {"affine": False},                 # no weight/bias
        {"track_running_stats": False},    # batch statistics in eval too
    ],
)
def test_matches_torch_over_several_steps(backend, ours_cls, torch_cls, shape, kw):
    import normlab

    ours, theirs = _pair(ours_cls, torch_cls, shape[1], **kw)
    with normlab.use_backend(backend):
        for step in range(3):
            compare_step(ours, theirs, off_centre(*shape, offset=step + 1.0))
        assert_same_param_grads(ours, theirs)
        for name, buf in theirs.named_buffers():
            torch.testing.assert_close(dict(ours.named_buffers())[name], buf, rtol=1e-5, atol=1e-6)
        ours.eval(), theirs.eval()
        x = off_centre(*shape, offset=-2.0)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        if theirs.num_batches_tracked is not None:
            assert int(ours.num_batches_tracked) == 3


def test_state_dict_round_trip_and_isinstance():
    theirs = nn.BatchNorm2d(8)
    theirs.train()
    theirs(off_centre(4, 8, 3, 3))
    ours = nlnn.BatchNorm2d(8)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = nn.BatchNorm2d(8)
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert isinstance(ours, nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_channels_last_and_bf16(dtype):
    ours, theirs = _pair(nlnn.BatchNorm2d, nn.BatchNorm2d, 6)
    x = off_centre(4, 6, 5, 5, dtype=dtype).to(memory_format=torch.channels_last)
    y = ours(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, theirs(x.float())) < (1e-2 if dtype == torch.bfloat16 else 1e-6)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-2, atol=1e-2)


def test_errors():
    bn = nlnn.BatchNorm2d(4)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bn(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"expects 4 channels.*got input of shape \(2, 3, 5, 5\)"):
        bn(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 4, 1, 1\)"):
        bn(torch.randn(1, 4, 1, 1))
    with pytest.raises(TypeError, match="floating-point"):
        bn(torch.ones(2, 4, 3, 3, dtype=torch.int32))
    bn.eval()  # one value per channel is fine in eval (running statistics)
    assert torch.isfinite(bn(torch.randn(1, 4, 1, 1))).all()


@pytest.mark.parametrize("activation,fn", [("relu", torch.relu), ("silu", torch.nn.functional.silu),
                                           ("gelu", torch.nn.functional.gelu)])
@pytest.mark.parametrize(
    "ours,theirs,shape",
    # a batch-statistics norm (training), a per-sample one and a fixed one (eval statistics):
    # the activation follows each kind of affine
    [(lambda **kw: nlnn.BatchNorm2d(5, **kw), lambda: nn.BatchNorm2d(5), (4, 5, 3, 3)),
     (lambda **kw: nlnn.InstanceNorm2d(5, affine=True, **kw),
      lambda: nn.InstanceNorm2d(5, affine=True), (2, 5, 4, 4)),
     (lambda **kw: nlnn.FrozenBatchNorm2d(5, **kw), lambda: nn.BatchNorm2d(5).eval(), (2, 5, 3, 3))],
)
def test_fused_activation_is_torch_norm_then_activation(activation, fn, ours, theirs, shape):
    # what timm's BatchNormAct2d computes (issue 13 item 1): the activation after the affine
    m, t = ours(activation=activation), theirs()
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.normal_()
        m.weight.copy_(t.weight)
        m.bias.copy_(t.bias)
    x = off_centre(*shape)
    torch.testing.assert_close(m(x), fn(t(x)), atol=1e-5, rtol=1e-5)
    assert f"activation={activation!r}" in repr(m)


@pytest.mark.parametrize("cls", [nlnn.BatchNorm2d, nlnn.InstanceNorm2d, nlnn.SyncBatchNorm])
@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_is_checked_at_construction(cls, eps):
    # a deliberate difference (normlab.nn docstring): torch builds these and divides by
    # sqrt(var + eps) <= sqrt(var); normlab's operator needs eps > 0 and now says so when the
    # module is built, as its GroupNorm and LayerNorm did, not at the first forward
    getattr(nn, cls.__name__)(4, eps=eps)
    with pytest.raises(ValueError, match=f"eps must be a positive finite number, got {eps}"):
        cls(4, eps=eps)


@pytest.mark.parametrize(
    "make,slice0",
    [(lambda: nlnn.BatchNorm2d(4), False),
     (lambda: nlnn.SyncBatchNorm(4), False),            # one process: BN of its own batch
     (lambda: nlnn.BatchRenorm2d(4), False),            # renorm's r, d touch y, not the stats
     (lambda: nlnn.GhostBatchNorm2d(4, virtual_batch=3), True)],  # follows slice 0 (docstring)
)
def test_update_bn_recomputes_the_population_statistics(make, slice0):
    """torch.optim.swa_utils.update_bn (the equal-weight re-estimate docs/choosing.md points to,
    PreciseBN of Wu & Johnson 2021) resets the buffers, runs the batches with momentum None and
    restores the momentum: the running stats are torch BN's through the same procedure."""
    batches = [off_centre(6, 4, 3, 5) for _ in range(4)]  # 4 batches: 6 images = 2 slices of 3
    ours, ref = nn.Sequential(make()), nn.Sequential(nn.BatchNorm2d(4))
    momentum = ours[0].momentum
    torch.optim.swa_utils.update_bn(batches, ours)
    torch.optim.swa_utils.update_bn([b[:3] for b in batches] if slice0 else batches, ref)
    torch.testing.assert_close(ours[0].running_mean, ref[0].running_mean)
    torch.testing.assert_close(ours[0].running_var, ref[0].running_var)
    assert ours[0].momentum == momentum and int(ours[0].num_batches_tracked) == 4


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("kind", ["bn", "in"])
def test_checkpoint_recompute_moves_the_buffers_as_torch_does(backend, kind):
    # non-reentrant torch.utils.checkpoint recomputes up to the last tensor saved for backward:
    # torch's BatchNorm moves its buffers again there, its InstanceNorm does not. The reference
    # backend updated BN's buffers after its saved tensors: once, while counting the batch twice
    from torch.utils.checkpoint import checkpoint

    import normlab

    make = {"bn": (lambda lib: lib.BatchNorm2d(3, momentum=None)),  # cumulative: weights count
            "in": (lambda lib: lib.InstanceNorm2d(3, affine=True, track_running_stats=True))}[kind]
    ours, theirs = make(nlnn), make(nn)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(3) + 0.5)
        theirs.bias.copy_(torch.randn(3))
    ours.load_state_dict(theirs.state_dict())
    for step in range(2):  # (4, 3, 5, 5), off-centre: each step's statistics differ
        x = off_centre(4, 3, 5, 5, offset=step + 1.0)
        with normlab.use_backend(backend):
            checkpoint(ours, x.clone().requires_grad_(), use_reentrant=False).square().sum().backward()
        checkpoint(theirs, x.clone().requires_grad_(), use_reentrant=False).square().sum().backward()
        for name, buf in theirs.named_buffers():
            torch.testing.assert_close(dict(ours.named_buffers())[name], buf, msg=name)
