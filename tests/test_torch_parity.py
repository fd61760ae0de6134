"""Drop-in against torch itself (issue 13, items 4-7, 9 and the running-stats edge): the same
input and seed through torch.nn and normlab, and the float64 formula where torch is wrong."""

import collections
import copy
import pickle

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import normlab.functional as NLF
import normlab.nn as nlnn
from normlab.backends import available_backends, use_backend
from formula import normalize64, off_centre
from versions import needs_torch_norm_bias

BACKENDS = [b for b in ("reference", "native", "triton") if b in available_backends()]
# float32 rounding at offset 1000: one ulp of 1000 is 6.1e-5 and x - mean carries about one;
# three ulps leave room for the variance's own rounding (torch.nn's channels_last GN: ~1)
ULP_1000 = 1000 * torch.finfo(torch.float32).eps / 2


def _offset_channels_last(seed, shape=(2, 6, 16, 16)):
    # (2, 6, 16, 16): the size (256 positions per channel), 6 channels for 2 or 3 groups
    torch.manual_seed(seed)
    return (1000 + torch.randn(*shape)).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_norm_channels_last_at_offset_matches_the_formula(backend, seed):
    x = _offset_channels_last(seed)
    for g in (6, 3):  # IN-like (one channel per group) and 2 channels per group
        with use_backend(backend):
            y = nlnn.GroupNorm(g, 6)(x)
        assert y.is_contiguous(memory_format=torch.channels_last)  # as torch's GN
        err = (y.double() - normalize64(x, g, False)).abs().max().item()
        assert err < 3 * 2 * ULP_1000, (backend, g, err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instance_norm_channels_last_offset_and_memory_format_as_torch(backend, seed):
    x = _offset_channels_last(seed)
    with use_backend(backend):
        y = nlnn.InstanceNorm2d(6)(x)
    want = nn.InstanceNorm2d(6)(x)
    assert y.is_contiguous() and want.is_contiguous()  # torch returns contiguous: .view works
    y.view(-1)
    err = (y.double() - normalize64(x, 6, False)).abs().max().item()
    assert err < 3 * 2 * ULP_1000, (backend, err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_5d_channels_last_3d_at_offset_and_instance_norm_contiguous_as_torch(backend):
    # 5-D channels_last_3d (4x4x4 positions): the other channels_last layout
    torch.manual_seed(0)
    x = (1000 + torch.randn(2, 6, 4, 4, 4)).contiguous(memory_format=torch.channels_last_3d)
    with use_backend(backend):
        y, g = nlnn.InstanceNorm3d(6)(x), nlnn.GroupNorm(3, 6)(x)
    assert y.is_contiguous() and nn.InstanceNorm3d(6)(x).is_contiguous()
    assert g.is_contiguous(memory_format=torch.channels_last_3d)
    assert (y.double() - normalize64(x, 6, False)).abs().max().item() < 3 * 2 * ULP_1000
    assert (g.double() - normalize64(x, 3, False)).abs().max().item() < 3 * 2 * ULP_1000


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_channels_last_at_offset_as_accurate_as_contiguous(dtype):
    # the shifted channels_last path in half precision: no worse than the NCHW path
    torch.manual_seed(0)
    x = (100 + torch.randn(2, 6, 8, 8)).to(dtype)
    exact = normalize64(x, 3, False)
    err_cl = (nlnn.GroupNorm(3, 6).to(dtype)(x.contiguous(memory_format=torch.channels_last))
              .double() - exact).abs().max().item()
    err_nchw = (nlnn.GroupNorm(3, 6).to(dtype)(x).double() - exact).abs().max().item()
    assert err_cl <= 1.5 * err_nchw + 1e-6, (err_cl, err_nchw)


def test_group_norm_one_value_per_group_raises_as_torch():
    x = torch.tensor([[1e6, 2e6, 3e6, 4e6]])  # the input: 4 groups of one value, N = 1
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as theirs:
        nn.GroupNorm(4, 4)(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training.*\\(1, 4\\)"):
        nlnn.GroupNorm(4, 4)(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        NLF.group_norm(x, 4)
    assert "Expected more than 1 value per channel when training" in str(theirs.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_one_value_per_group_over_a_batch_is_the_bias(backend):
    # N = 2: torch accepts it (2 values per group over the batch) but returns garbage at 1e6
    # (ATen's kernel); each sample's group is one value, so the formula gives exactly the bias
    x = torch.tensor([[1e6, 2e6, 3e6, 4e6], [5e6, 6e6, 7e6, 8e6]])
    ours = nlnn.GroupNorm(4, 4)
    with torch.no_grad():
        ours.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    with use_backend(backend):
        torch.testing.assert_close(ours(x), ours.bias.detach().expand(2, 4))


@pytest.mark.parametrize(
    "call",
    [lambda mod, f: mod.LayerNorm(0)(torch.randn(4, 6, 0)),            # normalized_shape (0,)
     lambda mod, f: f.layer_norm(torch.randn(0, 8), (0, 8)),           # no element at all
     lambda mod, f: f.layer_norm(torch.randn(0, 8), (8,)),             # no rows
     lambda mod, f: f.batch_norm(torch.randn(0), None, None, training=True)],  # empty 1-D
)
def test_empty_inputs_return_what_torch_returns(call):
    torch.manual_seed(0)
    want = call(nn, F)
    got = call(nlnn, NLF)
    assert got.shape == want.shape and got.dtype == want.dtype


def test_layer_norm_of_empty_input_keeps_the_parameters_in_the_graph():
    ln = nlnn.LayerNorm((0,))
    x = torch.randn(3, 0, requires_grad=True)
    ln(x).sum().backward()
    assert x.grad.shape == (3, 0)


def test_batch_norm_on_a_1d_input_names_the_shape():
    # torch: IndexError "Dimension out of range"; normlab: which shape it needs and got
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\).*\(5,\)"):
        NLF.batch_norm(torch.randn(5), None, None, training=True)


@pytest.mark.parametrize(
    "theirs,ours,text",
    [(lambda: F.batch_norm(torch.randn(1, 3), None, None, training=True),
      lambda: NLF.batch_norm(torch.randn(1, 3), None, None, training=True),
      "Expected more than 1 value per channel when training"),
     (lambda: nn.BatchNorm2d(3)(torch.randn(1, 3, 1, 1)),
      lambda: nlnn.BatchNorm2d(3)(torch.randn(1, 3, 1, 1)),
      "Expected more than 1 value per channel when training"),
     (lambda: F.instance_norm(torch.randn(2, 3, 1)),
      lambda: NLF.instance_norm(torch.randn(2, 3, 1)),
      "Expected more than 1 spatial element when training"),
     (lambda: nn.InstanceNorm1d(3)(torch.randn(2, 3, 1)),
      lambda: nlnn.InstanceNorm1d(3)(torch.randn(2, 3, 1)),
      "Expected more than 1 spatial element when training")],
)
def test_fixed_error_texts_are_torchs(theirs, ours, text):
    """The words users and libraries match on are torch's; normlab adds the offending shape."""
    with pytest.raises(ValueError, match=text):
        theirs()
    with pytest.raises(ValueError, match=text):
        ours()


def test_group_norm_bad_groups_text_is_torchs():
    with pytest.raises(RuntimeError, match="Expected number of channels in input to be divisible by num_groups"):
        F.group_norm(torch.randn(2, 6, 3), 4)
    # the same words; ValueError, as normlab's argument errors are (the value named)
    with pytest.raises(ValueError, match="Expected number of channels in input to be divisible by num_groups.*num_channels=6.*num_groups=4"):
        NLF.group_norm(torch.randn(2, 6, 3), 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norm_one_group_2d_half_gradients_as_accurate_as_torch(dtype):
    # (150, 6): the shape, 2-D so that G = 1 is LayerNorm over the features
    torch.manual_seed(0)
    x, dy = off_centre(150, 6, dtype=torch.float64), torch.randn(150, 6, dtype=torch.float64)
    w, b = torch.rand(6) + 0.5, torch.randn(6)

    def grads(module, dt):
        module = module.to(dt)
        with torch.no_grad():
            module.weight.copy_(w)
            module.bias.copy_(b)
        xx = x.detach().to(dt).clone().requires_grad_()
        module(xx).backward(dy.to(dt))
        return [t.double() for t in (module.weight.grad, module.bias.grad, xx.grad)]

    exact = grads(nn.GroupNorm(1, 6), torch.float64)
    theirs = grads(nn.GroupNorm(1, 6), dtype)
    ours = grads(nlnn.GroupNorm(1, 6), dtype)
    for o, t, e, name in zip(ours, theirs, exact, ("dweight", "dbias", "dx")):
        err_o, err_t = (o - e).abs().max().item(), (t - e).abs().max().item()
        assert err_o <= 1.5 * err_t + 1e-6, (name, err_o, err_t)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("where", [(0, 0, 0, 0), (0, 0, 1, 2)])  # first element (the shift) or not
def test_inf_input_running_stats_as_torch(backend, where):
    torch.manual_seed(0)
    x = off_centre(2, 3, 4, 4)
    x[where] = float("inf")
    theirs = nn.InstanceNorm2d(3, track_running_stats=True)
    ours = nlnn.InstanceNorm2d(3, track_running_stats=True)
    theirs(x)
    with use_backend(backend):
        ours(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, equal_nan=True)
    torch.testing.assert_close(ours.running_var, theirs.running_var, equal_nan=True)
    assert ours.running_mean[0] == float("inf")


@pytest.mark.parametrize("momentum", [None, -0.5, 1.5])
@pytest.mark.parametrize("pair", [(nn.BatchNorm2d, nlnn.BatchNorm2d),
                                  (nn.InstanceNorm2d, nlnn.InstanceNorm2d)])
def test_momentum_outside_0_1_behaves_as_torch(momentum, pair):
    """Not validated, as torch (documented): the running average takes it as given."""
    kwargs = {"track_running_stats": True} if pair[0] is nn.InstanceNorm2d else {}
    theirs, ours = (cls(3, momentum=momentum, **kwargs) for cls in pair)
    for seed in (0, 1):
        torch.manual_seed(seed)
        x = off_centre(4, 3, 5, 5)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-5, rtol=1e-5)


# an input with 3 channels for modules of 4: torch raises RuntimeError ("running_mean should
# contain 3 elements not 4", "Expected weight to be a vector of size ..."); normlab's error is
# a ValueError naming the shape that code written for torch also catches as RuntimeError
@pytest.mark.parametrize("make,shape", [
    (lambda m: m.BatchNorm2d(4), (2, 3, 4, 4)),                        # running_mean's size
    (lambda m: m.BatchNorm1d(4, track_running_stats=False), (5, 3)),  # weight, not running_mean
    (lambda m: m.GroupNorm(2, 4), (2, 3, 4)),                          # 3 channels, 2 groups
    (lambda m: m.GroupNorm(1, 4), (2, 6, 4)),                          # divisible, still not 4
])
def test_wrong_channel_count_is_the_runtime_error_torch_raises(make, shape):
    x = off_centre(*shape)
    with pytest.raises(RuntimeError):
        make(nn)(x)
    with pytest.raises(RuntimeError, match=rf"expects 4 channels.*{tuple(shape)}") as ours:
        make(nlnn)(x)
    assert isinstance(ours.value, ValueError)


# a wrong type for a count argument: torch raises TypeError (from torch.empty, or a missing
# argument); normlab the same type, naming the argument and the value
@pytest.mark.parametrize("make,text", [
    (lambda m: m.SyncBatchNorm(3.0), "num_features must be a positive int, got 3.0"),
    (lambda m: m.SyncBatchNorm("3"), "num_features must be a positive int, got '3'"),
    (lambda m: m.GroupNorm(2, 4.0), "num_channels must be a positive int, got 4.0"),
    (lambda m: m.GroupNorm(num_channels=4), "missing required argument: 'num_groups'"),
    (lambda m: m.GroupNorm(2), "missing required argument: 'num_channels'"),
    (lambda m: m.RMSNorm("4"), "normalized_shape must be an int or a sequence of ints, got '4'"),
    (lambda m: m.RMSNorm([4, 2.0]), r"got \[4, 2.0\]"),
])
def test_wrong_argument_types_are_torchs_type_error(make, text):
    with pytest.raises(TypeError):
        make(nn)
    with pytest.raises(TypeError, match=text):
        make(nlnn)


def test_rmsnorm_input_is_named_x_as_torchs():
    x = off_centre(3, 5)
    ours, theirs = nlnn.RMSNorm(5), nn.RMSNorm(5)
    torch.testing.assert_close(ours(x=x), theirs(x=x), rtol=1e-5, atol=1e-6)


@needs_torch_norm_bias
@pytest.mark.parametrize("ours,theirs", [
    # each module that takes bias= by building torch's module with a bias and dropping it
    # (nn._common.drop_bias: torch < 2.11 has no bias= argument)
    (lambda: nlnn.BatchNorm2d(6, bias=False), lambda: nn.BatchNorm2d(6, bias=False)),
    (lambda: nlnn.InstanceNorm2d(6, affine=True, track_running_stats=True, bias=False),
     lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True, bias=False)),
    (lambda: nlnn.GroupNorm(3, 6, bias=False), lambda: nn.GroupNorm(3, 6, bias=False)),
    (lambda: nlnn.SyncBatchNorm(6, bias=False), lambda: nn.SyncBatchNorm(6, bias=False)),
])
def test_bias_false_state_repr_reset_and_output_as_torch(ours, theirs):
    torch.manual_seed(0)
    a, b = ours(), theirs()
    assert a.bias is None and list(a.state_dict()) == list(b.state_dict())
    assert repr(a) == repr(b)
    with torch.no_grad():  # random affine and running statistics, then reset both
        for m in (a, b):
            m.weight.uniform_(0.5, 1.5)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.normal_(); m.running_var.uniform_(0.5, 2.0)
    b.load_state_dict(a.state_dict())
    x = off_centre(4, 6, 5, 5)
    torch.testing.assert_close(a(x), b(x))  # training: the batch statistics, weight, no bias
    a.reset_parameters(); b.reset_parameters()
    assert a.bias is None
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(t, u, msg=name)


@pytest.mark.parametrize("make", [
    lambda m: m.InstanceNorm2d(6),                                    # no affine, no buffers
    lambda m: m.InstanceNorm2d(6, affine=True, track_running_stats=True),  # both
    lambda m: nlnn.GhostBatchNorm2d(6, virtual_batch=2) if m is nlnn else m.BatchNorm2d(6),
])
@pytest.mark.parametrize("shape", [(4, 6, 0, 5), (4, 6, 3, 0)])  # no position: H = 0, W = 0
def test_a_training_input_without_positions_gives_what_torch_gives(make, shape):
    """torch refuses exactly one value per statistic (``== 1``); an input with no position at
    all is empty, not one value: torch's InstanceNorm and BatchNorm return an empty output and
    leave the running statistics alone (GhostBatchNorm's reference is BatchNorm, the layer it
    stands for). normlab raised "Expected more than 1 spatial element" / "1 value per channel
    and slice" there."""
    theirs, ours = make(nn).train(), make(nlnn).train()
    with torch.no_grad():
        for m in (theirs, ours):
            if m.running_mean is not None:
                m.running_mean.normal_(1.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    want = theirs(x)
    got = ours(x)
    assert got.shape == want.shape == shape and got.dtype == want.dtype
    got.sum().backward()  # the graph holds: an empty input gradient, as torch's
    assert x.grad.shape == shape
    for (name, t), u in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(t, u, msg=name)  # buffers left alone; the batch counted


# the torch.nn modules normlab's subclass, each with random affine and running statistics; the
# keys are torch's, so the same state_dict goes into both
_PAIRS = {
    "bn": lambda m, **kw: m.BatchNorm2d(6, **kw),
    "syncbn": lambda m, **kw: m.SyncBatchNorm(6, **kw),  # one process: BatchNorm's output
    "in": lambda m, **kw: m.InstanceNorm2d(6, affine=True, track_running_stats=True, **kw),
    "gn": lambda m, **kw: m.GroupNorm(3, 6, **kw),
    "ln": lambda m, **kw: m.LayerNorm([6, 5, 5], **kw),
    "rms": lambda m, **kw: m.RMSNorm([6, 5, 5], **kw),
}


def _random_state(module):
    """torch.nn's module's state_dict with weights around 1, biases and means off 0."""
    torch.manual_seed(0)
    state = module.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "var" in name or "weight" in name
                        else torch.randn_like(t))
    return state


@pytest.mark.parametrize("name", list(_PAIRS))
@pytest.mark.parametrize("how", ["device=", "context"])
def test_meta_construction_then_load_state_dict_assign_as_torch(name, how):
    """The large-model loading path (``torch.device('meta')`` or ``device='meta'``, then
    ``load_state_dict(state, assign=True)``): no memory until the checkpoint's tensors are
    assigned, which become the module's Parameters and buffers; train and eval outputs are then
    torch.nn's on the same state."""
    theirs = _PAIRS[name](nn)
    state = _random_state(theirs)
    if how == "context":
        with torch.device("meta"):
            ours = _PAIRS[name](nlnn)
    else:
        ours = _PAIRS[name](nlnn, device="meta")
    assert all(t.is_meta for t in list(ours.parameters()) + list(ours.buffers()))
    ours.load_state_dict(state, assign=True)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in ours.parameters())
    assert ours.weight.data_ptr() == state["weight"].data_ptr()  # assigned, not copied
    x = off_centre(4, 6, 5, 5)
    for train in (False, True):  # eval first: the loaded running statistics
        torch.testing.assert_close(ours.train(train)(x), theirs.train(train)(x))
    for (key, t), u in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(t, u, msg=key)


@pytest.mark.parametrize("make", [
    lambda: nlnn.BatchNorm2d(6, activation="silu"), lambda: nlnn.GroupNorm(3, 6),
    lambda: nlnn.InstanceNorm2d(6, track_running_stats=True), lambda: nlnn.LayerNorm2d(6),
    lambda: nlnn.RMSNorm2d(6), lambda: nlnn.FrozenBatchNorm2d(6),
    lambda: nlnn.GhostBatchNorm2d(6, virtual_batch=2), lambda: nlnn.BatchRenorm2d(6),
    lambda: nlnn.FilterResponseNorm2d(6), lambda: nlnn.EvoNorm2dS0(6, num_groups=3),
    lambda: nlnn.EvoNorm2dB0(6), lambda: nlnn.SyncBatchNorm(6), lambda: nlnn.WSConv2d(6, 6, 3),
    lambda: nlnn.LazyBatchNorm2d(),  # becomes BatchNorm2d on its first forward
])
def test_whole_module_torch_save_pickle_and_deepcopy_as_torch(make, tmp_path):
    """``torch.save(model)`` / ``torch.load(weights_only=False)``, pickle and ``copy.deepcopy``
    of a model that holds the module after a training step (moved buffers, the lazy module
    materialized): the same class, state and outputs in both modes, as for torch.nn's modules."""

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), make())
    x = off_centre(4, 3, 5, 5)
    model(x)  # a training step: running statistics moved, the lazy module materialized
    torch.save(model, tmp_path / "model.pt")
    copies = [torch.load(tmp_path / "model.pt", weights_only=False),
              pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    for train in (False, True):
        want = copy.deepcopy(model).train(train)(x)
        for other in copies:
            assert type(other[1]) is type(model[1])
            torch.testing.assert_close(other.train(train)(x), want)
            for (key, t), u in zip(other.state_dict().items(), model.state_dict().values()):
                assert t.dtype == u.dtype, key


@pytest.mark.parametrize("name", list(_PAIRS))
@pytest.mark.parametrize("train", [True, False])
def test_cpu_bfloat16_autocast_after_a_conv_as_torch(name, train):
    """CPU autocast (the lab's ``--amp`` on the CPU): the conv before the norm gives bfloat16,
    the norm's parameters stay float32, a mixed call torch's CPU kernels take. Output (dtype and
    values), gradients and buffers are torch.nn's."""
    runs = []
    x = off_centre(4, 3, 5, 5)
    for m in (nn, nlnn):
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 6, 3, padding=1)
        norm = _PAIRS[name](m)
        if m is nn:
            state = {k: v.clone() for k, v in _random_state(norm).items()}
        else:
            norm.load_state_dict(state)
        model = nn.Sequential(conv, norm).train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        (y.float() * torch.linspace(-1, 2, y.numel()).view_as(y)).sum().backward()
        runs.append((y, conv.weight.grad, norm.state_dict()))
    (want, want_grad, want_state), (got, got_grad, got_state) = runs
    assert got.dtype == want.dtype == torch.bfloat16
    if name == "in" and train:
        # normlab takes IN's statistics per (sample, channel), torch batch-norms the (1, N*C,
        # ...) view: bfloat16 roundings differ (one ulp on 1 output of 600; the conv's gradient,
        # through the bfloat16 backward, within one bfloat16 ulp of its largest value: both as
        # far from the float64 computation, 0.106, in one check)
        torch.testing.assert_close(got, want)
        assert (got_grad - want_grad).abs().max() <= 2 ** -7 * want_grad.abs().max()
    else:  # the same kernels on the same values: the same bits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)
    for key in want_state:
        torch.testing.assert_close(got_state[key], want_state[key], msg=key)


