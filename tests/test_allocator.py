"""tieify.tune_allocator: page faults on large freed blocks stop; state, errors, cache keys."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import tieify
from tieify.latency import _allocator, allocator_state
from tieify.latency._table import layer_key
from tieify.nn import TiedConv2d

glibc_only = pytest.mark.skipif(
    _allocator._glibc() is None or _allocator._preloaded_allocator() is not None,
    reason="needs glibc malloc (no jemalloc/tcmalloc preloaded)",
)

# A child process (the setting is process-wide and one-way): a 1×1 conv writing a 51 MiB
# output, above glibc's largest dynamic mmap threshold (32 MiB), and the minor page faults
# per call before and after tune_allocator().
_CHILD = textwrap.dedent(
    """
    import json, torch
    from tieify.latency import allocator_state, tune_allocator
    from tieify.latency._allocator import minor_faults

    torch.set_num_threads(1)
    conv = torch.nn.Conv2d(64, 256, 1, bias=False)
    x = torch.randn(16, 64, 56, 56)

    @torch.inference_mode()
    def faults_per_call(n=6):
        for _ in range(3):  # warm-up: one-off heap growth is not a per-call fault
            conv(x)
        before = minor_faults()
        for _ in range(n):
            conv(x)
        return (minor_faults() - before) / n

    out = {"before": faults_per_call(), "state_before": allocator_state().label}
    state = tune_allocator()
    out.update(after=faults_per_call(), state_after=state.label, detail=state.detail)
    print(json.dumps(out))
    """
)


@glibc_only
def test_tuned_allocator_stops_page_faults_on_large_blocks() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True, env=_clean_env()
    )
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["state_before"] == "system" and res["state_after"] == "tuned"
    assert "1024 MiB" in res["detail"]
    pages = 16 * 256 * 56 * 56 * 4 // 4096
    # Under the defaults the output's block is mmap'd afresh on every call: one fault per
    # 4 KiB page of it.
    assert res["before"] >= 0.9 * pages, res
    # Tuned, the freed block is reused: no fresh pages at all (a few stray faults allowed).
    assert res["after"] < 0.01 * pages, res


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in _allocator._ENV_KNOBS}


@pytest.mark.parametrize("retain", [1 << 20, 2**31, 1.5e9, "1G"])
def test_retain_out_of_range_names_the_rule(retain) -> None:
    with pytest.raises(ValueError, match=r"retain.*\[32 MiB, 2 GiB\).*default"):
        tieify.tune_allocator(retain=retain)


def test_not_glibc_warns_and_changes_nothing(monkeypatch) -> None:
    monkeypatch.setattr(_allocator, "_glibc", lambda: None)
    monkeypatch.setattr(_allocator, "_preloaded_allocator", lambda: None)
    with pytest.warns(RuntimeWarning, match="not glibc.*nothing was changed.*jemalloc"):
        state = tieify.tune_allocator()
    assert (state.name, state.tuned, state.label) == ("unknown", False, "system")


def test_preloaded_allocator_is_left_alone(monkeypatch) -> None:
    class NoMallopt:
        def mallopt(self, *args):  # pragma: no cover - must not be called
            raise AssertionError("mallopt called under jemalloc")

    monkeypatch.setattr(_allocator, "_preloaded_allocator", lambda: "jemalloc")
    monkeypatch.setattr(_allocator, "_glibc", lambda: NoMallopt())
    state = tieify.tune_allocator()
    assert (state.name, state.label) == ("jemalloc", "tuned")
    assert str(state).startswith("jemalloc (tuned): ")


def test_environment_knobs_count_as_tuned(monkeypatch) -> None:
    if _allocator._glibc() is None:
        pytest.skip("glibc only")
    monkeypatch.setattr(_allocator, "_preloaded_allocator", lambda: None)
    monkeypatch.setattr(_allocator, "_tuned_retain", None)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000000")
    state = allocator_state()
    assert state.tuned and "MALLOC_TRIM_THRESHOLD_" in state.detail


def test_latency_table_key_separates_allocator_states(monkeypatch) -> None:
    layer = TiedConv2d(16, 16, 3, B=4, padding=1)
    x = torch.randn(1, 16, 8, 8)
    keys = {}
    for label in ("system", "tuned"):
        state = _allocator.AllocatorState("glibc", label == "tuned", "test")
        monkeypatch.setattr("tieify.latency._table.allocator_state", lambda s=state: s)
        keys[label] = json.loads(layer_key(layer, x))
    assert keys["system"]["allocator"] == "system" and keys["tuned"]["allocator"] == "tuned"
    assert {k: v for k, v in keys["system"].items() if k != "allocator"} == {
        k: v for k, v in keys["tuned"].items() if k != "allocator"
    }


@pytest.mark.parametrize("allocator, calls", [("tuned", 1), ("system", 0)])
def test_search_latency_tunes_the_allocator_as_the_recipe_says(monkeypatch, allocator, calls):
    import tieify.latency
    from tieify.search._objective import Evaluator
    from tieify.search._recipe import recipe_from_dict

    seen = []
    monkeypatch.setattr(tieify.latency, "tune_allocator", lambda: seen.append(1))
    ev = Evaluator.__new__(Evaluator)  # only what _latency reads: no data, no training
    ev.recipe = recipe_from_dict({"latency": {"allocator": allocator, "repeats": 2}})
    ev.latency_input = torch.randn(1, 4)
    ev.latency_mode = "measured"
    ev.dense = torch.nn.Linear(4, 2)  # timed beside the candidate in the same rounds
    ms, ratio = ev._latency(torch.nn.Linear(4, 2))
    assert ms > 0 and ratio > 0
    assert len(seen) == calls
