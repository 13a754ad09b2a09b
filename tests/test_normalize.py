import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from oracle import group_norm, standardize

from normlab import PatternError, normalize

N, C, H, W = 4, 6, 5, 3


def nhwc(t):
    return t.permute(0, 2, 3, 1)


# Every row of DESIGN.md's table: (pattern, sizes, how to get the input, float64 oracle).
TABLE = [
    ("n c h w -> c", {}, lambda x: x, lambda x: standardize(x, (0, 2, 3))),
    ("n h w c -> c", {}, nhwc, lambda x: nhwc(standardize(x, (0, 2, 3)))),
    ("n c h w -> c h w", {}, lambda x: x, lambda x: standardize(x, (0,))),
    ("n h w c -> h w c", {}, nhwc, lambda x: nhwc(standardize(x, (0,)))),
    ("n c h w -> n c", {}, lambda x: x, lambda x: standardize(x, (2, 3))),
    ("n h w c -> n c", {}, nhwc, lambda x: nhwc(standardize(x, (2, 3)))),
    ("n c h w -> n", {}, lambda x: x, lambda x: standardize(x, (1, 2, 3))),
    ("n h w c -> n", {}, nhwc, lambda x: nhwc(standardize(x, (1, 2, 3)))),
    ("n (g k) h w -> n g", {"g": 3}, lambda x: x, lambda x: group_norm(x, 3)),
    ("n h w (g k) -> n g", {"k": 2}, nhwc, lambda x: nhwc(group_norm(x, 3))),
    ("n c ... -> c", {}, lambda x: x, lambda x: standardize(x, (0, 2, 3))),
    (
        "b t d -> b t",
        {},
        lambda x: x.reshape(N, C, H * W),
        lambda x: standardize(x.reshape(N, C, H * W), (2,)),
    ),
]


@pytest.mark.parametrize("pattern, sizes, layout, reference", TABLE, ids=[row[0] for row in TABLE])
def test_every_method_matches_float64_oracle(pattern, sizes, layout, reference):
    x = torch.randn(N, C, H, W) * 3 + 1
    y = normalize(layout(x), pattern, **sizes)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(x), atol=1e-5, rtol=1e-5)


def test_group_norm_identities():
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    gn1 = normalize(x, "n (g k) h w -> n g", g=1)
    ln = normalize(x, "n c h w -> n")
    gnc = normalize(x, "n (g k) h w -> n g", g=C)
    inn = normalize(x, "n c h w -> n c")
    torch.testing.assert_close(gn1, ln)
    torch.testing.assert_close(gnc, inn)


def test_rms_is_uncentered():
    x = torch.randn(N, 7, 16) + 2
    y = normalize(x, "b t d -> b t", center=False, eps=1e-6)
    torch.testing.assert_close(
        y.double(), standardize(x, (2,), 1e-6, center=False), atol=1e-5, rtol=1e-5
    )
    # Centered data: RMS norm equals layer norm.
    xc = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(
        normalize(xc, "b t d -> b t", center=False), normalize(xc, "b t d -> b t")
    )


def test_affine_per_channel_and_trailing():
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    w, b = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    y = normalize(x, "n (g k) h w -> n g", g=2, weight=w, bias=b)
    expected = group_norm(x, 2) * w[:, None, None] + b[:, None, None]
    torch.testing.assert_close(y, expected)
    t = torch.randn(2, 3, 8, dtype=torch.float64)
    w8, b8 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    torch.testing.assert_close(
        normalize(t, "b t d -> b t", weight=w8, bias=b8), standardize(t, (2,)) * w8 + b8
    )


