"""Synchronized hybrids (``sync=True``): 2 gloo processes with uneven and empty per-process
batches against the same layer, unsynchronized, on the concatenated batch; and without
torch.distributed, exactly the layers they were."""

import datetime
import os
import pickle

import pytest
import torch
import torch.distributed as dist
from gloo import spawn
from torch import nn

import normlab
from normlab import IBN, BatchInstanceNorm, BatchRenorm, SwitchableNorm, SyncBatchNorm
from normlab.convert import is_batch_norm
from normlab.layers.batchnorm import BatchNorm
from normlab.sync import SYNC_BATCH_NORMS, revert_sync_batchnorm

C = 3
WORLD = 2
# Per-step batch sizes of each process: uneven, with an empty batch on either side.
SIZES = [[5, 0], [2, 7], [0, 3]]

# name -> (factory of sync, per-sample shape); every hybrid, channels-first and -last.
LAYERS = {
    "bin": (lambda sync: BatchInstanceNorm(C, sync=sync), (C, 3, 2)),
    "sn": (lambda sync: SwitchableNorm(C, sync=sync), (C, 3, 2)),
    "sn_paper_last": (
        lambda sync: SwitchableNorm(C, momentum=None, variance="paper", channel_axis=-1, sync=sync),
        (2, 3, C),
    ),
    "brn": (lambda sync: BatchRenorm(C, rmax=1.3, dmax=0.4, sync=sync), (C, 4)),
    "brn_last": (
        lambda sync: BatchRenorm(C, momentum=None, rmax=2.0, dmax=1.0, channel_axis=-1, sync=sync),
        (4, C),
    ),
    "ibn": (lambda sync: IBN(5, ratio=0.4, sync=sync), (5, 3, 2)),
}


def _make(name, sync):
    """The layer in float64 with parameters that are neither 0 nor 1 (gates inside [0, 1])."""
    layer = LAYERS[name][0](sync).double()
    g = torch.Generator().manual_seed(sorted(LAYERS).index(name))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) * 0.8 + 0.1)
    return layer


def _data(step, total, shape):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn((total, *shape), generator=g, dtype=torch.float64) * 1.5 + 0.7
    dy = torch.randn((total, *shape), generator=g, dtype=torch.float64)
    return x, dy


def _grad(t):
    return torch.zeros_like(t) if t.grad is None else t.grad.clone()


def _run_steps(layer, shape, rank=0, sizes=None):
    """Train steps on this process's slice of each step's batch: outputs, gradients, buffers."""
    sizes = sizes or [[sum(s)] for s in SIZES]
    steps = []
    for step, per_rank in enumerate(sizes):
        x, dy = _data(step, sum(per_rank), shape)
        start = sum(per_rank[:rank])
        part = slice(start, start + per_rank[rank])
        xs = x[part].clone().requires_grad_(True)
        layer.zero_grad()
        y = layer(xs)
        (y * dy[part]).sum().backward()
        params = {n: _grad(p) for n, p in layer.named_parameters()}
        steps.append({"y": y.detach(), "dx": _grad(xs), "params": params})
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    return steps, buffers


def _eval_input(shape):
    return _data(99, 4, shape)[0]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        out = {}
        for name, (_, shape) in LAYERS.items():
            layer = _make(name, sync=True)
            out[name] = _run_steps(layer, shape, rank, SIZES)
            if rank == 0:  # eval runs no collective: one process alone must not block
                with torch.no_grad():
                    out[name + "/eval"] = layer.eval()(_eval_input(shape))
        # one value per channel over both processes: every process raises the same error
        try:
            _make("brn", sync=True)(torch.randn(1 - rank, C, 1, dtype=torch.float64))
            out["error"] = None
        except ValueError as error:
            out["error"] = str(error)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    return spawn(_worker, WORLD)


def close(actual, expected, atol=1e-12):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_synchronized_layer_equals_the_layer_on_the_whole_batch(results, name):
    shape = LAYERS[name][1]
    reference = _make(name, sync=False)
    steps, buffers = _run_steps(reference, shape)
    for step, expected in enumerate(steps):
        parts = [r[name][0][step] for r in results]
        assert [p["y"].shape[0] for p in parts] == SIZES[step]
        close(torch.cat([p["y"] for p in parts]), expected["y"])
        close(torch.cat([p["dx"] for p in parts]), expected["dx"])
        # each process holds its share of a parameter's gradient (DDP sums them)
        for param, grad in expected["params"].items():
            close(sum(p["params"][param] for p in parts), grad, atol=1e-11)
    for r in results:
        assert r[name][1].keys() == buffers.keys()
        for key, value in buffers.items():
            close(r[name][1][key], value)
    # eval uses the (global) running statistics, identical to the reference's
    with torch.no_grad():
        close(results[0][name + "/eval"], reference.eval()(_eval_input(shape)))


