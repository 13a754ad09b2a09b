import pytest

from normlab import PatternError, parse_pattern, plan


@pytest.mark.parametrize(
    "pattern, shape, sizes, sets, set_size, reduced",
    [
        ("n c h w -> c", (8, 64, 32, 32), {}, 64, 8 * 32 * 32, ("n", "h", "w")),
        ("n c h w -> n c", (8, 64, 32, 32), {}, 8 * 64, 32 * 32, ("h", "w")),
        ("n c h w -> n", (8, 64, 32, 32), {}, 8, 64 * 32 * 32, ("c", "h", "w")),
        ("n (g k) h w -> n g", (8, 64, 32, 32), {"g": 32}, 8 * 32, 2 * 32 * 32, ("k", "h", "w")),
        ("n (g k) h w -> n g", (8, 64, 32, 32), {"k": 16}, 8 * 4, 16 * 32 * 32, ("k", "h", "w")),
        ("n c h w -> c h w", (8, 3, 4, 5), {}, 60, 8, ("n",)),
        ("b t d -> b t", (4, 10, 768), {}, 40, 768, ("d",)),
        ("n h w c -> c", (2, 5, 7, 3), {}, 3, 70, ("n", "h", "w")),
        ("n c ... -> c", (2, 3), {}, 3, 2, ("n",)),
        ("n c ... -> c", (2, 3, 4, 5, 6), {}, 3, 2 * 120, ("n", "...0", "...1", "...2")),
    ],
)
def test_plan_counts(pattern, shape, sizes, sets, set_size, reduced):
    p = plan(pattern, shape, **sizes)
    assert p.num_sets == sets
    assert p.set_size == set_size
    assert p.reduced_axes == reduced
    assert p.num_sets * p.set_size == __import__("math").prod(shape)


def test_kept_order_follows_right_side():
    p = plan("n c h w -> c n", (2, 3, 4, 4))
    assert p.kept_axes == ("c", "n")
    assert p.kept_shape == (3, 2)


def test_parse_is_cached():
    assert parse_pattern("n c h w -> c") is parse_pattern("n c h w -> c")


@pytest.mark.parametrize(
    "pattern, shape, sizes, fragment",
    [
        ("n c h w", (2, 3, 4, 4), {}, "expected one '->'"),
        ("n c h w -> c -> n", (2, 3, 4, 4), {}, "expected one '->'"),
        ("n c h w -> x", (2, 3, 4, 4), {}, "kept axis 'x' is not an input axis"),
        ("n c c w -> c", (2, 3, 4, 4), {}, "appears twice"),
        ("n c h w -> c c", (2, 3, 4, 4), {}, "appears twice on the right"),
        ("n c h w -> c", (2, 3, 4), {}, "expected 4 axes, got 3"),
        ("n c ... -> c", (2,), {}, "expected at least 2 axes, got 1"),
        ("n (g k) h w -> n g", (2, 6, 4, 4), {}, "needs the sizes"),
        ("n (g k) h w -> n g", (2, 6, 4, 4), {"g": 4}, "expected a divisor of 6"),
        ("n (g k) h w -> n g", (2, 6, 4, 4), {"g": 2, "k": 2}, "expected size 4"),
        ("n c h w -> c", (2, 3, 4, 4), {"q": 3}, "unknown axis 'q'"),
        ("n c h w -> c", (2, 3, 4, 4), {"c": 5}, "expected size 5"),
        ("n c! h w -> c", (2, 3, 4, 4), {}, "expected axis names"),
        ("n () h w -> n", (2, 3, 4, 4), {}, "expected axis names inside"),
        ("n c h w -> (c)", (2, 3, 4, 4), {}, "expected plain axis names"),
        ("n c h w -> ...", (2, 3, 4, 4), {}, "not an input axis"),
    ],
)
def test_bad_patterns_raise_with_pattern_and_shape(pattern, shape, sizes, fragment):
    with pytest.raises(PatternError) as info:
        plan(pattern, shape, **sizes)
    message = str(info.value)
    assert fragment in message
    assert pattern.strip() in message


def test_bad_size_value():
    with pytest.raises(PatternError, match="expected a positive int for g="):
        plan("n (g k) h w -> n g", (2, 4, 1, 1), g=0)


def test_pattern_must_be_a_string():
    with pytest.raises(TypeError, match="expected a pattern string"):
        parse_pattern(3)
