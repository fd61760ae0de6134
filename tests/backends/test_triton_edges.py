"""Edge cases of the Triton backend reached through normlab's public entry points
(normlab.functional with ``backend="triton"``, normlab.nn modules under
``normlab.use_backend("triton")``), against torch.nn in float64.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py): shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import normlab  # noqa: E402
from normlab import functional as NF  # noqa: E402
from normlab.backends import BackendUnavailable  # noqa: E402
from versions import needs_triton_knobs  # noqa: E402
from formula import off_centre, rel_err  # noqa: E402

tn = pytest.importorskip("normlab.backends.triton_norm")

if not tn.BACKEND.available():
    pytest.skip("triton backend unavailable (no CUDA and TRITON_INTERPRET != 1)",
                allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("module,shape", [
    # BatchNorm2d in eval on an empty batch (N = 0)
    (torch.nn.BatchNorm2d, (0, 4, 3, 3)),
    # ... on an empty spatial dim (N > 0, H = 0)
    (torch.nn.BatchNorm2d, (2, 4, 0, 3)),
    # BatchNorm1d on features, empty batch: the 2-D input of the given-statistics path
    (torch.nn.BatchNorm1d, (0, 4)),
])
def test_eval_batchnorm_of_an_empty_input_is_empty(module, shape):
    """BatchNorm in eval (given statistics) of an empty input gives an empty output, as it does
    in training and as torch's: the triton backend refused it ("empty input") in eval only."""
    ours = getattr(normlab.nn, module.__name__)(4).to(DEVICE).eval()
    ref = module(4).double().eval()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.arange(1.0, 5.0))
            m.bias.copy_(torch.arange(4.0) - 1.5)
            m.running_mean.copy_(torch.arange(4.0) + 0.5)
            m.running_var.copy_(torch.arange(4.0) + 1.0)
    x = torch.randn(shape, device=DEVICE).requires_grad_()
    with normlab.use_backend("triton"):
        y = ours(x)
    y64 = ref(x.detach().cpu().double())
    assert y.shape == y64.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(ours.weight.grad.cpu(), torch.zeros(4))
    assert torch.equal(ours.bias.grad.cpu(), torch.zeros(4))


@pytest.mark.parametrize("shape", [
    (0, 3, 2, 2),  # InstanceNorm with running statistics (use_input_stats=False), N = 0
    (0, 3, 2, 1, 2, 2),  # 4 spatial dims, N = 0: was "cannot reshape ... into [0, 3, -1]"
])
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_given_statistics_of_an_empty_input_are_empty(shape, backend):
    x = torch.randn(shape, device=DEVICE)
    mean, var = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    y = NF.instance_norm(x, mean, var, use_input_stats=False, backend=backend)
    assert y.shape == x.shape
    y = NF.batch_norm(x, mean, var, training=False, backend=backend)
    assert y.shape == x.shape


def test_too_many_elements_per_sample_names_the_count():
    """The kernels' in-sample offsets are int32: 2**31 elements per sample are refused, and the
    error says how many there are (an expanded tensor: nothing is allocated)."""
    x = torch.empty(1, 1, 1, device=DEVICE).expand(2, 2**16, 2**15)  # exactly 2**31 per sample
    with pytest.raises(BackendUnavailable, match="2147483648 elements per sample"):
        NF.normalize(x, 1, False, backend="triton")


def test_interpreter_switched_on_after_import_is_a_clear_error(monkeypatch):
    """TRITON_INTERPRET=1 set after this module was imported: its kernels were built for the
    GPU (Triton decides at decoration), and a CPU launch failed deep in Triton ("0 active
    drivers"). The backend refuses CPU tensors then, saying when the variable must be set."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tn, "KERNELS_INTERPRETED", False)
    x = torch.randn(2, 4, 3)
    after = "TRITON_INTERPRET=1 was set after .*imported.*set it before"
    with pytest.raises(BackendUnavailable, match=after):
        NF.group_norm(x, 2, backend="triton")


@needs_triton_knobs
@pytest.mark.parametrize("value", ["1", "true", "TRUE", "On", "yes", "0", "false", "2", ""])
def test_interpreter_switch_is_read_as_triton_reads_it(monkeypatch, value):
    """normlab and Triton agree on whether $TRITON_INTERPRET asks for the interpreter: normlab
    read only "1", so TRITON_INTERPRET=true ran Triton's interpreter while normlab refused CPU
    tensors. The reference is Triton's own knob, read from the same environment."""
    import triton.knobs
    from normlab.backends import triton_interpreting

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreting() is bool(triton.knobs.runtime.interpret)


