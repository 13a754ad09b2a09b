import pytest
import torch
from oracle import group_norm, standardize

import normlab
from normlab.registry import default_groups, register


def test_every_name_builds_a_working_layer():
    x = torch.randn(4, 16, 5, 5)
    for name in normlab.available_norms():
        layer = normlab.create_norm(name, 16)
        assert layer(x).shape == x.shape, name


@pytest.mark.parametrize(
    "name, reference",
    [
        ("bn", lambda x: standardize(x, (0, 2, 3))),
        ("in", lambda x: standardize(x, (2, 3))),
        ("ln", lambda x: standardize(x, (1, 2, 3))),
        ("ln2d", lambda x: standardize(x, (1,), eps=1e-6)),
        ("gn", lambda x: group_norm(x, 8)),
        ("rms", lambda x: standardize(x, (1,), eps=torch.finfo(torch.float32).eps, center=False)),
        ("none", lambda x: x.double()),
    ],
)
def test_names_mean_what_they_say(name, reference):
    x = torch.randn(4, 16, 5, 5) + 1
    torch.testing.assert_close(
        normlab.create_norm(name, 16)(x).double(), reference(x), atol=1e-4, rtol=1e-4
    )


def test_options_pass_through():
    assert normlab.create_norm("gn", 64, num_groups=4).num_groups == 4
    assert normlab.create_norm("bn", 8, channel_axis=-1).channel_axis == -1


def test_default_groups():
    assert default_groups(64) == 32
    assert default_groups(16) == 8
    assert default_groups(3) == 1
    assert default_groups(48) == 24


def test_register_rejects_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="already taken"):
        register("bn", normlab.BatchNorm, "again")
    with pytest.raises(ValueError, match="lower-case"):
        register("BN2", normlab.BatchNorm, "upper")
