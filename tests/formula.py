"""An independent float64 statement of the operator, written from REFERENCE section 1 with an
explicit loop over groups (unlike the reference backend's reshape), used as ground truth."""

import torch
import torch.nn.functional as F


def normalize64(x, num_groups, over_batch, weight=None, bias=None, eps=1e-5, activation=None):
    """y_i = act(gamma_c * (x_i - mu_i) / sqrt(var_i + eps) + beta_c), statistics over S_i."""
    x = x.detach().to(torch.float64)
    n, c = x.shape[:2]
    cpg = c // num_groups
    y = torch.empty_like(x)
    reduce_dims = tuple(range(x.dim())) if over_batch else tuple(range(1, x.dim()))
    for g in range(num_groups):
        part = x[:, g * cpg : (g + 1) * cpg]
        mu = part.mean(dim=reduce_dims, keepdim=True)
        var = ((part - mu) ** 2).mean(dim=reduce_dims, keepdim=True)
        y[:, g * cpg : (g + 1) * cpg] = (part - mu) / torch.sqrt(var + eps)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.detach().to(torch.float64).reshape(shape)
    if bias is not None:
        y = y + bias.detach().to(torch.float64).reshape(shape)
    if activation == "relu":
        y = F.relu(y)
    elif activation == "silu":
        y = F.silu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    return y


def off_centre(*shape, dtype=torch.float32, scale=2.0, offset=3.0):
    """Random data that is neither centred nor unit-scale, with per-channel differences."""
    x = torch.randn(*shape, dtype=torch.float64) * scale + offset
    if len(shape) >= 2:
        ch = torch.randn(shape[1], dtype=torch.float64).reshape((1, -1) + (1,) * (len(shape) - 2))
        x = x + ch
    return x.to(dtype)


def rel_err(a, b):
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare_step(ours, theirs, x, rtol=1e-5, atol=1e-5):
    """One forward and backward of two modules on the same input and output gradient: outputs and
    input gradients must agree (parameter gradients accumulate for the caller to compare)."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, rtol=rtol, atol=atol)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=10 * rtol, atol=atol)


def assert_same_param_grads(ours, theirs, rtol=1e-4, atol=1e-5):
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)