def test_given_statistics_that_require_grad_get_their_gradients():
    """Statistics computed by the caller (gathered across processes, a BatchRenorm correction)
    that require grad: the triton backend detached them, so their .grad stayed None while
    reference and native differentiate them. Reference: the formula in float64 by autograd."""
    gen = torch.Generator().manual_seed(0)
    x = off_centre(3, 4, 5).to(DEVICE).requires_grad_()
    mean = (torch.randn(4, generator=gen) + 3).to(DEVICE).requires_grad_()
    var = (torch.rand(4, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    w = (torch.rand(4, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    b = torch.randn(4, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(3, 4, 5, generator=gen).to(DEVICE)
    NF.normalize_fixed(x, mean, var, w, b, activation="silu", backend="triton").backward(dy)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, mean, var, w, b)]
    x64, m64, v64, w64, b64 = leaves
    chan = (1, 4, 1)
    z = (x64 - m64.view(chan)) / torch.sqrt(v64.view(chan) + 1e-5) * w64.view(chan) + b64.view(chan)
    torch.nn.functional.silu(z).backward(dy.cpu().double())
    for ours, ref in zip((x, mean, var, w, b), leaves):
        assert ours.grad is not None
        assert rel_err(ours.grad.cpu(), ref.grad) < 1e-5


# (3, 6, 4, 5): 3 samples to map over, 6 channels in 3 groups, odd spatial size;
# (3, 5, 8): 3 samples of 5 tokens with 8 features (LayerNorm's rows)
_FUNC_MODULES = {
    "groupnorm": (lambda: normlab.nn.GroupNorm(3, 6), (3, 6, 4, 5)),
    "batchnorm_eval": (lambda: normlab.nn.BatchNorm2d(6).eval(), (3, 6, 4, 5)),
    "layernorm": (lambda: normlab.nn.LayerNorm(8), (3, 5, 8)),
}
_FUNC_TRANSFORMS = {
    # per-sample outputs: x is a BatchedTensor
    "vmap": lambda m, x, t: torch.func.vmap(lambda xi: m(xi.unsqueeze(0)).squeeze(0))(x),
    # forward-mode AD of the input
    "jvp": lambda m, x, t: torch.func.jvp(m, (x,), (t,))[1],
    # gradient of the parameters only: x stays a plain tensor, the weight is wrapped
    "grad_params": lambda m, x, t: torch.func.grad(
        lambda p: (torch.func.functional_call(m, p, (x,)) * t).sum())(dict(m.named_parameters())),
}


@pytest.mark.parametrize("transform", list(_FUNC_TRANSFORMS))
@pytest.mark.parametrize("name", list(_FUNC_MODULES))
def test_torch_func_transforms_are_unsupported_not_a_functorch_error(name, transform):
    """Under a torch.func transform the triton backend's eager autograd.Functions (no
    setup_context) failed with functorch's RuntimeError, and since ``auto`` picks triton for
    every CUDA call, per-sample gradients (vmap(grad)) and jvp failed for every normlab module
    on a GPU. The backend now says it cannot run the call (auto moves on to native; named, it
    raises BackendUnavailable naming the transforms), whichever tensor the transform wraps."""
    make, shape = _FUNC_MODULES[name]
    m = make().to(DEVICE)
    with torch.no_grad():  # random affine and statistics, off the defaults
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
        for b in m.buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5)
    x = off_centre(*shape).to(DEVICE)
    t = torch.randn(shape).to(DEVICE)
    fn = _FUNC_TRANSFORMS[transform]
    with normlab.use_backend("triton"):
        with pytest.raises(BackendUnavailable, match="torch.func"):
            fn(m, x, t)
    # what auto asks before it takes triton: a reason under the transform, none outside
    c = x.shape[1]
    reasons = []
    torch.func.vmap(lambda xi: reasons.append(tn.BACKEND.unsupported_reason(xi, c, False, None))
                    or xi)(x)
    assert reasons and reasons[0] is not None and "torch.func" in reasons[0]
    assert tn.BACKEND.unsupported_reason(x, c, False, None) is None


@pytest.mark.parametrize("name", list(_FUNC_MODULES))
def test_forward_mode_ad_is_unsupported_not_a_missing_jvp(name):
    """Forward-mode AD with torch.autograd.forward_ad (dual tensors, no torch.func transform):
    the eager autograd.Functions have no jvp, so every normlab module on a GPU (auto picks
    triton) failed with "You must implement the jvp function", where torch.nn's modules give
    the tangent. Now the backend declines the call inside a dual_level (auto moves on; named,
    BackendUnavailable), and declines nothing once the level is closed."""
    import torch.autograd.forward_ad as fwAD

    make, shape = _FUNC_MODULES[name]
    m = make().to(DEVICE)
    x = off_centre(*shape).to(DEVICE)
    t = torch.randn(shape).to(DEVICE)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, t)
        with normlab.use_backend("triton"):
            with pytest.raises(BackendUnavailable, match="forward-mode AD"):
                m(dual)
        assert tn.BACKEND.unsupported_reason(x, x.shape[1], False, None) is not None
    assert tn.BACKEND.unsupported_reason(x, x.shape[1], False, None) is None
