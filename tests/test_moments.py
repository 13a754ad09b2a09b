import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from normlab import combine, moments
from normlab.moments import Moments


def test_moments_match_float64_definition():
    x = torch.randn(6, 4, 5, 3)
    m = moments(x, "n c h w -> c")
    ref = x.double()
    assert torch.allclose(m.mean.double(), ref.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(m.var.double(), ref.var((0, 2, 3), unbiased=False), atol=1e-6)
    assert torch.all(m.count == 6 * 5 * 3)
    assert m.axes == ("c",)


def test_grouped_moments_and_kept_order():
    x = torch.randn(2, 6, 3)
    m = moments(x, "n (g k) t -> g n", g=3)
    ref = x.double().reshape(2, 3, 2, 3)
    assert m.mean.shape == (3, 2)
    assert torch.allclose(m.mean.double(), ref.mean((2, 3)).T, atol=1e-6)
    assert torch.allclose(m.var.double(), ref.var((2, 3), unbiased=False).T, atol=1e-6)


@pytest.mark.parametrize("offset, scale", [(2000.0, 1.0), (100.0, 0.01), (1e4, 0.1)])
def test_large_offset_is_stable_in_float32(offset, scale):
    x = torch.randn(16, 8, 12, 12, dtype=torch.float64) * scale + offset
    m = moments(x.float(), "n c h w -> c")
    exact = x.float().double().var((0, 2, 3), unbiased=False)
    assert torch.allclose(m.var.double(), exact, rtol=2e-2)
    # And Chan combination of instance moments keeps it: no E[x²] − E[x]² anywhere.
    via_instances = moments(x.float(), "n c h w -> n c").reduce("n")
    assert torch.allclose(via_instances.var.double(), exact, rtol=2e-2)


def test_unbiased_var():
    x = torch.randn(7, 3)
    m = moments(x, "n c -> c")
    assert torch.allclose(m.unbiased_var(), x.var(0, unbiased=True), atol=1e-6)


def test_bf16_statistics_are_float32():
    x = torch.randn(4, 3, 5, 5).to(torch.bfloat16)
    m = moments(x, "n c h w -> c")
    assert m.mean.dtype == torch.float32
    assert torch.allclose(m.mean, x.float().mean((0, 2, 3)), atol=1e-5)


@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5).filter(lambda s: sum(s) > 0),
    channels=st.integers(1, 4),
    offset=st.sampled_from([0.0, 50.0, -1000.0]),
    seed=st.integers(0, 2**16),
)
def test_combine_partial_batches_equals_whole(sizes, channels, offset, seed):
    # Law: the moments of disjoint parts (some possibly empty) combine into the whole's.
    gen = torch.Generator().manual_seed(seed)
    whole = torch.randn(sum(sizes), channels, 3, generator=gen, dtype=torch.float64) + offset
    parts = torch.split(whole, sizes)
    combined = combine([moments(p, "n c t -> c") for p in parts])
    assert torch.allclose(combined.mean, whole.mean((0, 2)), atol=1e-9)
    assert torch.allclose(combined.var, whole.var((0, 2), unbiased=False), atol=1e-9)
    assert torch.all(combined.count == sum(sizes) * 3)


@given(
    n=st.integers(1, 4),
    c=st.integers(1, 5),
    length=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_coarser_moments_follow_from_finer(n, c, length, seed):
    # Law: BN and LN moments derive exactly from IN moments (Switchable Norm's trick).
    x = torch.randn(
        n, c, length, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    inst = moments(x, "n c l -> n c")
    for kept, direct in [(("c",), "n c l -> c"), (("n",), "n c l -> n"), ((), "n c l -> ")]:
        derived = inst.keep(*kept)
        expected = moments(x, direct)
        assert torch.allclose(derived.mean, expected.mean, atol=1e-10)
        assert torch.allclose(derived.var, expected.var, atol=1e-10)
        assert torch.allclose(derived.count, expected.count)


def test_combine_all_empty_gives_zero_count():
    empty = moments(torch.randn(0, 3, 2), "n c t -> c")
    out = combine([empty, empty])
    assert torch.all(out.count == 0) and torch.all(out.mean == 0) and torch.all(out.var == 0)


def test_combine_errors():
    a = moments(torch.randn(2, 3), "n c -> c")
    b = moments(torch.randn(2, 4), "n c -> c")
    with pytest.raises(ValueError, match="expected at least one"):
        combine([])
    with pytest.raises(ValueError, match="same axes and shape"):
        combine([a, b])
    with pytest.raises(ValueError, match="cannot reduce over 'q'"):
        a.reduce("q")


def test_moments_rejects_integer_input():
    with pytest.raises(TypeError, match="floating-point"):
        moments(torch.ones(2, 3, dtype=torch.long), "n c -> c")


def test_moments_is_a_value():
    m = moments(torch.randn(2, 3), "n c -> c")
    assert isinstance(m, Moments)
