"""BatchRenorm1d/2d against a float64 statement of Ioffe (2017), its schedule, and BN equivalences."""

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nlnn
from formula import off_centre, rel_err


def brn64(x, rm, rv, w, b, eps, r_max, d_max):
    """x_hat = (x - mu_B) / sigma_B * r + d, r and d clipped and without gradient."""
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mu = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, unbiased=False) + eps)
    sigma = torch.sqrt(rv.double() + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu - rm.double()) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - mu.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    return x_hat * w.double().reshape(shape) + b.double().reshape(shape)


@pytest.mark.parametrize(
    "cls,shape", [(nlnn.BatchRenorm2d, (6, 4, 3, 3)), (nlnn.BatchRenorm1d, (8, 4))]  # both dims
)
def test_matches_formula_with_active_limits(cls, shape):
    brn = cls(4, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0, momentum=0.1)
    with torch.no_grad():
        brn.weight.copy_(torch.rand(4) + 0.5)
        brn.bias.copy_(torch.randn(4))
        brn.running_mean.copy_(torch.randn(4))  # far from the batch: the clips engage
        brn.running_var.copy_(torch.rand(4) * 3 + 0.1)
    rm0, rv0 = brn.running_mean.clone(), brn.running_var.clone()
    x = off_centre(*shape)
    xa = x.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    y = brn(xa)
    expected = brn64(x64, rm0, rv0, brn.weight.detach(), brn.bias.detach(), brn.eps, 1.5, 0.5)
    assert rel_err(y, expected) < 1e-6
    g = torch.randn(shape)
    y.backward(g)
    expected.backward(g.double())
    assert rel_err(xa.grad, x64.grad) < 1e-5
    # running statistics moved by momentum towards the batch (unbiased variance)
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(brn.running_mean, 0.9 * rm0 + 0.1 * x.mean(dims), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(brn.running_var, 0.9 * rv0 + 0.1 * x.var(dims), rtol=1e-4, atol=1e-6)


def test_warmup_equals_batchnorm_and_eval_equals_bn_eval():
    brn = nlnn.BatchRenorm2d(5, momentum=0.1)  # step 1 is inside the warm-up: r = 1, d = 0
    bn = nn.BatchNorm2d(5, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5) + 0.5)
        bn.bias.copy_(torch.randn(5))
    brn.load_state_dict(bn.state_dict(), strict=True)
    x = off_centre(4, 5, 3, 3)
    torch.testing.assert_close(brn(x), bn(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(brn.running_var, bn.running_var)
    brn.eval(), bn.eval()
    x = off_centre(2, 5, 3, 3)
    torch.testing.assert_close(brn(x), bn(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls,shape", [(nlnn.BatchRenorm2d, (6, 4, 3, 3)),
                                       (nlnn.BatchRenorm1d, (8, 4))])  # both dims
def test_bias_false_as_batchnorm_and_converted_from_one(cls, shape):
    # BatchNorm's keyword bias=False (a weight without a shift): BatchRenorm had no such
    # argument, so convert_norm(model, "brn") gave a bias-free BN a trainable bias, and a
    # BN(bias=False) state_dict did not load strictly
    brn = cls(4, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0,
              momentum=0.1, bias=False)
    assert brn.bias is None and "bias=False" in repr(brn)
    with torch.no_grad():
        brn.weight.copy_(torch.rand(4) + 0.5)
        brn.running_mean.copy_(torch.randn(4))  # far from the batch: the clips engage
        brn.running_var.copy_(torch.rand(4) * 3 + 0.1)
    rm0, rv0 = brn.running_mean.clone(), brn.running_var.clone()
    x = off_centre(*shape)
    expected = brn64(x.double(), rm0, rv0, brn.weight.detach(), torch.zeros(4), brn.eps, 1.5, 0.5)
    assert rel_err(brn(x), expected) < 1e-6
    brn.reset_parameters()  # torch < 2.11's reset_parameters assumed a bias with affine
    bn = (nn.BatchNorm2d if cls is nlnn.BatchRenorm2d else nn.BatchNorm1d)(4)
    bn.register_parameter("bias", None)  # BatchNorm(4, bias=False) on every torch
    with torch.no_grad():
        bn.weight.copy_(torch.rand(4) + 0.5)
    brn.load_state_dict(bn.state_dict(), strict=True)
    torch.testing.assert_close(brn.eval()(x), bn.eval()(x), rtol=1e-6, atol=1e-6)
    converted = normlab.convert_norm(nn.Sequential(bn), "brn")[0]
    assert converted.bias is None and converted.state_dict().keys() == bn.state_dict().keys()


def test_schedule():
    brn = nlnn.BatchRenorm2d(2, r_max=3.0, d_max=5.0, warmup_steps=100, r_max_steps=500, d_max_steps=300)
    for step, r, d in [(0, 1.0, 0.0), (100, 1.0, 0.0), (300, 2.0, 5.0), (500, 3.0, 5.0), (10_000, 3.0, 5.0)]:
        brn.num_batches_tracked.fill_(step)
        r_max, d_max = brn.limits()
        assert r_max.item() == pytest.approx(r) and d_max.item() == pytest.approx(d), step


def test_errors():
    with pytest.raises(ValueError, match="r_max must be >= 1, got 0.5"):
        nlnn.BatchRenorm2d(4, r_max=0.5)
    with pytest.raises(ValueError, match="d_max must be >= 0, got -1"):
        nlnn.BatchRenorm2d(4, d_max=-1)
    with pytest.raises(ValueError, match="expected 4D input"):
        nlnn.BatchRenorm2d(4)(torch.randn(2, 4))


@pytest.mark.parametrize("backend", ["reference", "native"])  # native: ATen hands back stats
@pytest.mark.parametrize("dtype,tol", [
    (torch.bfloat16, 1e-2),  # 8-bit mantissa: statistics of this precision move r, d, running stats
    (torch.float16, 2e-3),   # 11-bit mantissa, the other half type
])
def test_half_input_keeps_float32_statistics(backend, dtype, tol):
    # r, d and the running statistics are built from the batch mean and rstd: those must be the
    # float32-accumulated values, not values rounded to the input's half type (which would put a
    # ~1e-3 relative error on the running statistics of every step)
    import normlab

    brn = nlnn.BatchRenorm2d(4, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0,
                             d_max_steps=0, momentum=0.1)
    with torch.no_grad():
        brn.weight.copy_(torch.rand(4) + 0.5)
        brn.bias.copy_(torch.randn(4))
        brn.running_mean.copy_(torch.randn(4) + 3.0)
        brn.running_var.copy_(torch.rand(4) * 6 + 0.5)
    rm0, rv0 = brn.running_mean.clone(), brn.running_var.clone()
    x = off_centre(8, 4, 5, 5).to(dtype)
    xa = x.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    with normlab.use_backend(backend):
        y = brn(xa)
    assert y.dtype == dtype
    expected = brn64(x64, rm0, rv0, brn.weight.detach(), brn.bias.detach(), brn.eps, 1.5, 0.5)
    assert rel_err(y, expected) < tol
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    y.backward(g)
    expected.backward(g.double())
    assert rel_err(xa.grad, x64.grad) < 4 * tol
    assert brn.running_mean.dtype == torch.float32 and brn.running_var.dtype == torch.float32
    x64 = x64.detach()
    mean64, var64 = x64.mean((0, 2, 3)), x64.var((0, 2, 3))
    assert rel_err(brn.running_mean, 0.9 * rm0.double() + 0.1 * mean64) < 1e-6
    assert rel_err(brn.running_var, 0.9 * rv0.double() + 0.1 * var64) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clip", [False, True])  # False: the warm-up (r = 1, d = 0), BatchNorm
def test_half_input_to_a_float32_module_is_rounded_once(backend, dtype, clip):
    # a float32 module on half input (a bf16 forward of a float32 model): x_hat * (r * gamma) +
    # (d * gamma + beta) in float32, rounded once to the half type, as torch's BatchNorm2d does
    # in that setting (within half a unit in the last place). x_hat rounded to the half type
    # and the float32 scale and shift rounded to it before the affine were 58-260 units off
    # where the bias cancels (y near 0)
    import normlab

    torch.manual_seed(0)
    kw = dict(r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0) if clip else {}
    brn = nlnn.BatchRenorm2d(6, momentum=0.1, **kw)
    with torch.no_grad():
        brn.weight.copy_(torch.rand(6) * 3 + 0.5)
        brn.bias.copy_(torch.randn(6) * 3)
        brn.running_mean.copy_(torch.randn(6) + 3.0)
        brn.running_var.copy_(torch.rand(6) * 4 + 0.5)
    rm0, rv0 = brn.running_mean.clone(), brn.running_var.clone()
    x = off_centre(8, 6, 4, 4).to(dtype)
    with normlab.use_backend(backend):
        y = brn(x)
    assert y.dtype == dtype
    r_max, d_max = (1.5, 0.5) if clip else (1.0, 0.0)
    expected = brn64(x.double(), rm0, rv0, brn.weight.detach(), brn.bias.detach(), brn.eps,
                     r_max, d_max)
    ulp = torch.finfo(dtype).eps * expected.abs() + 1e-5  # (+ float32's error at y ~ 0)
    assert ((y.double() - expected).abs() <= ulp).all()


@pytest.mark.parametrize("momentum", [0.1, None])  # None: the cumulative average divides by steps
def test_empty_batch_leaves_running_statistics(momentum):
    # as torch's BatchNorm: a batch of zero samples (a detector's empty proposal set) gives an
    # empty output and counts the step, but has no statistics to move the running ones with
    brn = nlnn.BatchRenorm2d(3, momentum=momentum, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    with torch.no_grad():
        brn.running_mean.copy_(torch.randn(3))
        brn.running_var.copy_(torch.rand(3) + 0.5)
    rm0, rv0 = brn.running_mean.clone(), brn.running_var.clone()
    bn = nn.BatchNorm2d(3, momentum=momentum)
    x = torch.randn(0, 3, 4, 4)
    y = brn(x)
    assert y.shape == x.shape and bn(x).shape == x.shape
    assert torch.equal(brn.running_mean, rm0) and torch.equal(brn.running_var, rv0)
    assert brn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 1


def test_float64_module_clips_at_float64_bounds():
    # a float64 module must clip r and d at the float64 values of r_max and d_max: 1.3 and 0.3
    # are not float32 numbers, and bounds rounded to float32 put a ~1e-8 relative error on the
    # output where a clip engages (float64 agrees to ~1e-16 otherwise)
    torch.manual_seed(0)
    brn = nlnn.BatchRenorm2d(3, r_max=1.3, d_max=0.3, warmup_steps=0, r_max_steps=0,
                             d_max_steps=0, momentum=0.1, dtype=torch.float64)
    with torch.no_grad():
        brn.weight.copy_(torch.rand(3) + 0.5)
        brn.bias.copy_(torch.randn(3))
        brn.running_mean.copy_(torch.tensor([4.0, -1.0, 0.5]))  # far from the batch: d clips
        brn.running_var.copy_(torch.tensor([0.2, 30.0, 4.0]))   # r clips above and below
    rm0, rv0 = brn.running_mean.clone(), brn.running_var.clone()
    x = off_centre(4, 3, 3, 3, dtype=torch.float64)  # N*H*W = 36 values per channel
    y = brn(x)
    expected = brn64(x, rm0, rv0, brn.weight.detach(), brn.bias.detach(), brn.eps, 1.3, 0.3)
    sigma = torch.sqrt(rv0 + brn.eps)
    r = torch.sqrt(x.var((0, 2, 3), unbiased=False) + brn.eps) / sigma
    d = (x.mean((0, 2, 3)) - rm0) / sigma
    assert (r > 1.3).any() and (r < 1 / 1.3).any() and (d.abs() > 0.3).any()  # clips engage
    assert rel_err(y, expected) < 1e-12
    # mid-ramp limits too: step 3 of a ramp from step 1 to step 7 is 1/3 of the way
    ramped = nlnn.BatchRenorm2d(3, r_max=1.3, d_max=0.3, warmup_steps=1, r_max_steps=7,
                                d_max_steps=7, dtype=torch.float64)
    ramped.num_batches_tracked.fill_(3)
    r_max, d_max = ramped.limits()
    assert r_max.item() == pytest.approx(1 + 0.3 / 3, rel=1e-15)
    assert d_max.item() == pytest.approx(0.3 / 3, rel=1e-15)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_running_var_of_a_small_variance_channel_is_the_batch_variance(backend):
    # activations of scale 1e-4 (variance 1e-8, far below eps = 1e-5): the running variance
    # must be the unbiased batch variance as BatchNorm stores it, not sigma_B^2 - eps rebuilt
    # from the float32 rstd, which cancels to a ~1e-4 relative error there
    import normlab

    brn = nlnn.BatchRenorm2d(4, momentum=1.0, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    x = off_centre(8, 4, 5, 5, scale=1e-4, offset=3e-4)  # 200 values per channel
    with normlab.use_backend(backend):
        brn(x)
    x64 = x.double()
    assert rel_err(brn.running_var, x64.var((0, 2, 3))) < 1e-6
    assert rel_err(brn.running_mean, x64.mean((0, 2, 3))) < 1e-6


@pytest.mark.parametrize("train", [True, False])
def test_without_running_statistics_the_error_says_why(train):
    # torch.func.replace_all_batch_norm_modules_ (functorch's vmap recipe) sets every
    # BatchNorm's buffers to None; Batch Renorm cannot run without them (was
    # "'NoneType' object has no attribute 'clone'" in training, a normalize_fixed error in eval)
    from torch.func import replace_all_batch_norm_modules_

    model = nn.Sequential(nlnn.BatchRenorm2d(4)).train(train)
    replace_all_batch_norm_modules_(model)
    with pytest.raises(RuntimeError, match=r"BatchRenorm2d needs its running statistics.*"
                       r"running_mean and running_var are None"):
        model(off_centre(2, 4, 3, 3))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_gradients_are_those_of_the_forward(use_reentrant):
    """Why: torch.utils.checkpoint recomputes the forward during backward, after the buffers
    (and the step of the limits' schedule) have moved. r and d taken from them again made
    gradients of another function than the forward output (0.02 off on the weight here);
    torch's BatchNorm gives the same gradients with and without checkpointing. The buffers
    still move on the recompute too, as torch's BatchNorm's do."""
    from torch.utils.checkpoint import checkpoint

    def run(ckpt):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nlnn.BatchRenorm2d(
            4, momentum=0.3, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0,
            d_max_steps=0), nn.Conv2d(4, 4, 1))
        with torch.no_grad():
            model[1].running_mean.fill_(0.5)
            model[1].running_var.fill_(2.0)
        x = off_centre(6, 3, 4, 4, offset=1.0).requires_grad_()
        y = checkpoint(model, x, use_reentrant=use_reentrant) if ckpt else model(x)
        y.square().mean().backward()
        return [x.grad] + [p.grad for p in model.parameters()], model[1]

    want, plain = run(False)
    got, ckpt = run(True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert int(ckpt.num_batches_tracked) == 2 and int(plain.num_batches_tracked) == 1


def test_the_repr_reads_as_a_call_that_builds_the_same_layer():
    # it named track_running_stats=True, which the constructor does not take (a TypeError when
    # the repr was pasted back as code)
    brn = nlnn.BatchRenorm2d(6, eps=1e-3, momentum=0.05, r_max=2.0, d_max=1.5, warmup_steps=10,
                        r_max_steps=20, d_max_steps=30, bias=False)
    again = eval(repr(brn), {"BatchRenorm2d": nlnn.BatchRenorm2d})
    assert repr(again) == repr(brn)
    assert (again.eps, again.momentum, again.r_max, again.d_max, again.warmup_steps,
            again.r_max_steps, again.d_max_steps, again.bias) == (1e-3, 0.05, 2.0, 1.5, 10, 20,
                                                                   30, None)
