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


def table_script_args(description: str, rounds: int, argv=None, options=None) -> argparse.Namespace:
    """The arguments of a script that prints tables (``--threads``, ``--rounds``, the
    allocator flag and what ``options(parser)`` adds), applied: threads set, allocator tuned,
    and the header line printed."""
    import torch

    from tieify.latency._machine import describe_machine

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=rounds)
    add_flag(p)
    if options is not None:
        options(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{describe_machine()}; allocator: {apply(args)}; ", end="")
    print(f"{args.threads} threads; torch {torch.__version__}.\n")
    return args
