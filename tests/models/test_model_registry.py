"""The model registry contract used by the lab CLI: create(name, *, norm, num_classes, in_chans,
**kwargs) and list_models()."""

import pytest
import torch

from normlab import models

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


def test_nf_models_refuse_a_chosen_norm_but_accept_the_default():
    assert not models.model_uses_norm("nf_resnet20")
    models.create("nf_resnet20")  # the registry default norm="bn" means "not chosen"
    models.create("nf_resnet20", norm="none")
    with pytest.raises(ValueError, match="normalizer-free.*gn"):
        models.create("nf_resnet20", norm="gn")


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        models.register("resnet20", lambda **kw: None)
