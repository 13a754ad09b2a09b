"""SyncBatchNorm and synchronized moments: several gloo processes against one batch norm on
the concatenated batch (uneven and empty per-process batches), plus conversion both ways."""

import copy
import datetime
import os
import pickle

import pytest
import torch
import torch.distributed as dist
from gloo import spawn
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import normlab
from normlab.moments import Moments, moments
from normlab.sync import (
    SYNC_BATCH_NORMS,
    SyncBatchNorm,
    revert_sync_batchnorm,
    synchronized_moments,
)

C = 3

# Per-step batch sizes of each process: uneven, with empty batches.
SIZES = {2: [[5, 0], [2, 7]], 3: [[4, 0, 1], [2, 3, 6]]}


def _data(step, total, shape, seed):
    g = torch.Generator().manual_seed(seed + step)
    x = torch.randn((total, *shape), generator=g, dtype=torch.float64) * 3 + 5
    dy = torch.randn((total, *shape), generator=g, dtype=torch.float64)
    return x, dy


def _run_steps(layer, rank, sizes, shape, seed):
    """Train steps on this process's slice; return per-step outputs and gradients."""
    results = []
    for step, per_rank in enumerate(sizes):
        x, dy = _data(step, sum(per_rank), shape, seed)
        start = sum(per_rank[:rank])
        part = slice(start, start + per_rank[rank])
        xs = x[part].clone().requires_grad_(True)
        layer.zero_grad()
        y = layer(xs)
        (y * dy[part]).sum().backward()
        results.append(
            {
                "y": y.detach(),
                "dx": xs.grad,
                "dw": layer.weight.grad.clone(),
                "db": None if layer.bias is None else layer.bias.grad.clone(),
            }
        )
    return results, {"mean": layer.running_mean.clone(), "var": layer.running_var.clone()}


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        torch.manual_seed(0)
        out = {}
        first = SyncBatchNorm(C, dtype=torch.float64)
        with torch.no_grad():
            first.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
            first.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        out["nchw"] = _run_steps(first, rank, SIZES[world], (C, 3, 2), seed=1)
        last = SyncBatchNorm(C, momentum=None, bias=False, channel_axis=-1, dtype=torch.float64)
        out["nlc"] = _run_steps(last, rank, SIZES[world], (4, C), seed=2)
        # one value per channel over all processes: every process raises the same error
        single = SyncBatchNorm(C, dtype=torch.float64)
        x = torch.randn(1 if rank == 0 else 0, C, 1, 1, dtype=torch.float64)
        try:
            single(x)
            out["error"] = None
        except ValueError as error:
            out["error"] = str(error)
        # the mechanism on its own: moments of the whole batch
        x, _ = _data(0, sum(SIZES[world][0]), (C, 2), seed=3)
        start = sum(SIZES[world][0][:rank])
        local = moments(x[start : start + SIZES[world][0][rank]], "n c l -> c")
        whole = synchronized_moments(local)
        out["moments"] = (whole.mean, whole.var, whole.count)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


def _spawn(world):
    return spawn(_worker, world)


def _reference(layer, sizes, shape, seed, to_bn=lambda t: t, from_bn=lambda t: t):
    """One batch norm on the concatenated batch: per step y, dx, dw, db and running buffers."""
    steps = []
    for step, per_rank in enumerate(sizes):
        x, dy = _data(step, sum(per_rank), shape, seed)
        x.requires_grad_(True)
        layer.zero_grad()
        y = from_bn(layer(to_bn(x)))
        (y * dy).sum().backward()
        db = None if layer.bias.grad is None else layer.bias.grad.clone()
        steps.append((y.detach(), x.grad, layer.weight.grad.clone(), db))
    return steps, layer.running_mean, layer.running_var


