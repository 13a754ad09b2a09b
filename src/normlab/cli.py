"""The `normlab` command: explain, draw, compare, bench.

Each subcommand lives in the module that does the work; this file only wires them.
Every module offers ``add_arguments(parser)`` and ``run(args) -> int``.

Example:
    $ normlab explain "n (g k) h w -> n g" --shape 8,64,32,32 g=32
"""

from __future__ import annotations

import argparse
import importlib
import sys
import zipfile
from collections.abc import Sequence

from normlab.errors import PatternError

SUBCOMMANDS = {
    "explain": ("normlab.explain", "what a pattern normalizes over, in words and numbers"),
    "draw": ("normlab.draw", "draw the N x C x (H*W) block with one set S shaded"),
    "compare": ("normlab.lab.cli", "train the same model with each normalization and compare"),
    "bench": ("normlab.bench", "time normlab against torch.nn and a plain copy"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normlab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            add_arguments = importlib.import_module(module).add_arguments
        except ModuleNotFoundError as error:
            # A subcommand whose module is not part of this build is left out, not fatal.
            if error.name is None or not module.startswith(error.name):
                raise
            continue
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module)
        add_arguments(sub)
    return parser


# What the user's input can raise: bad values, unreadable or unwritable files (OSError
# covers permissions, missing files and Pillow's UnidentifiedImageError), truncated
# archives (BadZipFile, EOFError).
USER_ERRORS = (PatternError, ValueError, TypeError, OSError, zipfile.BadZipFile, EOFError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (bad input: one line on stderr, status 2)."""
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args.module).run(args) or 0)
    except USER_ERRORS as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"normlab {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"normlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
