"""What a conversion did: one :class:`Replacement` per layer, gathered in a :class:`ConversionReport`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Replacement:
    """One replaced layer: what it was, what it became, what carried over and what did not.

    Example:
        >>> print(Replacement("bn1", "BatchNorm2d", "GroupNorm", carried=["weight"]))
        bn1: BatchNorm2d -> GroupNorm; carried weight
    """

    name: str
    source: str
    target: str
    carried: list[str] = field(default_factory=list)
    not_carried: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.name or '<root>'}: {self.source} -> {self.target}"
        if self.carried:
            text += f"; carried {', '.join(self.carried)}"
        if self.not_carried:
            text += f"; NOT carried {', '.join(self.not_carried)}"
        return text + "".join(f"; {note}" for note in self.notes)


@dataclass
class ConversionReport:
    """Every replacement :func:`~normlab.convert` made, in module order; ``print(report)``
    lists them.

    Example:
        >>> len(ConversionReport())
        0
    """

    replaced: list[Replacement] = field(default_factory=list)

    @property
    def not_carried(self) -> dict[str, list[str]]:
        """Layer name -> what its replacement could not take over (empty when all carried)."""
        return {r.name: r.not_carried for r in self.replaced if r.not_carried}

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"converted {len(self.replaced)} layer(s)"]
        return "\n".join(lines + [f"  {r}" for r in self.replaced])
