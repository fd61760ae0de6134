"""Adaptive Gradient Clipping (NFNets; REFERENCE section 3) against the formula, unit by unit."""

import pytest
import torch
from torch import nn

from normlab import models
from normlab.optim import AGC, adaptive_grad_clip_, agc_parameters, unitwise_norm


def _reference_clip(w: torch.Tensor, g: torch.Tensor, clip: float, eps: float,
                    vector_unit: str = "tensor") -> torch.Tensor:
    """The formula, one unit at a time in float64, written independently of the implementation."""
    w, g = w.double(), g.double().clone()
    if w.dim() >= 2:
        units = [(w[i], g[i]) for i in range(w.shape[0])]
    elif vector_unit == "element":
        units = [(w.reshape(-1)[i], g.reshape(-1)[i]) for i in range(w.numel())]
    else:
        units = [(w, g)]
    for wi, gi in units:
        wn = max(wi.norm().item(), eps)
        gn = gi.norm().item()
        if gn / wn > clip:
            gi.mul_(clip * wn / gn)
    return g


# shapes: a conv weight (a unit = the whole fan-in), a linear weight (a row), a Scaled-WS gain
# (out, 1, 1, 1) (a unit = one element), a bias vector and a 0-d SkipInit scalar
SHAPES = [(8, 4, 3, 3), (6, 10), (8, 1, 1, 1), (7,), ()]


@pytest.mark.parametrize("vector_unit", ["tensor", "element"])
@pytest.mark.parametrize("clip", [0.01, 0.3])
def test_clips_exactly_per_formula(clip, vector_unit):
    params, expected = [], []
    for shape in SHAPES:
        p = nn.Parameter(torch.randn(shape) * 0.5 + 0.1)
        # gradient scales spread over 4 decades so that some units clip and some do not
        scale = torch.logspace(-4, 0, p.shape[0] if p.dim() else 1).reshape(
            (-1,) + (1,) * max(p.dim() - 1, 0)) if p.dim() else torch.tensor(0.05)
        p.grad = (torch.randn(shape) + 0.2) * scale
        params.append(p)
        expected.append(_reference_clip(p.detach(), p.grad, clip, 1e-3, vector_unit))
    adaptive_grad_clip_(params, clip=clip, eps=1e-3, vector_unit=vector_unit)
    clipped_any = unclipped_any = False
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-6, atol=1e-12)
    for p in params[:2]:
        ratio = unitwise_norm(p.grad) / unitwise_norm(p.detach()).clamp_min(1e-3)
        clipped_any |= bool((ratio - clip).abs().lt(1e-6).any())
        unclipped_any |= bool((ratio < clip * 0.999).any())
    assert clipped_any and unclipped_any


def test_eps_floor_lets_zero_weights_move():
    p = nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.full((4, 3), 2.0)
    adaptive_grad_clip_([p], clip=0.01, eps=1e-3)
    # ||G_i|| = 2*sqrt(3) clipped to 0.01 * 1e-3
    torch.testing.assert_close(p.grad.norm(dim=1), torch.full((4,), 1e-5))


def test_skips_params_without_grad_and_accepts_a_single_tensor():
    a, b = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3, 3))
    b.grad = torch.randn(3, 3) * 100
    adaptive_grad_clip_([a, b])
    assert a.grad is None
    single = nn.Parameter(torch.randn(5, 2) + 1)
    single.grad = torch.randn(5, 2) * 10
    exp = _reference_clip(single.detach(), single.grad, 0.01, 1e-3)
    adaptive_grad_clip_(single)
    torch.testing.assert_close(single.grad.double(), exp)


def test_bfloat16_grads():
    p = nn.Parameter(torch.randn(8, 16).bfloat16())
    p.grad = (torch.randn(8, 16) * 10).bfloat16()
    exp = _reference_clip(p.detach(), p.grad, 0.05, 1e-3)
    adaptive_grad_clip_([p], clip=0.05)
    torch.testing.assert_close(p.grad.double(), exp, rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("kw, exc, match", [
    ({"clip": 0.0}, ValueError, "clip"), ({"clip": float("nan")}, ValueError, "clip"),
    ({"eps": -1.0}, ValueError, "eps"), ({"vector_unit": "row"}, ValueError, "row"),
])
def test_bad_arguments(kw, exc, match):
    p = nn.Parameter(torch.randn(2, 2))
    p.grad = torch.randn(2, 2)
    with pytest.raises(exc, match=match):
        adaptive_grad_clip_([p], **kw)


def test_non_tensor_parameter_is_a_typeerror():
    with pytest.raises(TypeError, match="index 1"):
        adaptive_grad_clip_([nn.Parameter(torch.randn(2)), "fc.weight"])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)   # a name that starts with "fc" but is not the classifier
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.fc2(torch.relu(self.body(x)))))


