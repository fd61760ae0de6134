"""The operator (normlab.functional.normalize) and its torch-signature wrappers, on the reference and
native backends, against the float64 formula (tests/formula.py) and torch.nn.functional."""

import contextlib
import math
import re

import pytest
import torch
import torch.nn.functional as F

import normlab
import normlab.nn as nlnn
from normlab import functional as NF
from normlab.backends import BackendUnavailable, register_backend, _INSTANCES
from formula import group_norm64, normalize64, off_centre, rel_err

BACKENDS = ["reference", "native"]

# (shape, num_groups, over_batch): every method, 0-3 spatial dims
CASES = [
    ((6, 8), 8, True),            # BN on (N, C): no spatial dims
    ((4, 6, 10), 6, True),        # BN1d with length
    ((3, 8, 5, 7), 8, True),      # BN2d, odd spatial sizes
    ((2, 4, 3, 4, 5), 4, True),   # BN3d
    ((3, 12, 5, 6), 4, True),     # batch-group norm: over_batch with 1 < G < C
    ((5, 12), 1, False),          # LN over features of a 2-D input
    ((3, 8, 6, 5), 1, False),     # LN conv form (C and spatial), G = 1
    ((3, 8, 6, 5), 8, False),     # IN, G = C
    ((2, 12, 4, 5), 3, False),    # GN, 4 channels per group
    ((2, 6, 9), 2, False),        # GN on 1 spatial dim
    ((2, 8, 3, 4, 3), 4, False),  # GN on 3 spatial dims
    ((1, 10, 7, 3), 5, False),    # batch of one, odd C/G = 2
]


