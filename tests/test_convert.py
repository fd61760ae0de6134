"""convert_norm on torch-only models: replacement, carried weights, exact FrozenBN, shared modules."""

import copy
import warnings

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from normlab import convert_norm
from normlab.factory import get_norm_class
from formula import off_centre
from versions import needs_torch_norm_bias


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.extra = nn.ModuleDict({"bn": nn.BatchNorm2d(c)})

    def forward(self, x):
        return torch.relu(self.extra["bn"](self.bn(self.conv(x)))) + x


def _model():
    torch.manual_seed(3)
    m = nn.Sequential(
        nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(), Block(48),
        nn.Flatten(), nn.Linear(48 * 16, 10), nn.BatchNorm1d(10),
    )
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                mod.weight.copy_(torch.rand_like(mod.weight) + 0.5)
                mod.bias.copy_(torch.randn_like(mod.bias))
    m.train()
    for _ in range(2):
        m(off_centre(4, 3, 4, 4))
    return m


def test_to_gn_replaces_every_bn_with_group_rule_and_weights():
    m = _model()
    old = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)}
    convert_norm(m, "gn", num_groups=32)
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    assert len(m.normlab_conversion) == 4
    for name, bn in old.items():
        gn = m.get_submodule(name)
        assert isinstance(gn, nlnn.GroupNorm) and gn.num_groups == 24  # 48 channels: rule
        assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)
    assert isinstance(m[6], nlnn.GroupNorm) and m[6].num_groups == 10  # BatchNorm1d(10)
    assert m(off_centre(2, 3, 4, 4)).shape == (2, 10)
    assert "BatchNorm2d -> GroupNorm(24, 48" in str(m.normlab_conversion)


def test_to_frozenbn_reproduces_eval_exactly():
    m = _model().eval()
    x = off_centre(3, 3, 4, 4)
    m[6] = nn.Identity()  # FrozenBN is 2-D only
    expected = m(x)
    convert_norm(m, "frozenbn")
    assert sum(isinstance(mod, nlnn.FrozenBatchNorm2d) for mod in m.modules()) == 3
    assert torch.equal(m(x), expected)


def test_torch_bn_to_normlab_bn_keeps_state_and_mode():
    m = _model()
    ref = _model()
    convert_norm(m, "bn")
    assert isinstance(m[1], nlnn.BatchNorm2d) and isinstance(m[6], nlnn.BatchNorm1d)
    assert m[1].training
    for (k, v), (k2, v2) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = off_centre(4, 3, 4, 4)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    m.eval(), ref.eval()
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


def test_shared_module_root_and_dtype():
    bn = nn.BatchNorm2d(8).double()
    shared = nn.Sequential(bn, nn.ReLU(), bn)
    convert_norm(shared, "gn", num_groups=4)
    assert shared[0] is shared[2] and isinstance(shared[0], nlnn.GroupNorm)
    assert shared[0].weight.dtype == torch.float64
    root = convert_norm(nn.BatchNorm2d(16), "ln")
    assert isinstance(root, nlnn.GroupNorm) and root.num_groups == 1
    assert len(root.normlab_conversion) == 1


def test_errors():
    with pytest.raises(ValueError, match="unknown norm 'groupy'"):
        convert_norm(_model(), "groupy")
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        convert_norm({}, "gn")
    # dims=3 is carried over from a BatchNorm3d, not given: the error names that module
    model = nn.Sequential(nn.Conv3d(2, 4, 1), nn.BatchNorm3d(4))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm3d\): norm 'brn' supports dims=\[1, 2\], "
                                         r"got dims=3"):
        convert_norm(model, "brn")
    assert type(model[1]) is nn.BatchNorm3d  # nothing changed


def _trained_bn(cls, c, **kw):
    bn = cls(c, **kw)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(c) + 0.5)
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(c))
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(c))
            bn.running_var.copy_(torch.rand(c) * 0.1 + 0.01)  # small: eps matters
    return bn


