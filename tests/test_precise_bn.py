"""normlab.precise_bn (PreciseBN, Wu & Johnson 2021) against an independent float64 reference.

The reference runs each batch on a fresh deep copy of the model as it was (so no state carries
from one batch to the next), records every recomputed layer's input with a hook, concatenates
them over all batches and takes torch's mean and unbiased variance of the whole (InstanceNorm:
the mean over instances of each instance's statistics). The implementation instead merges
per-batch moments as it goes and restores the buffers between batches. Off-centre inputs whose
batches differ in mean, random affine parameters and random running statistics throughout.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nln
from normlab.precise_bn import PreciseBNRecord


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine parameters and running statistics: a model 'after training'."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias", "v"):
                p = getattr(m, name, None)
                if isinstance(p, torch.Tensor) and p.dim() == 1:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name == "weight"
                            else torch.randn(p.shape, generator=g) * 0.3)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            if getattr(m, "running_var", None) is not None:
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


class Net(nn.Module):
    """One of each layer kind precise_bn recomputes, and a dropout, a BN1d after a Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)                       # torch.nn's own
        self.drop = nn.Dropout(0.3)                       # training mode changes the features
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.brn = nln.BatchRenorm2d(8)                   # reads its running stats in training
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.gbn = nln.GhostBatchNorm2d(8, virtual_batch=3)
        self.inn = nln.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.evo = nln.EvoNorm2dB0(8)                     # running_var only
        self.fc = nn.Linear(8, 6)
        self.bn1d = nln.BatchNorm1d(6, activation="relu")

    def forward(self, x):
        x = self.drop(torch.relu(self.bn(self.conv1(x))))
        x = torch.relu(self.brn(self.conv2(x)))
        x = self.evo(self.inn(self.gbn(self.conv3(x))))
        return self.bn1d(self.fc(x.mean((2, 3))))


RECOMPUTED = ["bn", "brn", "gbn", "inn", "evo", "bn1d"]


def _net(dtype=torch.float64) -> Net:
    net = _randomize(Net().to(dtype))
    net.brn.num_batches_tracked.fill_(30000)  # past the warm-up: BRN reads its running stats
    return net