def _affine(c, dtype=torch.float32):
    return torch.randn(c, dtype=dtype) * 0.5 + 1.0, torch.randn(c, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups,over_batch", CASES)
def test_matches_float64_formula(backend, shape, groups, over_batch):
    x = off_centre(*shape, dtype=torch.float64)
    w, b = _affine(shape[1], torch.float64)
    y = NF.normalize(x, groups, over_batch, w, b, eps=1e-5, backend=backend)
    expected = normalize64(x, groups, over_batch, w, b, 1e-5)
    assert y.dtype == torch.float64 and y.shape == x.shape
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups,over_batch", CASES)
def test_float32_close_to_formula(backend, shape, groups, over_batch):
    x = off_centre(*shape)
    w, b = _affine(shape[1])
    y = NF.normalize(x, groups, over_batch, w, b, backend=backend)
    assert y.dtype == torch.float32
    assert rel_err(y, normalize64(x, groups, over_batch, w, b)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups,over_batch", [CASES[2], CASES[4], CASES[6], CASES[8]])
def test_half_precision_accumulates_in_float32(backend, dtype, shape, groups, over_batch):
    x = off_centre(*shape, dtype=dtype)
    w, b = _affine(shape[1])
    y, mean, rstd = NF.normalize(x, groups, over_batch, w, b, backend=backend, return_stats=True)
    assert y.dtype == dtype
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    # the only error left is the final rounding to the half type (~2^-8 for bf16)
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    assert rel_err(y, normalize64(x, groups, over_batch, w, b)) < tol


# Normalized-output error allowed at mean 1e4, std 0.1. The reference (and the Triton kernels)
# sum shifted data and reach ~1e-6. ATen's CPU kernels (native) subtract a float32 mean that
# cannot be stored closer than ~5e-4 to the truth at 1e4, i.e. 5e-3 of a standard deviation:
# that is float32's limit for their method, and still usable.
LARGE_OFFSET_TOL = {"reference": 1e-4, "native": 0.05}
LARGE_OFFSET_RSTD_TOL = {"reference": 1e-4, "native": 5e-3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "groups,over_batch", [(16, True), (4, True), (1, False), (4, False), (16, False)]
)
def test_large_offset_is_stable(backend, groups, over_batch):
    # mean 1e4, std 0.1: E[x^2] - E[x]^2 loses every digit here (its variance comes out negative
    # or 0); the float64 formula on the same float32 values is the truth.
    x = 1e4 + 0.1 * torch.randn(4, 16, 12, 12)
    y, mean, rstd = NF.normalize(x, groups, over_batch, backend=backend, return_stats=True)
    x64 = x.double()
    expected = normalize64(x64, groups, over_batch)
    assert (y.double() - expected).abs().max().item() < LARGE_OFFSET_TOL[backend]
    dims = (0, 2) if over_batch else (2,)
    true_var = x64.reshape(4, groups, -1).var(dim=dims, unbiased=False)
    torch.testing.assert_close(
        rstd.double().reshape(true_var.shape), torch.rsqrt(true_var + 1e-5),
        rtol=LARGE_OFFSET_RSTD_TOL[backend], atol=0,
    )
    naive = (x.reshape(4, groups, -1) ** 2).mean(dims) - x.reshape(4, groups, -1).mean(dims) ** 2
    assert not torch.allclose(naive.double(), true_var, rtol=0.5)  # the trap is real


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_fused_activation(backend, activation):
    x = off_centre(3, 8, 5, 5)
    w, b = _affine(8)
    y = NF.normalize(x, 4, False, w, b, activation=activation, backend=backend)
    expected = normalize64(x, 4, False, w, b, activation=activation)
    assert rel_err(y, expected) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "layout",
    [
        "channels_last",     # 4-D NHWC strides must be kept in the output
        "channels_last_3d",  # 5-D NDHWC
        "transposed",        # neither layout: a permuted view
        "sliced",            # a strided slice of a larger tensor
    ],
)
def test_memory_formats(backend, layout):
    if layout == "channels_last":
        x = off_centre(3, 8, 5, 6).to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = off_centre(2, 8, 3, 4, 5).to(memory_format=torch.channels_last_3d)
    elif layout == "transposed":
        x = off_centre(3, 5, 8, 6).transpose(1, 2)
    else:
        x = off_centre(3, 16, 6, 6)[:, ::2]
    w, b = _affine(8)
    for groups, over_batch in ((4, False), (8, True), (2, True)):
        y = NF.normalize(x, groups, over_batch, w, b, backend=backend)
        assert rel_err(y, normalize64(x, groups, over_batch, w, b)) < 1e-5
        if layout.startswith("channels_last"):
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert y.is_contiguous(memory_format=fmt), (groups, over_batch)
        else:
            assert y.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("params", ["strided", "expanded"])
@pytest.mark.parametrize(
    "shape,groups,dtype,cl",
    [
        ((2, 6, 3, 4), 3, torch.float32, False),  # GN
        ((2, 6, 3, 4), 6, torch.float32, True),   # IN, channels_last
        ((3, 6), 1, torch.bfloat16, False),       # LN over features of half input (GN kernel)
    ],
)
def test_strided_and_expanded_parameters(backend, params, shape, groups, dtype, cl):
    # weight/bias that are views (every other element of a buffer, one value expanded over C):
    # native handed them to ATen's group-norm kernel, which reads them as dense vectors
    c = shape[1]
    if params == "strided":
        w = (torch.randn(2 * c) * 0.5 + 1).to(dtype)[::2].requires_grad_()
        b = torch.randn(2 * c).to(dtype)[1::2].requires_grad_()
    else:
        w = (torch.rand(1) + 0.5).to(dtype).expand(c).requires_grad_()
        b = torch.randn(1).to(dtype).expand(c).requires_grad_()
    x = off_centre(*shape).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = NF.normalize(x, groups, False, w, b, backend=backend)
    assert rel_err(y, normalize64(x, groups, False, w, b)) < (1e-5 if dtype == torch.float32
                                                              else 1e-2)
    dy = torch.randn(shape)
    y.backward(dy.to(dtype))
    x64 = x.detach().double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    group_norm64(x64, groups, w64, b64).backward(dy.double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel_err(x.grad, x64.grad) < tol
    assert rel_err(w.grad, w64.grad) < tol and rel_err(b.grad, b64.grad) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_stats_shapes_and_values(backend):
    x = off_centre(3, 12, 4, 4)
    y, mean, rstd = NF.normalize(x, 4, False, backend=backend, return_stats=True)
    assert mean.shape == (3, 4) and rstd.shape == (3, 4)
    xg = x.double().reshape(3, 4, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(xg.var(-1, unbiased=False) + 1e-5), rtol=1e-5, atol=0)
    y, mean, rstd = NF.normalize(x, 12, True, backend=backend, return_stats=True)
    assert mean.shape == (12,) and rstd.shape == (12,)
    torch.testing.assert_close(mean.double(), x.double().mean((0, 2, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [6, 3])  # BN (G = C) and batch-group norm
def test_running_stats_update(backend, groups):
    x = off_centre(5, 6, 4, 3)
    rm, rv = torch.randn(groups), torch.rand(groups) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    NF.normalize(x, groups, True, backend=backend, running_mean=rm, running_var=rv, momentum=0.3)
    xg = x.double().transpose(0, 1).reshape(groups, -1)
    torch.testing.assert_close(rm.double(), 0.7 * rm0.double() + 0.3 * xg.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), 0.7 * rv0.double() + 0.3 * xg.var(1, unbiased=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,groups,over_batch,activation",
    [
        ((4, 6, 3, 3), 6, True, None),      # BN
        ((3, 6, 2, 3), 3, True, "relu"),    # batch-group norm + relu
        ((2, 6, 3, 2), 2, False, "silu"),   # GN + silu
        ((2, 6, 5), 1, False, "gelu"),      # LN conv form + gelu
        ((2, 4, 3, 3), 4, False, None),     # IN
        ((3, 5), 1, False, None),           # LN over features (native: aten layer norm)
    ],
)
def test_gradcheck(backend, shape, groups, over_batch, activation):
    x = off_centre(*shape, dtype=torch.float64).requires_grad_()
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64).requires_grad_()

    def f(x, w, b):
        return NF.normalize(x, groups, over_batch, w, b, activation=activation, backend=backend)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("cl", [False, True])
def test_bias_without_weight_gradients(backend, groups, cl):
    # a bias without a weight, with gradients: ATen's group-norm backward raised "tensor does
    # not have a device" there (torch's F.group_norm does too), so native failed in backward
    x = off_centre(2, 4, 3, 3)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    b = torch.randn(4).requires_grad_()
    dy = torch.randn(2, 4, 3, 3)
    y = NF.normalize(x, groups, False, None, b, activation="gelu", backend=backend)
    y.backward(dy)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = F.gelu(group_norm64(x64, groups, None, b64))
    y64.backward(dy.double())
    assert rel_err(y, y64) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-4 and rel_err(b.grad, b64.grad) < 1e-5


def test_native_gradients_match_reference():
    x = off_centre(4, 8, 5, 5).requires_grad_()
    w, b = _affine(8)
    w.requires_grad_(), b.requires_grad_()
    g = torch.randn(4, 8, 5, 5)
    grads = {}
    for backend in BACKENDS:
        for groups, over_batch in ((4, False), (8, True), (2, True)):
            y = NF.normalize(x, groups, over_batch, w, b, activation="silu", backend=backend)
            grads[backend, groups, over_batch] = torch.autograd.grad(y, (x, w, b), g)
    for groups, over_batch in ((4, False), (8, True), (2, True)):
        for a, r in zip(grads["native", groups, over_batch], grads["reference", groups, over_batch]):
            assert rel_err(a, r) < 1e-5


# ------------------------------------------------------------------- torch-signature wrappers


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrappers_match_torch(backend):
    x = off_centre(4, 6, 5, 5)
    w, b = _affine(6)
    torch.testing.assert_close(
        NF.group_norm(x, 3, w, b, 1e-5, backend=backend), F.group_norm(x, 3, w, b, 1e-5)
    )
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    torch.testing.assert_close(
        NF.batch_norm(x, rm, rv, w, b, True, 0.2, 1e-3, backend=backend),
        F.batch_norm(x, rm2, rv2, w, b, True, 0.2, 1e-3),
    )
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    torch.testing.assert_close(
        NF.batch_norm(x, rm, rv, w, b, False, backend=backend), F.batch_norm(x, rm, rv, w, b, False)
    )
    torch.testing.assert_close(
        NF.instance_norm(x, None, None, w, b, backend=backend), F.instance_norm(x, None, None, w, b)
    )
    xl = off_centre(3, 4, 5, 6)
    wl, bl = torch.randn(5, 6), torch.randn(5, 6)
    torch.testing.assert_close(
        NF.layer_norm(xl, (5, 6), wl, bl, backend=backend), F.layer_norm(xl, (5, 6), wl, bl)
    )


# ---------------------------------------------------------------------------- backend choice


def test_backend_selection_order(monkeypatch):
    x = off_centre(2, 4, 3, 3)
    chosen = []

    class Spy:
        name = "spy"

        def available(self):
            return True

        def unsupported_reason(self, *a):
            return None

        def normalize(self, x, *args):
            chosen.append("spy")
            return normlab.backends.get_backend("reference").normalize(x, *args)

        def normalize_fixed(self, x, *args):
            chosen.append("spy")
            return normlab.backends.get_backend("reference").normalize_fixed(x, *args)

    register_backend("spy", Spy())
    try:
        NF.normalize(x, 2, False, backend="spy")
        assert chosen == ["spy"]
        with normlab.use_backend("spy"):
            NF.group_norm(x, 2)
            with normlab.use_backend("native"):
                NF.group_norm(x, 2)  # inner context wins
        assert chosen == ["spy", "spy"]
        monkeypatch.setenv("NORMLAB_BACKEND", "spy")
        NF.group_norm(x, 2)
        assert chosen == ["spy"] * 3
        with normlab.use_backend("reference"):  # context beats the environment
            NF.group_norm(x, 2)
        assert chosen == ["spy"] * 3
        monkeypatch.setenv("NORMLAB_BACKEND", "nonsense")
        with pytest.raises(ValueError, match="NORMLAB_BACKEND.*nonsense"):
            NF.group_norm(x, 2)
    finally:
        _INSTANCES.pop("spy", None)


def test_environment_variable_is_read_on_every_call(monkeypatch):
    # current_backend reads $NORMLAB_BACKEND through a cached key lookup: it must follow the
    # variable as it is set, changed, given odd case/space and removed while the process runs
    monkeypatch.delenv("NORMLAB_BACKEND", raising=False)
    assert normlab.backends.current_backend() == "auto"
    monkeypatch.setenv("NORMLAB_BACKEND", "reference")
    assert normlab.backends.current_backend() == "reference"
    monkeypatch.setenv("NORMLAB_BACKEND", " Native ")
    assert normlab.backends.current_backend() == "native"
    monkeypatch.delenv("NORMLAB_BACKEND")
    assert normlab.backends.current_backend() == "auto"


def test_explicit_unsupported_backend_raises_and_auto_falls_back():
    x = off_centre(2, 4, 3, 3)

    class Picky:
        name = "picky"

        def available(self):
            return True

        def unsupported_reason(self, x, *a):
            return "only float16"

    register_backend("picky", Picky())
    try:
        with pytest.raises(BackendUnavailable, match="picky.*only float16"):
            NF.normalize(x, 2, False, backend="picky")
        y = NF.normalize(x, 2, False, backend="auto")
        assert rel_err(y, normalize64(x, 2, False)) < 1e-5
    finally:
        _INSTANCES.pop("picky", None)
    with pytest.raises(ValueError, match="unknown normalization backend 'cuda-magic'"):
        NF.normalize(x, 2, False, backend="cuda-magic")
    with pytest.raises(ValueError, match="unknown normalization backend"):
        with normlab.use_backend("nope"):
            pass


def test_auto_uses_native_on_cpu():
    assert "native" in normlab.available_backends()
    assert normlab.backends.resolve_backend("auto", torch.randn(2, 4), 4, True, None).name == "native"


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: NF.normalize(torch.randn(2, 6, 4), 4, False), ValueError, "num_channels=6 is not divisible by num_groups=4"),
        (lambda: NF.normalize(torch.randn(2, 6, 4), 0, False), ValueError, "num_groups must be >= 1, got 0"),
        (lambda: NF.normalize(torch.randn(6), 1, False), ValueError, r"at least 2 dims, got shape \(6,\)"),
        (lambda: NF.normalize(torch.randint(0, 5, (2, 4, 3)), 2, False), TypeError, "floating-point.*torch.int64"),
        (lambda: NF.normalize(torch.randn(2, 4, 3), 2, False, eps=0.0), ValueError, "eps must be a positive finite number, got 0.0"),
        (lambda: NF.normalize(torch.randn(2, 4, 3), 2, False, eps=-1e-5), ValueError, "got -1e-05"),
        (lambda: NF.normalize(torch.randn(2, 4, 3), 2, False, weight=torch.randn(5)), ValueError, r"weight must have shape \(4,\).*got shape \(5,\)"),
        (lambda: NF.normalize(torch.randn(2, 4, 3), 2, False, activation="tanh"), ValueError, "unknown activation 'tanh'"),
        (lambda: NF.normalize(torch.randn(1, 4), 4, True), ValueError, r"more than 1 value per channel.*\(1, 4\)"),
        (lambda: NF.batch_norm(torch.randn(1, 4, 1, 1), None, None, training=True), ValueError, "more than 1 value per channel"),
        (lambda: NF.instance_norm(torch.randn(3, 4, 1, 1)), ValueError, r"more than 1 spatial element.*\(3, 4, 1, 1\)"),
        (lambda: NF.layer_norm(torch.randn(3, 4), (5,)), ValueError, r"normalized_shape=\[5\].*\(3, 4\)"),
        (lambda: NF.normalize([1.0, 2.0], 1, False), TypeError, "must be a torch.Tensor, got list"),
        (lambda: NF.normalize(torch.randn(4, 6), 3, True, running_mean=torch.zeros(6)), ValueError, r"running_mean must have shape \(3,\)"),
        # running buffers that are not float tensors (an AttributeError / ATen RuntimeError before)
        (lambda: NF.normalize(torch.randn(4, 6), 6, True, running_mean=[0.0] * 6, running_var=torch.ones(6)), TypeError, "running_mean must be a Tensor or None, got list"),
        (lambda: NF.batch_norm(torch.randn(4, 6), torch.zeros(6), torch.ones(6, dtype=torch.long), training=True), TypeError, "running_var must have a floating-point dtype, got torch.int64"),
        # given statistics missing (ATen's RuntimeError "running_mean must be defined" before)
        (lambda: NF.normalize_fixed(torch.randn(4, 6), None, torch.ones(6)), ValueError, "needs the statistics: got mean=None"),
        # normalized_shape neither an int nor a sequence ("'float' object is not iterable" before)
        (lambda: NF.layer_norm(torch.randn(3, 4), 4.0), TypeError, "normalized_shape must be an int or a sequence of ints, got 4.0"),
        # parameters that are not float tensors: int/bool weights were silently used as floats
        # (torch refuses them), a complex one was a KeyError 'complex64' in the triton backend
        (lambda: NF.normalize(torch.randn(2, 4, 3), 2, False, weight=torch.ones(4, dtype=torch.long)), TypeError, "weight must have a floating-point dtype, got torch.int64"),
        (lambda: NF.normalize(torch.randn(2, 4, 3), 2, False, bias=torch.zeros(4, dtype=torch.complex64)), TypeError, "bias must have a floating-point dtype, got torch.complex64"),
        (lambda: NF.normalize_fixed(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4)), TypeError, "running_mean must have a floating-point dtype, got torch.int64"),
        (lambda: NF.layer_norm(torch.randn(3, 4), 4, torch.ones(4, dtype=torch.bool)), TypeError, "weight must have a floating-point dtype, got torch.bool"),
        # momentum=None (the modules' cumulative average) reached lerp_ / ATen: an argument error
        # that did not say which argument (reference, triton)
        (lambda: NF.batch_norm(torch.randn(4, 6), torch.zeros(6), torch.ones(6), training=True, momentum=None, backend="reference"), TypeError, "momentum must be a float.*got None"),
    ],
)
def test_errors_name_the_values(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "value", ["yes", "", None, 0, 1, 2, 1.0, torch.tensor(True), torch.tensor([True])],
    ids=repr,
)
def test_over_batch_must_be_a_bool(value):
    """over_batch chooses the statistics set: "yes" was truthy (batch statistics), None and ""
    falsy, a one-element tensor read through bool(); every one silently. A TypeError naming the
    value now, in normalize and moments; 0 and 1 too (an int is no flag here, as a bool is no
    int for num_groups)."""
    x = off_centre(3, 4, 5)
    match = re.escape(f"over_batch must be a bool, got {value!r}")
    with pytest.raises(TypeError, match=match):
        NF.normalize(x, 2, value)
    with pytest.raises(TypeError, match=match):
        NF.moments(x, 2, value)
    with pytest.raises(TypeError, match=re.escape(f"center must be a bool, got {value!r}")):
        NF.normalize(x, 2, False, center=value)
    with pytest.raises(TypeError, match=re.escape(f"return_stats must be a bool, got {value!r}")):
        NF.normalize(x, 2, False, return_stats=value)  # "yes" returned a tuple, "" a tensor


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("over_batch", [False, True])
def test_over_batch_numpy_bool_is_the_python_bool(backend, over_batch, monkeypatch):
    """A numpy bool (a config's np.bool_) is taken as the Python bool and reaches the backend as
    one (a kernel's constexpr, a plan cache key)."""
    np = pytest.importorskip("numpy")
    x = off_centre(4, 6, 5, 3)
    w, b = _affine(6)
    seen = []
    impl = normlab.backends.get_backend(backend)
    real = impl.normalize

    def spy(x, num_groups, over_batch, *args, **kwargs):
        seen.append(over_batch)
        return real(x, num_groups, over_batch, *args, **kwargs)

    monkeypatch.setattr(impl, "normalize", spy)
    y = NF.normalize(x, 3, np.bool_(over_batch), w, b, backend=backend)
    assert seen == [over_batch] and type(seen[0]) is bool
    assert rel_err(y, normalize64(x, 3, over_batch, w, b)) < 1e-5
    mean, var = NF.moments(x, 3, np.bool_(over_batch), center=np.bool_(True))
    mean64, var64 = NF.moments(x.double(), 3, over_batch)
    assert mean.shape == ((3,) if over_batch else (4, 3))
    assert rel_err(mean, mean64) < 1e-6 and rel_err(var, var64) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups,over_batch", [(4, False), (8, True), (1, False)])