def test_class_and_partial_targets_carry_eps_momentum_affine():
    import functools

    m = nn.Sequential(_trained_bn(nn.BatchNorm2d, 4, eps=1e-1, momentum=0.3)).eval()
    x = off_centre(2, 4, 3, 3)
    expected = m(x)
    convert_norm(m, nlnn.FrozenBatchNorm2d)  # by class: the same exact freeze as "frozenbn"
    assert type(m[0]) is nlnn.FrozenBatchNorm2d and m[0].eps == 1e-1
    assert torch.equal(m(x), expected)

    m = nn.Sequential(_trained_bn(nn.BatchNorm2d, 4, eps=1e-1, momentum=0.3))
    convert_norm(m, nlnn.BatchNorm2d)
    assert (m[0].eps, m[0].momentum) == (1e-1, 0.3)
    m = nn.Sequential(_trained_bn(nn.BatchNorm2d, 4, eps=1e-1, affine=False))
    convert_norm(m, nn.GroupNorm)
    assert (m[0].eps, m[0].affine) == (1e-1, False)
    m = nn.Sequential(_trained_bn(nn.BatchNorm2d, 4, eps=1e-1))
    convert_norm(m, functools.partial(nlnn.GroupNorm, 2, eps=1e-3))  # bound in the partial: kept
    assert (m[0].num_groups, m[0].eps) == (2, 1e-3)
    m = nn.Sequential(_trained_bn(nn.BatchNorm2d, 4, eps=1e-1))
    convert_norm(m, nlnn.BatchNorm2d, eps=1e-4)  # given: kept
    assert m[0].eps == 1e-4


@pytest.mark.parametrize("to", ["ln", "ln2d", "brn", "gn", "in"])
def test_affine_false_is_carried_to_every_target(to):
    m = nn.Sequential(nn.BatchNorm2d(8, affine=False))
    convert_norm(m, to)
    assert m[0].weight is None and m[0].bias is None and not list(m[0].parameters())


def test_frozen_parameters_stay_frozen():
    m = nn.Sequential(_trained_bn(nn.BatchNorm2d, 8), nn.BatchNorm2d(8))
    m[0].weight.requires_grad_(False)
    m[0].bias.requires_grad_(False)
    convert_norm(m, "gn", num_groups=4)
    assert not m[0].weight.requires_grad and not m[0].bias.requires_grad
    assert m[1].weight.requires_grad and m[1].bias.requires_grad



def test_frozenbn_refuses_non_2d_batchnorm_before_changing_anything():
    m = nn.Sequential(nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"'2' \(BatchNorm1d\).*FrozenBatchNorm2d.*4-D"):
        convert_norm(m, "frozenbn")
    assert type(m[0]) is nn.BatchNorm2d  # nothing replaced: no half-converted model
    m = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm3d(4))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm3d\)"):
        convert_norm(m, nlnn.FrozenBatchNorm2d)
    m = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        convert_norm(m, "frozenbn")
    assert type(m[0]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="eps must be a positive finite number, got 0"):
        convert_norm(nn.Sequential(nn.BatchNorm2d(4)), "frozenbn", eps=0)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'momentum'"):
        convert_norm(nn.Sequential(nn.BatchNorm2d(4)), "frozenbn", momentum=0.1)


def test_uninitialized_lazy_batchnorm_is_named():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"'1' \(LazyBatchNorm2d\).*not initialized.*forward"):
        convert_norm(m, "gn")
    m(off_centre(2, 3, 4, 4))  # after one forward it is a BatchNorm2d(4)
    convert_norm(m, "gn", num_groups=2)
    assert isinstance(m[1], nlnn.GroupNorm) and m[1].num_channels == 4


@needs_torch_norm_bias
@pytest.mark.parametrize("to", ["bn", "syncbn", "in", "gn", "ln", nn.GroupNorm, nlnn.BatchNorm2d])
def test_bias_false_is_carried(to):
    bn = _trained_bn(nn.BatchNorm2d, 8, bias=False)
    m = convert_norm(nn.Sequential(bn), to)
    assert m[0].bias is None and torch.equal(m[0].weight, bn.weight)
    assert [n for n, _ in m[0].named_parameters()] == ["weight"]