def _batches(n_batches=5, n=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    # off-centre, and each batch's mean differs: the spread of the batch means matters
    return [(torch.randn(n, 3, 5, 5, generator=g, dtype=dtype) * 1.5 + 2 + 0.7 * b,
             torch.randint(0, 6, (n,), generator=g)) for b in range(n_batches)]


def reference(model, batches, names, train_others=True, seed=3):
    """Each layer's (mean, unbiased var) over every value it received, float64."""
    seen = {name: [] for name in names}
    torch.manual_seed(seed)
    for x, _ in batches:
        m = copy.deepcopy(model)  # the model as it was, for every batch
        if train_others:
            m.train()
        hooks = []
        for name in names:
            layer = m.get_submodule(name)
            layer.train()
            hooks.append(layer.register_forward_pre_hook(
                lambda _m, a, kw, name=name: seen[name].append(
                    (a[0] if a else kw["input"]).detach().double()), with_kwargs=True))
        with torch.no_grad():
            m(x)
        for h in hooks:
            h.remove()
    out = {}
    for name, xs in seen.items():
        x = torch.cat(xs)
        c = x.shape[1]
        if isinstance(model.get_submodule(name), nn.modules.instancenorm._InstanceNorm):
            per = x.reshape(x.shape[0], c, -1)
            out[name] = (per.mean(-1).mean(0), per.var(-1, unbiased=True).mean(0))
        else:
            per = x.transpose(0, 1).reshape(c, -1)
            out[name] = (per.mean(1), per.var(1, unbiased=True))
    return out


def _check(model, ref, names, rtol=1e-10, atol=1e-12):
    for name in names:
        layer = model.get_submodule(name)
        mean, var = ref[name]
        if getattr(layer, "running_mean", None) is not None:
            torch.testing.assert_close(layer.running_mean, mean.to(layer.running_mean.dtype),
                                       rtol=rtol, atol=atol, msg=lambda m: f"{name} mean: {m}")
        torch.testing.assert_close(layer.running_var, var.to(layer.running_var.dtype),
                                   rtol=rtol, atol=atol, msg=lambda m: f"{name} var: {m}")


@pytest.mark.parametrize("train_others", [True, False])
def test_every_kind_equals_the_statistics_of_all_values(train_others):
    model = _net()
    model.eval()
    model.drop.train()  # a mode of its own, to be restored
    before = copy.deepcopy(model)
    batches = _batches()
    ref = reference(before, batches, RECOMPUTED, train_others)
    torch.manual_seed(3)  # the same dropout masks as the reference's
    record = normlab.precise_bn(model, batches, train_others=train_others)
    assert isinstance(record, PreciseBNRecord)
    assert sorted(record.recomputed) == sorted(RECOMPUTED) and record.skipped == []
    assert record.batches == len(batches)
    _check(model, ref, RECOMPUTED)
    # everything else as it was: parameters, step counts, modes
    state, old = model.state_dict(), before.state_dict()
    for key in state:
        if key.rsplit(".", 1)[-1] not in ("running_mean", "running_var"):
            assert torch.equal(state[key], old[key]), key
    assert {n: m.training for n, m in model.named_modules()} == {
        n: m.training for n, m in before.named_modules()}
    # the statistics did change (the random ones were not the population's)
    assert not torch.allclose(model.bn.running_var, before.bn.running_var, rtol=0.05)


def test_float32_model_against_the_float64_reference():
    model = _net(torch.float32)
    batches = _batches(dtype=torch.float32)
    ref = reference(copy.deepcopy(model), batches, RECOMPUTED)
    torch.manual_seed(3)
    normlab.precise_bn(model, batches)
    _check(model, ref, RECOMPUTED, rtol=1e-5, atol=1e-5)


def test_the_spread_of_batch_means_is_kept_where_a_cumulative_average_drops_it():
    """BN on the data itself: its population statistics are the data's. torch's update_bn
    (cumulative moving average of each batch's statistics) gets the same mean but averages the
    per-batch variances, which leaves out how far the batch means are apart."""
    batches = [torch.randn(8, 2, 4, 4, dtype=torch.float64) + 3 * b for b in range(4)]
    data = torch.cat(batches).transpose(0, 1).reshape(2, -1)
    ours = _randomize(nn.BatchNorm2d(2).double())
    torchs = copy.deepcopy(ours)
    normlab.precise_bn(ours, batches)
    torch.optim.swa_utils.update_bn(batches, torchs)
    torch.testing.assert_close(ours.running_mean, data.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, data.var(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_mean, torchs.running_mean, rtol=1e-12, atol=1e-12)
    # the batch means are 3 apart: the variance of all values is about 1 + 11.25 (the biased
    # variance of 0, 3, 6, 9), where the average of the batch variances is about 1
    assert (ours.running_var > 10 * torchs.running_var).all()


def test_timm_layers_split_bn_and_norm_act():
    from timm_import import import_timm

    timm = import_timm()
    from timm.layers import BatchNormAct2d, SplitBatchNorm2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Conv2d(4, 4, 1),
                          SplitBatchNorm2d(4, num_splits=2)).double()
    _randomize(model)
    batches = [x for x, _ in _batches()]  # 6 images: 3 per split
    before = copy.deepcopy(model)
    record = normlab.precise_bn(model, batches)
    assert sorted(record.recomputed) == ["1", "3", "3.aux_bn.0"], timm.__version__
    ref = reference(before, [(x, None) for x in batches], ["1", "3.aux_bn.0"])
    _check(model, ref, ["1", "3.aux_bn.0"])
    # the split layer itself: its first split of every batch
    firsts = []
    hook = before[3].register_forward_pre_hook(lambda _m, a: firsts.append(a[0][:3].detach()))
    for x in batches:
        copy.deepcopy(before).train()(x)  # (the copy carries the hook)
    hook.remove()
    x = torch.cat(firsts).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(model[3].running_mean, x.mean(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[3].running_var, x.var(1), rtol=1e-10, atol=1e-12)


def test_layers_left_as_they_are_say_why():
    class OwnForward(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x[:, :, ::2])

    class Partly(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Conv2d(3, 4, 1), nln.FrozenBatchNorm2d(4), OwnForward(4),
                             nn.BatchNorm2d(4, track_running_stats=False), nln.GroupNorm(2, 4),
                             nn.BatchNorm2d(4))
            self.unused = nn.BatchNorm2d(4)  # registered, never called

        def forward(self, x):
            for layer in list(self)[:6]:
                x = layer(x)
            return x

    model = _randomize(Partly())
    before = copy.deepcopy(model)
    record = normlab.precise_bn(model, [x for x, _ in _batches(dtype=torch.float32)])
    assert record.recomputed == ["5"]
    reasons = dict(record.skipped)
    assert sorted(reasons) == ["1", "2", "unused"]
    assert "frozen" in reasons["1"] and "forward of its own" in reasons["2"]
    assert "not reached" in reasons["unused"]
    for name in ("1", "2", "unused"):
        assert torch.equal(model.get_submodule(name).running_var,
                           before.get_submodule(name).running_var)


@pytest.mark.parametrize("form", ["tuple", "tensor", "mapping", "forward", "device"])
def test_batch_forms_and_num_batches(form):
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

        def forward(self, images):
            return self.net(images)

    # float32 values in float64 tensors: the "device" form sends them as float32
    batches = [(x.float().double(), y) for x, y in _batches(n_batches=6)]
    model = _randomize(Keyword().double())
    ref = reference(copy.deepcopy(model), batches[:4], ["net.1"])  # only the first 4 are used
    if form == "tuple":
        record = normlab.precise_bn(model, batches, 4)
    elif form == "tensor":
        record = normlab.precise_bn(model, (x for x, _ in batches), num_batches=4)
    elif form == "mapping":
        record = normlab.precise_bn(model, [{"images": x} for x, _ in batches], 4)
    elif form == "forward":
        record = normlab.precise_bn(model, batches, 4,
                                    forward=lambda m, b: m(images=b[0] * 1.0))
    else:
        record = normlab.precise_bn(model, [(x.float(), y) for x, y in batches], 4,
                                    device="cpu", forward=lambda m, b: m(b[0].double()))
    assert record.batches == 4
    _check(model, ref, ["net.1"])


def test_bad_arguments_are_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    batches = [x for x, _ in _batches(dtype=torch.float32)]
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"num_batches must be at least 1, got {bad}"):
            normlab.precise_bn(model, batches, bad)
    for bad in (True, 2.5, "3"):
        with pytest.raises(TypeError, match=f"num_batches must be an int or None, got {bad!r}"):
            normlab.precise_bn(model, batches, bad)
    with pytest.raises(ValueError, match="gave no batch"):
        normlab.precise_bn(model, [])
    with pytest.raises(TypeError, match="a batch of type str"):
        normlab.precise_bn(model, ["images"])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        normlab.precise_bn([model], batches)
    lazy = nn.Sequential(nln.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="LazyBatchNorm2d has not been materialized"):
        normlab.precise_bn(lazy, batches)


def test_a_failing_batch_leaves_the_model_as_it_was():
    model = _net()
    model.eval()
    before = copy.deepcopy(model)

    def batches():
        yield from _batches(n_batches=2)
        raise RuntimeError("the loader broke")

    with pytest.raises(RuntimeError, match="the loader broke"):
        normlab.precise_bn(model, batches())
    for (k, a), b in zip(model.state_dict().items(), before.state_dict().values()):
        assert torch.equal(a, b), k
    assert not any(m.training for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_layer_called_with_its_input_by_keyword():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(input=x)

    batches = _batches()
    model = _randomize(Keyword().double())
    ref = reference(copy.deepcopy(model), batches, ["bn"])
    assert normlab.precise_bn(model, batches).recomputed == ["bn"]
    _check(model, ref, ["bn"])


@pytest.mark.parametrize("cls", [nn.InstanceNorm2d, nln.InstanceNorm2d, nn.InstanceNorm3d,
                                 nln.InstanceNorm3d])
def test_unbatched_instance_norm_input_is_one_instance(cls):
    """InstanceNorm2d/3d take an unbatched (C, H, W) / (C, D, H, W) input as one instance, as
    InstanceNorm1d takes (C, L). They were read as C instances of their second size's channels:
    with C equal to that size, wrong statistics and no error (here); else a size mismatch."""
    g = torch.Generator().manual_seed(0)
    shape = (4, 4, 6) if "2d" in cls.__name__ else (4, 4, 3, 5)  # C == the next size
    batches = [torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1 + b
               for b in range(3)]
    model = _randomize(cls(4, affine=True, track_running_stats=True).double())
    assert normlab.precise_bn(model, batches).recomputed == [""]
    per = torch.stack([x.reshape(4, -1) for x in batches])  # (instances, C, values)
    _check(model, {"": (per.mean(-1).mean(0), per.var(-1, unbiased=True).mean(0))}, [""])


def test_a_module_with_running_statistics_it_does_not_know_is_in_the_record():
    """A module of one's own with running statistics is left as it is, and said so (it was
    missing from the record)."""

    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(4))
            self.register_buffer("running_var", torch.ones(4))

        def forward(self, x):
            return x - self.running_mean.view(1, -1, 1, 1)

    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 1), Own(), nn.BatchNorm2d(4)))
    before = copy.deepcopy(model)
    record = normlab.precise_bn(model, [x for x, _ in _batches(dtype=torch.float32)])
    assert record.recomputed == ["2"]
    reasons = dict(record.skipped)
    assert sorted(reasons) == ["1"]
    assert "Own is not a layer precise_bn knows" in reasons["1"]
    assert torch.equal(model[1].running_var, before[1].running_var)
    assert torch.equal(model[1].running_mean, before[1].running_mean)