def test_nan_and_inf_propagate(backend, groups, over_batch):
    x = off_centre(3, 8, 4, 4)
    x[1, 2, 1, 1] = math.nan
    x[2, 5, 0, 0] = math.inf
    y = NF.normalize(x, groups, over_batch, backend=backend)
    assert y.shape == x.shape
    assert torch.isnan(y[1, 2, 1, 1]) and not torch.isfinite(y[2, 5]).all()
    if not over_batch and groups == 4:  # groups without a bad value are untouched
        assert torch.isfinite(y[0]).all()
        assert rel_err(y[0], normalize64(x[0:1], groups, False)[0]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_three_spatial_dims_match_torch(backend):
    """torch.nn.functional takes any number of spatial dims for GN, IN and BN; so does the
    operator (the statistics sets are the same over the flattened spatial dims)."""
    x = off_centre(2, 4, 3, 2, 2, 3, dtype=torch.float64)  # 4 spatial dims
    w, b = _affine(4, torch.float64)
    y = NF.group_norm(x, 2, w, b, backend=backend)
    assert y.shape == x.shape
    assert rel_err(y, F.group_norm(x, 2, w, b)) < 1e-12
    assert rel_err(NF.instance_norm(x, backend=backend), F.instance_norm(x)) < 1e-12
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    y = NF.batch_norm(x, rm, rv, w, b, True, 0.1, backend=backend)
    assert rel_err(y, F.batch_norm(x, rm_t, rv_t, w, b, True, 0.1)) < 1e-12
    assert rel_err(rm, rm_t) < 1e-12 and rel_err(rv, rv_t) < 1e-12
    y = NF.batch_norm(x, rm, rv, w, b, False, backend=backend)  # eval: given statistics
    assert rel_err(y, F.batch_norm(x, rm, rv, w, b, False)) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_normalized_shape_like_torch(backend):
    """normalized_shape with no elements: (3, 0) over (0,) has no (rows, features) view; the
    output is the empty input (times an empty weight), in the graph, as torch's layer_norm and
    rms_norm give (rms_norm raised "cannot reshape tensor of 0 elements")."""
    x = torch.randn(3, 0, requires_grad=True)
    w = torch.randn(0, requires_grad=True)
    for ours, theirs in ((NF.rms_norm(x, (0,), w, backend=backend), F.rms_norm(x, (0,), w)),
                         (NF.layer_norm(x, (0,), w, backend=backend), F.layer_norm(x, (0,), w))):
        assert ours.shape == theirs.shape == (3, 0)
        ours.sum().backward()
        assert x.grad.shape == (3, 0) and w.grad.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_like_torch(backend):
    """N = 0 (an empty batch after filtering, a detector with no proposals): an empty output in
    the autograd graph, zero parameter gradients, running statistics untouched, as torch.nn."""
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    w = (torch.randn(4) + 1).requires_grad_()
    b = torch.randn(4).requires_grad_()
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = NF.batch_norm(x, rm, rv, w, b, True, 0.1, backend=backend, activation="relu")
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(4)) and torch.equal(b.grad, torch.zeros(4))
    for call in (lambda: NF.group_norm(x, 2, w, b, backend=backend),
                 lambda: NF.instance_norm(x, backend=backend),
                 lambda: NF.layer_norm(torch.randn(0, 5), (5,), backend=backend)):
        assert call().numel() == 0
    xc = torch.randn(0, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    assert NF.group_norm(xc, 2, backend=backend).is_contiguous(memory_format=torch.channels_last)
    y, mean, rstd = NF.normalize(x, 4, True, return_stats=True, backend=backend)
    assert mean.shape == (4,) and torch.isnan(mean).all()
    _, mean, _ = NF.normalize(x, 2, False, return_stats=True, backend=backend)
    assert mean.shape == (0, 2)
    bn, bn_t = normlab.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    bn(x), bn_t(x)
    assert torch.equal(bn.num_batches_tracked, bn_t.num_batches_tracked)
    assert torch.equal(bn.running_mean, bn_t.running_mean)


# ------------------------------------------ parameters, buffers and statistics in other dtypes

# (x dtype, weight/bias dtype, running buffers' / given statistics' dtype)
DTYPE_MIXES = [
    (torch.bfloat16, torch.float32, torch.float32),    # autocast: bf16 activations, float32 module
    (torch.bfloat16, torch.bfloat16, torch.float32),   # bf16 weights, float32 buffers (kept float32 for accuracy)
    (torch.float16, torch.float16, torch.float32),     # the same in float16
    (torch.bfloat16, torch.float32, torch.bfloat16),   # float32 weights with bf16 buffers
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # a model cast to bf16: nothing mixed
    (torch.float32, torch.float32, torch.float64),     # float64 buffers (or statistics) with float32 input
    (torch.float32, torch.float64, torch.float32),     # float64 parameters with float32 input
    (torch.float64, torch.float32, torch.float32),     # float64 input through a float32 module
]
_Y_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# a buffer's update is rounded to its dtype twice (scale, then add)
_BUF_TOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _expected_running(x, groups, over_batch, rm0, rv0, momentum):
    """The running update written out in float64: unbiased variance over each statistic's set,
    per-sample statistics (not over the batch) averaged over N."""
    xg = x.double().reshape(x.shape[0], groups, -1)
    if over_batch:
        xg = xg.transpose(0, 1).reshape(groups, -1)
        mu, var = xg.mean(1), xg.var(1, unbiased=True)
    else:
        mu, var = xg.mean(2).mean(0), xg.var(2, unbiased=True).mean(0)
    return (1 - momentum) * rm0.double() + momentum * mu, (1 - momentum) * rv0.double() + momentum * var


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdt,pdt,bdt", DTYPE_MIXES)
@pytest.mark.parametrize(
    "groups,over_batch",
    [
        (6, True),   # BN: ATen's batch norm updates the buffers itself when their dtype fits
        (3, True),   # batch-group norm: ATen's batch norm on a grouped view, float32 unit affine
        (6, False),  # InstanceNorm with running statistics (ATen's group norm + a pass)
        (2, False),  # GroupNorm with running statistics
    ],
)
def test_mixed_dtypes_with_running_stats(backend, xdt, pdt, bdt, groups, over_batch):
    # native crashed in ATen ("expected scalar type", "mixed dtype (CPU)") on every BN and
    # batch-group case here except the autocast one; the reference took them all
    x = off_centre(4, 6, 3, 3, dtype=xdt).contiguous(memory_format=torch.channels_last)
    w, b = _affine(6, pdt)
    rm0 = torch.randn(groups).to(bdt)
    rv0 = (torch.rand(groups) + 0.5).to(bdt)
    rm, rv = rm0.clone(), rv0.clone()
    y = NF.normalize(x, groups, over_batch, w, b, activation="silu", backend=backend,
                     running_mean=rm, running_var=rv, momentum=0.3)
    assert y.dtype == xdt and y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, normalize64(x, groups, over_batch, w, b, activation="silu")) < _Y_TOL[xdt]
    em, ev = _expected_running(x, groups, over_batch, rm0, rv0, 0.3)
    assert rm.dtype == bdt and rv.dtype == bdt
    torch.testing.assert_close(rm.double(), em, rtol=_BUF_TOL[bdt], atol=_BUF_TOL[bdt])
    torch.testing.assert_close(rv.double(), ev, rtol=_BUF_TOL[bdt], atol=_BUF_TOL[bdt])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdt,pdt,sdt", DTYPE_MIXES)
