"""Speed: fast tied-layer paths, their tuning, and latency prediction.

- :func:`optimize` times each tied convolution's forward paths once per input shape and pins
  the fastest (cached on disk, like ``cudnn.benchmark``).
- :func:`predict_latency` predicts a model's (or a plan's) forward latency from a per-layer
  lookup table measured on this machine plus the model's non-layer remainder.
- :func:`measure_latency` measures it directly (the fastest of interleaved rounds);
  :func:`is_warm` says whether a prediction would be table lookups only.
- :func:`tune_allocator` stops glibc's allocator from unmapping freed activations, the page
  faults that otherwise slow (and scatter) CPU forward times; :func:`allocator_state` says
  which allocator serves the process.
- :func:`cache_dir` is where measurements are kept (``$TIEIFY_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/tieify``, else ``~/.cache/tieify``); :func:`cache_info` says what each
  cache holds and :func:`clear_cache` deletes them (``tieify cache [clear]``).
"""

from ._allocator import AllocatorState, allocator_state, tune_allocator
from ._cache import CacheInfo, cache_dir, cache_info, clear_cache
from ._optimize import optimize
from ._predict import is_warm, latency_breakdown, measure_latency, predict_latency
from ._table import LatencyTable

__all__ = [
    "optimize",
    "predict_latency",
    "measure_latency",
    "latency_breakdown",
    "is_warm",
    "LatencyTable",
    "cache_dir",
    "cache_info",
    "clear_cache",
    "CacheInfo",
    "tune_allocator",
    "allocator_state",
    "AllocatorState",
]