@pytest.mark.parametrize("to,kwargs", [("syncbn", {}), ("gn", {"num_groups": 4}), ("bn", {})])
def test_parameters_are_the_same_objects_so_an_earlier_optimizer_still_trains(to, kwargs):
    """As torch's convert_sync_batchnorm: the new norm holds the BatchNorm's own Parameter
    objects, so an optimizer built before the conversion updates the converted model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    bn_w, bn_b = model[1].weight, model[1].bias
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_norm(model, to, **kwargs)
    assert not isinstance(model[1], nn.BatchNorm2d) or to != "gn"
    assert model[1].weight is bn_w and model[1].bias is bn_b
    before = bn_w.detach().clone()
    model(off_centre(4, 3, 6, 6)).square().mean().backward()
    opt.step()
    assert not torch.equal(model[1].weight.detach(), before)  # the optimizer reached it


def test_frozen_affine_stays_frozen_when_shared():
    src = nn.Sequential(nn.BatchNorm2d(8))
    src[0].weight.requires_grad_(False)
    out = convert_norm(src, "gn", num_groups=2)
    assert not out[0].weight.requires_grad and out[0].bias.requires_grad


def test_syncbn_to_syncbn_keeps_its_process_group():
    # a torch SyncBatchNorm synchronizing over a sub-group must stay on that group, not widen to
    # the whole job (one process, gloo, an in-memory store: no network, no second process)
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4, process_group=group))
        convert_norm(model, "syncbn")
        assert isinstance(model[1], nlnn.SyncBatchNorm)
        assert model[1].process_group is group
        plain = convert_norm(nn.Sequential(nn.BatchNorm2d(4)), "syncbn")
        assert plain[0].process_group is None  # a BatchNorm had no group: the default stays
    finally:
        dist.destroy_process_group()


def test_batch_renorm_layers_are_left_alone_by_a_brn_conversion():
    # a model that already has Batch Renorm layers (1d and 2d) keeps them, with their own
    # r_max/d_max: converting to "brn" replaces only the BatchNorms
    brn1 = nlnn.BatchRenorm1d(6, r_max=2.0, d_max=1.0)
    brn2 = nlnn.BatchRenorm2d(4, r_max=1.5, d_max=0.5)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), brn2, nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4, 6), brn1)
    convert_norm(model, "brn")
    assert model[1] is brn2 and model[5] is brn1
    assert isinstance(model[2], nlnn.BatchRenorm2d)
    assert [r.name for r in model.normlab_conversion.replaced] == ["2"]
    assert convert_norm(brn1, "brn") is brn1  # a Batch Renorm root stays too


def test_syncbn_to_bn_accepts_the_dims_it_served():
    # convert_sync_batchnorm turns BatchNorm1d heads into SyncBatchNorm too; converting back to
    # "bn" cannot know the dims, so the new BN takes any input from (N, C) on
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.SyncBatchNorm(6))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    convert_norm(model, "bn")
    norm = model[1]
    assert isinstance(norm, nlnn.BatchNormXd)
    assert set(norm.state_dict()) == set(nn.BatchNorm1d(6).state_dict())
    for shape in [(8, 6), (4, 6, 7), (2, 6, 3, 3)]:  # 1-D features, sequences, images
        x = off_centre(*shape)
        ref = nn.BatchNorm1d(6) if len(shape) < 4 else nn.BatchNorm2d(6)
        ref.load_state_dict(norm.state_dict())
        torch.testing.assert_close(norm(x), ref(x))
        torch.testing.assert_close(norm.running_mean, ref.running_mean)
    with pytest.raises(ValueError, match="at least 2 dims"):
        norm(torch.randn(6))
    # an explicit dims= still picks the fixed-dims class
    assert type(convert_norm(nn.SyncBatchNorm(6), "bn", dims=1)) is nlnn.BatchNorm1d


@needs_torch_norm_bias
def test_convert_sync_batchnorm_classmethod_as_torchs():
    """SyncBatchNorm.convert_sync_batchnorm (torch's API, convert_norm's builder): the
    same Parameter objects and running statistics, the BN's settings, bias=False kept, a module
    shared under two names stays shared."""
    bn = _trained_bn(nn.BatchNorm1d, 6, momentum=0.3, eps=1e-3)
    nobias = _trained_bn(nn.BatchNorm2d, 4, bias=False)
    model = nn.Sequential(bn, nobias, bn)
    w, mean = bn.weight, bn.running_mean.clone()
    out = nlnn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(out[0]) is nlnn.SyncBatchNorm and out[0] is out[2]
    assert out[0].weight is w and torch.equal(out[0].running_mean, mean)
    assert (out[0].momentum, out[0].eps) == (0.3, 1e-3)
    assert out[1].bias is None and torch.equal(out[1].weight, nobias.weight)


def test_convert_sync_batchnorm_keeps_the_qconfig_as_torchs():
    # torch's classmethod carries a BN's qconfig (eager-mode quantization reads it per module);
    # normlab's dropped it. The converted modules otherwise compute what torch's converted BN does
    qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    theirs = nn.Sequential(nn.Conv2d(3, 4, 3), _trained_bn(nn.BatchNorm2d, 4))
    ours = copy.deepcopy(theirs)
    theirs[1].qconfig = ours[1].qconfig = qconfig
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(theirs)
    ours = nlnn.SyncBatchNorm.convert_sync_batchnorm(ours)
    assert theirs[1].qconfig is qconfig and ours[1].qconfig is qconfig
    assert not hasattr(ours[0], "qconfig")  # only where the BN had one
    x = off_centre(2, 3, 6, 6)
    torch.testing.assert_close(ours(x), theirs(x))  # one process, training: batch statistics


@pytest.mark.parametrize("to", ["gn", "in", "brn", "none"])
def test_a_fused_activation_goes_along(to):
    """A normlab BatchNorm's fused activation survives any target: fused again where the target
    takes activation= (gn, in), else run after it as an act submodule (brn, none)."""
    bn = _trained_bn(nlnn.BatchNorm2d, 8, activation="silu").eval()
    plain = convert_norm(nn.Sequential(_trained_bn(nlnn.BatchNorm2d, 8).eval()), to)[0]
    new = convert_norm(nn.Sequential(bn), to)[0]
    x = off_centre(2, 8, 5, 5)
    with torch.no_grad():
        plain.load_state_dict(new.state_dict())
        torch.testing.assert_close(new(x), torch.nn.functional.silu(plain(x)))
    assert getattr(new, "activation", None) == "silu" or isinstance(new.act, nn.SiLU)


@pytest.mark.parametrize("to,kwargs,eps", [
    ("frn", {}, 1e-6),                         # FRN keeps its own eps (on a mean square)
    ("evonorm_s0", {"num_groups": 4}, 1e-3),   # eps carried from the BatchNorm
    ("evonorm_b0", {}, 1e-3),
])
def test_to_batch_independent_alternatives(to, kwargs, eps):
    bn = nn.BatchNorm2d(8, eps=1e-3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.ReLU())
    model = convert_norm(model, to, **kwargs)
    new = model[1]
    assert type(new) is get_norm_class(to)
    assert new.eps == eps and new.weight is bn.weight and new.bias is bn.bias
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 8, 4, 4)
    assert model.normlab_conversion.replaced[0].new == repr(new)
    with pytest.raises(ValueError, match=f"norm '{to}' supports dims=\\[2\\], got dims=1"):
        convert_norm(nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8)), to, **kwargs)


@pytest.mark.parametrize("to", ["frozenbn", nlnn.FrozenBatchNorm2d, "gn", "bn"])
@pytest.mark.parametrize("train", [False, True])
def test_the_new_norm_takes_the_mode_of_the_one_it_replaces(to, train):
    # a FrozenBatchNorm2d built by the freeze was in training mode inside an eval model
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _trained_bn(nn.BatchNorm2d, 8)).train(train)
    convert_norm(model, to)
    assert model[1].training is train


def test_a_builder_that_returns_no_module_is_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    with pytest.raises(TypeError, match=r"must build an nn.Module, but it returned tuple"):
        convert_norm(model, lambda c: (c,))  # was AttributeError: 'tuple' has no attribute 'to'
    assert type(model[1]) is nn.BatchNorm2d


@pytest.mark.parametrize("convert", [
    lambda m: convert_norm(m, "gn", num_groups=2),
    nlnn.SyncBatchNorm.convert_sync_batchnorm,
])
def test_hooks_left_behind_on_a_replaced_norm_are_named_in_a_warning(convert):
    """A forward hook on a BatchNorm (a feature probe) does not move to the new norm, as with
    torch's convert_sync_batchnorm, which says nothing: the hook then silently stopped
    firing. A warning names the module and the kinds of hooks; a norm without hooks gets none."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    seen = []
    model[1].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    model[1].register_state_dict_pre_hook(lambda *a: None)
    with pytest.warns(UserWarning) as record:
        model = convert(model)
    [w] = record  # the hook-free BatchNorm at '3' is not named
    assert "'1' (BatchNorm2d: forward_hooks, state_dict_pre_hooks) are not carried over" in str(
        w.message)
    if isinstance(model[1], nlnn.GroupNorm):
        model(off_centre(2, 3, 6, 6))
        assert seen == []  # the hook did not come along: what the warning is about


