"""BatchRenorm1d/2d against a float64 statement of Ioffe (2017), its schedule, and BN equivalences."""

import pytest
import torch
from torch import nn

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
    "cls,shape", [(nlnn.BatchRenorm2d, (6, 4, 3, 3)), (nlnn.BatchRenorm1d, (8, 4))]
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
