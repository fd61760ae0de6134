"""create_norm by name, class and partial; the group rule; unknown names."""

import functools

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nlnn
from normlab import create_norm, resolve_groups


@pytest.mark.parametrize(
    "name,cls,check",
    [
        ("bn", nlnn.BatchNorm2d, lambda m: m.num_features == 64),
        ("BatchNorm", nlnn.BatchNorm2d, lambda m: True),              # alias, any case
        ("frozenbn", nlnn.FrozenBatchNorm2d, lambda m: m.num_features == 64),
        ("brn", nlnn.BatchRenorm2d, lambda m: m.r_max == 3.0),
        ("gn", nlnn.GroupNorm, lambda m: m.num_groups == 32),
        ("ln", nlnn.GroupNorm, lambda m: m.num_groups == 1),          # GN paper's conv LN
        ("ln2d", nlnn.LayerNorm2d, lambda m: m.num_channels == 64),
        ("rms", nlnn.RMSNorm2d, lambda m: m.num_channels == 64 and m.eps == 1e-6),
        ("RMSNorm", nlnn.RMSNorm2d, lambda m: True),                  # alias
        ("in", nlnn.InstanceNorm2d, lambda m: m.affine),
        ("none", nn.Identity, lambda m: True),
        ("frn", nlnn.FilterResponseNorm2d, lambda m: m.eps == 1e-6 and m.tau is not None),
        ("evonorm_s0", nlnn.EvoNorm2dS0, lambda m: m.num_groups == 32),
        ("EvoNorm-B0", nlnn.EvoNorm2dB0, lambda m: m.momentum == 0.1),   # alias
    ],
)
def test_names(name, cls, check):
    m = create_norm(name, 64)
    assert type(m) is cls and check(m)
    x = torch.randn(2, 64, 4, 4) + 1
    assert m(x).shape == x.shape


def test_kwargs_dims_class_partial():
    assert type(create_norm("bn", 8, dims=1)) is nlnn.BatchNorm1d
    assert type(create_norm("in", 8, dims=3)) is nlnn.InstanceNorm3d
    assert create_norm("bn", 8, momentum=0.3, eps=1e-3).momentum == 0.3
    assert create_norm("gn", 64, num_groups=8, activation="relu").activation == "relu"
    assert create_norm("gn", 64, group_size=16).num_groups == 4
    assert create_norm(nlnn.GroupNorm, 64, num_groups=16).num_groups == 16
    assert create_norm(nn.GroupNorm, 48).num_groups == 24  # torch class, group rule
    assert type(create_norm(nn.BatchNorm2d, 8)) is nn.BatchNorm2d
    m = create_norm(functools.partial(nlnn.GroupNorm, 4), 8)
    assert m.num_groups == 4 and m.num_channels == 8


@pytest.mark.parametrize(
    "c,g,size,expected",
    [
        (64, 32, None, 32),   # divisible: unchanged
        (48, 32, None, 24),   # largest divisor of 48 not above 32
        (16, 32, None, 16),   # fewer channels than groups: one channel per group
        (30, 32, None, 30),
        (3, 32, None, 3),
        (96, None, 16, 6),    # channels per group 16
        (40, None, 16, 4),    # largest divisor of 40 <= 16 is 10 -> 4 groups
        (7, None, 16, 1),     # prime C, group_size > C: one group
    ],
)
def test_group_rule(c, g, size, expected):
    assert resolve_groups(c, g, size) == expected
    assert c % expected == 0


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm9'; known norms: bn, syncbn, .*none"):
        create_norm("batchnorm9", 8)
    with pytest.raises(TypeError, match="norm must be a name, a module class or a callable"):
        create_norm(3, 8)
    with pytest.raises(ValueError, match="norm 'frozenbn' supports dims=\\[2\\], got dims=3"):
        create_norm("frozenbn", 8, dims=3)
    assert set(normlab.norm_names()) >= {"bn", "syncbn", "frozenbn", "brn", "gn", "ln", "in", "none"}


def test_module_instance_is_a_type_error():
    with pytest.raises(TypeError, match=r"norm must be a name, a module class or a callable.*"
                                        r"got a module instance BatchNorm2d"):
        create_norm(nn.BatchNorm2d(3), 8)


@pytest.mark.parametrize("cls", [nn.GroupNorm, nlnn.GroupNorm])
def test_partial_of_groupnorm_class_with_keywords(cls):
    m = create_norm(functools.partial(cls, num_groups=32, eps=1e-3), 48)  # group rule: 24
    assert type(m) is cls and (m.num_groups, m.num_channels, m.eps) == (24, 48, 1e-3)
    m = create_norm(functools.partial(cls, num_groups=4), 8, affine=False)
    assert (m.num_groups, m.affine) == (4, False)
    m = create_norm(functools.partial(cls, 4), 8)  # positional groups: as before
    assert (m.num_groups, m.num_channels) == (4, 8)
    x = torch.randn(2, 8, 3, 3) * 2 + 1
    torch.testing.assert_close(m(x), nn.functional.group_norm(x, 4, m.weight, m.bias))


