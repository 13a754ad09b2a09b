"""Every public layer's error cases: a ValueError/TypeError saying what was expected and what came."""

import pytest
import torch

import normlab

# (id, call, exception, fragment of the message)
ERRORS = [
    (
        "bn-wrong-channels",
        lambda: normlab.BatchNorm2d(3)(torch.randn(2, 4, 5, 5)),
        ValueError,
        "expected 3 channels at dim 1, got 4",
    ),
    (
        "bn-wrong-rank",
        lambda: normlab.BatchNorm2d(3)(torch.randn(2, 3, 5)),
        ValueError,
        "expected 4-D input, got shape (2, 3, 5)",
    ),
    (
        "bn1d-wrong-rank",
        lambda: normlab.BatchNorm1d(3)(torch.randn(2, 3, 5, 5)),
        ValueError,
        "expected 2-D or 3-D input",
    ),
    (
        "bn3d-wrong-rank",
        lambda: normlab.BatchNorm3d(3)(torch.randn(2, 3, 5, 5)),
        ValueError,
        "expected 5-D input",
    ),
    (
        "bn-one-value",
        lambda: normlab.BatchNorm1d(3)(torch.randn(1, 3)),
        ValueError,
        "expected more than 1 value per channel when training, got input of shape (1, 3)",
    ),
    (
        "bn-one-value-2d",
        lambda: normlab.BatchNorm2d(3)(torch.randn(1, 3, 1, 1)),
        ValueError,
        "more than 1 value per channel",
    ),
    (
        "bn-int-input",
        lambda: normlab.BatchNorm2d(3)(torch.ones(2, 3, 2, 2, dtype=torch.long)),
        TypeError,
        "expected a floating-point tensor, got dtype torch.int64",
    ),
    (
        "bn-not-tensor",
        lambda: normlab.BatchNorm2d(3)([[1.0]]),
        TypeError,
        "expected a torch.Tensor, got list",
    ),
    (
        "bn-channel-axis",
        lambda: normlab.BatchNorm2d(3, channel_axis=2),
        ValueError,
        "expected channel_axis in (1, -1), got 2",
    ),
    (
        "bn-last-wrong-channels",
        lambda: normlab.BatchNorm2d(3, channel_axis=-1)(torch.randn(2, 3, 5, 5)),
        ValueError,
        "expected 3 channels at dim 3, got 5",
    ),
    (
        "bn-any-bad-features",
        lambda: normlab.BatchNorm(0),
        ValueError,
        "expected num_features a positive int",
    ),
    (
        "bn-per-activation-shape",
        lambda: normlab.BatchNorm((3, 4), per_activation=True)(torch.randn(2, 3, 5)),
        ValueError,
        "expected input of shape (N, 3, 4)",
    ),
    (
        "bn-per-activation-bad",
        lambda: normlab.BatchNorm((3, 0), per_activation=True),
        ValueError,
        "shape of one sample",
    ),
    (
        "in-one-spatial",
        lambda: normlab.InstanceNorm2d(3)(torch.randn(2, 3, 1, 1)),
        ValueError,
        "more than 1 spatial element when training",
    ),
    (
        "in-wrong-channels",
        lambda: normlab.InstanceNorm2d(3, affine=True)(torch.randn(2, 4, 5, 5)),
        ValueError,
        "expected 3 channels",
    ),
    (
        "in-wrong-rank",
        lambda: normlab.InstanceNorm2d(3)(torch.randn(2, 3, 5, 5, 5)),
        ValueError,
        "expected 4-D input",
    ),
    (
        "in-channel-axis",
        lambda: normlab.InstanceNorm1d(3, channel_axis=0),
        ValueError,
        "expected channel_axis",
    ),
    (
        "gn-not-dividing",
        lambda: normlab.GroupNorm(4, 6),
        ValueError,
        "expected num_groups a positive divisor of num_channels=6, got 4",
    ),
    (
        "gn-size-not-dividing",
        lambda: normlab.GroupNorm(num_channels=6, group_size=4),
        ValueError,
        "expected group_size a positive divisor",
    ),
    (
        "gn-both",
        lambda: normlab.GroupNorm(2, 6, group_size=3),
        ValueError,
        "exactly one of num_groups and group_size",
    ),
    (
        "gn-neither",
        lambda: normlab.GroupNorm(num_channels=6),
        ValueError,
        "exactly one of num_groups and group_size",
    ),
    (
        "gn-no-channels",
        lambda: normlab.GroupNorm(2),
        ValueError,
        "expected num_channels a positive int",
    ),
    (
        "gn-wrong-channels",
        lambda: normlab.GroupNorm(2, 6)(torch.randn(2, 4, 3)),
        ValueError,
        "expected 6 channels at dim 1, got 4",
    ),
    (
        "ln-wrong-shape",
        lambda: normlab.LayerNorm(7)(torch.randn(2, 3, 8)),
        ValueError,
        "expected input of shape (*, 7), got (2, 3, 8)",
    ),
    (
        "ln-axis-needs-int",
        lambda: normlab.LayerNorm([3, 4], channel_axis=1),
        ValueError,
        "expected an int normalized_shape",
    ),
    (
        "ln2d-wrong-channels",
        lambda: normlab.LayerNorm2d(6)(torch.randn(2, 5, 3, 3)),
        ValueError,
        "expected 6 channels",
    ),
    (
        "ln2d-bad-channels",
        lambda: normlab.LayerNorm2d(0),
        ValueError,
        "expected num_channels a positive int",
    ),
    (
        "rms-wrong-shape",
        lambda: normlab.RMSNorm(7)(torch.randn(2, 8)),
        ValueError,
        "expected input of shape (*, 7)",
    ),
    (
        "rms-int-input",
        lambda: normlab.RMSNorm(2)(torch.ones(2, 2, dtype=torch.int32)),
        TypeError,
        "floating-point",
    ),
    ("registry-unknown", lambda: normlab.create_norm("gm", 8), ValueError, "did you mean 'gn'"),
    (
        "registry-bad-features",
        lambda: normlab.create_norm("bn", 0),
        ValueError,
        "expected num_features a positive int",
    ),
]


@pytest.mark.parametrize(
    "call, error, fragment", [row[1:] for row in ERRORS], ids=[row[0] for row in ERRORS]
)
def test_error(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


def test_layer_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"^BatchNorm2d\(3, eps="):
        normlab.BatchNorm2d(3)(torch.randn(2, 4, 5, 5))


def test_one_value_allowed_in_eval():
    layer = normlab.BatchNorm1d(3).eval()
    assert layer(torch.randn(1, 3)).shape == (1, 3)
