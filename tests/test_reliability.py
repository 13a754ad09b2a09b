"""Ordinary but awkward use: each case once broke (crashed, hung or gave a wrong result).

Each test compares against an independent oracle: torch.nn's counterpart, the same
layer in float64, or the definition of the state a fresh layer starts in.
"""

import multiprocessing
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import normlab
from normlab.kernels import use_reference
from normlab.layers import (
    IBN,
    BatchInstanceNorm,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm,
    EvoNormB0,
    RMSNorm,
    SwitchableNorm,
)

HYBRIDS = [SwitchableNorm, BatchInstanceNorm, IBN]
ROOT = Path(__file__).resolve().parents[1]


def _zero_variance_input():
    # 4·8·48·48 = 73,728 elements: past the size where the kernels take over
    x = torch.randn(4, 8, 48, 48)
    x[0, 1] = 0.0  # a black image's channel
    x[2, 5] = 3.0  # a dead (constant) channel
    return x


@pytest.mark.parametrize("cls", HYBRIDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_variance_sets_give_the_reference_paths_output(cls, training):
    """A (sample, channel) set of equal values: no ZeroDivisionError, the plain path's output."""
    x = _zero_variance_input()
    fast, plain = cls(8), cls(8)
    fast.train(training), plain.train(training)
    y = fast(x)
    with use_reference():
        expected = plain(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.state_dict(), plain.state_dict(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", HYBRIDS, ids=lambda c: c.__name__)
def test_zero_variance_sets_on_the_forced_kernels(cls, numba_kernels):
    x = _zero_variance_input()[:, :, :8, :8].contiguous()
    m = cls(8)
    y = m(x)
    with use_reference():
        expected = cls(8)(x)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def _forked_child(queue):  # runs in the child: the kernels' pool must work there too
    torch.manual_seed(1)
    x = torch.randn(4, 8, 16, 16)
    queue.put(SwitchableNorm(8)(x).abs().sum().item())


def test_a_forked_process_can_use_the_kernels_thread_pool(numba_kernels):
    """A child forked after the pool has run inherits it without its threads."""
    SwitchableNorm(8)(torch.randn(4, 8, 16, 16))  # the parent starts the pool
    from normlab.kernels import cpu

    assert cpu._pool[0] is not None, "the parent should have started the pool"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the forked child hung waiting for the thread pool")
    assert child.exitcode == 0
    torch.manual_seed(1)
    expected = SwitchableNorm(8)(torch.randn(4, 8, 16, 16)).abs().sum().item()
    assert queue.get(timeout=10) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("params", ["initial", "random"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", [SwitchableNorm, BatchInstanceNorm], ids=lambda c: c.__name__)
def test_half_precision_mixture_far_from_zero(cls, dtype, params):
    """Mixture weights in float32: the output is the float64 layer's (same parameters, same
    input), not shifted by weights that do not sum to 1 (0.47 in float16, -1232 in bfloat16)."""
    x = (2000 + torch.randn(8, 8, 6, 6)).to(dtype)
    half = cls(8).to(dtype)
    if params == "random":  # unequal mixture weights, gates inside [0, 1]
        with torch.no_grad():
            for p in half.parameters():
                p.copy_(torch.rand_like(p))
    wide = cls(8).double()
    wide.load_state_dict(half.state_dict())
    y = half(x).double()
    expected = wide(x.double())
    scale = expected.abs().max().clamp(min=1)
    torch.testing.assert_close(y / scale, expected / scale, atol=0.01, rtol=0)
    assert abs(y.mean() - expected.mean()) < 0.01


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str
)
@pytest.mark.parametrize("scale", [1e-3, 1.0])
def test_rmsnorm_default_eps_is_torchs(dtype, scale):
    """eps=None: the eps of the computation dtype (float32's for half input), as torch's."""
    x = (scale * torch.randn(4, 16, 32)).to(dtype)
    ours, theirs = RMSNorm(32).to(dtype), torch.nn.RMSNorm(32).to(dtype)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("path", ["default", "numba", "reference"])
def test_huge_magnitudes_match_torch(path, request):
    """|x| ~ 1e30 in float32: the variance overflows to inf; output 0, running var inf."""
    if path == "numba":
        request.getfixturevalue("numba_kernels")
    x = torch.randn(4, 8, 16, 16) * 1e30
    ours, theirs = BatchNorm2d(8), torch.nn.BatchNorm2d(8)
    with use_reference(path == "reference"):
        y = ours(x)
    expected = theirs(x)
    assert not y.isnan().any()
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-3, atol=0)
    for cls in HYBRIDS:  # the hybrids' derived statistics: no 0/0 either
        with use_reference(path == "reference"):
            assert not cls(8)(x).isnan().any(), cls.__name__


@pytest.mark.parametrize(
    "ours, theirs, shape",
    [
        (BatchNorm1d, torch.nn.BatchNorm1d, (0, 3)),
        (BatchNorm1d, torch.nn.BatchNorm1d, (0, 3, 5)),
        (BatchNorm2d, torch.nn.BatchNorm2d, (0, 3, 4, 4)),
        (BatchNorm2d, torch.nn.BatchNorm2d, (2, 3, 0, 4)),
        (BatchNorm3d, torch.nn.BatchNorm3d, (0, 3, 2, 2, 2)),
    ],
    ids=lambda v: str(v) if isinstance(v, tuple) else v.__name__,
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_in_training_is_torchs(ours, theirs, shape, momentum):
    a, b = ours(3, momentum=momentum), theirs(3, momentum=momentum)
    for m in (a, b):  # non-trivial buffers and affine
        m.load_state_dict(
            {
                "weight": torch.tensor([1.0, 2.0, 3.0]),
                "bias": torch.tensor([0.5, 0.0, -1.0]),
                "running_mean": torch.tensor([0.1, 0.2, 0.3]),
                "running_var": torch.tensor([2.0, 3.0, 4.0]),
                "num_batches_tracked": torch.tensor(5),
            }
        )
    xa = torch.randn(shape, requires_grad=True)
    xb = xa.detach().clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    assert ya.shape == yb.shape and ya.dtype == yb.dtype
    ya.sum().backward(), yb.sum().backward()
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    torch.testing.assert_close(a.weight.grad, b.weight.grad)
    torch.testing.assert_close(a.bias.grad, b.bias.grad)
    assert xa.grad.shape == xb.grad.shape


@pytest.mark.parametrize("cls", [BatchRenorm, EvoNormB0, SwitchableNorm, BatchInstanceNorm])
def test_empty_batch_counts_and_leaves_buffers(cls):
    m = cls(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    y = m(torch.randn(0, 3, 4, 4))
    assert y.shape == (0, 3, 4, 4)
    after = m.state_dict()
    assert int(after["num_batches_tracked"]) == int(before["num_batches_tracked"]) + 1
    for key, value in before.items():
        if key != "num_batches_tracked":
            assert torch.equal(after[key], value), key


@pytest.mark.parametrize(
    "make",
    [
        lambda eps: BatchNorm2d(3, eps=eps),
        lambda eps: BatchNorm1d(3, eps=eps),
        lambda eps: BatchNorm(3, eps=eps),
        lambda eps: BatchRenorm(3, eps=eps),
        lambda eps: SwitchableNorm(3, eps=eps),
        lambda eps: BatchInstanceNorm(3, eps=eps),
        lambda eps: EvoNormB0(3, eps=eps),
        lambda eps: IBN(4, eps=eps),
    ],
)
@pytest.mark.parametrize("eps", [0, 0.0, -1e-5, float("nan")])
def test_batch_statistics_layers_refuse_eps_at_most_zero(make, eps):
    """torch's batch norm refuses eps <= 0 once it trains; normlab at construction."""
    with pytest.raises(ValueError, match="expected eps a finite float > 0, got"):
        make(eps)


def test_torch_refuses_eps_zero_in_training_too():
    # the behaviour normlab's stricter check stands for
    with pytest.raises((ValueError, RuntimeError)):
        torch.nn.BatchNorm2d(3, eps=0)(torch.randn(2, 3, 4, 4))


def test_ibn_half_and_its_keys():
    m = IBN(8)
    keys = sorted(m.state_dict())
    h = m.half()
    assert (
        h is m and m.IN.weight.dtype == torch.float16 and m.BN.running_mean.dtype == torch.float16
    )
    assert sorted(m.state_dict()) == keys and all(k[:3] in ("IN.", "BN.") for k in keys)
    x = torch.randn(4, 8, 5, 5)
    wide = IBN(8)
    torch.testing.assert_close(m(x.half()).float(), wide(x), atol=1e-2, rtol=1e-2)
    assert IBN(8, ratio=0.25).instance_channels == 2 and IBN(planes=6, ratio=0.5).planes == 6


def _variants():
    for name in normlab.available_norms():
        yield name, {}
    yield "sn", {"last_gamma": True}
    yield "frn", {"learnable_eps": True, "eps": 1e-3}
    yield "bin", {"affine": False}


@pytest.mark.parametrize("name, options", list(_variants()), ids=lambda v: str(v))
def test_meta_then_to_empty_then_reset_parameters_is_a_fresh_layer(name, options):
    fresh = normlab.create_norm(name, 8, **options)
    with torch.device("meta"):
        m = normlab.create_norm(name, 8, **options)
    m = m.to_empty(device="cpu")
    state = fresh.state_dict()
    if not state:  # no parameter, no buffer: nothing to initialise
        return
    m.reset_parameters()
    got = m.state_dict()
    assert sorted(got) == sorted(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


def test_evonorm_b0_loads_a_checkpoint_without_the_counter():
    source = EvoNormB0(4)
    source(torch.randn(8, 4, 3, 3))
    state = source.state_dict()
    del state["num_batches_tracked"]
    m = EvoNormB0(4)
    m.load_state_dict(state)  # as torch's batch norm accepts old checkpoints
    assert torch.equal(m.running_var, source.running_var)
    assert int(m.num_batches_tracked) == 0


def test_the_built_package_carries_py_typed(tmp_path):
    """PEP 561: type checkers read normlab's hints only if py.typed is installed with it."""
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(tmp_path)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = out.glob("normlab-*.whl")
    assert "normlab/py.typed" in zipfile.ZipFile(wheel).namelist()
