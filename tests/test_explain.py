"""explain(): counts checked against plain arithmetic and a brute-force grouping of indices."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab import PatternError
from normlab.cli import main
from normlab.explain import METHODS, compare, default_groups, explain, format_table

SRC = str(Path(__file__).resolve().parents[1] / "src")


# (pattern, shape, sizes, kept names, reduced names, num_sets, set_size), numbers by hand
CASES = [
    ("n c h w -> c", (8, 64, 32, 32), {}, ("c",), ("n", "h", "w"), 64, 8 * 32 * 32),
    (
        "n (g k) h w -> n g",
        (8, 64, 32, 32),
        {"g": 32},
        ("n", "g"),
        ("k", "h", "w"),
        8 * 32,
        2 * 32 * 32,
    ),
    (
        "n (g k) h w -> n g",
        (8, 64, 32, 32),
        {"k": 16},
        ("n", "g"),
        ("k", "h", "w"),
        8 * 4,
        16 * 32 * 32,
    ),
    ("n c h w -> n c", (8, 64, 32, 32), {}, ("n", "c"), ("h", "w"), 8 * 64, 32 * 32),
    ("n c h w -> n", (8, 64, 32, 32), {}, ("n",), ("c", "h", "w"), 8, 64 * 32 * 32),
    ("n c h w -> c h w", (8, 64, 32, 32), {}, ("c", "h", "w"), ("n",), 64 * 32 * 32, 8),
    ("n h w c -> c", (8, 32, 32, 64), {}, ("c",), ("n", "h", "w"), 64, 8 * 32 * 32),
    ("n h w (g k) -> n g", (2, 5, 7, 12), {"g": 3}, ("n", "g"), ("h", "w", "k"), 2 * 3, 5 * 7 * 4),
    ("n c ... -> c", (4, 3, 5, 6, 7), {}, ("c",), ("n", "...0", "...1", "...2"), 3, 4 * 5 * 6 * 7),
    ("n c ... -> n c", (4, 3, 10), {}, ("n", "c"), ("...0",), 12, 10),
    ("... d -> ...", (4, 128, 768), {}, ("...0", "...1"), ("d",), 4 * 128, 768),
    ("b t d -> b t", (4, 128, 768), {}, ("b", "t"), ("d",), 4 * 128, 768),
    ("n c h w -> h c", (2, 3, 4, 5), {}, ("h", "c"), ("n", "w"), 12, 10),
]


@pytest.mark.parametrize("pattern, shape, sizes, kept, reduced, sets, size", CASES)
def test_counts_match_arithmetic(pattern, shape, sizes, kept, reduced, sets, size):
    e = explain(pattern, shape, **sizes)
    assert e.kept_axes == kept
    assert e.reduced_axes == reduced
    assert (e.num_sets, e.set_size) == (sets, size)
    assert e.num_sets * e.set_size == math.prod(shape)
    assert e.depends_on_batch == (e.axes[0] in reduced)
    assert e.shape == tuple(shape)
    text = str(e)
    assert f"{sets} sets" in text and f"{size} element" in text
    for name in reduced:
        assert f"{name} ({e.size_of(name)})" in text


def _brute_force(shape, kept_dims):
    """Group every element by its coordinates on the kept dims: the sets and their sizes."""
    coords = np.stack(np.unravel_index(np.arange(math.prod(shape)), shape), axis=1)
    keys = [tuple(row[list(kept_dims)]) for row in coords]
    _, counts = np.unique(np.array(keys).reshape(len(keys), -1), axis=0, return_counts=True)
    return len(counts), set(counts.tolist())


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    data=st.data(),
)
def test_random_kept_axes_match_brute_force(shape, data):
    names = "abcd"[: len(shape)]
    kept = data.draw(st.lists(st.sampled_from(names), unique=True))
    pattern = f"{' '.join(names)} -> {' '.join(kept)}"
    e = explain(pattern, shape)
    sets, sizes = _brute_force(shape, [names.index(k) for k in kept])
    assert e.num_sets == sets
    assert sizes == {e.set_size}
    assert e.depends_on_batch == ("a" not in kept)


def test_group_sets_match_brute_force():
    # GN on (2, 6, 3): channel = g·k + k_i, so group of channel c is c // k
    shape, g = (2, 6, 3), 3
    e = explain("n (g k) l -> n g", shape, g=g)
    coords = np.stack(np.unravel_index(np.arange(36), shape), axis=1)
    keys = {(n, c // (6 // g)) for n, c, _ in coords}
    assert e.num_sets == len(keys)
    assert e.set_size == 36 // len(keys)


def test_depends_on_batch_and_words():
    bn = explain("n c h w -> c", (8, 64, 32, 32))
    assert bn.depends_on_batch and bn.batch_axis == "n"
    assert "depends on the other samples" in str(bn)
    assert "batch of 1" not in str(bn)
    alone = explain("n c h w -> c", (1, 64, 32, 32))
    assert alone.depends_on_batch and "batch of 1" in str(alone)
    gn = explain("n (g k) h w -> n g", (8, 64, 16, 16), g=32)
    assert not gn.depends_on_batch
    assert "does not depend on other samples" in str(gn)
    assert "kept per n, g (256 sets = 8 × 32)" in str(gn)
    assert "512 elements: k (2) × h (16) × w (16)" in str(gn)
    whole = explain("n c -> ", (4, 3))
    assert whole.num_sets == 1 and whole.set_size == 12 and "whole input" in str(whole)
    none = explain("n c -> n c", (4, 3))
    assert none.set_size == 1 and "nothing is reduced" in str(none)


def test_explanation_is_frozen():
    e = explain("n c h w -> c", (2, 3, 4, 4))
    with pytest.raises(AttributeError):
        e.num_sets = 5


@pytest.mark.parametrize(
    "pattern, shape, sizes, error, words",
    [
        ("n c h w -> c", (2, 3), {}, PatternError, "expected 4 axes, got 2"),
        ("n c h w -> q", (2, 3, 4, 4), {}, PatternError, "not an input axis"),
        ("n c h w", (2, 3, 4, 4), {}, PatternError, "'->'"),
        ("n (g k) h w -> n g", (2, 64, 4, 4), {"g": 30}, PatternError, "divisor of 64"),
        ("n (g k) h w -> n g", (2, 64, 4, 4), {}, PatternError, "needs the sizes"),
        ("n (g k) h w -> n g", (2, 64, 4, 4), {"g": "a"}, PatternError, "positive int"),
        ("n c h w -> c", (2, 3, 4, 4), {"z": 2}, PatternError, "unknown axis 'z'"),
        ("n c h w -> c", "2,3,4,4", {}, TypeError, "expected a shape"),
        ("n c h w -> c", (2, 0, 4, 4), {}, ValueError, "positive ints"),
        ("n c h w -> c", (2, 3.0, 4, 4), {}, ValueError, "positive ints"),
        ("n c h w -> c", (), {}, ValueError, "positive ints"),
        (42, (2, 3, 4, 4), {}, TypeError, "pattern string"),
    ],
)
def test_bad_input(pattern, shape, sizes, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace("'", "'")):
        explain(pattern, shape, **sizes)


# ------------------------------------------------------------------------------ compare


def test_compare_rows_on_nchw():
    n, c, h, w = 8, 64, 32, 32
    rows = {r.method.key: r for r in compare((n, c, h, w))}
    assert list(rows) == [m.key for m in METHODS]
    expected = {  # key: (pattern as in the design table, sets, set size, depends on batch)
        "bn": ("n c h w -> c", c, n * h * w, True),
        "bn-act": ("n c h w -> c h w", c * h * w, n, True),
        "in": ("n c h w -> n c", n * c, h * w, False),
        "ln": ("n c h w -> n", n, c * h * w, False),
        "gn": ("n (g k) h w -> n g", n * 32, (c // 32) * h * w, False),
        "ln2d": ("n c h w -> n h w", n * h * w, c, False),
        "rms": ("n c h w -> n", n, c * h * w, False),
    }
    for key, (pattern, sets, size, batch) in expected.items():
        e = rows[key].explanation
        assert rows[key].pattern == pattern
        assert (e.num_sets, e.set_size, e.depends_on_batch) == (sets, size, batch)
    assert not rows["rms"].method.center and rows["ln"].method.center


def test_compare_channels_last_matches_channels_first():
    first = compare((8, 48, 7, 5))
    last = compare((8, 7, 5, 48), channels_last=True)
    assert [r.pattern for r in last][:5] == [
        "n h w c -> c",
        "n h w c -> h w c",
        "n h w c -> n c",
        "n h w c -> n",
        "n h w (g k) -> n g",
    ]
    for a, b in zip(first, last, strict=True):
        assert (a.explanation.num_sets, a.explanation.set_size) == (
            b.explanation.num_sets,
            b.explanation.set_size,
        )
        assert a.explanation.depends_on_batch == b.explanation.depends_on_batch


@pytest.mark.parametrize(
    "shape, spatial",
    [((4, 6), ""), ((4, 6, 9), "l"), ((4, 6, 3, 3), "h w"), ((4, 6, 2, 3, 3), "d h w")],
)
def test_compare_any_rank(shape, spatial):
    rows = {r.method.key: r for r in compare(shape)}
    assert rows["bn"].pattern == " ".join(["n c", spatial, "-> c"]).replace("  ", " ")
    rest = math.prod(shape[2:])
    assert rows["in"].explanation.set_size == rest
    assert rows["ln"].explanation.set_size == shape[1] * rest
    assert rows["bn"].explanation.set_size == shape[0] * rest


def test_compare_rank_six_keeps_ellipsis():
    rows = {r.method.key: r for r in compare((2, 4, 2, 2, 2, 2))}
    assert rows["bn"].pattern == "n c ... -> c"
    assert rows["bn"].explanation.set_size == 2 * 16


def test_default_groups():
    for channels in range(1, 200):
        g = default_groups(channels)
        assert channels % g == 0 and 1 <= g <= 32
        assert not any(channels % d == 0 for d in range(g + 1, 33))
    assert default_groups(64) == 32


def test_compare_groups_override_and_errors():
    gn = {r.method.key: r for r in compare((2, 64, 4, 4), groups=8)}["gn"]
    assert gn.explanation.num_sets == 2 * 8 and gn.explanation.set_size == 8 * 16
    with pytest.raises(PatternError, match="divisor"):
        compare((2, 64, 4, 4), groups=5)
    with pytest.raises(ValueError, match="at least 2 axes"):
        compare((64,))
    with pytest.raises(TypeError, match="expected a shape"):
        compare(None)


def test_format_table():
    rows = compare((8, 64, 32, 32))
    text = format_table(rows).splitlines()
    assert len(text) == len(rows) + 1
    assert text[0].split()[0] == "method"
    for line, row in zip(text[1:], rows, strict=True):
        assert line.startswith(row.method.name)
        assert row.pattern in line and f" {row.explanation.num_sets} " in line
    md = format_table(rows, markdown=True).splitlines()
    assert len(md) == len(rows) + 2 and all(line.startswith("|") for line in md)
    assert "| batch norm | `n c h w -> c` | c | 64 | 8192 = 8 × 32 × 32 | yes |" in md


# ------------------------------------------------------------------------------ command line


def test_cli_explain(capsys):
    assert main(["explain", "n (g k) h w -> n g", "--shape", "8,64,32,32", "g=32"]) == 0
    out = capsys.readouterr().out
    assert "256 sets" in out and "2048 elements" in out
    # sizes may also come before --shape, and the shape may be space-separated
    assert main(["explain", "n (g k) h w -> n g", "g=32", "--shape", "8", "64", "32", "32"]) == 0
    assert "256 sets" in capsys.readouterr().out


def test_cli_compare(capsys):
    assert main(["explain", "--compare", "--shape", "8,64,32,32"]) == 0
    out = capsys.readouterr().out
    for method in METHODS:
        assert method.name in out
    assert "8192 = 8 × 32 × 32" in out
    assert main(["explain", "--compare", "--groups", "4", "--shape", "2,8,3"]) == 0
    assert "n (g k) l -> n g, g=4" in capsys.readouterr().out
    assert (
        main(["explain", "--compare", "--markdown", "--shape", "2,3,3,8", "--channels-last"]) == 0
    )
    assert "`n h w c -> c`" in capsys.readouterr().out


BAD = [
    ["explain", "n (g k) h w -> n g", "--shape", "8,64,32,32", "g=30"],
    ["explain", "n c h w -> q", "--shape", "8,64,32,32"],
    ["explain", "n c h w -> c", "--shape", "8,a,32,32"],
    ["explain", "n c h w -> c", "--shape", "8,64"],
    ["explain", "n c h w -> c"],
    ["explain", "n c h w -> c", "--shape", "8,64,32,32", "g=x"],
    ["explain", "n c h w -> c", "n h w c -> c", "--shape", "8,64,32,32"],
    ["explain", "n c h w", "--shape", "8,64,32,32"],
    ["explain", "--shape", "8,64,32,32"],
    ["explain", "--compare", "--shape", "8"],
    ["explain", "--compare", "--shape", "8,64,3,3", "g=4"],
]


@pytest.mark.parametrize("argv", BAD)
def test_cli_bad_input_in_process(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normlab explain: error: ")
    assert "expected" in lines[0]


def _run(*argv):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "normlab", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_subprocess_explain():
    done = _run("explain", "n (g k) h w -> n g", "--shape", "8,64,32,32", "g=32")
    assert done.returncode == 0, done.stderr
    assert "256 sets" in done.stdout and "2048 elements" in done.stdout


@pytest.mark.parametrize("argv", [BAD[0], BAD[2], BAD[4]])
def test_subprocess_bad_input(argv):
    done = _run(*argv)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
