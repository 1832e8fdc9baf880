"""``tieify cache [clear [NAME ...]]``: what tieify keeps on disk, and clearing it."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser"]

_EPILOG = """\
examples:
  tieify cache                  # where the caches are, what each holds and its size
  tieify cache clear latency    # re-time every layer and remainder on the next prediction
  tieify cache clear            # everything (the kernel is compiled again on its next use)
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``tieify cache``."""
    from ..latency._cache import CACHES

    p = subparsers.add_parser(
        "cache",
        help="show or clear the measurements and builds tieify keeps on disk",
        description=(
            "Show or clear what tieify keeps under its cache directory ($TIEIFY_CACHE_DIR,\n"
            "else $XDG_CACHE_HOME/tieify, else ~/.cache/tieify): the latency table, the\n"
            "forward paths tieify.optimize and tieify.fuse timed, and the kernel's builds.\n"
            "Clear the latency table after a run on a loaded machine: its remainders are\n"
            "kept for every later prediction of the same model."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "action", nargs="?", choices=("show", "clear"), default="show", help="default: show"
    )
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"with clear: which caches ({', '.join(CACHES)}; default: all)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .._errors import TieifyError
    from ..latency._cache import CACHES, CacheInfo, cache_dir, cache_info, clear_cache

    if args.action == "show" and args.names:
        raise TieifyError(
            f"names ({' '.join(args.names)}) go with 'clear': tieify cache clear {args.names[0]}"
        )

    def line(info: CacheInfo) -> str:
        if not info.exists:
            held = "empty"
        elif info.entries is None:
            held = "unreadable (rebuilt on its next use)"
        elif info.name == "kernels":
            held = f"{info.entries} build{'s' * (info.entries != 1)}"
        else:
            held = f"{info.entries} entr{'ies' if info.entries != 1 else 'y'}"
            if info.name == "latency":
                held += f", {info.remainders} of them model remainders"
        where = f"{info.path.name}: {info.description}"
        return f"  {info.name:<8} {_size(info.size):>9}  {held:<38} {where}"

    if args.action == "clear":
        try:
            removed = clear_cache(*args.names)  # checks every name before it deletes
        except ValueError as err:
            raise TieifyError(str(err)) from None
        print(f"cleared in {cache_dir()}:")
        for info in removed:
            print(line(info))
        return 0
    print(f"tieify cache: {cache_dir()}")
    for name in CACHES:
        print(line(cache_info(name)))
    return 0


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.1f} MiB"
