"""Draw a pattern's set S the way the Group Norm paper does: an N × C × H·W block, one set shaded.

Which input axis plays which role:

* **N (batch)** is the first input axis.
* **C (channels)** is the axis named ``c`` (or ``ch``, ``channels``, ``d``, ``dim``,
  ``f``, ``features``), else the first grouped axis such as ``(g k)``, else the second
  input axis (PyTorch's channels-first convention). So ``b t d -> b t`` draws ``d`` as C
  and ``t`` as spatial; ``n h w c -> c`` draws ``c`` as C wherever it sits.
* **H·W (spatial)** is every other axis, merged in input order (rank 2: size 1).

The shaded set is the one holding element 0. An axis longer than its cap (N 8, C 16,
H·W 12 cells) shows its first cells, a gap, then cells evenly spaced up to the last
index, so both small groups near 0 and the overall proportion stay visible.

Example:
    >>> fig = draw("n (g k) h w -> n g", (8, 64, 32, 32), "gn.png", g=32)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from normlab.explain import (
    Row,
    add_input_arguments,
    compare,
    explain,
    parse_input,
)
from normlab.pattern import Plan, plan

if TYPE_CHECKING:  # matplotlib is an optional dependency (normlab[draw]), imported on use
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CHANNEL_NAMES = frozenset({"c", "ch", "channel", "channels", "d", "dim", "f", "features"})
CAPS = {"N": 8, "C": 16, "S": 12}
FORMATS = (".png", ".svg", ".pdf")
DEFAULT_METHODS = ("bn", "ln", "in", "gn")  # the Group Norm paper's Figure 2

_GAP = 0.7  # width of the break drawn where cells are elided
_DEPTH = 0.55  # projected length of one N cell
_ANGLE = math.radians(40)
_IN = ("#2f6db5", "#5a92d6", "#1f4c80")  # front, top, side faces of a cell in S
_OUT = ("#eef2f7", "#f8fafc", "#d9e0e8")  # ... and of every other cell
_EDGE = "#7d8796"


def roles(p: Plan) -> tuple[int, int | None, tuple[int, ...]]:
    """The input dims drawn as N, C and H·W (see the module docstring for the rule).

    Example:
        >>> roles(plan("n h w c -> c", (8, 32, 32, 64)))
        (0, 3, (1, 2))
    """
    rest = list(range(1, len(p.shape)))
    named = [d for d in rest if any(p.axes[i] in CHANNEL_NAMES for i in p.input_dims[d])]
    grouped = [d for d in rest if len(p.input_dims[d]) > 1]
    c = (named or grouped or rest or [None])[0]
    return 0, c, tuple(d for d in rest if d != c)


def _label(p: Plan, dims: Sequence[int]) -> str:
    """How the input names these dims: 'h w', '(g k)', '...0'."""
    parts = []
    for d in dims:
        names = [p.axes[i] for i in p.input_dims[d]]
        parts.append(f"({' '.join(names)})" if len(names) > 1 else names[0])
    return " ".join(parts)


def _drawn(size: int, cap: int) -> tuple[list[int], list[float]]:
    """Indices drawn along an axis of `size` and their positions (a gap marks elision)."""
    if size <= cap:
        return list(range(size)), [float(i) for i in range(size)]
    head, tail = cap // 2, cap - cap // 2
    rest = [head + round(j * (size - 1 - head) / (tail - 1)) for j in range(tail)]
    positions = [float(i) for i in range(head)] + [head + _GAP + j for j in range(tail)]
    return list(range(head)) + rest, positions


class FirstSet:
    """Whether the cell (n, c, s) of the N × C × H·W block lies in the set holding element 0.

    An element shares element 0's statistics exactly when all its kept coordinates are 0.

    Example:
        >>> in_set = FirstSet(plan("n c h w -> c", (8, 3, 4, 4)))
        >>> in_set(7, 0, 15), in_set(0, 1, 0)
        (True, False)
    """

    def __init__(self, p: Plan) -> None:
        self.p = p
        self.n_dim, self.c_dim, self.s_dims = roles(p)
        self.kept = set(p.kept)

    def __call__(self, n: int, c: int, s: int) -> bool:
        index = [0] * len(self.p.shape)
        index[self.n_dim] = n
        if self.c_dim is not None:
            index[self.c_dim] = c
        for d in reversed(self.s_dims):  # unravel the merged spatial index, row-major
            s, index[d] = divmod(s, self.p.shape[d])
        for d, members in enumerate(self.p.input_dims):
            rest = index[d]
            for axis in reversed(members):  # a group (g k) is row-major: channel = g·k + k_i
                rest, coord = divmod(rest, self.p.expanded_shape[axis])
                if coord and axis in self.kept:
                    return False
        return True


def _draw_block(ax: Axes, p: Plan, title: str, caption: str) -> None:
    from matplotlib.patches import Polygon

    n_dim, c_dim, s_dims = roles(p)
    sizes = {
        "N": p.shape[n_dim],
        "C": p.shape[c_dim] if c_dim is not None else 1,
        "S": math.prod(p.shape[d] for d in s_dims),
    }
    drawn = {role: _drawn(size, CAPS[role]) for role, size in sizes.items()}
    in_set = FirstSet(p)
    kx, ky = _DEPTH * math.cos(_ANGLE), _DEPTH * math.sin(_ANGLE)

    def point(x: float, y: float, z: float) -> tuple[float, float]:
        return (x + z * kx, -y + z * ky)  # y grows downwards, z goes back into the page

    def cell(corners: list[tuple[float, float]], inside: bool, face: int) -> None:
        colour = (_IN if inside else _OUT)[face]
        ax.add_patch(Polygon(corners, closed=True, fc=colour, ec=_EDGE, lw=0.6))

    (ns, zs), (cs, xs), (ss, ys) = drawn["N"], drawn["C"], drawn["S"]
    for c, x in zip(cs, xs, strict=True):  # front face: n = 0
        for s, y in zip(ss, ys, strict=True):
            corners = [
                point(x, y, 0),
                point(x + 1, y, 0),
                point(x + 1, y + 1, 0),
                point(x, y + 1, 0),
            ]
            cell(corners, in_set(ns[0], c, s), 0)
    for n, z in zip(ns, zs, strict=True):  # top face: first spatial index
        for c, x in zip(cs, xs, strict=True):
            corners = [
                point(x, 0, z),
                point(x + 1, 0, z),
                point(x + 1, 0, z + 1),
                point(x, 0, z + 1),
            ]
            cell(corners, in_set(n, c, ss[0]), 1)
    right = xs[-1] + 1
    for n, z in zip(ns, zs, strict=True):  # side face: last drawn channel
        for s, y in zip(ss, ys, strict=True):
            corners = [
                point(right, y, z),
                point(right, y, z + 1),
                point(right, y + 1, z + 1),
                point(right, y + 1, z),
            ]
            cell(corners, in_set(n, cs[-1], s), 2)

    def note(role: str) -> str:
        shown = len(drawn[role][0])
        return f"\n({shown} of {sizes[role]} drawn)" if shown < sizes[role] else ""

    width, height, depth = right, ys[-1] + 1, zs[-1] + 1
    label = dict(fontsize=9, color="#1a1a1a")
    c_text = _label(p, [c_dim]) if c_dim is not None else "(none)"
    ax.text(
        width / 2,
        -height - 0.5,
        f"C (channels): {c_text} = {sizes['C']}{note('C')}",
        ha="center",
        va="top",
        **label,
    )
    s_text = _label(p, s_dims) or "(none)"
    s_sizes = "×".join(str(p.shape[d]) for d in s_dims) or "1"
    ax.text(
        -0.5,
        -height / 2,
        f"H·W (spatial): {s_text} = {s_sizes}{note('S')}",
        ha="right",
        va="center",
        rotation=90,
        **label,
    )
    nx, ny = point(0, 0, depth / 2)
    ax.text(
        nx - 0.35,
        ny + 0.35,
        f"N (batch): {_label(p, [n_dim])} = {sizes['N']}{note('N')}",
        ha="center",
        va="bottom",
        rotation=math.degrees(_ANGLE),
        rotation_mode="anchor",
        **label,
    )
    ax.set_title(title, fontsize=11, fontweight="bold", pad=4)
    ax.text(
        0.5,
        0.0,
        caption,
        transform=ax.transAxes,
        ha="center",
        va="top",
        fontsize=8.5,
        color="#333333",
    )
    tx, ty = point(width, 0, depth)
    ax.set_xlim(-2.2, max(tx, width) + 0.6)
    ax.set_ylim(-height - 2.4, ty + 1.6)
    ax.set_aspect("equal")
    ax.axis("off")


def _caption(pattern: str, shape: Sequence[int], sizes: dict[str, int]) -> str:
    e = explain(pattern, shape, **sizes)
    given = "".join(f", {k}={v}" for k, v in e.sizes)
    return (
        f"'{e.pattern}'{given}\non shape {e.shape}: {e.num_sets} sets S of {e.set_size} elements\n"
        f"shaded: the set holding element 0"
    )


def _figure(panels: int) -> tuple[Figure, list[Axes]]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("normlab draw needs matplotlib: pip install 'normlab[draw]'") from error
    cols = panels if panels <= 4 else 3
    rows = -(-panels // cols)
    figure = Figure(figsize=(4.6 * cols, 5.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)  # headless: never a GUI backend
    axes = list(figure.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.axis("off")
    return figure, axes[:panels]


def _save(figure: Figure, path: str | Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"expected an output file ending in {', '.join(FORMATS)}, got '{path}'")
    figure.savefig(path, dpi=150)


def draw(
    pattern: str, shape: Sequence[int], path: str | Path | None = None, **sizes: int
) -> Figure:
    """Draw the N × C × H·W block of `shape` with the set of `pattern` holding element 0 shaded.

    Saves to `path` (``.png``, ``.svg`` or ``.pdf``) when given; returns the Figure.

    Example:
        >>> fig = draw("n c h w -> c", (8, 64, 32, 32))  # batch norm: one column of C
    """
    caption = _caption(pattern, shape, sizes)  # validates pattern, shape and sizes first
    figure, (ax,) = _figure(1)
    _draw_block(ax, plan(pattern, tuple(shape), **sizes), f"normalized jointly: {pattern}", caption)
    _save(figure, path)
    return figure


def draw_compare(
    shape: Sequence[int],
    path: str | Path | None = None,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    groups: int | None = None,
    channels_last: bool = False,
) -> Figure:
    """The classical methods side by side on one shape, as in the Group Norm paper's Figure 2.

    `methods` are keys of :data:`normlab.explain.METHODS` (``bn``, ``bn-act``, ``in``,
    ``ln``, ``gn``, ``ln2d``, ``rms``).

    Example:
        >>> fig = draw_compare((8, 64, 32, 32), methods=("bn", "ln", "in", "gn"))
    """
    rows: dict[str, Row] = {
        r.method.key: r for r in compare(shape, groups=groups, channels_last=channels_last)
    }
    unknown = [m for m in methods if m not in rows]
    if unknown or not methods:
        raise ValueError(
            f"expected methods among {', '.join(rows)}, got {', '.join(methods) or 'none'}"
        )
    figure, axes = _figure(len(methods))
    for ax, key in zip(axes, methods, strict=True):
        row = rows[key]
        sizes = dict(row.explanation.sizes)
        p = plan(row.pattern, tuple(shape), **sizes)
        _draw_block(ax, p, row.method.name, _caption(row.pattern, shape, sizes))
    _save(figure, path)
    return figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``normlab draw``."""
    add_input_arguments(parser)
    parser.add_argument("-o", "--output", metavar="FILE", help="where to write: .png, .svg or .pdf")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        metavar="KEYS",
        help="with --compare: comma-separated method keys (bn,bn-act,in,ln,gn,ln2d,rms)",
    )


