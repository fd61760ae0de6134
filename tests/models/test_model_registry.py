"""The model registry contract used by the lab CLI: create(name, *, norm, num_classes, in_chans,
**kwargs) and list_models()."""

import pytest
import torch

from normlab import models
from normlab.models import registry

EXPECTED = (
    [f"resnet{d}" for d in (20, 32, 56, 110)] + [f"preact_resnet{d}" for d in (20, 32, 56, 110)]
    + [f"resnet{d}" for d in (18, 34, 50, 101)] + ["bn_dropout_cnn"]
    + [f"nf_resnet{d}" for d in (20, 32, 56, 110, 18, 34, 50, 101)]
)


def test_list_models_has_every_name():
    names = models.list_models()
    assert sorted(names) == sorted(EXPECTED)
    assert all(isinstance(n, str) for n in names)


def test_create_is_case_insensitive_and_sets_in_chans_and_classes():
    m = models.create("ResNet20", num_classes=7, in_chans=1)
    assert m(torch.randn(2, 1, 8, 8) + 0.5).shape == (2, 7)


def test_unknown_model_names_the_value():
    with pytest.raises(ValueError, match="resnet21"):
        models.create("resnet21")


@pytest.mark.parametrize("kw, match", [
    ({"num_classes": 0}, "num_classes"),
    ({"in_chans": -1}, "in_chans"),
    ({"width": 0}, "width"),
    ({"norm": "batchnorm9"}, "batchnorm9"),
])
def test_bad_arguments_raise_valueerror(kw, match):
    with pytest.raises(ValueError, match=match):
        models.create("resnet20", **kw)


def test_unknown_kwarg_is_a_typeerror_naming_it():
    with pytest.raises(TypeError, match="bogus"):
        models.create("resnet20", bogus=1)


# one model of each builder: the message names the model (not an internal function such as
# "cifar_resnet()" or "NFResNet.__init__()"), the keyword, and the keywords the model takes
@pytest.mark.parametrize("name, bad, takes", [
    ("resnet20", "small_input", "zero_init_last"),      # an ImageNet-only option on a CIFAR net
    ("preact_resnet20", "preact", "order"),             # fixed by the name: not an option
    ("resnet50", "drop_rate", "small_input"),           # an NF option on a normalized ResNet
    ("nf_resnet20", "norm_kwargs", "skipinit"),         # NF models take no norm options
    ("nf_resnet50", "dropout", "drop_rate"),            # the CNN's name for NF's drop_rate
    ("bn_dropout_cnn", "width", "bn_dense"),
])
def test_unknown_kwarg_names_model_keyword_and_the_accepted_ones(name, bad, takes):
    with pytest.raises(TypeError, match=rf"model '{name}'.*'{bad}'.*takes.*\b{takes}\b"):
        models.create(name, **{bad: 1})


def test_every_listed_option_is_accepted():
    # the options the error lists are the ones the builder really takes: each one passed alone
    # with a valid value builds the model
    values = {"width": 4, "zero_init_last": True, "norm_kwargs": {}, "order": "norm_act",
              "preact": True, "small_input": True, "alpha": 0.3, "activation": "silu",
              "gamma": 1.5, "drop_rate": 0.1, "stochastic_depth": 0.1, "drop_path_rate": 0.1,
              "skipinit": False, "std_conv": False, "bn_conv": False, "bn_dense": False,
              "dropout": 0.2, "hidden": 16, "image_size": 16}
    for name in ("resnet20", "preact_resnet20", "resnet18", "nf_resnet20", "nf_resnet18",
                 "bn_dropout_cnn"):
        entry = registry._lookup(name)
        assert entry.options, name
        for opt in entry.options:
            models.create(name, **({"width": 4} if opt != "width" and "resnet" in name else {}),
                          **{opt: values[opt]})


def test_nf_models_refuse_a_chosen_norm_but_accept_the_default():
    assert not models.model_uses_norm("nf_resnet20")
    models.create("nf_resnet20")  # norm left out: "not chosen"
    models.create("nf_resnet20", norm="none")
    models.create("nf_resnet20", norm=None)
    with pytest.raises(ValueError, match="normalizer-free.*gn"):
        models.create("nf_resnet20", norm="gn")
    # an explicit "bn" too: it was taken for the default and gave a model without any norm
    with pytest.raises(ValueError, match="normalizer-free.*'bn'"):
        models.create("nf_resnet20", norm="bn")


def test_models_with_a_norm_default_to_batchnorm():
    m = models.create("resnet20", width=4)
    assert any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        models.register("resnet20", lambda **kw: None)