def test_mixed_dtypes_with_given_statistics(backend, xdt, pdt, sdt):
    # BatchNorm eval / FrozenBatchNorm: the statistics and the affine each in their own dtype
    x = off_centre(3, 6, 4, 4, dtype=xdt)
    w, b = _affine(6, pdt)
    mean, var = (torch.randn(6) + 3).to(sdt), (torch.rand(6) + 0.5).to(sdt)
    y = NF.batch_norm(x, mean, var, w, b, False, backend=backend)
    shape = (1, 6, 1, 1)
    expected = (x.double() - mean.double().reshape(shape)) / torch.sqrt(var.double().reshape(shape) + 1e-5)
    expected = expected * w.double().reshape(shape) + b.double().reshape(shape)
    assert y.dtype == xdt
    assert rel_err(y, expected) < _Y_TOL[xdt] + _Y_TOL[sdt]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,groups,over_batch",
    [
        ((5, 6, 4), 6, True),  # BN: ATen's batch norm takes both buffers or neither
        ((5, 6, 4), 3, True),  # batch-group norm: the same kernel on a grouped view
        ((5, 6), 1, False),    # LN over the features of a 2-D input (native's layer-norm path)
        ((5, 6, 4), 2, False),  # GroupNorm
    ],
)
@pytest.mark.parametrize("which", ["mean", "var"])
def test_one_running_buffer(backend, shape, groups, over_batch, which):
    # native raised "running_mean and running_var must either both be None or neither" for BN,
    # and its 2-D LayerNorm path dropped a lone running_var without updating it
    x = off_centre(*shape)
    buf0 = torch.randn(groups) if which == "mean" else torch.rand(groups) + 0.5
    buf = buf0.clone()
    kwargs = {"running_mean": buf} if which == "mean" else {"running_var": buf}
    y = NF.normalize(x, groups, over_batch, backend=backend, momentum=0.25, **kwargs)
    assert rel_err(y, normalize64(x, groups, over_batch)) < 1e-5
    em, ev = _expected_running(x, groups, over_batch, buf0, buf0, 0.25)
    torch.testing.assert_close(buf.double(), em if which == "mean" else ev, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize(
    "groups,over_batch",
    [
        (6, True),   # BN (native: ATen's batch norm raised its own error here only)
        (3, True),   # batch-group norm
        (6, False),  # InstanceNorm with running statistics (native updated silently)
    ],
)
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_buffer_that_requires_grad(backend, groups, over_batch, which):
    """A running buffer that requires grad, in training with grad enabled: a RuntimeError naming
    it on every backend (triton: in Triton's interpreter on CPU), as torch's batch_norm and
    instance_norm raise; before, reference and triton updated it silently and native raised
    only on its batch-norm paths. Under torch.no_grad() and inference_mode it is updated, as
    torch updates it."""
    if backend not in normlab.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    x = off_centre(4, 6, 5)
    w, b = _affine(6)
    rm0, rv0 = torch.randn(groups), torch.rand(groups) + 0.5

    def buffers():
        bufs = {"running_mean": rm0.clone(), "running_var": rv0.clone()}
        bufs[which].requires_grad_()
        return bufs

    bufs = buffers()
    with pytest.raises(RuntimeError, match=f"{which} cannot have requires_grad True"):
        NF.normalize(x, groups, over_batch, w, b, backend=backend, momentum=0.3, **bufs)
    with pytest.raises(RuntimeError, match=f"{which} cannot have requires_grad True"):
        NF.normalize(x, groups, over_batch, backend=backend, **{which: bufs[which]})  # alone
    assert torch.equal(bufs["running_mean"].detach(), rm0)  # refused before any update
    assert torch.equal(bufs["running_var"].detach(), rv0)
    if groups == 6:  # torch's own op for the case refuses it likewise
        torch_op = F.batch_norm if over_batch else F.instance_norm
        theirs = buffers()
        with pytest.raises(RuntimeError, match=which):
            torch_op(x, theirs["running_mean"], theirs["running_var"], w, b, True, 0.3)
    # an empty input leaves the buffers alone: no error (torch's batch_norm neither)
    NF.normalize(x[:0], groups, over_batch, backend=backend, **buffers())

    em, ev = _expected_running(x, groups, over_batch, rm0, rv0, 0.3)
    for no_grad in (torch.no_grad, torch.inference_mode):
        bufs = buffers()
        with no_grad():
            y = NF.normalize(x, groups, over_batch, w, b, backend=backend, momentum=0.3, **bufs)
        assert rel_err(y, normalize64(x, groups, over_batch, w, b)) < 1e-5
        torch.testing.assert_close(bufs["running_mean"].detach().double(), em, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bufs["running_var"].detach().double(), ev, rtol=1e-5, atol=1e-6)
        assert bufs[which].requires_grad  # updated in place, still the caller's leaf
        if groups == 6:
            theirs = buffers()
            with no_grad():
                torch_op(x, theirs["running_mean"], theirs["running_var"], w, b, True, 0.3)
            torch.testing.assert_close(bufs["running_mean"], theirs["running_mean"])
            torch.testing.assert_close(bufs["running_var"], theirs["running_var"])


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_module_buffer_that_requires_grad_raises_like_torch(backend):
    """The modules pass their buffers to the operator: a BatchNorm whose running_var requires
    grad raises in training as torch's does, and trains under torch.no_grad()."""
    ours, theirs = nlnn.BatchNorm1d(6), torch.nn.BatchNorm1d(6)
    for m in (ours, theirs):
        m.running_var.requires_grad_()
    x = off_centre(8, 6)
    with pytest.raises(RuntimeError, match="running_var"):
        theirs(x)
    with normlab.use_backend(backend):
        with pytest.raises(RuntimeError, match="running_var cannot have requires_grad True"):
            ours(x)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_statistics_are_differentiable(backend):
    # statistics computed by the caller (e.g. gathered across processes) carry gradients; ATen's
    # batch norm refuses running_mean with requires_grad, so native raised a RuntimeError
    x = off_centre(3, 4, 5, dtype=torch.float64).requires_grad_()
    mean = (torch.randn(4, dtype=torch.float64) + 3).requires_grad_()
    var = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()

    def f(x, mean, var, w):
        return NF.normalize_fixed(x, mean, var, w, None, activation="silu", backend=backend)

    assert torch.autograd.gradcheck(f, (x, mean, var, w))
    assert torch.autograd.gradgradcheck(f, (x, mean, var, w))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,groups,over_batch",
    [
        ((4, 6, 5, 5), 6, True),   # BN (BatchRenorm reads these statistics)
        ((4, 6, 5, 5), 3, True),   # batch-group norm
        ((4, 6, 5, 5), 2, False),  # GroupNorm
        ((4, 6, 5, 5), 6, False),  # InstanceNorm
        ((8, 6), 1, False),        # LN over features (native's layer-norm path)
    ],
)
@pytest.mark.parametrize("affine", ["none", "same dtype"])
def test_half_input_statistics_are_float32(backend, dtype, shape, groups, over_batch, affine):
    # ATen hands back half-input statistics in the parameters' dtype: bf16 mean and rstd (3
    # significant digits) from native unless the weight was float32
    x = off_centre(*shape, dtype=dtype)
    w, b = _affine(shape[1], dtype) if affine == "same dtype" else (None, None)
    y, mean, rstd = NF.normalize(x, groups, over_batch, w, b, backend=backend, return_stats=True)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    dims = (0, 2) if over_batch else (2,)
    xg = x.double().reshape(shape[0], groups, -1)
    torch.testing.assert_close(mean.double(), xg.mean(dims), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        rstd.double(), torch.rsqrt(xg.var(dims, unbiased=False) + 1e-5), rtol=1e-4, atol=0
    )
    assert rel_err(y, normalize64(x, groups, over_batch, w, b)) < _Y_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups,over_batch", [
    (3, True),   # batch-group norm (native: ATen's BN on a (N, G, rest) view, affine after it)
    (6, True),   # BN (ATen's mixed mode: float32 parameters, one rounding)
    (2, False),  # GroupNorm
])
def test_half_input_with_float32_affine_is_rounded_once(backend, dtype, groups, over_batch):
    # y = gamma * xhat + beta computed in float32 and rounded once to the half type: within one
    # unit in the last place of the float64 result, also where beta cancels gamma * xhat (y
    # near 0). Native's batch-group norm rounded xhat to the half type before the affine: up
    # to 15 (bf16) - 35 (fp16) units off there, where torch's BN in the same setting is half
    # of one
    torch.manual_seed(0)
    x = off_centre(8, 6, 5, 5, dtype=dtype)
    w, b = torch.rand(6) * 4 + 0.5, torch.randn(6) * 3
    y = NF.normalize(x, groups, over_batch, w, b, backend=backend)
    assert y.dtype == dtype
    expected = normalize64(x, groups, over_batch, w, b)
    ulp = torch.finfo(dtype).eps * expected.abs() + 1e-5  # (+ float32's error at y ~ 0)
    assert ((y.double() - expected).abs() <= ulp).all()


