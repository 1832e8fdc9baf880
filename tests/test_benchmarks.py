"""The kernel benchmark's arithmetic, on one tiny shape (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def kernels():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("kernels", BENCHMARKS / "kernels.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.PEAK_GEMM_N = 64  # the peak sgemm's size does not matter to the arithmetic
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_ceilings_and_rates_follow_from_the_timings(kernels):
    rows = kernels.bench_shape(8, 16, 4, 3, [2, 4], batch=1, rounds=3, target_s=1e-4)
    rows += kernels.bench_shape(16, 8, 4, 1, [2], batch=2, rounds=3, target_s=1e-4)
    peak = kernels.add_compute_ceiling(rows)
    assert [r["B"] for r in rows] == [2, 4, 2]
    # 2 flops per multiply-add: batch · H · W · C_in · C_out · k², the dense layer's count.
    for r, flops in zip(rows, (2 * 16 * 8 * 16 * 9,) * 2 + (2 * 2 * 16 * 16 * 8,), strict=True):
        # Three rounds: the median rate is the rate of the median time.
        assert r["dense_gflops"] == pytest.approx(flops / (r["dense_ms"] / 1e3) / 1e9)
        assert r["E_compute_ceiling"] == pytest.approx(peak / r["dense_gflops"])
        assert r["E_compute_ceiling"] >= 1.0  # the peak is at least every dense rate
        assert r["E_roofline"] == min(r["E_ceiling"], r["E_compute_ceiling"])
        assert r["of_roofline"] == pytest.approx(r["E_tieify"] / r["E_roofline"])
    assert peak == max(
        r[k] for r in rows for k in ("peak_gemm_gflops", "dense_nchw_gflops", "dense_cl_gflops")
    )
    summary = kernels.summarize(rows)
    assert summary["n"] == 3
    assert summary["E_roofline"]["min"] == min(r["E_roofline"] for r in rows)
    md = kernels.markdown(
        {
            "summary": summary,
            "rows": rows,
            "batch": 1,
            "threads": 1,
            "rounds": 3,
            "machine": "test",
            "torch": "test",
            "peak_gflops": peak,
            "note": "",
            "loadavg_start": [0, 0, 0],
            "loadavg_end": [0, 0, 0],
            "allocator": "test",
        }
    )
    assert md.count("\n| 8 | 16 | 4 | 3 |") == 2 and "| 16 | 8 | 4 | 1 | 2 |" in md
    assert "| roofline ceiling (the smaller of the two) |" in md


@pytest.mark.parametrize("numel", [64, 100, 8 * 64 * 56 * 56])
def test_the_streamed_write_covers_the_output(kernels, numel):
    from tieify.nn._kernel import kernel_available

    if not kernel_available():
        pytest.skip("tieify's kernel cannot be built here: the floor times the fill alone")
    out = kernels.stream_writer(numel)()
    assert out.numel() >= numel and out.numel() - numel < kernels.STREAM_WIDTH
    torch.testing.assert_close(out, torch.ones_like(out))
