"""normlab.convert_layer_norm: a model's LayerNorms and RMSNorms become LayerNorm, RMSNorm or
nothing, each in its own form. The reference is torch's and timm's own classes put in the same
places by hand (torch.nn.LayerNorm / RMSNorm over the tokens, timm's LayerNorm2d / RmsNorm2d
over the channels), holding the same parameters."""

import copy

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nlnn
from formula import off_centre
from timm_import import import_timm


class _Block(nn.Module):
    """A transformer-style block on (N, tokens, 16) with every token-norm source: torch's
    LayerNorm (with and without bias), torch's RMSNorm with eps=None, timm's LayerNorm."""

    def __init__(self, timm):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)
        self.ln_nobias = nn.LayerNorm(16, bias=False)
        self.rms = nn.RMSNorm(16)
        self.timm_ln = timm.layers.LayerNorm(16, eps=1e-6)

    def forward(self, x):
        return self.timm_ln(self.rms(self.ln_nobias(self.ln(self.fc(x)))))


class _ConvBlock(nn.Module):
    """A ConvNeXt-style block on NCHW input: timm's LayerNorm2d and RmsNorm2d (over channels)."""

    def __init__(self, timm):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ln2d = timm.layers.LayerNorm2d(8)
        self.rms2d = timm.layers.RmsNorm2d(8)

    def forward(self, x):
        return self.rms2d(self.ln2d(self.conv(x)))


def _randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