def test_one_value_per_channel_over_all_processes_raises_everywhere(results):
    for r in results:
        assert r["error"] is not None and "more than 1 value per channel over all" in r["error"]


def test_the_batch_part_is_what_is_synchronized(results):
    # The IN and LN parts stay per sample: a process's first step alone (5 of 5 samples
    # on rank 0) equals the unsynchronized layer; at step 1 (2 of 9) it does not.
    shape = LAYERS["sn"][1]
    alone = _make("sn", sync=False)
    x, _ = _data(0, 5, shape)
    close(alone(x), results[0]["sn"][0][0]["y"])
    x, _ = _data(1, 9, shape)
    assert not torch.allclose(alone(x[:2]), results[0]["sn"][0][1]["y"])


# ----------------------------------------------------------------- one process


def _same(name, x):
    """Train (twice) and eval: sync=True and sync=False give bit-identical results."""
    a, b = _make(name, sync=True), _make(name, sync=False)
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = a(xa), b(xb)
        assert torch.equal(ya, yb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert torch.equal(xa.grad, xb.grad)
        for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(pa.grad, pb.grad), n
    for ba, bb in zip(a.buffers(), b.buffers(), strict=True):
        assert torch.equal(ba, bb)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_without_distributed_sync_changes_nothing(name):
    assert not dist.is_initialized()
    _same(name, _data(0, 6, LAYERS[name][1])[0])


def test_group_of_one_process_changes_nothing(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for name, (_, shape) in LAYERS.items():
            _same(name, _data(0, 6, shape)[0])
    finally:
        dist.destroy_process_group()


def test_options_and_registry():
    assert not any(m.sync for m in (BatchInstanceNorm(C), SwitchableNorm(C), BatchRenorm(C)))
    assert not IBN(8).sync and type(IBN(8).BN) is BatchNorm
    synced = IBN(8, sync=True)
    assert type(synced.BN) is SyncBatchNorm and synced.BN.process_group is None
    assert synced.state_dict().keys() == IBN(8).state_dict().keys()  # BN.* as before
    assert "sync=True" in repr(synced) and "sync=True" in repr(BatchRenorm(C, sync=True))
    for name in ("bin", "sn", "brn", "ibn"):
        assert normlab.create_norm(name, 8, sync=True).sync


def test_errors():
    for make in (BatchInstanceNorm, SwitchableNorm, BatchRenorm, IBN):
        with pytest.raises(TypeError, match="expected sync a bool"):
            make(8, sync="yes")
        with pytest.raises(ValueError, match="expected sync=True with a process_group"):
            make(8, process_group=object())
    with pytest.raises(ValueError, match="expected using_bn=True"):
        SwitchableNorm(C, using_bn=False, sync=True)


# ----------------------------------------------------------------- conversion


def _ibn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), IBN(8), nn.BatchNorm2d(8))


def test_convert_sync_batchnorm_reaches_the_bn_half_of_ibn():
    net = _ibn_net()
    x = torch.randn(4, 3, 5, 5)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    expected = net(x)
    synced = SyncBatchNorm.convert_sync_batchnorm(net)
    assert type(synced[1].BN) is SyncBatchNorm and synced[1].sync
    assert isinstance(synced[1].IN, normlab.InstanceNorm) and type(synced[2]) is SyncBatchNorm
    assert synced.state_dict().keys() == state.keys()
    net.load_state_dict(state)  # the step above moved the running statistics: start again
    torch.testing.assert_close(synced(x), expected)
    back = revert_sync_batchnorm(synced)
    assert not back[1].sync and not any(isinstance(m, SYNC_BATCH_NORMS) for m in back.modules())


def test_convert_to_syncbn_where_batch_norm_keeps_ibn():
    # every norm becomes "syncbn" by default (IBN as a whole, as for any target); to
    # synchronize only the batch norms, IBN's BN half included, select them
    net, report = normlab.convert(_ibn_net(), "syncbn", where=lambda n, m: is_batch_norm(m))
    assert isinstance(net[1], IBN) and type(net[1].BN) is SyncBatchNorm
    assert sorted(e.split(":")[0] for e in map(str, report.replaced)) == ["1.BN", "2"]
    whole, _ = normlab.convert(_ibn_net(), "syncbn")
    assert type(whole[1]) is SyncBatchNorm


def test_convert_sync_batchnorm_switches_the_hybrids_on_and_revert_off():
    net = nn.Sequential(
        BatchRenorm(C), BatchInstanceNorm(C), SwitchableNorm(C), SwitchableNorm(C, using_bn=False)
    )
    group = object()  # stored only: nothing runs here
    synced = SyncBatchNorm.convert_sync_batchnorm(net, process_group=group)
    assert [type(m) for m in synced] == [type(m) for m in net]  # kept, not replaced
    assert [m.sync for m in synced] == [True, True, True, False]
    assert all(m.process_group is group for m in synced[:3])
    back = revert_sync_batchnorm(synced)
    assert not any(m.sync or m.process_group is not None for m in back)
