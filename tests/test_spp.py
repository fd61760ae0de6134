"""Signal propagation plots (Brock, De & Smith, ICLR 2021; REFERENCE section 3): the statistics
against a float64 formula, hooks, mode/buffer restoration, and the documented shapes at init."""

import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from normlab import models, spp
from normlab.models import ResidualBlock

KW = dict(batch_size=16, image_size=32)  # 32x32 keeps zero-padding effects small at stage 3


def test_channel_stats_against_float64_formula():
    x = torch.randn(5, 7, 6, 4) * torch.linspace(0.5, 3, 7)[:, None, None] + 4.0
    xs = x.double().permute(1, 0, 2, 3).reshape(7, -1)
    means = xs.mean(1)
    var = ((xs - means[:, None]) ** 2).mean(1)
    sq, v = spp.channel_stats(x)
    assert sq == pytest.approx((means ** 2).mean().item(), rel=1e-12)
    assert v == pytest.approx(var.mean().item(), rel=1e-12)
    cl = spp.channel_stats(x.contiguous(memory_format=torch.channels_last))
    assert cl == pytest.approx((sq, v), rel=1e-6)


class _Scale(ResidualBlock):
    """x + 0.5 * branch_out(3 * x): the residual branch's variance is 9 Var(x)."""

    def forward(self, x):
        return x + 0.5 * self.branch_out(3.0 * x)


def test_records_residual_branch_before_scaling():
    model = nn.Sequential()
    model.add_module("stem", nn.Identity())
    model.add_module("b1", _Scale())
    model.add_module("b2", _Scale())
    x = torch.randn(8, 4, 5, 5) * 1.5 + 0.5
    recs = spp.signal_propagation(model, x)
    assert [r.name for r in recs] == ["stem", "b1", "b2"]
    assert [r.depth for r in recs] == [0, 1, 2]
    sq0, v0 = spp.channel_stats(x)
    assert recs[0].residual_var is None
    assert recs[0].avg_var == pytest.approx(v0)
    assert recs[1].residual_var == pytest.approx(9 * v0)
    assert recs[1].avg_var == pytest.approx(2.5 ** 2 * v0)
    assert recs[2].residual_var == pytest.approx(9 * 2.5 ** 2 * v0)
    assert recs[2].avg_sq_mean == pytest.approx(2.5 ** 4 * sq0)


def test_blocks_by_name_on_any_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Flatten(), nn.Linear(8 * 64, 2))
    recs = spp.signal_propagation(model, blocks=["0", "2"], batch_size=4, image_size=8)
    assert [r.name for r in recs] == ["0", "2"] and all(r.residual_var is None for r in recs)
    with pytest.raises(ValueError, match="no normlab residual blocks"):
        spp.signal_propagation(model)
    with pytest.raises(ValueError, match="'7'"):
        spp.signal_propagation(model, blocks=["0", "7"])


def test_default_batch_is_seeded_unit_gaussian_and_channels_last_matches():
    model = models.create("resnet20", width=4)
    a = spp.signal_propagation(model, batch_size=4, image_size=8, seed=3)
    b = spp.signal_propagation(model, batch_size=4, image_size=8, seed=3)
    c = spp.signal_propagation(model, batch_size=4, image_size=8, seed=3, channels_last=True)
    assert [r.as_dict() for r in a] == [r.as_dict() for r in b]
    for ra, rc in zip(a, c):
        assert rc.avg_var == pytest.approx(ra.avg_var, rel=1e-4)
        assert rc.avg_sq_mean == pytest.approx(ra.avg_sq_mean, rel=1e-3, abs=1e-9)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    d = spp.signal_propagation(model, x)
    assert [r.as_dict() for r in a] == [r.as_dict() for r in d]
    assert len(a) == 1 + 9 and a[0].name == "stem"


def test_float64_model_and_in_chans():
    model = models.create("preact_resnet20", width=4, in_chans=1).double()
    recs = spp.signal_propagation(model, batch_size=4, image_size=8)
    assert all(math.isfinite(r.avg_var) for r in recs)


