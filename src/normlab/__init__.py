"""normlab: activation normalization as one pattern engine.

Every method is a pattern such as ``n c h w -> c`` (batch norm): the axes on the right
keep their own statistics, every other axis is reduced.

Example:
    >>> import torch, normlab
    >>> y = normlab.normalize(torch.randn(8, 64, 4, 4), "n (g k) h w -> n g", g=32)
"""

from normlab.errors import PatternError
from normlab.moments import Moments, combine, moments
from normlab.normalize import normalize
from normlab.pattern import parse_pattern, plan

__version__ = "0.1.0"

__all__ = [
    "Moments",
    "PatternError",
    "combine",
    "moments",
    "normalize",
    "parse_pattern",
    "plan",
]