def test_fx_trace_of_a_converted_model_runs_each_hook_once():
    # the act that convert_norm keeps in a forward hook (here: GELU, which LayerNorm2d cannot
    # fuse) and a user's hooks on a normlab module: torch.fx traces through normlab modules,
    # running their hooks on the proxies, and the module's call_module node ran them again
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nlnn.BatchNorm2d(8, activation="gelu"),
                          nn.Conv2d(8, 8, 1), nlnn.BatchNorm2d(8))
    with torch.no_grad():
        for bn in (model[1], model[3]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    model = convert_norm(model.eval(), "ln2d")
    model[3].register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    model[3].register_forward_hook(lambda m, args, out: out * 2)
    x = torch.randn(2, 3, 7, 7)
    gm = torch.fx.symbolic_trace(model)
    h = nn.functional.gelu(nn.functional.layer_norm(
        model[0](x).permute(0, 2, 3, 1), (8,), model[1].weight, model[1].bias, model[1].eps))
    h = model[2](h.permute(0, 3, 1, 2)) + 1
    want = 2 * nn.functional.layer_norm(h.permute(0, 2, 3, 1), (8,), model[3].weight,
                                        model[3].bias, model[3].eps).permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
        torch.testing.assert_close(gm(x), want)


@pytest.mark.parametrize("to", ["frozenbn", nlnn.FrozenBatchNorm2d])
def test_frozenbn_target_takes_an_activation_as_create_norm_does(to):
    # create_norm("frozenbn", C, activation="relu") works, but convert_norm to frozenbn refused
    # the keyword ("it takes eps") while every other BatchNorm target took it
    bn = _model()[1].eval()
    model = convert_norm(nn.Sequential(bn), to, activation="relu")
    x = off_centre(2, 48, 3, 3)
    assert model[0].activation == "relu"
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.relu(bn(x)))