def run(args: argparse.Namespace) -> int:
    """``normlab draw PATTERN --shape 8,64,32,32 [g=32] -o FILE.png`` (or ``--compare``)."""
    try:
        return _run(args)
    except ImportError as error:  # matplotlib missing: one line, as for any other bad input
        print(f"normlab draw: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    pattern, shape, sizes = parse_input(args)
    if not args.output:
        raise ValueError("expected -o FILE.png (or .svg, .pdf)")
    if Path(args.output).suffix.lower() not in FORMATS:
        raise ValueError(
            f"expected an output file ending in {', '.join(FORMATS)}, got '{args.output}'"
        )
    if args.compare:
        if pattern is not None or sizes:
            raise ValueError("--compare draws the classical methods; give no pattern or sizes")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        draw_compare(
            shape,
            args.output,
            methods=methods,
            groups=args.groups,
            channels_last=args.channels_last,
        )
        print(f"wrote {args.output}: {', '.join(methods)} on shape {shape}")
        return 0
    if pattern is None:
        raise ValueError("expected a pattern such as 'n c h w -> c', or --compare")
    draw(pattern, shape, args.output, **sizes)
    print(f"wrote {args.output}")
    print(explain(pattern, shape, **sizes))
    return 0


__all__ = ["CAPS", "CHANNEL_NAMES", "FirstSet", "draw", "draw_compare", "roles"]
