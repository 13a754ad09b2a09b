"""Every registry norm on ordinary but awkward input, on the forced Numba path and the plain path.

Cases: sets of equal values, empty batches, half precision far from zero, huge
magnitudes, non-contiguous and channels_last views, a forked process, several threads.
The oracle is torch.nn's counterpart where there is one (batch, instance, group, layer
and RMS norm, with their activations), otherwise the same layer's float64 copy on the
plain path (the hybrids' formulas are checked against the papers in their own tests).
"""

import contextlib
import copy
import multiprocessing
import threading

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import normlab
from normlab.kernels import use_reference

NAMES = sorted(normlab.available_norms())
C = 8
SHAPE = (4, C, 6, 6)


def _channels_last_norm(torch_layer):  # torch's (..., C) layers on NCHW data
    return lambda x: torch_layer(x.movedim(1, -1)).movedim(-1, 1)


def torch_counterpart(name, m, dtype=torch.float64):
    """torch.nn's layer with `m`'s state (in `dtype`, `m`'s train mode), or None."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in m.state_dict().items()}
    act = {"relu": F.relu, "silu": F.silu}.get(name.rsplit("-", 1)[-1], lambda y: y)
    base = name.split("-")[0] if name.startswith(("bn-", "gn-")) else name
    if base in ("bn", "syncbn", "brn", "frozenbn"):  # brn starts as BN (rmax 1, dmax 0)
        t = nn.BatchNorm2d(C, eps=m.eps, momentum=getattr(m, "momentum", 0.1))
        if base == "frozenbn":
            state["num_batches_tracked"] = torch.tensor(0)
    elif base in ("gn", "ln"):
        t = nn.GroupNorm(m.num_groups, C, eps=m.eps)
    elif base == "in":
        t = nn.InstanceNorm2d(C, eps=m.eps, affine=True)
    elif base == "ln2d":
        t = nn.LayerNorm(C, eps=m.eps)
    elif base == "rms":
        t = nn.RMSNorm(C, eps=m.eps)
    elif base == "none":
        return lambda x: x
    else:
        return None
    t = t.to(dtype)
    t.load_state_dict(state)
    t.train(m.training and base != "frozenbn")
    fn = _channels_last_norm(t) if base in ("ln2d", "rms") else t
    return lambda x: act(fn(x))


def oracle(name, m, x):
    """The expected output for `x` (float64), and the oracle's state after the call."""
    t = torch_counterpart(name, m)
    if t is not None:
        return t(x.double()), None
    wide = copy.deepcopy(m).double()
    with use_reference():
        y = wide(x.double())
    return y, wide.state_dict()


@pytest.fixture(params=["numba", "plain"])
def path(request):
    """The forced Numba path (the shared fixture) or the plain PyTorch path."""
    if request.param == "numba":
        request.getfixturevalue("numba_kernels")
        return contextlib.nullcontext
    return use_reference


def check(name, m, x, *, scale=1.0, atol=1e-4):
    expected, state = oracle(name, m, x)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not y.isnan().any(), "finite input gave NaN"
    torch.testing.assert_close(y.double() / scale, expected / scale, atol=atol, rtol=atol)
    if state is not None:
        for key, value in state.items():
            got = m.state_dict()[key]
            torch.testing.assert_close(got.to(value.dtype), value, atol=atol, rtol=atol, msg=key)
    return y


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_sets_of_equal_values(name, training, path):
    x = torch.randn(SHAPE)
    x[0, 1] = 0.0  # a black image's channel
    x[:, 5] = 2.5  # a dead channel, over the whole batch
    m = normlab.create_norm(name, C).train(training)
    with path():
        check(name, m, x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name, training, path):
    m = normlab.create_norm(name, C).train(training)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(0, C, 6, 6, requires_grad=True)
    with path():
        y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    for key, value in m.state_dict().items():
        if key.endswith("num_batches_tracked") and training:
            assert int(value) == int(before[key]) + 1, key  # counted, as torch's
        else:
            assert torch.equal(value, before[key]), key  # the buffers are left alone


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_far_from_zero(name, dtype, path):
    x = (2000 + 16 * torch.randn(SHAPE)).to(dtype)
    m = normlab.create_norm(name, C).to(dtype)
    expected, _ = oracle(name, m, x)
    with path():
        y = m(x).double()
    scale = expected.abs().max().clamp(min=1)
    tol = 0.02 if dtype == torch.bfloat16 else 0.005
    torch.testing.assert_close(y / scale, expected / scale, atol=tol, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_huge_magnitudes(name, path):
    """|x| ~ 1e30 in float32: never NaN; torch.nn's output where torch gives no NaN."""
    x = torch.randn(SHAPE) * 1e30
    m = normlab.create_norm(name, C)
    with path():
        y = m(x)
    assert not y.isnan().any()
    theirs = torch_counterpart(name, normlab.create_norm(name, C), torch.float32)
    if theirs is not None:
        expected = theirs(x)  # float32, as torch computes it: the variance overflows to inf
        if not expected.isnan().any():  # torch's GroupNorm gives NaN here (a difference)
            torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_views(name, path):
    base = torch.randn(4, 2 * C, 6, 12)
    x = base[:, ::2, :, ::2]  # strided in channels and width
    assert not x.is_contiguous()
    m = normlab.create_norm(name, C)
    with path():
        y = check(name, m, x)
    m2 = copy.deepcopy(normlab.create_norm(name, C))
    with path():
        torch.testing.assert_close(y, m2(x.contiguous()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_channels_last(name, training, path):
    x = torch.randn(SHAPE).to(memory_format=torch.channels_last)
    m = normlab.create_norm(name, C).train(training)
    with path():
        y = check(name, m, x)
    assert y.is_contiguous(memory_format=torch.channels_last), "the memory format is kept"


def _outputs():
    torch.manual_seed(3)
    x = torch.randn(SHAPE)
    with torch.no_grad():  # tensors with a graph cannot be pickled to the parent
        return {name: normlab.create_norm(name, C)(x) for name in NAMES}


def _send_outputs(queue):
    # as NumPy arrays: torch would share the tensors' memory through the child, which exits
    queue.put({name: y.numpy() for name, y in _outputs().items()})


def test_fork_after_the_pool_ran(numba_kernels):
    """A forked child (a data-loader worker, a process pool) runs every norm as the parent."""
    expected = _outputs()  # the parent uses every kernel, thread pool included
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_send_outputs, args=(queue,))
    child.start()
    try:
        got = queue.get(timeout=300)  # before join: the queue's feeder must drain
    except Exception:  # noqa: BLE001  (queue.Empty: the child hung or died)
        got = None
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        child.join()
    assert got is not None and child.exitcode == 0, "the forked child hung or failed"
    for name in NAMES:
        torch.testing.assert_close(torch.from_numpy(got[name]), expected[name], msg=name)


@pytest.mark.parametrize("name", NAMES)
def test_threads(name, path):
    """Four threads, each with its own layer, at once: each gets what it gets alone."""
    inputs = [torch.randn(SHAPE) for _ in range(4)]
    layers = [normlab.create_norm(name, C) for _ in inputs]
    with path():
        alone = [copy.deepcopy(m)(x) for m, x in zip(layers, inputs, strict=True)]
    results, errors = [None] * 4, []
    barrier = threading.Barrier(4)

    def work(i):
        try:
            with path():  # the reference switch is per thread
                barrier.wait()
                for _ in range(3):
                    results[i] = layers[i](inputs[i])
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for got, want in zip(results, alone, strict=True):
        torch.testing.assert_close(got, want)  # training: the same batch each time