@pytest.mark.parametrize("name", ["bn", "in", "brn", "frozenbn", "gn", "ln", "ln2d"])
@pytest.mark.parametrize("c", [0, -3, 8.0, True, "8"])
def test_bad_num_channels_named(name, c):
    with pytest.raises((ValueError, TypeError), match=f"num_channels must be a positive int, got {c!r}"):
        create_norm(name, c)


def test_unknown_kwargs_named_with_what_is_accepted():
    with pytest.raises(TypeError, match=r"create_norm\('bn'\): unexpected keyword argument\(s\) "
                                        r"'foo'; BatchNorm2d takes .*momentum.*dims"):
        create_norm("bn", 8, foo=1)
    with pytest.raises(TypeError, match=r"create_norm\('ln'\): unexpected keyword argument\(s\) "
                                        r"'num_groups'"):
        create_norm("ln", 8, num_groups=4)
    with pytest.raises(TypeError, match=r"'bar', 'foo'; GroupNorm takes .*group_size"):
        create_norm("gn", 8, foo=1, bar=2)
    with pytest.raises(TypeError, match=r"'momentum'; FrozenBatchNorm2d takes"):
        create_norm("frozenbn", 8, momentum=0.1)


def test_evonorm_s0_group_rule_and_keywords():
    assert create_norm("evonorm_s0", 48).num_groups == 24               # the group rule, as gn
    assert create_norm("evonorm_s0", 64, group_size=16).num_groups == 4
    assert create_norm("frn", 8, tlu=False).tau is None
    with pytest.raises(TypeError, match=r"create_norm\('evonorm_b0'\): unexpected keyword argument\(s\) 'num_groups'"):
        create_norm("evonorm_b0", 8, num_groups=4)
    with pytest.raises(ValueError, match=r"norm 'frn' supports dims=\[2\], got dims=1"):
        create_norm("frn", 8, dims=1)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown norm 'groupnrom'; known norms: .*none; "
                                         r"did you mean 'gn'\?"):  # alias groupnorm -> gn
        create_norm("groupnrom", 8)
    with pytest.raises(ValueError, match=r"did you mean 'syncbn'\?"):
        normlab.convert_norm(nn.Sequential(nn.BatchNorm2d(8)), "syncbm")
    with pytest.raises(ValueError, match=r"unknown norm 'xyz'; known norms: [^?]*$"):
        create_norm("xyz", 8)  # nothing close: no guess


def test_missing_required_keyword_is_named():
    with pytest.raises(TypeError, match=r"create_norm\('ghostbn'\): missing required keyword "
                                        r"argument\(s\) 'virtual_batch'"):
        create_norm("ghostbn", 8)
    with pytest.raises(TypeError, match=r"'ghostbn'.*'virtual_batch'"):
        normlab.convert_norm(nn.Sequential(nn.BatchNorm2d(8)), "ghostbn")
    assert create_norm("ghostbn", 8, virtual_batch=4).virtual_batch == 4


def test_a_callable_that_builds_no_module_is_a_type_error():
    def builder(c):
        return c * 2  # not a module

    with pytest.raises(TypeError, match=r"norm <function .*builder.*> must build an nn.Module, "
                                        r"but it returned int: 16"):
        create_norm(builder, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    with pytest.raises(TypeError, match="must build an nn.Module, but it returned int"):
        normlab.convert_norm(model, builder)
    assert type(model[1]) is nn.BatchNorm2d  # nothing replaced


def test_numpy_integer_counts_as_in_normlab_nn():
    np = pytest.importorskip("numpy")
    m = create_norm("gn", np.int64(48))  # a channel count read from an array
    assert (m.num_groups, m.num_channels) == (24, 48) and type(m.num_channels) is int
    assert nlnn.GroupNorm(np.int64(24), np.int64(48)).num_groups == 24  # the module takes it too
    assert resolve_groups(np.int64(48), np.int64(32)) == 24


def test_groupnorm_subclasses_that_take_channels_first():
    # timm's GroupNorm and GroupNormAct take (num_channels, num_groups=32), GroupNorm1 only
    # num_channels: create_norm called them as (G, C), swapping the two ("num_channels (4) must
    # be divisible by num_groups (8)", or GroupNorm1(G, C) a TypeError)
    from timm_import import import_timm
    layers = import_timm().layers
    torch.manual_seed(0)
    x = torch.randn(2, 24, 3, 3, dtype=torch.float64) * 2 + 1
    for norm, kwargs, groups in [
        (layers.GroupNorm, {}, 24),                                 # group rule: 32 -> 24
        (layers.GroupNorm, {"num_groups": 4}, 4),
        (functools.partial(layers.GroupNormAct, num_groups=6, apply_act=False), {}, 6),
        (layers.GroupNormAct, {"group_size": 8, "act_layer": nn.SiLU}, 3),
        (layers.GroupNorm1, {"eps": 1e-3}, 1),
    ]:
        m = create_norm(norm, 24, **kwargs).double()
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
        want = nn.functional.group_norm(x, groups, m.weight, m.bias, m.eps)
        if kwargs.get("act_layer"):
            want = nn.functional.silu(want)
        assert (m.num_groups, m.num_channels) == (groups, 24)
        torch.testing.assert_close(m(x), want)
    with pytest.raises(TypeError, match="num_groups"):  # GroupNorm1 has one group
        create_norm(layers.GroupNorm1, 24, num_groups=4)
