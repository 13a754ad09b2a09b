"""FrozenBatchNorm, freeze/unfreeze and update_stats, against torch's batch norm in eval mode
and torch.optim.swa_utils.update_bn."""

import copy

import pytest
import torch
from test_convert import randomize_norms
from torch import nn
from torch.optim.swa_utils import update_bn

import normlab
from normlab import FrozenBatchNorm, freeze, unfreeze, update_stats


def _bn(rank, channels=4, **kw):
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank](channels, **kw)
    return randomize_norms(nn.Sequential(bn))[0].eval()


@pytest.mark.parametrize("shape", [(5, 4), (5, 4, 7), (3, 4, 5, 6), (2, 4, 3, 3, 3)])
def test_frozen_equals_batch_norm_in_eval_even_when_training(shape):
    bn = _bn(max(len(shape) - 2, 1))
    frozen = FrozenBatchNorm(4)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(shape) * 3 + 1
    expected = bn(x)
    frozen.train()
    torch.testing.assert_close(frozen(x), expected)
    torch.testing.assert_close(frozen(x * 2), bn(x * 2))  # nothing was updated
    assert list(frozen.parameters()) == []
    torch.testing.assert_close(frozen.running_mean, bn.running_mean)


def test_channels_last_and_half_precision():
    bn = _bn(2)
    frozen = FrozenBatchNorm(4, channel_axis=-1)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 3, 4)
    torch.testing.assert_close(frozen(x), bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    assert frozen.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_state_dict_loads_both_ways():
    bn = _bn(2)
    frozen = FrozenBatchNorm(4)
    frozen.load_state_dict(bn.state_dict())  # strict, num_batches_tracked dropped
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    for target in (nn.BatchNorm2d(4), normlab.BatchNorm2d(4)):
        target.load_state_dict(frozen.state_dict())  # strict, counter starts at 0
        x = torch.randn(2, 4, 3, 3)
        torch.testing.assert_close(target.eval()(x), bn(x))
        assert int(target.num_batches_tracked) == 0


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        normlab.SyncBatchNorm(4),
        nn.GroupNorm(2, 4),
        nn.Flatten(2),
        normlab.BatchNorm1d(4),
    )
    return randomize_norms(model)


def test_freeze_and_unfreeze():
    model = _model()
    x = torch.randn(2, 3, 6, 6)
    expected = copy.deepcopy(model).eval()(x)
    frozen = freeze(model)
    assert frozen is model
    kinds = [type(m).__name__ for m in frozen]
    assert kinds.count("FrozenBatchNorm") == 3 and "GroupNorm" in kinds
    torch.testing.assert_close(frozen.train()(x), expected)  # train mode: still fixed
    back = unfreeze(frozen)
    assert sum(isinstance(m, normlab.BatchNorm) for m in back) == 3
    assert all(p.requires_grad for p in back.parameters())
    torch.testing.assert_close(back.eval()(x), expected)
    partial = freeze(_model(), where="1")
    assert [type(m).__name__ for m in partial][1:5:3] == ["FrozenBatchNorm", "SyncBatchNorm"]


def test_update_stats_matches_swa_update_bn():
    torch.manual_seed(0)
    model = _model()
    model[4].momentum = 0.3
    model[1].eval()
    batches = [(torch.randn(3, 3, 6, 6) * 2 + 1, torch.zeros(3)) for _ in range(4)]
    reference = copy.deepcopy(model)
    update_bn(batches, reference)
    assert update_stats(model, batches) is model
    for mine, theirs in zip(model, reference, strict=True):
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            if hasattr(mine, key):
                torch.testing.assert_close(getattr(mine, key), getattr(theirs, key))
    assert model[4].momentum == 0.3 and not model[1].training and model[4].training


def test_update_stats_is_the_cumulative_average_and_stops_after_num_batches():
    model = nn.Sequential(normlab.InstanceNorm1d(2, track_running_stats=True))
    batches = [torch.randn(4, 2, 9) + i for i in range(5)]
    update_stats(model, iter(batches), num_batches=3)
    means = torch.stack([b.mean(2).mean(0) for b in batches[:3]])
    variances = torch.stack([b.var(2).mean(0) for b in batches[:3]])
    torch.testing.assert_close(model[0].running_mean, means.mean(0))
    torch.testing.assert_close(model[0].running_var, variances.mean(0))
    assert model[0].momentum == 0.1 and int(model[0].num_batches_tracked) == 3


def test_errors():
    with pytest.raises(ValueError, match="positive int"):
        FrozenBatchNorm(0)
    with pytest.raises(ValueError, match="eps >= 0"):
        FrozenBatchNorm(3, eps=-1)
    with pytest.raises(ValueError, match="channel_axis"):
        FrozenBatchNorm(3, channel_axis=0)
    with pytest.raises(ValueError, match="expected 3 channels"):
        FrozenBatchNorm(3)(torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="floating-point"):
        FrozenBatchNorm(3)(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="freeze: expected an nn.Module"):
        freeze(None)
    with pytest.raises(TypeError, match="unfreeze: expected an nn.Module"):
        unfreeze(None)
    with pytest.raises(ValueError, match="keeps no running statistics"):
        freeze(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))
    with pytest.raises(TypeError, match="update_stats: expected an nn.Module"):
        update_stats(None, [])
    model = _model()
    with pytest.raises(ValueError, match="num_batches a positive int"):
        update_stats(model, [], num_batches=0)
    with pytest.raises(ValueError, match="at least one batch"):
        update_stats(model, [])
    with pytest.raises(ValueError, match="track running statistics"):
        update_stats(nn.Sequential(nn.Linear(2, 2)), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match="empty sequence"):
        update_stats(model, [()])
