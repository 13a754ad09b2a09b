"""draw(): the shaded cells are the set S of element 0, and the files are real PNG/SVG."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from normlab import PatternError, normalize
from normlab.cli import main
from normlab.draw import CAPS, FirstSet, draw, draw_compare, roles
from normlab.pattern import plan

SRC = str(Path(__file__).resolve().parents[1] / "src")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "pattern, shape, sizes, expected",
    [
        ("n c h w -> c", (2, 3, 4, 4), {}, (0, 1, (2, 3))),
        ("n h w c -> c", (2, 4, 4, 3), {}, (0, 3, (1, 2))),
        ("n (g k) h w -> n g", (2, 4, 3, 3), {"g": 2}, (0, 1, (2, 3))),
        ("n h w (g k) -> n g", (2, 3, 3, 4), {"g": 2}, (0, 3, (1, 2))),
        ("b t d -> b t", (2, 5, 8), {}, (0, 2, (1,))),
        ("x y z -> x", (2, 5, 8), {}, (0, 1, (2,))),  # no channel name: the second axis
        ("n c ... -> n c", (2, 3, 4, 5, 6), {}, (0, 1, (2, 3, 4))),
        ("n c -> c", (2, 3), {}, (0, 1, ())),
        ("n -> n", (5,), {}, (0, None, ())),
    ],
)
def test_roles(pattern, shape, sizes, expected):
    assert roles(plan(pattern, shape, **sizes)) == expected


def _jvp_set(pattern, shape, sizes):
    """Elements whose output moves when element 0 moves: exactly element 0's set S."""
    x = torch.randn(shape, dtype=torch.float64)
    tangent = torch.zeros_like(x)
    tangent.view(-1)[0] = 1.0
    _, out = torch.func.jvp(lambda t: normalize(t, pattern, **sizes), (x,), (tangent,))
    return out.abs() > 1e-12


@pytest.mark.parametrize(
    "pattern, shape, sizes",
    [
        ("n c h w -> c", (3, 4, 2, 3), {}),
        ("n c h w -> c h w", (3, 4, 2, 3), {}),
        ("n c h w -> n c", (3, 4, 2, 3), {}),
        ("n c h w -> n", (3, 4, 2, 3), {}),
        ("n c h w -> n h w", (3, 4, 2, 3), {}),
        ("n (g k) h w -> n g", (3, 6, 2, 2), {"g": 3}),
        ("n (g k) h w -> n k", (3, 6, 2, 2), {"g": 3}),
        ("n h w c -> c", (3, 2, 3, 4), {}),
        ("n h w (g k) -> n g", (2, 2, 3, 6), {"g": 2}),
        ("b t d -> b t", (3, 4, 5), {}),
        ("n c ... -> c", (2, 3, 2, 2, 2), {}),
        ("n c -> c", (5, 4), {}),
    ],
)
def test_shaded_cells_are_the_set_of_element_0(pattern, shape, sizes):
    p = plan(pattern, shape, **sizes)
    in_set = FirstSet(p)
    n_dim, c_dim, s_dims = roles(p)
    oracle = _jvp_set(pattern, shape, sizes)
    spatial = [shape[d] for d in s_dims]
    for flat in range(math.prod(shape)):
        index = np.unravel_index(flat, shape)
        s = int(np.ravel_multi_index([index[d] for d in s_dims], spatial)) if s_dims else 0
        c = index[c_dim] if c_dim is not None else 0
        assert in_set(index[n_dim], c, s) == bool(oracle[index]), (pattern, index)


