"""The ``--system-allocator`` flag every timing benchmark shares."""

from __future__ import annotations

import argparse

from tieify.latency import allocator_state, tune_allocator


def add_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--system-allocator`` (default: ``tieify.tune_allocator()`` before timing)."""
    parser.add_argument(
        "--system-allocator",
        action="store_true",
        help="time under the allocator as the process starts (default: tieify.tune_allocator() "
        "first, so large outputs do not page-fault on every call; see benchmarks/allocator.py)",
    )


def apply(args: argparse.Namespace) -> str:
    """Tune the allocator unless ``--system-allocator``; the state, for the report."""
    if not args.system_allocator:
        tune_allocator()
    return str(allocator_state())
