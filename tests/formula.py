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


# --------------------------------------------------------------------------------------------
# REFERENCE section 7: normalizations whose statistics are not (only) the centred ones.
# Each written from its paper's formula with explicit loops, in float64, differentiable (for
# gradcheck against the modules): inputs are converted, not detached.
# --------------------------------------------------------------------------------------------


def _f64(t):
    return None if t is None else t.to(torch.float64)


def _chan(t, ndim):
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def rms_norm64(x, normalized_shape, weight=None, eps=None):
    """Zhang & Sennrich 2019, eq. 4: x / sqrt(mean(x^2) + eps) * g over the trailing dims;
    eps None = machine epsilon of x's dtype."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    x = _f64(x)
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    m = 1
    for d in dims:
        m *= x.shape[d]
    ms = (x * x).sum(dim=dims, keepdim=True) / m
    y = x / torch.sqrt(ms + eps)
    return y if weight is None else y * _f64(weight)


def _per_group64(x, num_groups, normalize_part, weight, bias):
    """Each sample's group of channels through ``normalize_part(part, dims)``, then the
    per-channel affine; float64, differentiable."""
    x = _f64(x)
    cpg = x.shape[1] // num_groups
    dims = tuple(range(1, x.dim()))
    y = torch.cat([normalize_part(x[:, g * cpg : (g + 1) * cpg], dims)
                   for g in range(num_groups)], dim=1)
    if weight is not None:
        y = y * _chan(_f64(weight), x.dim())
    if bias is not None:
        y = y + _chan(_f64(bias), x.dim())
    return y


def uncentred64(x, num_groups, weight=None, bias=None, eps=1e-5):
    """The operator with center=False, not over the batch: per sample and group,
    y = gamma_c * x / sqrt(mean(x^2) + eps) + beta_c (loop over groups)."""
    return _per_group64(
        x, num_groups,
        lambda part, dims: part / torch.sqrt((part * part).mean(dim=dims, keepdim=True) + eps),
        weight, bias)


def frn64(x, weight, bias, tau=None, eps=1e-6):
    """Singh & Krishnan 2020, eqs. 1-3: nu2 = sum_{h,w} x^2 / (H W) per (n, c);
    y = gamma x / sqrt(nu2 + eps) + beta; z = max(y, tau)."""
    x = _f64(x)
    hw = x.shape[2] * x.shape[3]
    nu2 = (x * x).sum(dim=(2, 3), keepdim=True) / hw
    y = _chan(_f64(weight), 4) * x / torch.sqrt(nu2 + eps) + _chan(_f64(bias), 4)
    return y if tau is None else torch.maximum(y, _chan(_f64(tau), 4))


def _var(part, dims):
    """Biased variance over dims, two passes."""
    mu = part.mean(dim=dims, keepdim=True)
    return ((part - mu) ** 2).mean(dim=dims, keepdim=True)


def evonorm_s0_64(x, weight, bias, v, num_groups, eps=1e-5):
    """Liu et al. 2020, Table 1, EvoNorm-S0: x * sigmoid(v x) / sqrt(s2_{w,h,c/g}(x) + eps) *
    gamma + beta (group variance per sample, loop over groups)."""
    x = _f64(x)
    c = x.shape[1]
    cpg = c // num_groups
    std = torch.cat(
        [torch.sqrt(_var(x[:, g * cpg : (g + 1) * cpg], (1, 2, 3)) + eps).expand(-1, cpg, -1, -1)
         for g in range(num_groups)], dim=1)
    vx = _chan(_f64(v), 4) * x
    return x * torch.sigmoid(vx) / std * _chan(_f64(weight), 4) + _chan(_f64(bias), 4)


def evonorm_b0_64(x, weight, bias, v, eps=1e-5, running_var=None):
    """Liu et al. 2020, Table 1, EvoNorm-B0: x / max(sqrt(s2_{b,w,h}(x) + eps),
    v x + sqrt(s2_{w,h}(x) + eps)) * gamma + beta; with running_var given (eval mode) it takes
    the place of the batch variance s2_{b,w,h}."""
    x = _f64(x)
    batch_var = _var(x, (0, 2, 3)) if running_var is None else _chan(_f64(running_var), 4)
    inst_std = torch.sqrt(_var(x, (2, 3)) + eps)
    denom = torch.maximum(torch.sqrt(batch_var + eps), _chan(_f64(v), 4) * x + inst_std)
    return x / denom * _chan(_f64(weight), 4) + _chan(_f64(bias), 4)


def group_norm64(x, num_groups, weight=None, bias=None, eps=1e-5):
    """The operator not over the batch (GN; IN with G = C; LN with G = 1), differentiable in
    float64 for gradient references: per sample and group, centred two-pass statistics."""
    def centred(part, dims):
        mu = part.mean(dim=dims, keepdim=True)
        var = ((part - mu) ** 2).mean(dim=dims, keepdim=True)
        return (part - mu) / torch.sqrt(var + eps)
    return _per_group64(x, num_groups, centred, weight, bias)