@pytest.mark.parametrize("make", [
    lambda m: m.BatchNorm2d(6, momentum=None),  # cumulative: the count decides the average
    lambda m: m.SyncBatchNorm(6, momentum=None),
    lambda m: m.InstanceNorm2d(6, momentum=None, track_running_stats=True),
    # normlab's own: the reference is the same class given the full state with the kept count
    lambda m: nlnn.GhostBatchNorm2d(6, virtual_batch=2, momentum=None),
    lambda m: nlnn.BatchRenorm2d(6),  # the count drives the r, d schedule
])
@pytest.mark.parametrize("metadata", [True, False])
def test_an_old_state_dict_without_num_batches_tracked_loads_as_torchs(make, metadata):
    """A checkpoint from before torch 0.4.1 has no ``num_batches_tracked`` (its metadata says
    version 1; a hand-built dict has none): torch's ``_load_from_state_dict`` keeps the
    module's own count and loads strictly. normlab's BatchNorm-like modules load such a
    checkpoint as torch's, and the next training step averages from that count."""
    theirs = make(nn)
    state = _random_state(theirs)
    old = collections.OrderedDict((k, v) for k, v in state.items() if "num_batches" not in k)
    if metadata:
        old._metadata = copy.deepcopy(state._metadata)
        old._metadata[""]["version"] = 1
    state["num_batches_tracked"].fill_(3)  # (theirs's own buffer) the count to keep: 1/4 next
    torchs = type(theirs).__module__.startswith("torch.")
    theirs.load_state_dict(old if torchs else state, strict=True)  # torch's rule, or the rule
    ours = make(nlnn)
    ours.num_batches_tracked.fill_(3)
    ours.load_state_dict(old, strict=True)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    x = off_centre(4, 6, 5, 5)
    torch.testing.assert_close(ours.train()(x), theirs.train()(x))
    for key, want in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], want, msg=key)


@pytest.mark.parametrize("make,shape", [
    # N = 0 into IN with running statistics: torch's writes NaN into them (a mean over no
    # instance); BatchNorm, torch's and normlab's, leaves its own alone on an empty batch
    (lambda m: m.InstanceNorm2d(6, affine=True, track_running_stats=True), (0, 6, 4, 4)),
    # no position into GroupNorm: torch's weight gradient is NaN (0/0); there is no value, so
    # the gradient of a sum over no output is 0, as torch's bias gradient is
    (lambda m: m.GroupNorm(3, 6), (2, 6, 0, 4)),
])
def test_an_empty_input_leaves_buffers_and_gradients_finite_where_torch_gives_nan(make, shape):
    ours = make(nlnn).train()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(*shape, requires_grad=True)
    y = ours(x)
    assert y.shape == shape
    y.sum().backward()
    for key, value in ours.state_dict().items():
        if key != "num_batches_tracked":
            torch.testing.assert_close(value, before[key], msg=key)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, torch.zeros_like(p), msg=name)
