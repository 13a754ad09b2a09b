"""Patterns such as ``n (g k) h w -> n g``: which elements share one mean and variance.

The left side names the input's axes (a parenthesised group splits one input axis,
``...`` stands for any number of axes); the right side names the axes the statistics
are kept *per*. Every axis not on the right is reduced. A pattern is parsed once
(cached) and resolved against a shape into a :class:`Plan`, also cached. Under
``torch.compile`` and ``torch.export`` the shape may hold symbolic sizes: then the plan
is built afresh (dynamo traces it once per graph) and its sizes stay symbolic, so a
dynamic batch is not specialized to a constant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from normlab.errors import PatternError

ELLIPSIS = "..."
_TOKEN = re.compile(r"\s*(\([^()]*\)|\.\.\.|[A-Za-z_][A-Za-z0-9_]*)\s*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: the left side's dims (each a tuple of axis names) and the kept axes.

    Example:
        >>> parse_pattern("n (g k) h w -> n g").dims
        (('n',), ('g', 'k'), ('h',), ('w',))
    """

    text: str
    dims: tuple[tuple[str, ...], ...]
    kept: tuple[str, ...]

    @property
    def has_ellipsis(self) -> bool:
        return (ELLIPSIS,) in self.dims

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(name for dim in self.dims for name in dim)


def _split_side(side: str, text: str) -> list[str]:
    tokens, pos, side = [], 0, side.strip()
    while pos < len(side):
        match = _TOKEN.match(side, pos)
        if match is None or match.end() == pos:
            raise PatternError(
                f"pattern '{text}': expected axis names, '(...)' groups or '...', "
                f"got {side[pos:].strip()!r}"
            )
        tokens.append(match.group(1))
        pos = match.end()
    return tokens


def _prod(values: list) -> int:
    # math.prod over a generator is opaque to dynamo; sizes may be symbolic (SymInt)
    total = 1
    for v in values:
        total = total * v
    return total