def test_agc_parameters_excludes_the_classifier_by_name():
    net = _Net()
    kept = agc_parameters(net, exclude=("fc",))
    ids = {id(p) for p in kept}
    assert id(net.fc.weight) not in ids and id(net.fc.bias) not in ids
    assert id(net.fc2.weight) in ids and id(net.body.bias) in ids
    assert len(kept) == 4
    with pytest.raises(ValueError, match="head"):
        agc_parameters(net, exclude=("head",))


def test_wrapper_clips_all_but_fc_then_steps():
    torch.manual_seed(0)
    net, twin = _Net(), _Net()
    twin.load_state_dict(net.state_dict())
    opt = AGC(torch.optim.SGD(net.parameters(), lr=0.5), net, clip=0.01)
    x = torch.randn(16, 6) * 3 + 1
    for m in (net, twin):
        m(x).square().sum().backward()
    # expected: the reference clip on every parameter but fc's, then plain SGD
    with torch.no_grad():
        for (n, p), q in zip(twin.named_parameters(), net.parameters()):
            g = p.grad if n.startswith("fc.") else _reference_clip(p, p.grad, 0.01, 1e-3).float()
            assert n.startswith("fc.") or not torch.allclose(g, p.grad)  # it did clip
            p -= 0.5 * g
    opt.step()
    for p, q in zip(twin.parameters(), net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    assert opt.param_groups[0]["lr"] == 0.5          # delegated to the optimizer
    assert "exclude=('fc',)" in repr(opt)


def test_wrapper_with_closure_clips_the_recomputed_gradients():
    net = _Net()
    opt = AGC(torch.optim.SGD(net.parameters(), lr=0.1), net, clip=0.01)
    x = torch.randn(8, 6) * 3
    seen = {}

    def closure():
        opt.zero_grad()
        loss = net(x).square().sum()
        loss.backward()
        seen["raw"] = net.body.weight.grad.clone()
        return loss

    before = net.body.weight.detach().clone()
    opt.step(closure)
    exp = _reference_clip(before, seen["raw"], 0.01, 1e-3).float()
    torch.testing.assert_close(net.body.weight.detach(), before - 0.1 * exp, rtol=1e-5, atol=1e-7)


def test_wrapper_on_normlab_models_default_exclude():
    m = models.create("nf_resnet20", skipinit=False)
    opt = AGC(torch.optim.SGD(m.parameters(), lr=0.1), m)
    assert {id(p) for p in opt.clipped}.isdisjoint({id(m.fc.weight), id(m.fc.bias)})
    assert len(opt.clipped) == len(list(m.parameters())) - 2
    with pytest.raises(TypeError, match="Optimizer"):
        AGC(object(), m)


def test_wrapper_clips_the_optimizers_params_including_added_groups():
    net = _Net()
    # the optimizer owns body and fc only; fc2 belongs to another optimizer
    opt = AGC(torch.optim.SGD(list(net.body.parameters()) + list(net.fc.parameters()), lr=0.1),
              net)
    extra = nn.Parameter(torch.randn(4, 3) + 1)                  # e.g. a learnable loss weight
    opt.add_param_group({"params": [extra]})                      # added after wrapping
    net(torch.randn(8, 6) * 3).square().sum().backward()
    extra.grad = torch.randn(4, 3) * 50
    raw = {n: p.grad.clone() for n, p in net.named_parameters()}
    raw_extra = extra.grad.clone()
    opt.clip_grads_()
    for n, p in net.named_parameters():
        if n.startswith("body."):
            want = _reference_clip(p.detach(), raw[n], 0.01, 1e-3).float()
            assert not torch.allclose(want, raw[n])
        else:  # fc: excluded by name; fc2: not this optimizer's (was clipped all the same)
            want = raw[n]
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-9, msg=n)
    torch.testing.assert_close(
        extra.grad, _reference_clip(extra.detach(), raw_extra, 0.01, 1e-3).float())
    assert any(p is extra for p in opt.clipped)