def test_numpy_scalars_as_torch_takes_them():
    # configs computed with numpy give np.int64 groups and np.float32 eps: torch.nn.functional
    # takes them; normlab raised "num_groups must be an int, got np.int64(2)"
    np = pytest.importorskip("numpy")
    x = off_centre(3, 4, 5)
    for backend in BACKENDS:
        torch.testing.assert_close(
            NF.group_norm(x, np.int64(2), eps=np.float32(1e-3), backend=backend),
            F.group_norm(x, 2, eps=1e-3),
        )
    with pytest.raises(TypeError, match="num_groups must be an int, got True"):
        NF.group_norm(x, True)
    with pytest.raises(ValueError, match="eps must be a positive finite number, got .*-1.0"):
        NF.group_norm(x, 2, eps=np.float64(-1.0))


def test_environment_variable_when_os_environ_is_replaced_or_cleared(monkeypatch):
    # the cached lookup reads os.environ's own mapping: it must follow clear()/update() on it
    # (they go through __delitem__/__setitem__) and an os.environ replaced by another mapping
    import os
    from unittest import mock

    monkeypatch.setenv("NORMLAB_BACKEND", "reference")
    with mock.patch.dict(os.environ, clear=True):  # os.environ.clear(), restored afterwards
        assert normlab.backends.current_backend() == "auto"
        os.environ.update({"NORMLAB_BACKEND": "native"})
        assert normlab.backends.current_backend() == "native"
    assert normlab.backends.current_backend() == "reference"
    monkeypatch.setattr(os, "environ", {"NORMLAB_BACKEND": "native"})
    assert normlab.backends.current_backend() == "native"  # was still 'reference'