@pytest.mark.parametrize("offset, scale", [(2000.0, 1.0), (100.0, 0.01)])
def test_large_mean_small_spread_float32(offset, scale):
    x64 = torch.randn(8, 4, 16, 16, dtype=torch.float64) * scale + offset
    x = x64.float()
    for pattern in ["n c h w -> c", "n c h w -> n c", "n c h w -> n"]:
        y = normalize(x, pattern, eps=0.0)
        reduce = {"n c h w -> c": (0, 2, 3), "n c h w -> n c": (2, 3), "n c h w -> n": (1, 2, 3)}[
            pattern
        ]
        ref = standardize(x.double(), reduce, eps=0.0)
        assert (y.double() - ref).abs().max() < 1e-2, pattern


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_dtype_and_float32_statistics(dtype):
    x = (torch.randn(N, C, H, W) * 2 + 50).to(dtype)
    w = torch.randn(C)  # float32 weights beside half input, as mixed precision gives
    y = normalize(x, "n c h w -> c", weight=w)
    assert y.dtype == dtype
    ref = standardize(x.double(), (0, 2, 3)) * w[:, None, None].double()
    assert (y.double() - ref).abs().max() < 0.05


def test_channels_last_in_channels_last_out():
    x = torch.randn(N, C, H, W).to(memory_format=torch.channels_last)
    for pattern, sizes in [
        ("n c h w -> c", {}),
        ("n (g k) h w -> n g", {"g": 3}),
        ("n c h w -> n c", {}),
    ]:
        y = normalize(x, pattern, weight=torch.ones(C), **sizes)
        assert y.is_contiguous(memory_format=torch.channels_last), pattern


def test_non_contiguous_input():
    base = torch.randn(N, C, H, 2 * W)
    x = base[..., ::2]
    assert not x.is_contiguous()
    torch.testing.assert_close(
        normalize(x, "n c h w -> c"), normalize(x.contiguous(), "n c h w -> c")
    )


@pytest.mark.parametrize(
    "pattern, sizes",
    [
        ("n c h w -> c", {}),
        ("n (g k) h w -> n g", {"g": 2}),
        ("n c h w -> n", {}),
        ("n c h w -> c h w", {}),
    ],
)
def test_gradcheck_and_gradgradcheck(pattern, sizes):
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    if pattern == "n c h w -> c h w":
        w = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return normalize(x, pattern, weight=w, bias=b, **sizes)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@st.composite
def pattern_case(draw):
    rank = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    names = [f"a{i}" for i in range(rank)]
    kept = draw(st.lists(st.sampled_from(names), unique=True, max_size=rank - 1))
    center = draw(st.booleans())
    return shape, names, kept, center


@given(case=pattern_case(), seed=st.integers(0, 2**16), offset=st.sampled_from([0.0, 30.0]))
def test_any_pattern_matches_float64_oracle(case, seed, offset):
    # Law: for any choice of kept axes, normalize equals the formula over the other axes.
    shape, names, kept, center = case
    x = (
        torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        + offset
    )
    pattern = f"{' '.join(names)} -> {' '.join(kept)}"
    reduced = tuple(i for i, n in enumerate(names) if n not in kept)
    y = normalize(x, pattern, center=center)
    torch.testing.assert_close(y, standardize(x, reduced, center=center), atol=1e-8, rtol=1e-8)
    y32 = normalize(x.float(), pattern, center=center)
    assert (y32.double() - standardize(x.float(), reduced, center=center)).abs().max() < 1e-3


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (
            lambda: normalize(torch.randn(2, 3), "n c h w -> c"),
            PatternError,
            "expected 4 axes, got 2",
        ),
        (
            lambda: normalize(torch.ones(2, 3, dtype=torch.int32), "n c -> c"),
            TypeError,
            "floating-point",
        ),
        (lambda: normalize([1.0, 2.0], "n -> "), TypeError, "expected a torch.Tensor"),
        (
            lambda: normalize(torch.randn(2, 3, 4), "n c l -> c", weight=torch.ones(4)),
            ValueError,
            "expected weight of 3 channels",
        ),
        (
            lambda: normalize(torch.randn(2, 3, 4), "b t d -> b t", weight=torch.ones(3)),
            ValueError,
            "trailing dims",
        ),
        (
            lambda: normalize(torch.randn(2, 3), "n c -> c", eps=-1.0),
            ValueError,
            "expected eps >= 0",
        ),
        (
            lambda: normalize(
                torch.randn(2, 3), "n c -> c", weight=torch.ones(3, dtype=torch.long)
            ),
            TypeError,
            "floating-point",
        ),
    ],
)
def test_errors(call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()