def test_wrapper_state_dict_round_trip_and_scheduler_on_the_inner_optimizer():
    net = _Net()
    opt = AGC(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net)
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5)
    net(torch.randn(4, 6)).sum().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    state = opt.state_dict()
    other = AGC(torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.9), net)
    other.load_state_dict(state)
    assert other.param_groups[0]["lr"] == pytest.approx(0.05)
    bufs = [other.state[p]["momentum_buffer"] for p in net.parameters()]
    torch.testing.assert_close(bufs, [opt.state[p]["momentum_buffer"] for p in net.parameters()])


def test_grad_scaler_step_clips_the_unscaled_gradients():
    # scaler.step(agc) unscales through agc.param_groups, then calls agc.step(): the clip must
    # see the true gradients (clipping the scaled ones would scale the threshold by 1/scale)
    torch.manual_seed(0)
    net, twin = _Net(), _Net()
    twin.load_state_dict(net.state_dict())
    x = torch.randn(8, 6) * 3
    opt = AGC(torch.optim.SGD(net.parameters(), lr=0.1), net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler.scale(net(x).square().sum()).backward()
    scaler.step(opt)
    scaler.update()
    ref = AGC(torch.optim.SGD(twin.parameters(), lr=0.1), twin)
    twin(x).square().sum().backward()
    ref.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# timm models name their classifier otherwise than normlab's ``fc``; the lab's AGC looked for
# ``fc`` only, so ``--set agc=...`` refused every one of these
_TIMM_HEADS = [("resnet10t", "fc"), ("efficientnet_b0", "classifier"),
               ("convnext_atto", "head.fc"), ("vit_tiny_patch16_224", "head"),
               ("mobilenetv3_small_050", "classifier"), ("regnetx_002", "head.fc")]


@pytest.mark.parametrize("name, head", _TIMM_HEADS)
def test_classifier_of_timm_models_is_timms_and_clips_as_timms_agc(name, head):
    from timm_import import import_timm

    timm = import_timm()
    from timm.models import model_parameters
    from timm.utils.agc import adaptive_clip_grad

    from normlab.optim import classifier_names

    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=5)
    assert classifier_names(m) == (head,)
    assert m.get_submodule(head) is m.get_classifier()
    twin = timm.create_model(name, num_classes=5)
    twin.load_state_dict(m.state_dict())
    for p, q in zip(m.parameters(), twin.parameters()):
        p.grad = torch.randn_like(p) * p.detach().abs().mean().clamp_min(1e-3) * 10
        q.grad = p.grad.clone()
    # the defaults (exclude=None) find the same classifier: the wrapper and the parameter list
    opt = AGC(torch.optim.SGD(m.parameters(), lr=0.1), m)
    assert opt.exclude == (head,)
    assert [id(p) for p in opt.clipped] == [id(p) for p in agc_parameters(m)]
    adaptive_grad_clip_(agc_parameters(m), 0.01, 1e-3)
    # timm's train.py leaves the last 2 parameters (the head's weight and bias) unclipped
    adaptive_clip_grad(model_parameters(twin, exclude_head=True), 0.01, 1e-3)
    for (n, p), q in zip(m.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert torch.equal(m.get_submodule(head).weight.grad, twin.get_submodule(head).weight.grad)


def test_classifier_names_of_other_models_and_the_error_when_there_is_none():
    from normlab.optim import classifier_names

    timm = pytest.importorskip("timm_import").import_timm()
    deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=3, img_size=32,
                             patch_size=8, depth=1)
    assert classifier_names(deit) == ("head", "head_dist")  # get_classifier() gives both
    with pytest.raises(ValueError, match=r"get_classifier\(\) returned \('fc',\) with no "
                                         "parameters"):
        classifier_names(timm.create_model("resnet10t", num_classes=0))
    assert classifier_names(models.create("nf_resnet20")) == ("fc",)
    assert classifier_names(models.create("bn_dropout_cnn")) == ("fc",)
    # the README's own model: an nn.Sequential ending in its Linear classifier
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Sequential(nn.Linear(8, 4), nn.Dropout()))
    assert classifier_names(seq) == ("4.0",)

    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.body(x))

    with pytest.raises(ValueError, match=r"cannot tell the classifier of Own.*\['body', 'out'\]"):
        classifier_names(Own())
    Own.get_classifier = lambda self: self.out
    assert classifier_names(Own()) == ("out",)
    assert classifier_names(_Net()) == ("fc",)
