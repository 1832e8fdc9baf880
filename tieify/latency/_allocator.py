"""The process's memory allocator, tuned so forward passes stop page-faulting.

glibc's ``malloc`` (Linux) serves a block above its mmap threshold (128 KiB at start, raised
on the fly to at most 32 MiB) with fresh pages from the kernel and unmaps it on ``free``; it
also hands the top of its heap back to the kernel once more than the trim threshold is free.
A CNN's activations are megabytes each, so with these defaults a forward pass can take a page
fault on every 4 KiB page of a large output, on every call, and the fault count changes with
the order of the allocations before it. ``benchmarks/allocator.py`` measures it: on a 2-core
host a 1×1 convolution writing a 51 MB output took 36.4 ms with the defaults (12,545 page
faults a call) and 13.2 ms once the allocator keeps its memory (none). The fault cost
is the same for a dense and a tied layer, so it also hides the tied layer's speed-up, and it
makes a layer timed alone disagree with the same layer inside a model.

:func:`tune_allocator` raises both thresholds with glibc's ``mallopt``: freed activations are
reused instead of going back to the kernel. It removes the per-call faults in the workloads
the benchmarks measure, not in every allocation pattern (a loop of aligned allocations of
one size can still fragment glibc's heap). This is what running under jemalloc or tcmalloc
(``LD_PRELOAD``) achieves, which PyTorch's CPU performance guidance recommends. The price is
that the process keeps up to ``retain`` bytes of freed memory for reuse. The setting is
process-wide and stays until the process exits. tieify applies it before the latency
measurements of a search (unless its recipe says ``latency.allocator: system``) and in its
benchmarks; anywhere else only when called.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from functools import cache

__all__ = ["AllocatorState", "allocator_state", "tune_allocator", "minor_faults"]

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc always accepts an mmap threshold up to this (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit).
_GLIBC_MAX_SAFE_THRESHOLD = 32 << 20
_ENV_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")

_tuned_retain: int | None = None  # bytes retained, once tune_allocator succeeded here


@dataclass(frozen=True)
class AllocatorState:
    """Which allocator serves this process and whether it keeps freed memory for reuse.

    Attributes:
        name: ``"glibc"``, ``"jemalloc"``, ``"tcmalloc"`` or ``"unknown"``.
        tuned: whether large freed blocks are kept for reuse (no page fault per call).
        detail: one line saying how that was established.
    """

    name: str
    tuned: bool
    detail: str

    @property
    def label(self) -> str:
        """``"tuned"`` or ``"system"``: the value that goes into cache keys and reports."""
        return "tuned" if self.tuned else "system"

    def __str__(self) -> str:
        return f"{self.name} ({self.label}): {self.detail}"


@cache
def _preloaded_allocator() -> str | None:
    """``"jemalloc"`` or ``"tcmalloc"`` when one of them is mapped into this process."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read()
    except OSError:
        maps = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return None


@cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library, when it is glibc on Linux."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def allocator_state() -> AllocatorState:
    """Describe this process's allocator (see the module docstring for why it matters)."""
    preloaded = _preloaded_allocator()
    if preloaded is not None:
        return AllocatorState(preloaded, True, f"{preloaded} is loaded; it keeps freed memory")
    if _glibc() is None:
        return AllocatorState(
            "unknown",
            False,
            f"not glibc ({sys.platform}, {platform.libc_ver()[0] or 'no libc version'}); "
            "left as the system provides it",
        )
    if _tuned_retain is not None:
        return AllocatorState(
            "glibc", True, f"tieify.tune_allocator() keeps up to {_tuned_retain >> 20} MiB"
        )
    env = [k for k in _ENV_KNOBS if k in os.environ]
    if env:
        return AllocatorState("glibc", True, f"set by the environment ({', '.join(env)})")
    return AllocatorState(
        "glibc", False, "defaults: large blocks are unmapped on free and fault back in"
    )


def tune_allocator(retain: int = 1 << 30) -> AllocatorState:
    """Keep freed large blocks for reuse so forward passes stop page-faulting (glibc).

    Raises glibc's mmap threshold and trim threshold to ``retain`` bytes (``mallopt``), so a
    freed activation's memory serves the next one. Process-wide and permanent for this
    process. A no-op under jemalloc or tcmalloc (they keep memory already); elsewhere (not
    glibc) the allocator is left alone with a warning saying so. Calling it again is cheap.

    Args:
        retain: bytes of freed memory the process may keep; blocks at least this large still
            come from and return to the kernel. Between 32 MiB and 2 GiB - 1.

    Returns:
        The :class:`AllocatorState` after the call.

    Example:
        >>> import tieify
        >>> tieify.tune_allocator().label in ("tuned", "system")
        True
    """
    global _tuned_retain
    if not isinstance(retain, int) or not _GLIBC_MAX_SAFE_THRESHOLD <= retain < 2**31:
        raise ValueError(
            f"tune_allocator(retain=...) must be an int of bytes in [32 MiB, 2 GiB) "
            f"(mallopt takes a C int, and below 32 MiB glibc's own dynamic threshold does "
            f"better), but got {retain!r}. Use the default (1 GiB) unless memory is tight."
        )
    state = allocator_state()
    if state.name in ("jemalloc", "tcmalloc"):
        return state
    libc = _glibc()
    if libc is None:
        warnings.warn(
            f"tieify.tune_allocator: this process's allocator is not glibc ({state.detail}); "
            "nothing was changed. If timings vary from call to call, run the process under "
            "jemalloc or tcmalloc.",
            RuntimeWarning,
            stacklevel=2,
        )
        return state
    threshold = retain
    if not libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)):
        # Some glibc builds cap the threshold at half their heap size; 32 MiB always holds.
        threshold = _GLIBC_MAX_SAFE_THRESHOLD
        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold))
    libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(retain))
    _tuned_retain = threshold
    return allocator_state()


def minor_faults() -> int | None:
    """Minor page faults this process has taken so far (``getrusage``); None off Unix."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