def _colours(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    return np.unique(image[..., :3].reshape(-1, 3), axis=0)


def test_draw_writes_png(tmp_path):
    path = tmp_path / "bn.png"
    figure = draw("n c h w -> c", (8, 64, 32, 32), path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    colours = _colours(path)
    assert len(colours) > 1
    strong = np.array(matplotlib.colors.to_rgb("#2f6db5"))  # the colour of the set S
    assert np.abs(colours - strong).max(axis=1).min() < 2 / 255
    assert figure.axes[0].get_title().endswith("n c h w -> c")


def test_draw_writes_svg(tmp_path):
    path = tmp_path / "gn.svg"
    draw("n (g k) h w -> n g", (8, 64, 32, 32), path, g=32)
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    assert len(list(root.iter())) > 100  # the cells are there


def test_draw_caption_and_elision_notes():
    figure = draw("n (g k) h w -> n g", (8, 64, 32, 32), g=32)
    texts = " ".join(t.get_text() for t in figure.axes[0].texts)
    assert "256 sets S of 2048 elements" in texts
    assert f"({CAPS['C']} of 64 drawn)" in texts and f"({CAPS['S']} of 1024 drawn)" in texts
    assert "N (batch)" in texts and "C (channels)" in texts and "H·W (spatial)" in texts
    small = draw("n c h w -> c", (2, 3, 2, 2))
    assert "drawn)" not in " ".join(t.get_text() for t in small.axes[0].texts)


def test_draw_compare(tmp_path):
    path = tmp_path / "methods.png"
    figure = draw_compare((8, 64, 32, 32), path)
    assert [ax.get_title() for ax in figure.axes] == [
        "batch norm",
        "layer norm (CNN)",
        "instance norm",
        "group norm",
    ]
    assert path.read_bytes()[:8] == PNG_MAGIC
    six = draw_compare((4, 16, 8), methods=("bn", "bn-act", "in", "ln", "gn", "ln2d"))
    assert sum(ax.get_title() != "" for ax in six.axes) == 6


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda p: draw("n c h w -> c", (2, 3, 4, 4), p / "x.jpg"), ValueError, ".png"),
        (lambda p: draw("n c h w -> q", (2, 3, 4, 4)), PatternError, "not an input axis"),
        (lambda p: draw("n c h w -> c", (2, 3)), PatternError, "expected 4 axes"),
        (lambda p: draw("n (g k) h w -> n g", (2, 6, 4, 4), g=4), PatternError, "divisor"),
        (lambda p: draw_compare((2, 8, 4, 4), methods=("bn", "xx")), ValueError, "xx"),
        (lambda p: draw_compare((2, 8, 4, 4), methods=()), ValueError, "expected methods"),
        (lambda p: draw_compare((8,)), ValueError, "at least 2 axes"),
    ],
)
def test_draw_bad_input(tmp_path, call, error, words):
    with pytest.raises(error, match=words):
        call(tmp_path)


def test_cli_draw(tmp_path, capsys):
    out = tmp_path / "gn.png"
    argv = ["draw", "n (g k) h w -> n g", "--shape", "8,64,32,32", "g=32", "-o", str(out)]
    assert main(argv) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "256 sets" in capsys.readouterr().out
    svg = tmp_path / "cmp.svg"
    assert main(["draw", "--compare", "--shape", "4,8,5,5", "-o", str(svg)]) == 0
    assert ET.parse(svg).getroot().tag.endswith("svg")


@pytest.mark.parametrize(
    "argv",
    [
        ["draw", "n c h w -> c", "--shape", "8,64,32,32"],  # no -o
        ["draw", "n c h w -> c", "--shape", "8,64,32,32", "-o", "x.gif"],
        ["draw", "n c h w -> q", "--shape", "8,64,32,32", "-o", "x.png"],
        ["draw", "--shape", "8,64,32,32", "-o", "x.png"],
        ["draw", "--compare", "--methods", "bn,zz", "--shape", "8,64,3,3", "-o", "x.png"],
        ["draw", "n c h w -> c", "--shape", "2,3,4,4", "-o", "no/such/dir/x.png"],
    ],
)
def test_cli_draw_bad_input(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normlab draw: error: ")
    assert not any(tmp_path.iterdir())


def test_cli_draw_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    argv = ["draw", "n c h w -> c", "--shape", "2,3,4,4", "-o", str(tmp_path / "x.png")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "matplotlib" in lines[0]


def test_subprocess_draw(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "in.png"
    argv = ["draw", "n c h w -> n c", "--shape", "2,8,6,6", "-o", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "normlab", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(_colours(out)) > 1
    bad = subprocess.run(
        [sys.executable, "-m", "normlab", "draw", "n c -> q", "--shape", "2,3", "-o", "x.png"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