def test_running_buffers_in_another_dtype_under_fullgraph_compile():
    # native's own running-statistics update (a lone buffer, float64 buffers with float32
    # input) must trace whole: a generator expression in it broke torch.compile(fullgraph=True)
    x = off_centre(4, 6, 3, 3)
    w = torch.randn(6, dtype=torch.float64) + 1

    def f(x, rm, rv64):
        y1 = NF.normalize(x, 3, True, w, None, backend="native", running_mean=rm)
        y2 = NF.normalize(x, 6, True, None, None, backend="native", running_mean=rv64 - 1,
                          running_var=rv64)
        return y1, y2

    rm, rv = torch.randn(3), torch.rand(6, dtype=torch.float64) + 1
    rm_c, rv_c, rv0 = rm.clone(), rv.clone(), rv.clone()
    expected = f(x, rm, rv)
    got = torch.compile(f, fullgraph=True, backend="eager")(x, rm_c, rv_c)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(rm_c, rm)
    torch.testing.assert_close(rv_c, rv)
    assert not torch.equal(rv_c, rv0)  # the float64 buffer did move


# --------------------------------------------------------------------------------------------
# center=False (RMSNorm, FRN), moments, rms_norm
# --------------------------------------------------------------------------------------------

from formula import rms_norm64, uncentred64  # noqa: E402


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize(
    "shape,groups",
    [
        ((3, 6, 5, 4), 6),   # per sample and channel (FRN's sets)
        ((3, 6, 5, 4), 2),   # per sample and group
        ((4, 10), 1),        # (rows, features): RMSNorm's view
        ((2, 4, 7), 4),      # 1-D spatial
    ],
)
def test_uncentred_matches_float64_formula(backend, shape, groups):
    x = off_centre(*shape, dtype=torch.float64)
    c = shape[1]
    w, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    y, mean, rstd = NF.normalize(x, groups, False, w, b, 1e-3, backend=backend, center=False,
                                 return_stats=True)
    assert rel_err(y, uncentred64(x, groups, w, b, 1e-3)) < 1e-12
    assert mean.shape == rstd.shape == (shape[0], groups) and not mean.any()
    ms = x.reshape(shape[0], groups, -1).square().mean(-1)
    torch.testing.assert_close(rstd, torch.rsqrt(ms + 1e-3))
    y32 = NF.normalize(x.float(), groups, False, w.float(), b.float(), 1e-3, backend=backend,
                       center=False)
    assert rel_err(y32, uncentred64(x, groups, w, b, 1e-3)) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_uncentred_half_input_accumulates_in_float32(backend, dtype):
    x = off_centre(4, 8, 6, 6, dtype=dtype)  # 36 elements per statistic, offset 3
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    y, _, rstd = NF.normalize(x, 8, False, w, b, backend=backend, center=False, return_stats=True)
    assert y.dtype == dtype and rstd.dtype == torch.float32
    expect = uncentred64(x, 8, w, b)
    # one rounding of the float32 result to the half type
    torch.testing.assert_close(y.double(), expect.to(dtype).double(), rtol=0, atol=2 * (expect.abs().max() * torch.finfo(dtype).eps).item())


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_uncentred_gradcheck(backend):
    x = off_centre(2, 4, 3, 3, dtype=torch.float64).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64).requires_grad_()
    fn = lambda x, w, b: NF.normalize(x, 2, False, w, b, 1e-3, "silu", backend, center=False)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    # and the gradient equals the float64 formula's
    g = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    ours = torch.autograd.grad(fn(x, w, b), (x, w, b), g)
    ref = torch.autograd.grad(F.silu(uncentred64(x, 2, w, b, 1e-3)), (x, w, b), g)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r)


def test_uncentred_over_batch_and_errors():
    x = off_centre(3, 4, 5, dtype=torch.float64)
    y = NF.normalize(x, 4, True, center=False, backend="native")  # per channel over (N, L)
    ms = x.square().mean(dim=(0, 2), keepdim=True)
    torch.testing.assert_close(y, x / torch.sqrt(ms + 1e-5))
    with pytest.raises(ValueError, match="center=False with running_mean"):
        NF.normalize(x, 4, True, running_mean=torch.zeros(4, dtype=torch.float64), center=False)
    with pytest.raises(TypeError, match="center must be a bool, got 'no'"):
        NF.normalize(x, 4, True, center="no")


def test_backend_without_uncentred_support_is_skipped_or_refused(monkeypatch):
    class Centred:  # a backend that predates center=False (no center parameter)
        name = "centred"

        def available(self):
            return True

        def unsupported_reason(self, *a):
            return None

        def normalize(self, x, num_groups, over_batch, weight, bias, eps, activation,
                      running_mean, running_var, momentum):
            raise AssertionError("not called")

    register_backend("centred", Centred())
    monkeypatch.setattr(normlab.backends, "_AUTO_ORDER", ("centred", "native", "reference"))
    try:
        x = torch.empty(2, 4, 3, device="meta")  # not CPU: auto walks its order
        resolve = normlab.backends.resolve_backend
        assert resolve("auto", x, 2, False, None).name == "centred"
        assert resolve("auto", x, 2, False, None, center=False).name == "native"
        with pytest.raises(BackendUnavailable, match="centred.*center=False"):
            NF.normalize(off_centre(2, 4, 3), 2, False, backend="centred", center=False)

        class Uncentred(Centred):  # a center parameter is support; the attribute overrides it
            def normalize(self, *a, center=True):
                raise AssertionError("not called")

        register_backend("centred", Uncentred())
        assert resolve("auto", x, 2, False, None, center=False).name == "centred"
        Uncentred.supports_uncentered = False
        normlab.backends._UNCENTERED.clear()
        assert resolve("auto", x, 2, False, None, center=False).name == "native"
    finally:
        _INSTANCES.pop("centred", None)
        normlab.backends._UNCENTERED.clear()


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("groups,over_batch", [(2, False), (4, True), (1, False)])
def test_moments_match_formula_and_differentiate(center, groups, over_batch):
    x = off_centre(3, 4, 5, 2, dtype=torch.float64)
    mean, var = NF.moments(x, groups, over_batch, center)
    xg = x.reshape(3, groups, -1)
    dims = (0, 2) if over_batch else (2,)
    expect_mean = xg.mean(dims) if center else torch.zeros_like(xg.mean(dims))
    expect_var = (xg.var(dims, unbiased=False) if center else xg.square().mean(dims))
    torch.testing.assert_close(mean, expect_mean)
    torch.testing.assert_close(var, expect_var)
    xr = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: NF.moments(t, groups, over_batch, center), (xr,))
    # float32 input far from zero: the centred variance is summed over shifted data
    big = (1e4 + 0.1 * torch.randn(2, 4, 64, dtype=torch.float64))
    _, v = NF.moments(big.float(), 4, False)
    torch.testing.assert_close(v.double(), big.float().double().var(-1, unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize(
    "shape,normalized,eps",
    [
        ((4, 7, 16), [16], None),      # tokens x features, eps = finfo(float32).eps
        ((3, 5, 6), (5, 6), 1e-6),     # two trailing dims
        ((10,), 10, None),             # a single vector, an int shape
    ],
)
def test_rms_norm_matches_torch_and_formula(backend, shape, normalized, eps):
    x = torch.randn(shape) * 2 + 1
    norm_shape = [normalized] if isinstance(normalized, int) else list(normalized)
    w = torch.rand(norm_shape) + 0.5
    y = NF.rms_norm(x, normalized, w, eps, backend=backend)
    torch.testing.assert_close(y, F.rms_norm(x, norm_shape, w, eps))
    assert rel_err(y, rms_norm64(x, norm_shape, w, eps)) < 1e-6
    assert NF.rms_norm(x, normalized, backend=backend).shape == x.shape


def test_rms_norm_errors_name_the_values():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"normalized_shape=\[7\] does not match"):
        NF.rms_norm(x, 7)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\), got \(4,\)"):
        NF.rms_norm(x, 8, torch.ones(4))
    with pytest.raises(ValueError, match="eps must be a positive finite number, got -1.0"):
        NF.rms_norm(x, 8, eps=-1.0)