def _by_hand(model, to, timm):
    """The reference: each norm replaced by torch's or timm's class for ``to``, by setattr,
    holding a copy of the same weight (and bias, LayerNorm to LayerNorm)."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_children()):
        token = isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and not isinstance(
            m, timm.layers.LayerNorm2d)
        channel = isinstance(m, (timm.layers.LayerNorm2d, timm.layers.RmsNorm2d))
        if not (token or channel):
            continue
        eps = m.eps if m.eps is not None else 1e-5
        if to == "none":
            new = nn.Identity()
        elif to == "rms":
            new = (nn.RMSNorm(16, eps=m.eps) if token else timm.layers.RmsNorm2d(8, eps=eps))
        else:
            has_bias = getattr(m, "bias", None) is not None or isinstance(m, nn.RMSNorm) or \
                isinstance(m, timm.layers.RmsNorm2d)
            new = (nn.LayerNorm(16, eps=eps, bias=has_bias) if token
                   else timm.layers.LayerNorm2d(8, eps=eps))
        with torch.no_grad():
            if to != "none":
                new.weight.copy_(m.weight)
                if to == "ln" and getattr(m, "bias", None) is not None:
                    new.bias.copy_(m.bias)
        setattr(ref, name, new)
    return ref


@pytest.mark.parametrize("to", ["ln", "rms", "none"])
@pytest.mark.parametrize("kind", ["token", "channel"])
def test_every_source_becomes_the_target_in_its_own_form(kind, to):
    timm = import_timm()
    torch.manual_seed(0)
    model = _randomize(_Block(timm) if kind == "token" else _ConvBlock(timm))
    # (3 samples, 5 tokens, 16 features) / (2, 3, 6, 6) NCHW: off-centre, so LN and RMS differ
    x = off_centre(3, 5, 16) if kind == "token" else off_centre(2, 3, 6, 6)
    ref = _by_hand(model, to, timm)
    weights = {n: m.weight for n, m in model.named_children() if hasattr(m, "weight")}
    ours = normlab.convert_layer_norm(model, to)
    assert ours is model and len(ours.normlab_conversion) == (4 if kind == "token" else 2)
    assert not ours.normlab_conversion.left
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    if to != "none":  # the Parameter objects themselves: an optimizer built before trains them
        for name, w in weights.items():
            if name not in ("fc", "conv"):
                assert getattr(ours, name).weight is w, name
    expect = {("token", "ln"): nlnn.LayerNorm, ("token", "rms"): nlnn.RMSNorm,
              ("channel", "ln"): nlnn.LayerNorm2d, ("channel", "rms"): nlnn.RMSNorm2d,
              ("token", "none"): nn.Identity, ("channel", "none"): nn.Identity}[(kind, to)]
    norms = [m for n, m in ours.named_children() if n not in ("fc", "conv")]
    assert all(type(m) is expect for m in norms)


def test_a_replaced_layernorm2d_keeps_timms_output_strides():
    # timm's LayerNorm2d returns channels_last strides on NCHW input; so does the LayerNorm2d
    # put in its place (ConvNeXt's next convs then run channels_last, as timm has them)
    timm = import_timm()
    theirs = _randomize(timm.layers.LayerNorm2d(8))
    x = off_centre(2, 8, 5, 5)
    expect = theirs(x)
    ours = normlab.convert_layer_norm(copy.deepcopy(theirs), "ln")  # the root itself: returned
    assert type(ours) is nlnn.LayerNorm2d and ours.channels_last_output
    y = ours(x)
    assert y.stride() == expect.stride() and torch.equal(y, expect)



def test_a_layernorm2d_without_bias_stays_without_bias():
    # timm's LayerNorm2d(C, bias=False) -> ln: the LayerNorm2d in its place had a zero bias
    # Parameter of its own (a shift the model never had, trained by any optimizer built after)
    timm = import_timm()
    theirs = _randomize(timm.layers.LayerNorm2d(8, bias=False))
    x = off_centre(2, 8, 5, 5)
    expect = theirs(x)
    ours = normlab.convert_layer_norm(copy.deepcopy(theirs), "ln")
    assert [n for n, _ in ours.named_parameters()] == ["weight"] and ours.bias is None
    assert "bias=False" in repr(ours)
    torch.testing.assert_close(ours(x), expect)


@pytest.mark.parametrize("to", ["rms", "none"])
def test_torchs_transformer_encoder_in_eval_mode_calls_its_new_norms(to):
    # torch's TransformerEncoderLayer in eval mode computes LayerNorm itself from norm1/norm2's
    # eps, weight and bias (its fast path): with RMSNorm or Identity there it raised an
    # AttributeError. The reference: torch's layer with torch's RMSNorm / Identity put in by
    # hand, run with the fast path off (what calls the norms)
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1,
                                enable_nested_tensor=True).eval()
    ref = copy.deepcopy(enc)
    for layer in ref.layers:
        layer.norm1, layer.norm2 = [nn.RMSNorm(8, eps=1e-5) if to == "rms" else nn.Identity()
                                    for _ in range(2)]
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])  # the nested-tensor path
    ours = normlab.convert_layer_norm(enc, to)
    with torch.no_grad():
        for kwargs in ({}, {"src_key_padding_mask": pad}):
            was = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                expect = ref(x, **kwargs)
            finally:
                torch.backends.mha.set_fastpath_enabled(was)
            torch.testing.assert_close(ours(x, **kwargs), expect)

def test_errors_left_layers_and_hooks():
    class OwnLN(nn.LayerNorm):  # a subclass with a forward of its own: not known, left
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(4, 4), OwnLN(4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"can become 'ln', 'rms', 'none', got to='gn'"):
        normlab.convert_layer_norm(model, "gn")
    with pytest.raises(ValueError, match=r"got to='ln2d'"):  # ln2d is ln's channel form
        normlab.convert_layer_norm(model, "ln2d")
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        normlab.convert_layer_norm(3, "ln")
    model[2].register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="convert_layer_norm"):
        normlab.convert_layer_norm(model, "RMSNorm")  # an alias of rms
    assert type(model[1]) is OwnLN and type(model[2]) is nlnn.RMSNorm
    (name, why), = model.normlab_conversion.left
    assert name == "1" and "OwnLN is not one of the layers" in why
    assert str(model.normlab_conversion).startswith("convert_layer_norm -> rms: 1 module(s)")