def _check(results, key, reference, sizes, has_bias=True):
    steps, mean, var = reference
    for step, (y, dx, dw, db) in enumerate(steps):
        per_rank = [r[key][0][step] for r in results]
        torch.testing.assert_close(torch.cat([r["y"] for r in per_rank]), y, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.cat([r["dx"] for r in per_rank]), dx, rtol=0, atol=1e-12)
        # each process holds its own part of the parameter gradient (DDP sums them)
        torch.testing.assert_close(sum(r["dw"] for r in per_rank), dw, rtol=0, atol=1e-11)
        if has_bias:
            torch.testing.assert_close(sum(r["db"] for r in per_rank), db, rtol=0, atol=1e-11)
        assert [r["y"].shape[0] for r in per_rank] == sizes[step]
    for r in results:
        torch.testing.assert_close(r[key][1]["mean"], mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(r[key][1]["var"], var, rtol=0, atol=1e-12)


@pytest.mark.parametrize("world", [2, 3])
def test_sync_batch_norm_equals_batch_norm_on_the_whole_batch(world):
    results = _spawn(world)
    sizes = SIZES[world]
    bn = nn.BatchNorm1d(C, dtype=torch.float64)  # (N, C, L) after flattening h, w
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    ref = _reference(
        bn,
        sizes,
        (C, 3, 2),
        1,
        to_bn=lambda t: t.flatten(2),
        from_bn=lambda t: t.unflatten(2, (3, 2)),
    )
    _check(results, "nchw", ref, sizes)

    last = nn.BatchNorm1d(C, momentum=None, dtype=torch.float64)  # bias frozen at 0
    last.bias.requires_grad_(False)
    ref = _reference(
        last,
        sizes,
        (4, C),
        2,
        to_bn=lambda t: t.transpose(1, 2),
        from_bn=lambda t: t.transpose(1, 2),
    )
    _check(results, "nlc", ref, sizes, has_bias=False)

    for r in results:
        assert r["error"] is not None and "more than 1 value per channel" in r["error"]
        x, _ = _data(0, sum(sizes[0]), (C, 2), seed=3)
        mean, var, count = r["moments"]
        v, m = torch.var_mean(x, dim=(0, 2), correction=0)
        torch.testing.assert_close(mean, m, rtol=0, atol=1e-12)
        torch.testing.assert_close(var, v, rtol=0, atol=1e-12)
        assert torch.all(count == x.shape[0] * x.shape[2])


# ----------------------------------------------------------------- one process


def test_without_distributed_it_is_batch_norm():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    sync, bn = SyncBatchNorm(5), nn.BatchNorm2d(5)
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.running_var, bn.running_var)
    sync.eval(), bn.eval()
    torch.testing.assert_close(sync(x), bn(x))


def test_moments_pass_through_with_one_process():
    m = moments(torch.randn(4, 3, 2), "n c l -> c")
    assert synchronized_moments(m) is m


def test_group_of_one_process_is_batch_norm(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        x = torch.randn(6, 2, 4, requires_grad=True)
        sync, bn = SyncBatchNorm(2), nn.BatchNorm1d(2)
        sync(x).square().sum().backward()
        grad = x.grad.clone()
        x.grad = None
        bn(x).square().sum().backward()
        torch.testing.assert_close(grad, x.grad)
        torch.testing.assert_close(sync.running_mean, bn.running_mean)
    finally:
        dist.destroy_process_group()


def test_signature_and_keys_match_torch():
    mine, theirs = SyncBatchNorm(7, 1e-3, 0.2, True, True), nn.SyncBatchNorm(7, 1e-3, 0.2)
    # A batch norm to every tool, but not torch's SyncBatchNorm: DDP refuses those on CPU.
    assert isinstance(mine, _BatchNorm) and not isinstance(mine, nn.SyncBatchNorm)
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    mine.load_state_dict(theirs.state_dict())
    assert (mine.eps, mine.momentum, mine.process_group) == (1e-3, 0.2, None)
    assert "syncbn" in normlab.available_norms()
    assert isinstance(normlab.create_norm("syncbn", 4), SyncBatchNorm)


def test_errors():
    with pytest.raises(ValueError, match="positive int"):
        SyncBatchNorm(0)
    with pytest.raises(ValueError, match="channel_axis"):
        SyncBatchNorm(3, channel_axis=2)
    with pytest.raises(ValueError, match="expected 3 channels"):
        SyncBatchNorm(3)(torch.randn(4, 2, 5))
    with pytest.raises(TypeError, match="Moments"):
        synchronized_moments((torch.zeros(3), torch.ones(3)))
    with pytest.raises(TypeError, match="nn.Module"):
        SyncBatchNorm.convert_sync_batchnorm("model")
    with pytest.raises(TypeError, match="nn.Module"):
        revert_sync_batchnorm(None)
    plain = nn.Sequential(nn.Linear(2, 2))  # nothing to convert: returned as it is, as torch's
    assert SyncBatchNorm.convert_sync_batchnorm(plain) is plain
    assert revert_sync_batchnorm(plain) is plain


# ----------------------------------------------------------------- conversion


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style: batch norm with dropout and activation inside."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            self.momentum, self.eps,
        )  # fmt: skip
        return self.act(self.drop(x))