# (normlab call, torch call) on the same bad input: torch raises RuntimeError for each; ours is
# a ValueError naming the shapes that is also a RuntimeError (InputShapeError)
_SHAPE_ERRORS = [
    # trailing dims that do not match normalized_shape
    (lambda: NF.layer_norm(torch.randn(2, 5), (4,)),
     lambda: torch.nn.functional.layer_norm(torch.randn(2, 5), (4,))),
    (lambda: NF.rms_norm(torch.randn(2, 5), (4,)),
     lambda: torch.nn.functional.rms_norm(torch.randn(2, 5), (4,))),
    # a 1-D input has no channel dim
    (lambda: NF.group_norm(torch.randn(4), 2),
     lambda: torch.nn.functional.group_norm(torch.randn(4), 2)),
    # channels not divisible by the groups
    (lambda: NF.group_norm(torch.randn(2, 6, 3), 4),
     lambda: torch.nn.functional.group_norm(torch.randn(2, 6, 3), 4)),
    # a weight of the wrong size
    (lambda: NF.group_norm(torch.randn(2, 6, 3), 3, torch.randn(5)),
     lambda: torch.nn.functional.group_norm(torch.randn(2, 6, 3), 3, torch.randn(5))),
    # layer_norm's weight of the wrong shape
    (lambda: NF.layer_norm(torch.randn(2, 5), (5,), torch.randn(4)),
     lambda: torch.nn.functional.layer_norm(torch.randn(2, 5), (5,), torch.randn(4))),
]


@pytest.mark.parametrize("ours,theirs", _SHAPE_ERRORS)
def test_shape_errors_are_the_runtime_errors_torch_raises(ours, theirs):
    with pytest.raises(RuntimeError):
        theirs()
    with pytest.raises(NF.InputShapeError) as err:
        ours()
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)


# --------------------------------------------------------------------------------------------
# torch's own op where native would run it (layer_norm, rms_norm, group_norm): a few us a call
# --------------------------------------------------------------------------------------------

# (function, input shape, normalized_shape or groups, dtype, affine, activation)
TORCH_OP_CASES = [
    ("layer_norm", (2, 16, 64), (64,), torch.float32, True, None),    # tokens: (batch, seq, C)
    ("layer_norm", (5, 12), (12,), torch.float64, False, None),       # already (rows, features)
    ("layer_norm", (3, 4, 5, 6), (5, 6), torch.float32, True, "gelu"),  # two trailing dims
    ("rms_norm", (2, 16, 64), (64,), torch.float32, True, None),      # tokens
    ("rms_norm", (3, 4, 5, 6), (5, 6), torch.float64, False, None),   # two trailing dims, no weight
    ("group_norm", (2, 12, 4, 5), 3, torch.float32, True, "relu"),    # GN, fused ReLU
    ("group_norm", (2, 6, 9), 2, torch.float64, False, None),         # 1 spatial dim, no affine
    ("group_norm", (3, 8, 2, 3, 2), 4, torch.bfloat16, True, "silu"),  # 3 spatial dims, half
]


def _torch_op_call(fn, x, arg, w, b, act, backend=None):
    if fn == "layer_norm":
        return NF.layer_norm(x, arg, w, b, 1e-5, activation=act, backend=backend)
    if fn == "rms_norm":
        return NF.rms_norm(x, arg, w, 1e-6, backend=backend)
    return NF.group_norm(x, arg, w, b, 1e-5, activation=act, backend=backend)


def _operator_call(fn, x, arg, w, b, act):
    """The same call through the operator's native backend on its (N, C, ...) view."""
    if fn == "group_norm":
        return NF._dispatch(x, arg, False, w, b, 1e-5, act, "native")
    numel = math.prod(arg)
    flat = lambda t: None if t is None else t.reshape(numel)  # noqa: E731
    eps, center, bias = (1e-5, True, flat(b)) if fn == "layer_norm" else (1e-6, False, None)
    y = NF._dispatch(x.reshape(-1, numel), 1, False, flat(w), bias, eps, act, "native",
                     center=center)
    return y.reshape(x.shape)


@pytest.mark.parametrize("fn,shape,arg,dtype,affine,act", TORCH_OP_CASES)
def test_torch_op_path_equals_the_operators_native_bitwise(fn, shape, arg, dtype, affine, act):
    """On the native backend a dense input goes to torch's own op (torch.layer_norm, ...) as it
    is, without the operator's views and returned statistics: output and every gradient equal,
    bit for bit, to the operator's native path on its view, whose accuracy the other tests show."""
    torch.manual_seed(0)
    x = off_centre(*shape, dtype=dtype)
    width = shape[1] if fn == "group_norm" else arg
    w = (torch.randn(width, dtype=dtype) * 0.5 + 1).requires_grad_() if affine else None
    b = torch.randn(width, dtype=dtype).requires_grad_() if affine and fn != "rms_norm" else None
    g = torch.randn(shape, dtype=dtype)
    outs = []
    for call in (lambda xi: _torch_op_call(fn, xi, arg, w, b, act),
                 lambda xi: _operator_call(fn, xi, arg, w, b, act)):
        xi = x.clone().requires_grad_()
        y = call(xi)
        params = [p for p in (xi, w, b) if p is not None]
        outs.append((y.detach(), *torch.autograd.grad(y, params, g)))
    for ours, operator in zip(*outs):
        assert ours.dtype == operator.dtype and torch.equal(ours, operator)


def test_torch_op_path_is_taken_only_where_native_would_run_that_op(monkeypatch):
    """The operator is skipped only for normlab's own native backend and inputs it would hand
    to that op as they are; every other call reaches the operator (``_dispatch``)."""
    calls = []
    dispatch = NF._dispatch

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return dispatch(*args, **kwargs)

    normlab.backends.get_backend("native")  # loaded (a process's first call loads it)
    monkeypatch.setattr(NF, "_dispatch", spy)
    x3, x4 = off_centre(2, 16, 8), off_centre(2, 8, 4, 4)
    NF.layer_norm(x3, (8,))
    NF.rms_norm(x3, (8,))
    NF.group_norm(x4, 4)
    NF.group_norm(x4, 4, backend="native")
    assert calls == []  # CPU auto and native named: torch's ops
    NF.group_norm(x4.to(memory_format=torch.channels_last), 4)  # native's own channels_last path
    NF.group_norm(x4[:, :, :, :2], 4)                          # strided: not as it is
    NF.group_norm(off_centre(2, 8, 1, 1), 8)                  # one value per group: reference
    NF.group_norm(x4, 4, None, torch.randn(8))                 # bias without weight: unit weight
    NF.group_norm(x4, 4, torch.randn(8, dtype=torch.float64))  # parameters in another dtype
    NF.layer_norm(x3.bfloat16(), (8,))                         # half: the group-norm kernel
    NF.rms_norm(x3.transpose(0, 1), (8,))                      # strided
    NF.layer_norm(x3, (8,), backend="reference")
    with normlab.use_backend("reference"):
        NF.rms_norm(x3, (8,))
    assert calls == [x4.shape, (2, 8, 4, 2), (2, 8, 1, 1), x4.shape, x4.shape] + [(32, 8)] * 4
    # a backend registered under native's name replaces it: it is called
    with _native_replaced() as replaced:
        NF.group_norm(x4, 4)
        NF.layer_norm(x3, (8,))
    assert replaced == [x4.shape, (32, 8)]


