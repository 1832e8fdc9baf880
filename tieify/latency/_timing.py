"""Wall-clock timing helpers: warm-up, interleaved repetitions, fastest rounds and medians.

Timings on a shared machine are noisy; every helper here interleaves the candidates
(A B C A B C ...) so that a burst of load hits all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (``None``: leave as is)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(
    fn: Callable[[], object], iters: int = 1, device: torch.device | None = None
) -> float:
    """Seconds per call of ``fn``, averaged over ``iters`` back-to-back calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def calibrate_iters(fn: Callable[[], object], target_s: float, device=None) -> int:
    """How many back-to-back calls of ``fn`` take about ``target_s`` (at least 1)."""
    t = time_once(fn, 1, device)
    return max(1, min(1000, int(target_s / max(t, 1e-7))))


def interleaved_samples(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 2,
    target_s: float = 0.02,
    device: torch.device | None = None,
    min_seconds: float = 0.0,
    spread: float | None = None,
    max_rounds: int | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one sample per interleaved round (ABAB...).

    Args:
        fns: name -> zero-argument callable.
        repeats: rounds; each round times every candidate once, in order.
        warmup: untimed calls of each candidate first (allocator, kernel selection).
        target_s: each timed sample runs a candidate about this long (several calls).
        device: a CUDA device to synchronize around each sample, or ``None``.
        min_seconds: keep adding rounds (up to ``max_rounds``) until the rounds span at
            least this long, so that a median is not one short burst of a shared machine.
        spread: wait before each round instead (at least 2 ms, to decorrelate it from other
            processes' time slices, and until round r starts r / ``repeats`` of ``spread``
            seconds after the first), so that ``repeats`` rounds cover the machine's phases
            over that long at little cost; ``None``: rounds back to back.
        max_rounds: the most rounds ``min_seconds`` may add up to (default ``10 * repeats``).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    iters = {name: calibrate_iters(fn, target_s, device) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    most = 10 * repeats if max_rounds is None else max(repeats, max_rounds)
    while rounds < repeats or (rounds < most and time.perf_counter() - start < min_seconds):
        if spread is not None:
            time.sleep(max(0.002, start + rounds * spread / repeats - time.perf_counter()))
        for name, fn in fns.items():
            samples[name].append(time_once(fn, iters[name], device))
        rounds += 1
    return samples


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 2,
    target_s: float = 0.02,
    device: torch.device | None = None,
    min_seconds: float = 0.0,
    best: bool = False,
) -> dict[str, float]:
    """Median seconds per call of each candidate over interleaved rounds (see
    :func:`interleaved_samples` for the arguments); with ``best``, each candidate's fastest
    round instead: the sample least slowed by other jobs, for a choice made once and kept
    (under load that stays for several rounds, medians of two candidates drift towards each
    other as both wait alike)."""
    samples = interleaved_samples(fns, repeats, warmup, target_s, device, min_seconds)
    statistic = "best" if best else "median"
    return {name: reduce_samples(v, statistic) for name, v in samples.items()}


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


#: How a latency is read off timed samples. ``best``, the fastest sample: on a shared machine
#: only other processes make a sample slower, so the fastest is the model's own time and
#: reproduces from one run to the next (the latency model predicts it). ``median``: the
#: typical sample of this run, which follows the machine's load of the moment.
STATISTICS = ("best", "median")
#: What tieify calls a model's latency, measured (``measure_latency``, ``tieify report``,
#: ``tieify search``) and predicted (the remainder's calibration) alike.
LATENCY_STATISTIC = "best"


def reduce_samples(samples: Sequence[float], statistic: str) -> float:
    """``samples`` (seconds) reduced by ``statistic`` (one of :data:`STATISTICS`)."""
    check_statistic(statistic)
    return min(samples) if statistic == "best" else statistics.median(samples)


def check_statistic(statistic: str) -> None:
    """Raise a ``ValueError`` naming the choices unless ``statistic`` is one of them."""
    if statistic not in STATISTICS:
        raise ValueError(
            f"statistic must be one of {', '.join(map(repr, STATISTICS))} (how a latency is "
            f"read off timed rounds), but got {statistic!r}."
        )
