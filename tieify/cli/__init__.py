"""The ``tieify`` command line: ``tieify report``, ``tieify search`` and ``tieify cache``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers
the subcommand and sets ``func(args) -> int`` as its handler. Errors tieify raises on purpose
(:class:`tieify.TieifyError`) end with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._errors import TieifyError
from .._version import __version__


def build_parser() -> argparse.ArgumentParser:
    from . import _cache, _report, _search

    parser = argparse.ArgumentParser(
        prog="tieify",
        description="Make PyTorch CNNs leaner by tying their filters.",
    )
    parser.add_argument("--version", action="version", version=f"tieify {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _report.add_parser(sub)
    _search.add_parser(sub)
    _cache.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tieify`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TieifyError as err:
        print(f"tieify {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tieify {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