class Scaled(nn.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), BatchNormAct2d(8), nn.Conv1d(8, 4, 1)
    )
    net[3] = nn.Sequential(nn.Flatten(2), nn.Conv1d(8, 4, 1), nn.BatchNorm1d(4, eps=1e-3))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net


def test_convert_sync_and_back_keeps_behaviour_and_state():
    net = _net()
    x = torch.randn(4, 3, 6, 6)
    expected = {"train": None, "eval": net.eval()(x)}
    state = copy.deepcopy(net.state_dict())
    synced = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    assert isinstance(synced[1], SyncBatchNorm) and isinstance(synced[3][2], SyncBatchNorm)
    # the timm-style layer became a NormAct around the new norm, activation kept
    assert isinstance(synced[2], normlab.NormAct) and isinstance(synced[2].norm, SyncBatchNorm)
    assert isinstance(synced[2].act, nn.ReLU)
    assert synced[3][2].eps == 1e-3
    assert synced.state_dict().keys() == state.keys()
    torch.testing.assert_close(synced(x), expected["eval"])
    back = revert_sync_batchnorm(synced)
    assert not any(isinstance(m, SYNC_BATCH_NORMS) for m in back.modules())
    assert isinstance(back[2].act, nn.ReLU)
    torch.testing.assert_close(back(x), expected["eval"])
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, state[key])
    # train mode as well: the activation still runs after the norm
    expected["train"] = net.train()(x)
    torch.testing.assert_close(back.train()(x), expected["train"])
    # and the state_dict of the reverted model loads into the original
    net.load_state_dict(back.state_dict())


def test_convert_sync_refuses_to_drop_an_overridden_forward():
    with pytest.raises(TypeError, match="Scaled.*overrides forward"):
        SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), Scaled(4)))


def test_torch_sync_batch_norm_reverts():
    net = nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    )
    back = revert_sync_batchnorm(net)
    assert type(back[1]) is normlab.BatchNorm
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(back.eval()(x), net.eval()(x))


def test_moments_type_is_kept():
    m = Moments(torch.zeros(2), torch.ones(2), torch.full((2,), 4.0), ("c",))
    assert synchronized_moments(m).axes == ("c",)


# ----------------------------------------------------------------- mismatched processes


def _mismatch_worker(rank, world, init_file, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        out = {}
        channels = C + rank  # a different channel count on each process
        layer = SyncBatchNorm(channels, dtype=torch.float64)
        try:
            layer(torch.randn(4, channels, 2, dtype=torch.float64))
            out["error"] = None
        except ValueError as error:
            out["error"] = str(error)
        # the process and its group survive: a matching layer synchronizes afterwards
        same = SyncBatchNorm(C, dtype=torch.float64)
        x = torch.full((2, C, 1), float(rank), dtype=torch.float64)
        same(x)
        out["mean"] = same.running_mean.clone()
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_a_different_channel_count_on_each_process_raises_on_every_process():
    results = spawn(_mismatch_worker, 2)
    for rank, r in enumerate(results):
        assert r["error"] is not None
        assert f"expected statistics of shape ({C + rank},)" in r["error"]
        assert f"got ({C},) on rank 0, ({C + 1},) on rank 1" in r["error"]
        # mean of the whole batch (values 0 and 1, equally many) is 0.5; momentum 0.1
        torch.testing.assert_close(r["mean"], torch.full((C,), 0.05, dtype=torch.float64))
