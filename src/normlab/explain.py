"""What a pattern normalizes over, in words and numbers, and the classical methods side by side.

A pattern's right side names the axes statistics are kept *per*; every other axis is
reduced. The elements that share one mean and variance form a set S, whose size is the
batch-norm paper's "effective mini-batch".

Example:
    >>> print(explain("n (g k) h w -> n g", (8, 64, 16, 16), g=32))  # doctest: +NORMALIZE_WHITESPACE
    Pattern 'n (g k) h w -> n g' on shape (8, 64, 16, 16), g=32.
    Statistics are kept per n, g (256 sets = 8 × 32); each set S holds 512 elements:
    k (2) × h (16) × w (16). Output of one sample does not depend on other samples.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from normlab.pattern import ELLIPSIS, plan


@dataclass(frozen=True)
class Explanation:
    """One pattern resolved against one shape: which axes are reduced, how many sets, how big.

    ``axes``/``axis_sizes`` list the elementary axes with groups split (``...`` becomes
    ``...0``, ``...1``, …). ``batch_axis`` names the first input axis; the output of one
    sample depends on the other samples when it is reduced (``depends_on_batch``).

    Example:
        >>> e = explain("n c h w -> c", (8, 64, 32, 32))
        >>> e.num_sets, e.set_size, e.depends_on_batch
        (64, 8192, True)
    """

    pattern: str
    shape: tuple[int, ...]
    sizes: tuple[tuple[str, int], ...]
    axes: tuple[str, ...]
    axis_sizes: tuple[int, ...]
    kept_axes: tuple[str, ...]
    reduced_axes: tuple[str, ...]
    num_sets: int
    set_size: int
    batch_axis: str
    depends_on_batch: bool

    def size_of(self, axis: str) -> int:
        """The size of one elementary axis (``explain("n c h w -> c", s).size_of("h")``)."""
        return self.axis_sizes[self.axes.index(axis)]

    def __str__(self) -> str:
        given = "".join(f", {name}={value}" for name, value in self.sizes)
        lines = [f"Pattern '{self.pattern}' on shape {self.shape}{given}."]
        if self.kept_axes:
            kept = ", ".join(self.kept_axes)
            factors = " × ".join(str(self.size_of(a)) for a in self.kept_axes)
            count = f"{self.num_sets} sets = {factors}" if len(self.kept_axes) > 1 else None
            head = f"Statistics are kept per {kept} ({count or f'{self.num_sets} sets'})"
        else:
            head = "Statistics are shared by the whole input (1 set)"
        if self.reduced_axes:
            parts = " × ".join(f"{a} ({self.size_of(a)})" for a in self.reduced_axes)
            body = f"each set S holds {self.set_size} elements: {parts}."
        else:
            body = "each set S holds 1 element: nothing is reduced."
        lines.append(f"{head}; {body}")
        if self.depends_on_batch:
            alone = all(self.size_of(a) == 1 for a in self.batch_axis.split())
            lines.append(
                f"Output of one sample depends on the other samples ({self.batch_axis} is reduced"
                + ("; with a batch of 1 there are none yet)." if alone else ").")
            )
        else:
            lines.append("Output of one sample does not depend on other samples.")
        return "\n".join(lines)


def explain(pattern: str, shape: Sequence[int], **sizes: int) -> Explanation:
    """Describe which elements `pattern` normalizes jointly on an input of `shape`.

    Example:
        >>> explain("n c ... -> n c", (2, 3, 4, 5)).reduced_axes
        ('...0', '...1')
    """
    shape = _check_shape(shape)
    p = plan(pattern, shape, **sizes)
    first = p.input_dims[0] if p.input_dims else ()
    return Explanation(
        pattern=p.pattern.text,
        shape=p.shape,
        sizes=tuple(sorted(sizes.items())),
        axes=p.axes,
        axis_sizes=p.expanded_shape,
        kept_axes=p.kept_axes,
        reduced_axes=p.reduced_axes,
        num_sets=p.num_sets,
        set_size=p.set_size,
        batch_axis=" ".join(p.axes[i] for i in first),
        depends_on_batch=any(i in p.reduced for i in first),
    )


def _check_shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"expected a shape such as (8, 64, 32, 32), got {shape!r}")
    if not shape or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise ValueError(
            f"expected a shape of positive ints such as (8, 64, 32, 32), got {shape!r}"
        )
    return tuple(shape)


# --------------------------------------------------------------------------- the methods


@dataclass(frozen=True)
class Method:
    """A classical normalization as patterns; ``...`` is the spatial axes (any rank).

    ``center=False`` marks a method that divides by the root mean square instead of the
    standard deviation (RMS norm): same sets, no mean subtracted.
    """

    key: str
    name: str
    channels_first: str
    channels_last: str
    center: bool = True


# One list: the table of docs/concepts.md, `normlab explain --compare` and
# `normlab draw --compare` all come from it.
METHODS: tuple[Method, ...] = (
    Method("bn", "batch norm", "n c ... -> c", "n ... c -> c"),
    Method("bn-act", "batch norm per activation", "n c ... -> c ...", "n ... c -> ... c"),
    Method("in", "instance norm", "n c ... -> n c", "n ... c -> n c"),
    Method("ln", "layer norm (CNN)", "n c ... -> n", "n ... c -> n"),
    Method("gn", "group norm", "n (g k) ... -> n g", "n ... (g k) -> n g"),
    Method("ln2d", "LayerNorm2d (per position)", "n c ... -> n ...", "n ... c -> n ..."),
    Method("rms", "RMS norm (LN, no centering)", "n c ... -> n", "n ... c -> n", center=False),
)

# Spatial axis names that make a pattern read like the papers' (`n c h w -> c`).
_SPATIAL_NAMES = {0: (), 1: ("l",), 2: ("h", "w"), 3: ("d", "h", "w")}


def default_groups(channels: int, preferred: int = 32) -> int:
    """Group norm's G: `preferred` (32, the paper's default) if it divides C, else the
    largest divisor of C below it.

    Example:
        >>> default_groups(64), default_groups(48), default_groups(7)
        (32, 24, 7)
    """
    return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


def method_pattern(method: Method, rank: int, channels_last: bool = False) -> str:
    """The method's pattern for an input of `rank` axes, spatial axes named where usual.

    Example:
        >>> method_pattern(METHODS[0], 4)
        'n c h w -> c'
    """
    text = method.channels_last if channels_last else method.channels_first
    names = _SPATIAL_NAMES.get(rank - 2)
    if names is None:  # rank 6 and above: keep the ellipsis
        return text
    return " ".join(" ".join(names) if t == ELLIPSIS else t for t in text.split()).replace(
        "  ", " "
    )


@dataclass(frozen=True)
class Row:
    """One line of the comparison table: a method and its explanation on the shape."""

    method: Method
    pattern: str
    explanation: Explanation


def compare(
    shape: Sequence[int], *, groups: int | None = None, channels_last: bool = False
) -> list[Row]:
    """Explain every method of :data:`METHODS` on an ``N, C, ...`` (or ``N, ..., C``) shape.

    Group norm uses `groups` if given, else :func:`default_groups` of C.

    Example:
        >>> [r.explanation.num_sets for r in compare((8, 64, 32, 32))][:3]
        [64, 65536, 512]
    """
    shape = _check_shape(shape)
    if len(shape) < 2:
        raise ValueError(
            f"expected a shape N, C, ... with at least 2 axes for --compare, got {shape}"
        )
    channels = shape[-1] if channels_last else shape[1]
    g = default_groups(channels) if groups is None else groups
    rows = []
    for method in METHODS:
        pattern = method_pattern(method, len(shape), channels_last)
        sizes = {"g": g} if "(g k)" in pattern else {}
        rows.append(Row(method, pattern, explain(pattern, shape, **sizes)))
    return rows


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """The comparison as an aligned text table (or a Markdown table)."""
    header = ("method", "pattern", "kept per", "sets", "set size S", "depends on batch")
    body = []
    for row in rows:
        e = row.explanation
        pattern = row.pattern + ("".join(f", {k}={v}" for k, v in e.sizes))
        size = " × ".join(str(e.size_of(a)) for a in e.reduced_axes) or "1"
        if len(e.reduced_axes) > 1:
            size = f"{e.set_size} = {size}"
        body.append(
            (
                row.method.name,
                f"`{pattern}`" if markdown else pattern,
                ", ".join(e.kept_axes) or "(all)",
                str(e.num_sets),
                size,
                "yes" if e.depends_on_batch else "no",
            )
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in (header, *body)
    )


# --------------------------------------------------------------------------- command line

_SIZE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """PATTERN, --shape and NAME=SIZE terms, shared by `normlab explain` and `normlab draw`."""
    parser.add_argument(
        "terms",
        nargs="*",
        metavar="PATTERN [NAME=SIZE ...]",
        help="a pattern such as 'n (g k) h w -> n g', then sizes of split axes such as g=32",
    )
    parser.add_argument(
        "--shape",
        nargs="+",
        metavar="N,C,H,W",
        help="the input's shape, e.g. 8,64,32,32; NAME=SIZE terms may follow it",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="the classical methods (batch, instance, layer, group, RMS norm) on this shape",
    )
    parser.add_argument(
        "--groups", type=int, default=None, metavar="G", help="group norm's G for --compare"
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="with --compare: the shape is N, ..., C (channels-last patterns)",
    )


def parse_input(args: argparse.Namespace) -> tuple[str | None, tuple[int, ...], dict[str, int]]:
    """Sort the command line's terms into (pattern or None, shape, sizes); ValueError if bad.

    A term with ``->`` is the pattern, ``NAME=INT`` a size, anything else part of the shape
    (argparse cannot tell them apart when sizes follow ``--shape``).
    """
    pattern, shape_parts, sizes = None, [], {}
    for where, terms in (("positional", args.terms or []), ("shape", args.shape or [])):
        for term in terms:
            match = _SIZE.match(term.strip())
            if "->" in term:
                if pattern is not None:
                    raise ValueError(f"expected one pattern, got '{pattern}' and '{term}'")
                pattern = term
            elif match:
                name, value = match.groups()
                if not re.fullmatch(r"\d+", value.strip()):
                    raise ValueError(f"expected NAME=INT such as g=32, got '{term}'")
                sizes[name] = int(value)
            elif where == "shape":
                shape_parts += re.split(r"\s*,\s*|\s+", term.strip())
            else:
                raise ValueError(
                    f"expected a pattern such as 'n c h w -> c' or NAME=SIZE, got '{term}'"
                )
    if not shape_parts:
        raise ValueError("expected --shape such as --shape 8,64,32,32")
    if not all(re.fullmatch(r"\d+", s) and int(s) > 0 for s in shape_parts):
        raise ValueError(
            f"expected --shape as positive integers such as 8,64,32,32, "
            f"got '{','.join(shape_parts)}'"
        )
    return pattern, tuple(int(s) for s in shape_parts), sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``normlab explain``."""
    add_input_arguments(parser)
    parser.add_argument(
        "--markdown", action="store_true", help="print the --compare table as Markdown"
    )


def run(args: argparse.Namespace) -> int:
    """``normlab explain PATTERN --shape 8,64,32,32 g=32`` or ``normlab explain --compare --shape ...``."""
    pattern, shape, sizes = parse_input(args)
    if pattern is None and not args.compare:
        raise ValueError("expected a pattern such as 'n c h w -> c', or --compare")
    if pattern is None and sizes:
        raise ValueError(
            f"expected a pattern with sizes {sizes}; for --compare give --groups G instead"
        )
    if pattern is not None:
        print(explain(pattern, shape, **sizes))
    if args.compare:
        if pattern is not None:
            print()
        print(
            format_table(
                compare(shape, groups=args.groups, channels_last=args.channels_last), args.markdown
            )
        )
    elif args.groups is not None or args.channels_last:
        print("note: --groups and --channels-last apply to --compare only", file=sys.stderr)
    return 0


__all__ = [
    "METHODS",
    "Explanation",
    "Method",
    "Row",
    "compare",
    "default_groups",
    "explain",
    "format_table",
    "method_pattern",
]
