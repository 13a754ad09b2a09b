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
    (
        "bn-eps-zero",
        lambda: normlab.BatchNorm2d(3, eps=0),
        ValueError,
        "BatchNorm2d: expected eps a finite float > 0, got 0",
    ),
    (
        "bn-momentum",
        lambda: normlab.BatchNorm2d(3, momentum=2),
        ValueError,
        "BatchNorm2d: expected momentum in [0, 1] or None, got 2",
    ),
    (
        "brn-eps",
        lambda: normlab.BatchRenorm(3, eps=-1.0),
        ValueError,
        "BatchRenorm: expected eps a finite float > 0",
    ),
    (
        "brn-rmax",
        lambda: normlab.BatchRenorm(3, rmax=0.5),
        ValueError,
        "BatchRenorm: expected rmax a float >= 1",
    ),
    (
        "brn-wrong-channels",
        lambda: normlab.BatchRenorm(3)(torch.randn(2, 4, 5, 5)),
        ValueError,
        "expected 3 channels at dim 1, got 4",
    ),
    (
        "brn-one-value",
        lambda: normlab.BatchRenorm(3)(torch.randn(1, 3)),
        ValueError,
        "expected more than 1 value per channel when training",
    ),
    (
        "bin-features",
        lambda: normlab.BatchInstanceNorm(0),
        ValueError,
        "BatchInstanceNorm: expected num_features a positive int, got 0",
    ),
    (
        "bin-eps",
        lambda: normlab.BatchInstanceNorm(4, eps=0.0),
        ValueError,
        "BatchInstanceNorm: expected eps a finite float > 0",
    ),
    (
        "bin-rank",
        lambda: normlab.BatchInstanceNorm(4)(torch.randn(2, 4)),
        ValueError,
        "expected input of at least 3 dims",
    ),
    (
        "bin-one-position",
        lambda: normlab.BatchInstanceNorm(4)(torch.randn(2, 4, 1)),
        ValueError,
        "expected more than 1 spatial element when training",
    ),
    (
        "sn-variance",
        lambda: normlab.SwitchableNorm(4, variance="x"),
        ValueError,
        "SwitchableNorm: expected variance in ('release', 'paper'), got 'x'",
    ),
    (
        "sn-momentum",
        lambda: normlab.SwitchableNorm(4, momentum=-0.1),
        ValueError,
        "SwitchableNorm: expected momentum in [0, 1] or None",
    ),
    (
        "sn-sync-needs-bn",
        lambda: normlab.SwitchableNorm(4, using_bn=False, sync=True),
        ValueError,
        "expected using_bn=True",
    ),
    (
        "sn-wrong-channels",
        lambda: normlab.SwitchableNorm(4)(torch.randn(2, 5, 3, 3)),
        ValueError,
        "expected 4 channels at dim 1, got 5",
    ),
    (
        "ibn-ratio",
        lambda: normlab.IBN(8, ratio=1.5),
        ValueError,
        "IBN: expected ratio in (0, 1), got 1.5",
    ),
    ("ibn-planes", lambda: normlab.IBN(1), ValueError, "expected between 1 and 0"),
    ("ibn-eps", lambda: normlab.IBN(8, eps=0), ValueError, "IBN: expected eps a finite float > 0"),
    (
        "ibn-wrong-channels",
        lambda: normlab.IBN(8)(torch.randn(2, 6, 3, 3)),
        ValueError,
        "expected 8 channels at dim 1, got 6",
    ),
    (
        "ibnb-residual",
        lambda: normlab.IBNb(4)(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3)),
        ValueError,
        "expected a residual of shape (2, 4, 3, 3)",
    ),
    (
        "frn-eps",
        lambda: normlab.FilterResponseNorm(4, eps=-1.0),
        ValueError,
        "FilterResponseNorm: expected eps a finite float >= 0",
    ),
    (
        "frn-wrong-channels",
        lambda: normlab.FilterResponseNorm(4)(torch.randn(2, 3, 5, 5)),
        ValueError,
        "expected 4 channels at dim 1, got 3",
    ),
    (
        "evonorm-b0-eps",
        lambda: normlab.EvoNormB0(4, eps=0),
        ValueError,
        "EvoNormB0: expected eps a finite float > 0",
    ),
    (
        "evonorm-b0-rank",
        lambda: normlab.EvoNormB0(4)(torch.randn(2, 4)),
        ValueError,
        "expected input of at least 3 dims",
    ),
    (
        "evonorm-s0-groups",
        lambda: normlab.EvoNormS0(6, num_groups=4),
        ValueError,
        "EvoNormS0: expected num_groups a positive divisor of num_channels=6, got 4",
    ),
    (
        "evonorm-s0-both",
        lambda: normlab.EvoNormS0(8, num_groups=2, group_size=4),
        ValueError,
        "EvoNormS0: expected at most one of num_groups and group_size",
    ),
    (
        "gn-groups",
        lambda: normlab.GroupNorm(3, 10),
        ValueError,
        "GroupNorm: expected num_groups a positive divisor of num_channels=10, got 3",
    ),
    (
        "normact-drop",
        lambda: normlab.NormAct(torch.nn.BatchNorm2d(4), drop=1.0),
        ValueError,
        "NormAct: expected drop in [0, 1), got 1.0",
    ),
    (
        "normact-norm",
        lambda: normlab.NormAct("bn"),
        TypeError,
        "NormAct: expected norm an nn.Module, got str",
    ),
    (
        "norm-act-act",
        lambda: normlab.norm_act("bn", 4, act="tanhh"),
        ValueError,
        "NormAct: expected act one of",
    ),
    (
        "frozenbn-eps",
        lambda: normlab.FrozenBatchNorm(4, eps=-1),
        ValueError,
        "FrozenBatchNorm: expected eps >= 0",
    ),
    (
        "syncbn-wrong-channels",
        lambda: normlab.SyncBatchNorm(4)(torch.randn(2, 3, 5, 5)),
        ValueError,
        "expected 4 channels at dim 1, got 3",
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


def test_every_message_says_what_was_expected_and_what_came():
    for _, call, error, _ in ERRORS:
        with pytest.raises(error) as info:
            call()
        assert "expected" in str(info.value), str(info.value)


def test_layer_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"^BatchNorm2d\(3, eps="):
        normlab.BatchNorm2d(3)(torch.randn(2, 4, 5, 5))


def test_one_value_allowed_in_eval():
    layer = normlab.BatchNorm1d(3).eval()
    assert layer(torch.randn(1, 3)).shape == (1, 3)