def test_convert_sync_batchnorm_keeps_a_fused_activation():
    # normlab's BatchNorm2d(activation="silu") became a SyncBatchNorm without it (the silu
    # dropped); convert_norm(..., "syncbn") kept it
    bn = _trained_bn(nn.BatchNorm2d, 6)
    ours = nlnn.BatchNorm2d(6, activation="silu")
    ours.load_state_dict(bn.state_dict())
    out = nlnn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(ours.eval()))
    x = off_centre(2, 6, 3, 3)
    assert out[0].activation == "silu"
    with torch.no_grad():
        torch.testing.assert_close(out(x), nn.functional.silu(bn.eval()(x)))


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _small_bn_net():
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 8, 3), _trained_bn(nn.BatchNorm2d, 8), nn.ReLU(),
                         nn.Conv2d(8, 8, 1), _trained_bn(nn.BatchNorm2d, 8)).train()


@pytest.mark.parametrize("to", ["gn", "in", "frozenbn"])
def test_a_ddp_wrapped_model_is_refused_and_left_unchanged(one_process_group, to):
    # convert_norm on a DistributedDataParallel replaced the norms inside it, but DDP had
    # registered the old norms' parameters and buffers when it was built: the next step failed
    # far from the cause (gn, in: an internal assert in DDP's buffer broadcast; frozenbn:
    # "Expected to have finished reduction", the BN weights no longer used)
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _small_bn_net()
    wrapped = DDP(model)
    with pytest.raises(ValueError, match=r"'the model' is a DistributedDataParallel.*"
                                         r"convert the module before wrapping it"):
        convert_norm(wrapped, to)
    assert [type(m) for m in model.modules()].count(nn.BatchNorm2d) == 2  # nothing replaced
    # nothing to replace inside (already normlab's GroupNorm): no refusal
    done = DDP(convert_norm(_small_bn_net(), "gn", num_groups=4))
    assert convert_norm(done, "gn", num_groups=4) is done