def test_restores_modes_and_buffers():
    model = models.create("resnet20", width=4, norm="bn")
    model.eval()
    model.stages[1].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    recs = spp.signal_propagation(model, batch_size=4, image_size=8)  # BN runs in train mode
    assert {n: m.training for n, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    ev = spp.signal_propagation(model, batch_size=4, image_size=8, training=False)
    assert ev[-1].avg_var != pytest.approx(recs[-1].avg_var)  # eval uses the running stats


def test_dropout_and_stochastic_depth_are_off_during_measurement():
    model = models.create("nf_resnet20", width=4, skipinit=False, stochastic_depth=0.5,
                          drop_rate=0.5)
    a = spp.signal_propagation(model, batch_size=4, image_size=8)
    b = spp.signal_propagation(model, batch_size=4, image_size=8)
    assert [r.as_dict() for r in a] == [r.as_dict() for r in b]


def test_bad_arguments():
    m = models.create("resnet20", width=4)
    with pytest.raises(TypeError, match="nn.Module"):
        spp.signal_propagation("resnet20")
    with pytest.raises(ValueError, match="batch_size"):
        spp.signal_propagation(m, batch_size=0)
    with pytest.raises(TypeError, match="int64"):
        spp.signal_propagation(m, torch.ones(2, 3, 8, 8, dtype=torch.int64))


# ------------------------------------------------------------------ documented shapes at init


def _by_stage(model, recs):
    """Records of the residual blocks grouped by stage (stem excluded)."""
    out = []
    for i, stage in enumerate(model.stages):
        out.append([r for r in recs if r.name.startswith(f"stages.{i}.")])
        assert len(out[-1]) == len(stage)
    return out


def test_nf_scaled_ws_follows_analytic_variance_with_resets():
    model = models.create("nf_resnet56", skipinit=False)
    recs = spp.signal_propagation(model, batch_size=8, image_size=64)
    expected = [1.0] + [b.expected_var for b in model.modules() if hasattr(b, "expected_var")]
    assert len(expected) == len(recs) == 28
    # Tolerance: every point within 25% of 1 + l*alpha^2. Width 16 at 64x64: zero padding at the
    # 16x16 stage and the 1x1 transition convs' few, correlated input channels give measured /
    # analytic in 0.82-1.06 over 10 seeds (0.73-1.01 at 32x32).
    for r, e in zip(recs, expected):
        assert r.avg_var / e == pytest.approx(1.0, abs=0.25), (r.name, r.avg_var, e)
    assert recs[0].avg_var == pytest.approx(1.0, abs=0.06)  # the stem: a Scaled WS conv
    stages = _by_stage(model, recs)
    alpha2 = 0.2 ** 2
    for s, stage in enumerate(stages):
        growth = (stage[-1].avg_var - stage[0].avg_var) / (len(stage) - 1)
        assert 0.5 * alpha2 < growth < 1.5 * alpha2, (s, growth)        # ~alpha^2 per block
        if s > 0:  # reset at the transition: back to ~1 + alpha^2
            assert stage[0].avg_var < stages[s - 1][-1].avg_var
            assert stage[0].avg_var == pytest.approx(1 + alpha2, rel=0.25)
    # no mean shift: Scaled WS maps constant (mean) inputs to zero
    assert max(r.avg_sq_mean / r.avg_var for r in recs) < 0.02
    assert all(0.6 < r.residual_var < 1.2 for r in recs[1:])


def test_no_analytic_variance_after_the_imagenet_max_pool_stem():
    # NF-ResNet-18: 7x7/2 conv + 3x3/2 max pool, then a first stage with identity shortcuts.
    # Width 8, 64x64 input (16x16 after the stem), float64, 8 samples: ~1 s. The formula starts
    # from a zero-mean unit-variance stem output; the max pool's has mean ~1.5, variance ~0.36.
    torch.manual_seed(0)
    model = models.create("nf_resnet18", width=8, skipinit=False).double()
    x = torch.randn(8, 3, 64, 64, dtype=torch.float64)
    outs = {}
    for n in ("stem", "stages.0.1"):
        dict(model.named_modules())[n].register_forward_hook(
            lambda mod, i, o, n=n: outs.__setitem__(n, o))
    with torch.no_grad():
        model(x)
    assert _var64(outs["stem"]) == pytest.approx(0.36, abs=0.05)
    v = _var64(outs["stages.0.1"])                       # 1 + 2 alpha^2 = 1.08 by the formula
    assert v < 0.6 * (1 + 2 * 0.2 ** 2)                   # measured ~0.48
    assert spp.expected_variance(model) == {}
    # the same blocks after a 3x3 stem (no pool) keep their analytic curve
    small = models.create("nf_resnet18", width=8, skipinit=False, small_input=True)
    assert list(spp.expected_variance(small).values()) == pytest.approx(
        [1 + k * 0.2 ** 2 for k in (1, 2, 1, 2, 1, 2, 1, 2)])


def test_bn_relu_conv_squared_mean_and_variance_grow_within_each_stage():
    model = models.create("preact_resnet56", norm="bn")
    recs = spp.signal_propagation(model, **KW)
    stages = _by_stage(model, recs)
    for s, stage in enumerate(stages):
        # measured last/first over 5 seeds: squared mean 3.5-9x, variance 5.7-6.4x
        assert stage[-1].avg_sq_mean > 2.0 * stage[0].avg_sq_mean, s
        assert stage[-1].avg_var > 3.0 * stage[0].avg_var, s
        if s > 0:  # variance resets at transitions (measured ratio 0.15-0.16)
            assert stage[0].avg_var < 0.5 * stages[s - 1][-1].avg_var


def test_relu_bn_conv_has_no_mean_shift_and_flat_residual_variance():
    model = models.create("preact_resnet56", norm="bn", order="act_norm")
    recs = spp.signal_propagation(model, **KW)
    assert max(r.avg_sq_mean / r.avg_var for r in recs[1:]) < 0.01   # measured <= 0.0015
    res = [r.residual_var for r in recs[1:]]
    assert max(res) / min(res) < 1.5                                   # measured 1.1-1.2
    # the level the spp docstring states: He-init convs (gain 2) on BN's unit-variance output
    assert all(1.5 < r < 2.5 for r in res)                             # measured 1.8-2.2


def test_unnormalized_he_init_squared_mean_explodes():
    model = models.create("preact_resnet56", norm="none")               # He init, no norm
    recs = spp.signal_propagation(model, **KW)
    # measured: the squared mean grows 1.5e6-2e7x over 27 blocks and ends at 1e5-1e6
    assert recs[-1].avg_sq_mean > 1e4 * recs[1].avg_sq_mean
    assert recs[-1].avg_sq_mean > 1e3
    sq = [r.avg_sq_mean for r in recs[1:]]
    assert sum(b > a for a, b in zip(sq, sq[1:])) >= 0.8 * (len(sq) - 1)


def test_nf_with_plain_he_init_has_a_growing_mean_shift():
    he = spp.signal_propagation(models.create("nf_resnet56", skipinit=False, std_conv=False), **KW)
    # measured over 5 seeds: 23-109x growth, squared mean 0.85-1.7x the variance at the end
    assert he[-1].avg_sq_mean > 10 * he[1].avg_sq_mean
    assert he[-1].avg_sq_mean > 0.5 * he[-1].avg_var


def test_plot_writes_png_and_svg(tmp_path):
    a = spp.signal_propagation(models.create("preact_resnet20", width=4), batch_size=4,
                               image_size=8)
    b = [r.as_dict() for r in spp.signal_propagation(
        models.create("nf_resnet20", width=4, skipinit=True), batch_size=4, image_size=8)]
    out = spp.plot({"bn": a, "nf (dicts)": b}, tmp_path / "sub" / "spp.png", title="t")
    assert [p.name for p in out] == ["spp.png", "spp.svg"]
    assert out[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = out[1].read_text()
    assert "<svg" in svg and len(svg) > 10_000
    with pytest.raises(ValueError, match="non-empty"):
        spp.plot({}, tmp_path / "x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_with_channels_last_matches_cpu():
    model = models.create("nf_resnet20", width=8, skipinit=False)
    cpu = spp.signal_propagation(model, batch_size=8, image_size=16)
    gpu_model = models.create("nf_resnet20", width=8, skipinit=False)
    gpu_model.load_state_dict(model.state_dict())
    gpu_model = gpu_model.cuda().to(memory_format=torch.channels_last)
    gpu = spp.signal_propagation(gpu_model, batch_size=8, image_size=16, channels_last=True)
    for a, b in zip(cpu, gpu):
        assert b.avg_var == pytest.approx(a.avg_var, rel=1e-3)
        assert b.residual_var == pytest.approx(a.residual_var, rel=1e-3, abs=1e-9) \
            if a.residual_var is not None else b.residual_var is None


class _TorchvisionStyleBlock(nn.Module):
    """A plain nn.Module residual block (no normlab marker): relu(bn2(conv2(...)) + x)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        r = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(r + x)


def _var64(t):
    """Average channel variance (biased, over N and spatial), float64, written out."""
    t = t.double().transpose(0, 1).reshape(t.shape[1], -1)
    return ((t - t.mean(1, keepdim=True)) ** 2).mean(1).mean().item()


def test_blocks_mapping_measures_the_residual_branch_of_any_module():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _TorchvisionStyleBlock(6),
                          _TorchvisionStyleBlock(6))
    with torch.no_grad():  # make the branch variance differ from BN's 1: gamma per channel
        for i in (1, 2):
            model[i].bn2.weight.copy_(torch.linspace(0.5, 2.0, 6) * i)
    x = torch.randn(4, 3, 8, 8) * 2 + 1
    recs = spp.signal_propagation(model, x, blocks={"0": None, "1": "1.bn2", "2": "2.bn2"})
    assert [r.name for r in recs] == ["0", "1", "2"] and recs[0].residual_var is None
    # independent reference: the same forward written out (BN in training mode, batch stats)
    with torch.no_grad():
        h0 = model[0](x)
        want = []
        for blk in (model[1], model[2]):
            r = F.batch_norm(blk.conv2(torch.relu(F.batch_norm(
                blk.conv1(h0), None, None, blk.bn1.weight, blk.bn1.bias, training=True))),
                None, None, blk.bn2.weight, blk.bn2.bias, training=True)
            want.append(_var64(r))
            h0 = torch.relu(r + h0)
    assert recs[1].residual_var == pytest.approx(want[0], rel=1e-6)
    assert recs[2].residual_var == pytest.approx(want[1], rel=1e-6)
    assert recs[2].avg_var == pytest.approx(_var64(h0), rel=1e-6)
    with pytest.raises(ValueError, match="'1.bn3'"):
        spp.signal_propagation(model, x, blocks={"1": "1.bn3"})


def test_no_gradients_and_global_rng_untouched():
    model = models.create("nf_resnet20", width=4, skipinit=False)
    state = torch.get_rng_state()
    spp.signal_propagation(model, batch_size=2, image_size=8)
    assert torch.equal(torch.get_rng_state(), state)          # the default batch has its own
    assert all(p.grad is None for p in model.parameters())


def test_channels_last_given_batch_and_bool_switches():
    model = models.create("resnet20", width=4)
    x = torch.randn(4, 3, 8, 8)
    a = spp.signal_propagation(model, x)
    b = spp.signal_propagation(model, x, channels_last=True)  # applies to a given x too
    for ra, rb in zip(a, b):
        assert rb.avg_var == pytest.approx(ra.avg_var, rel=1e-4)
    # a non-bool was taken by truth value: training="eval" ran the BNs in training mode
    with pytest.raises(TypeError, match="training must be a bool, got 'eval'"):
        spp.signal_propagation(model, x, training="eval")
    with pytest.raises(TypeError, match="channels_last"):
        spp.signal_propagation(model, x, channels_last=1)
    with pytest.raises(ValueError, match=r"4-d x, got shape \(4, 3, 8\)"):
        spp.signal_propagation(model, x[..., 0], channels_last=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_given_cpu_batch_follows_a_cuda_model():
    model = models.create("nf_resnet20", width=4, skipinit=False)
    x = torch.randn(4, 3, 8, 8)
    cpu = spp.signal_propagation(model, x)
    gpu = spp.signal_propagation(model.cuda(), x)               # x stays on the CPU here
    for a, b in zip(cpu, gpu):
        assert b.avg_var == pytest.approx(a.avg_var, rel=1e-3)


def test_plot_bad_arguments_name_the_problem(tmp_path):
    ok = [{"depth": 0, "avg_sq_mean": 0.1, "avg_var": 1.0, "residual_var": None}]
    with pytest.raises(TypeError, match="mapping.*list"):
        spp.plot([ok], tmp_path / "a")
    with pytest.raises(ValueError, match="model 'nf'.*non-empty"):
        spp.plot({"bn": ok, "nf": []}, tmp_path / "a")
    with pytest.raises(ValueError, match="model 'bn': record 0 has no 'avg_sq_mean'"):
        spp.plot({"bn": [{"depth": 0, "avg_var": 1.0, "residual_var": None}]}, tmp_path / "a")
    with pytest.raises(TypeError, match="path.*int"):
        spp.plot({"bn": ok}, 3)
    assert not list(tmp_path.iterdir())                      # nothing written on a bad call


class _ReassigningStats(ResidualBlock):
    """Updates its running mean by assigning a new tensor (not in place), as some layers do."""

    def __init__(self):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.running_mean = 0.9 * self.running_mean + 0.1 * x.mean((0, 2, 3))
            self.steps += 1
        return x + self.branch_out(x - self.running_mean[:, None, None])


def test_buffers_restored_even_when_the_forward_reassigns_them():
    model = nn.Sequential(_ReassigningStats(), _ReassigningStats())
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objs = dict(model.named_buffers())
    spp.signal_propagation(model, torch.randn(2, 4, 3, 3) + 5.0)   # runs in training mode
    after = model.state_dict()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert all(b is objs[k] for k, b in model.named_buffers())     # the same tensor objects
    assert not model.training and not model[0].training


def test_records_carry_the_analytic_variance_only_where_it_describes_the_model():
    model = models.create("nf_resnet20", skipinit=False)
    recs = spp.signal_propagation(model, batch_size=4, image_size=8)
    # the recurrence written out: v = 1 + k alpha^2 since the last projection, alpha 0.2
    v, expected = 1.0, []
    for b in model.modules():
        if isinstance(b, ResidualBlock):
            v = (1.0 if b.has_projection else v) + 0.04
            expected.append(v)
    assert recs[0].expected_var is None                        # the stem: no claim made
    assert [r.expected_var for r in recs[1:]] == pytest.approx(expected)
    for kw in ({"skipinit": True}, {"skipinit": False, "zero_init_last": True},
               {"skipinit": False, "std_conv": False}):       # branches zero, or He init
        m = models.create("nf_resnet20", **kw)
        assert spp.expected_variance(m) == {}, kw
    assert spp.expected_variance(models.create("preact_resnet20")) == {}


@pytest.mark.parametrize("name, kw, kind", [
    ("preact_resnet20", {}, "BN-ReLU-Conv"),
    ("preact_resnet20", {"order": "act_norm"}, "ReLU-BN-Conv"),
    ("preact_resnet20", {"norm": "gn"}, "GN-ReLU-Conv"),
    ("resnet20", {}, "Conv-BN-ReLU"),
    ("preact_resnet20", {"norm": "none"}, "no normalization (He init)"),
    ("nf_resnet20", {}, "NF + Scaled WS"),
    ("nf_resnet20", {"std_conv": False}, "NF + He init"),
])
def test_describe_names_each_kind(name, kw, kind):
    assert spp.describe(models.create(name, **kw)) == kind


def test_describe_an_unknown_model_is_none():
    assert spp.describe(nn.Sequential(nn.Conv2d(3, 4, 3))) is None


def test_plot_adds_the_analytic_panel_when_records_have_it(tmp_path, monkeypatch):
    nf = spp.signal_propagation(models.create("nf_resnet20", width=4, skipinit=False),
                                batch_size=4, image_size=8)
    bn = spp.signal_propagation(models.create("preact_resnet20", width=4), batch_size=4,
                                image_size=8)
    figs = []
    from matplotlib.figure import Figure
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self),
                                                                  real(self, *a, **k)))
    spp.plot({"bn": bn, "nf": [r.as_dict() for r in nf]}, tmp_path / "spp.png")
    axes = figs[0].axes
    assert len(axes) == 4 and "analytic" in axes[3].get_title()
    lines = {line.get_label(): line for line in axes[3].get_lines()}
    assert set(lines) == {"nf: measured", "nf: analytic"}
    assert list(lines["nf: analytic"].get_ydata()) == [r.expected_var for r in nf[1:]]
    # one colour per model in every panel
    assert lines["nf: measured"].get_color() == next(
        line.get_color() for line in axes[2].get_lines() if line.get_label() == "nf")
    spp.plot({"bn": bn}, tmp_path / "bn.png")
    assert len(figs[-1].axes) == 3


class _ResNetLayout(nn.Module):
    """torchvision's and timm's ResNet layout: conv stem ending in maxpool, then layer1, layer2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(_TorchvisionStyleBlock(6), _TorchvisionStyleBlock(6))
        self.layer2 = nn.Sequential(_TorchvisionStyleBlock(6))

    def forward(self, x):
        return self.layer2(self.layer1(self.maxpool(self.conv1(x))))


def test_a_torchvision_or_timm_resnet_layout_is_found_without_naming_blocks():
    model = _ResNetLayout()
    with torch.no_grad():  # branch variances other than BN's 1
        for i, blk in enumerate([*model.layer1, *model.layer2]):
            blk.bn2.weight.copy_(torch.linspace(0.5, 2.0, 6) * (i + 1))
    x = torch.randn(4, 3, 8, 8) * 2 + 1  # 4 off-centre images; 4 x 4 maps after the pool
    auto = spp.signal_propagation(model, x)
    named = spp.signal_propagation(model, x, blocks={  # the mapping checked above by hand
        "maxpool": None, "layer1.0": "layer1.0.bn2", "layer1.1": "layer1.1.bn2",
        "layer2.0": "layer2.0.bn2"})
    assert [r.as_dict() for r in auto] == [r.as_dict() for r in named]
    assert auto[0].residual_var is None and all(r.residual_var > 0 for r in auto[1:])


def test_timm_resnets_blocks_and_their_branch_ends():
    from timm_import import import_timm

    import_timm()
    # zero_init_last=False: timm zero-inits each block's last norm, which would zero every branch
    model = models.create("timm:resnet10t", norm="gn", norm_kwargs={"num_groups": 8},
                          zero_init_last=False)
    recs = spp.signal_propagation(model, batch_size=4, image_size=32)
    assert [r.name for r in recs] == ["maxpool", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert all(r.residual_var > 0 for r in recs[1:])  # bn2 (a GroupNorm now) of each block
    se = spp.resnet_layout_blocks(dict(models.create("timm:seresnet18").named_modules()))
    assert se["layer1.0"] == "layer1.0.se"  # squeeze-excite ends the branch, after bn2