@lru_cache(maxsize=512)
def parse_pattern(text: str) -> Pattern:
    """Parse ``"left -> right"`` once; raise :class:`PatternError` naming what is wrong.

    Example:
        >>> parse_pattern("n c h w -> c").kept
        ('c',)
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a pattern string like 'n c h w -> c', got {type(text).__name__}")
    if text.count("->") != 1:
        raise PatternError(f"pattern '{text}': expected one '->' between input axes and kept axes")
    left, right = text.split("->")
    dims: list[tuple[str, ...]] = []
    for token in _split_side(left, text):
        if token.startswith("("):
            names = tuple(token[1:-1].split())
            if not names or not all(_NAME.match(n) for n in names):
                raise PatternError(f"pattern '{text}': expected axis names inside {token}")
            dims.append(names)
        else:
            dims.append((token,))
    if not dims:
        raise PatternError(f"pattern '{text}': expected at least one input axis on the left")
    kept = tuple(_split_side(right, text))
    names = [n for dim in dims for n in dim]
    for name in set(names):
        if names.count(name) > 1:
            raise PatternError(f"pattern '{text}': axis '{name}' appears twice on the left")
    for name in kept:
        if name.startswith("("):
            raise PatternError(
                f"pattern '{text}': expected plain axis names on the right, got {name}"
            )
        if name not in names:
            raise PatternError(
                f"pattern '{text}': kept axis '{name}' is not an input axis; "
                f"expected one of {', '.join(names)}"
            )
        if kept.count(name) > 1:
            raise PatternError(f"pattern '{text}': kept axis '{name}' appears twice on the right")
    return Pattern(text=text.strip(), dims=tuple(dims), kept=kept)


@dataclass(frozen=True)
class Plan:
    """A pattern resolved against one input shape.

    The input is viewed with every group split (``expanded_shape``); statistics are
    taken over ``reduced`` and kept per ``kept`` (indices into the expanded axes,
    ``kept`` in the right side's order).

    Example:
        >>> p = plan("n (g k) h w -> n g", (8, 64, 4, 4), g=32)
        >>> p.num_sets, p.set_size
        (256, 32)
    """

    pattern: Pattern
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    expanded_shape: tuple[int, ...]
    input_dims: tuple[tuple[int, ...], ...]
    reduced: tuple[int, ...]
    kept: tuple[int, ...]

    @property
    def num_sets(self) -> int:
        return _prod([self.expanded_shape[i] for i in self.kept])

    @property
    def set_size(self) -> int:
        """Elements that share one mean and variance (the BN paper's effective mini-batch)."""
        return _prod([self.expanded_shape[i] for i in self.reduced])

    @property
    def kept_shape(self) -> tuple[int, ...]:
        return tuple(self.expanded_shape[i] for i in self.kept)

    @property
    def kept_axes(self) -> tuple[str, ...]:
        return tuple(self.axes[i] for i in self.kept)

    @property
    def reduced_axes(self) -> tuple[str, ...]:
        return tuple(self.axes[i] for i in self.reduced)

    @property
    def stats_shape(self) -> tuple[int, ...]:
        """The expanded shape with every reduced axis set to 1 (broadcasts against the input)."""
        return tuple(1 if i in self.reduced else s for i, s in enumerate(self.expanded_shape))

    def to_kept(self, stats: torch.Tensor) -> torch.Tensor:
        """A tensor in `stats_shape` (reduced axes of size 1) as one of `kept_shape`."""
        order = sorted(self.kept)
        squeezed = stats.reshape([self.expanded_shape[i] for i in order])
        return squeezed.permute([order.index(i) for i in self.kept])

    def to_stats(self, kept: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_kept`: a `kept_shape` tensor that broadcasts on the input."""
        order = sorted(self.kept)
        return kept.permute([self.kept.index(i) for i in order]).reshape(self.stats_shape)

    def input_dim_of(self, axis: str) -> int:
        """Index of the input dimension that holds elementary axis `axis`."""
        index = self.axes.index(axis)
        return next(d for d, members in enumerate(self.input_dims) if index in members)


def _fail(pattern: Pattern, shape: tuple[int, ...], message: str) -> PatternError:
    return PatternError(f"pattern '{pattern.text}' on input of shape {shape}: {message}")


def _resolve(text: str, shape: tuple[int, ...], sizes: tuple[tuple[str, int], ...]) -> Plan:
    pattern = (
        parse_pattern.__wrapped__(text) if torch.compiler.is_compiling() else parse_pattern(text)
    )
    known = dict(sizes)
    for name in known:
        if name not in pattern.axis_names:
            raise _fail(
                pattern,
                shape,
                f"size given for unknown axis '{name}'; "
                f"expected one of {', '.join(a for a in pattern.axis_names if a != ELLIPSIS)}",
            )
    n_fixed = len(pattern.dims) - pattern.has_ellipsis
    if (pattern.has_ellipsis and len(shape) < n_fixed) or (
        not pattern.has_ellipsis and len(shape) != n_fixed
    ):
        expected = f"at least {n_fixed}" if pattern.has_ellipsis else f"{n_fixed}"
        raise _fail(pattern, shape, f"expected {expected} axes, got {len(shape)}")
    axes: list[str] = []
    expanded: list[int] = []
    input_dims: list[tuple[int, ...]] = []
    extra = len(shape) - n_fixed
    d = 0
    for names in pattern.dims:
        if names == (ELLIPSIS,):
            for j in range(extra):
                input_dims.append((len(axes),))
                axes.append(f"{ELLIPSIS}{j}")
                expanded.append(shape[d])
                d += 1
            continue
        size = shape[d]
        unknown = [n for n in names if n not in known]
        given = _prod([known[n] for n in names if n in known])
        if len(unknown) > 1:
            raise _fail(
                pattern,
                shape,
                f"group ({' '.join(names)}) needs the sizes of all but one axis, "
                f"e.g. {unknown[0]}=...; got {len(names) - len(unknown)} of {len(names)}",
            )
        if unknown and (given <= 0 or size % given):
            raise _fail(
                pattern,
                shape,
                f"axis of size {size} cannot be split into ({' '.join(names)}) with "
                + ", ".join(f"{n}={known[n]}" for n in names if n in known)
                + f": expected a divisor of {size}",
            )
        if not unknown and given != size:
            raise _fail(
                pattern,
                shape,
                f"expected size {given} for ({' '.join(names)}) from the given sizes, got {size}",
            )
        members = []
        for n in names:
            members.append(len(axes))
            axes.append(n)
            expanded.append(known[n] if n in known else size // given)
        input_dims.append(tuple(members))
        d += 1
    kept_names: list[str] = []
    for name in pattern.kept:
        kept_names += [a for a in axes if a.startswith(ELLIPSIS)] if name == ELLIPSIS else [name]
    kept = tuple(axes.index(n) for n in kept_names)
    reduced = tuple(i for i in range(len(axes)) if i not in kept)
    return Plan(pattern, shape, tuple(axes), tuple(expanded), tuple(input_dims), reduced, kept)


def plan(pattern: str, shape: tuple[int, ...] | list[int], **sizes: int) -> Plan:
    """Resolve `pattern` against `shape`; sizes name the split axes of groups (``g=32``).

    Example:
        >>> plan("n c h w -> c", (8, 3, 5, 5)).set_size
        200
    """
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PatternError(
                f"pattern '{pattern}': expected a positive int for {name}=, got {value!r}"
            )
    key = tuple(sorted(sizes.items()))
    if torch.compiler.is_compiling() or not all(type(s) is int for s in shape):
        # symbolic sizes (torch.compile, torch.export): no int() that would specialize them
        return _resolve(pattern, tuple(shape), key)
    return _plan(pattern, tuple(shape), key)


_plan = lru_cache(maxsize=4096)(_resolve)