def test_converting_before_wrapping_in_ddp_trains_as_the_unwrapped_model(one_process_group):
    # the way the refusal points to: convert, then wrap; two SGD steps equal the same steps of
    # the converted model without DDP (one process: DDP's all-reduce leaves the gradients)
    from torch.nn.parallel import DistributedDataParallel as DDP

    twin = convert_norm(_small_bn_net(), "gn", num_groups=4)
    ddp = DDP(convert_norm(_small_bn_net(), "gn", num_groups=4))
    x = off_centre(4, 3, 6, 6)
    for net in (twin, ddp):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    with torch.no_grad():
        torch.testing.assert_close(ddp(x), twin(x))


def test_convert_layer_norm_refuses_a_ddp_wrapped_model(one_process_group):
    # LayerNorm -> RMSNorm drops the bias Parameter, which DDP would wait for a gradient of
    from torch.nn.parallel import DistributedDataParallel as DDP

    from normlab import convert_layer_norm

    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="convert_layer_norm: 'the model' is a Distributed"):
        convert_layer_norm(DDP(model), "rms")
    assert type(model[1]) is nn.LayerNorm


def test_a_parametrized_batchnorm_is_named_in_a_warning():
    # a parametrization on a BatchNorm's weight (here: kept positive) was dropped without a
    # word: the replacement holds the weight's current value as a plain Parameter, no longer
    # constrained, and the parametrization's original Parameter leaves the model
    from torch.nn.utils import parametrize

    class Positive(nn.Module):
        def forward(self, w):
            return w.abs() + 0.1

    torch.manual_seed(6)
    bn = _trained_bn(nn.BatchNorm2d, 6)
    parametrize.register_parametrization(bn, "weight", Positive())
    with pytest.warns(UserWarning, match=r"parametrizations of '0' \(ParametrizedBatchNorm2d: "
                                         r"weight\) are not carried over"):
        model = convert_norm(nn.Sequential(bn), "gn", num_groups=3)
    x = off_centre(2, 6, 4, 4)
    with torch.no_grad():  # the value it holds: the parametrized weight, against torch's GN
        torch.testing.assert_close(
            model(x), nn.functional.group_norm(x, 3, bn.weight, bn.bias, bn.eps))


def test_gn_layers_reduced_to_one_channel_per_group_are_named_in_a_warning():
    # convert_norm(model, "gn") gave a 16-channel BatchNorm GroupNorm(16, 16) (32 groups asked,
    # the largest divisor of 16 not above it), InstanceNorm, without a word
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 64, 3),
                          nn.BatchNorm2d(64))
    with pytest.warns(UserWarning, match=r"1 layer\(s\) have no more channels than the 32 groups "
                                         r"asked for .* InstanceNorm: 1 \(16\)"):
        convert_norm(copy.deepcopy(model), "gn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # several channels per group, or asked for: no warning
        convert_norm(copy.deepcopy(model), "gn", num_groups=8)
        convert_norm(copy.deepcopy(model), "gn", group_size=1)
        convert_norm(copy.deepcopy(model), "gn", num_groups=16)