def test_timms_batch_evonorms():
    """timm's EvoNorm2dB0/B1/B2 keep running_var, the unbiased variance over (N, H, W)."""
    from timm_import import import_timm

    import_timm()
    from timm.layers import EvoNorm2dB0, EvoNorm2dB1, EvoNorm2dB2

    torch.manual_seed(0)
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), EvoNorm2dB0(4), nn.Conv2d(4, 4, 1),
                                     EvoNorm2dB1(4), nn.Conv2d(4, 4, 1), EvoNorm2dB2(4))).double()
    batches = _batches()
    ref = reference(copy.deepcopy(model), batches, ["1", "3", "5"])
    assert normlab.precise_bn(model, batches).recomputed == ["1", "3", "5"]
    _check(model, ref, ["1", "3", "5"])


def test_a_buffer_the_forward_assigns_anew_is_restored_too():
    """A forward that assigns a new tensor to a buffer (``self.ema = ...``, not ``.copy_``):
    every batch still sees the model as it was, and the model ends with its own tensor and
    value; the new tensor was kept, and fed into the next batch."""

    class Rebinds(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("ema", torch.full((3,), 0.5, dtype=torch.float64))
            self.bn = nn.BatchNorm2d(3).double()

        def forward(self, x):
            self.ema = 0.5 * self.ema + 0.5 * x.mean((0, 2, 3))
            return self.bn(x - self.ema.view(1, -1, 1, 1))

    batches = _batches()
    model = _randomize(Rebinds())
    ema = model.ema
    ref = reference(model, batches, ["bn"])
    assert normlab.precise_bn(model, batches).recomputed == ["bn"]
    _check(model, ref, ["bn"])
    assert model.ema is ema and torch.equal(ema, torch.full((3,), 0.5, dtype=torch.float64))


def test_a_namedtuple_batch_moved_to_a_device():
    import collections

    Pair = collections.namedtuple("Pair", "images labels")
    batches = [(x.float().double(), y) for x, y in _batches()]
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double())
    ref = reference(copy.deepcopy(model), batches, ["1"])
    record = normlab.precise_bn(model, [Pair(x.float(), y) for x, y in batches], device="cpu",
                                forward=lambda m, b: m(b.images.double()))
    assert record.recomputed == ["1"]
    _check(model, ref, ["1"])


def test_a_model_without_batchnorm_is_said_and_runs_no_batch():
    # after convert_norm(model, "gn") precise_bn returned an empty record without a word, after
    # running every batch through the model for nothing
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8))
    calls = []

    def forward(m, batch):
        calls.append(1)
        return m(batch)

    with pytest.warns(UserWarning, match="Sequential has no BatchNorm layer with running "
                                         "statistics to recompute; nothing was changed"):
        record = normlab.precise_bn(model, [torch.randn(2, 3, 6, 6) + 1.0] * 3, 3,
                                    forward=forward)
    assert record.recomputed == [] and record.batches == 0 and not calls