def test_every_table_of_the_fused_activations_names_the_same_ones():
    # one list (reference.FUSED_ACTIVATIONS) and the tables that map its names to the kernels'
    # codes, torch.nn modules and torch functions: a name added to one and not the others would
    # be accepted and then fail (or not be fused) far from the cause
    import importlib

    pytest.importorskip("triton")
    from normlab.backends import reference, triton_norm
    convert, optimize = (importlib.import_module(f"normlab.{m}") for m in ("convert", "optimize"))

    names = set(reference.FUSED_ACTIVATIONS)
    assert set(triton_norm.ACT_CODES) - {"none"} == names
    assert set(convert._ACT_MODULES) == names
    assert set(convert._FUSED_NAMES.values()) - {None} == names
    assert set(optimize._ACT_FUNCTIONS.values()) == names


# --------------------------------------------------------------------------------------------
# batch_norm in training: ATen's batch-norm op called directly where native would run it
# --------------------------------------------------------------------------------------------

# (input shape, dtype, affine, running buffers, activation, strided: every other sample, as
# ghost BN's slice 0 of interleaved slices)
BATCH_NORM_OP_CASES = [
    ((4, 6, 5, 5), torch.float32, True, True, None, False),
    ((3, 5, 7), torch.float64, False, True, "relu", False),
    ((8, 4), torch.float32, True, False, None, False),              # (N, C): BatchNorm1d
    ((2, 6, 3, 2, 2), torch.bfloat16, True, True, "silu", False),   # 3 spatial dims, half
    ((8, 6, 4, 4), torch.float32, False, True, None, True),         # strided: ghost BN's slice 0
]


@pytest.mark.parametrize("shape,dtype,affine,running,act,strided", BATCH_NORM_OP_CASES)
def test_batch_norm_training_op_path_equals_the_operators_native_bitwise(shape, dtype, affine,
                                                                         running, act, strided):
    """A training batch_norm call on the native backend runs ``torch.native_batch_norm`` itself,
    without the operator's layers: output, every gradient and the running buffers equal, bit for
    bit, to the operator's native path (``_dispatch``)."""
    torch.manual_seed(0)
    x = off_centre(*shape, dtype=dtype)
    c = shape[1]
    w = (torch.randn(c, dtype=dtype) * 0.5 + 1).requires_grad_() if affine else None
    b = torch.randn(c, dtype=dtype).requires_grad_() if affine else None
    rm0, rv0 = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    outs = []
    for direct in (True, False):
        rm, rv = (rm0.clone(), rv0.clone()) if running else (None, None)
        xi = x.clone().requires_grad_()
        xs = xi[::2] if strided else xi
        if direct:
            y = NF.batch_norm(xs, rm, rv, w, b, True, 0.1, 1e-5, activation=act)
        else:
            y = NF._dispatch(xs, c, True, w, b, 1e-5, act, "native", rm, rv, 0.1)
        params = [p for p in (xi, w, b) if p is not None]
        g = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
        outs.append((y.detach(), *torch.autograd.grad(y, params, g),
                     *([rm, rv] if running else [])))
    for ours, operator in zip(*outs):
        assert ours.dtype == operator.dtype and torch.equal(ours, operator)


def test_batch_norm_training_op_path_is_taken_only_where_native_would_run_that_op(monkeypatch):
    """Only a training call that native would hand to ``torch.native_batch_norm`` as it is skips
    the operator; every other call reaches it (``_dispatch``), and eval never takes the path."""
    calls = []
    dispatch = NF._dispatch

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return dispatch(*args, **kwargs)

    normlab.backends.get_backend("native")  # loaded (a process's first call loads it)
    monkeypatch.setattr(NF, "_dispatch", spy)
    x = off_centre(4, 3, 2, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    NF.batch_norm(x, rm, rv, torch.ones(3), torch.zeros(3), True)
    NF.batch_norm(x, None, None, None, None, True, backend="native")
    NF.batch_norm(x[::2], rm, rv, None, None, True)                # strided: as it is
    assert calls == []  # CPU auto and native named: ATen's op
    NF.batch_norm(x, rm, None, None, None, True)                   # one running buffer alone
    NF.batch_norm(x, rm.double(), rv.double(), None, None, True)   # buffers in another dtype
    NF.batch_norm(x, None, None, torch.ones(3, dtype=torch.float64), None, True)
    NF.batch_norm(off_centre(2, 3, 2, 1, 2, 2), None, None, None, None, True)  # 4 spatial dims
    NF.batch_norm(torch.empty(0, 3, 2, 2), None, None, None, None, True)       # empty
    NF.batch_norm(x, None, None, None, None, True, backend="reference")
    with normlab.use_backend("reference"):
        NF.batch_norm(x, None, None, None, None, True)
    assert calls == ([(4, 3, 2, 2)] * 3 + [(2, 3, 2, 1, 2, 2), (2, 3, 8), (0, 3, 2, 2)]
                     + [(4, 3, 2, 2)] * 2)  # (4 spatial dims: the operator flattens them)
    NF.batch_norm(x, rm, rv, None, None, False)  # eval: running statistics, never the operator
    assert len(calls) == 8
    # a backend registered under native's name replaces it: it is called
    with _native_replaced() as replaced:
        NF.batch_norm(x, rm, rv, None, None, True)
    assert replaced == [(4, 3, 2, 2)]


def test_batch_norm_training_op_path_keeps_the_operators_errors():
    """The path checks what the operator checks, first: the same errors, naming the value."""
    x = off_centre(4, 3, 2, 2)
    with pytest.raises(NF.InputShapeError, match=r"weight must have shape \(3,\)"):
        NF.batch_norm(x, None, None, torch.ones(4), None, True)
    with pytest.raises(NF.InputShapeError, match=r"running_mean must have shape \(3,\)"):
        NF.batch_norm(x, torch.zeros(2), torch.ones(3), None, None, True)
    with pytest.raises(TypeError, match="momentum must be a float"):
        NF.batch_norm(x, torch.zeros(3), torch.ones(3), None, None, True, None)
    with pytest.raises(ValueError, match="eps must be a positive"):
        NF.batch_norm(x, None, None, None, None, True, 0.1, -1.0)
    with pytest.raises(ValueError, match="unknown activation"):
        NF.batch_norm(x, None, None, None, None, True, activation="tanh")
    with pytest.raises(ValueError, match="1 value per channel"):
        NF.batch_norm(off_centre(1, 3, 1, 1), None, None, None, None, True)
    with pytest.raises(RuntimeError, match="running_var cannot have requires_grad"):
        NF.batch_norm(x, torch.zeros(3), torch.ones(3, requires_grad=True), None, None, True)


@contextlib.contextmanager
def _native_replaced():
    """A backend registered under native's name for the block (the built-in one put back after):
    it records each input shape it normalizes, into the list yielded, and computes with the
    reference backend."""
    replaced = []

    class Native:
        name = "native"

        def available(self):
            return True

        def unsupported_reason(self, *a):
            return None

        def normalize(self, x, *args, **kwargs):
            replaced.append(tuple(x.shape))
            return normlab.backends.get_backend("reference").normalize(x, *args, **kwargs)

    builtin = _INSTANCES["native"]
    register_backend("native", Native())
    try:
        yield replaced
    finally:
        register_backend("native", builtin)
