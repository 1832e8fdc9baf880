"""The kernel benchmark's arithmetic, on one tiny shape (no timing is asserted)."""

from __future__ import annotations

import argparse
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


def test_the_cases_below_the_target_name_their_ceiling(kernels):
    def row(ci, co, B, e, memory, compute):
        return {"C_in": ci, "C_out": co, "H": 56, "k": 1, "B": B, "E_tieify": e,
                "E_ceiling": memory, "E_compute_ceiling": compute,
                "E_roofline": min(memory, compute)}  # fmt: skip

    rows = [row(64, 256, 8, 0.42, 0.48, 1.23), row(256, 64, 8, 0.55, 1.63, 1.38)]
    rows.append(row(256, 64, 4, 0.98, 2.52, 1.34))
    cases = kernels.below_target(rows)
    assert [(c["B"], c["ceiling"], c["bound"]) for c in cases] == [
        (8, "memory", True),
        (8, "compute", False),
    ]
    assert kernels.below_target_line(cases) == (
        "Below E = 0.6: 64→256 1×1 at 56×56, B = 8: E 0.42, memory ceiling 0.48 (no forward "
        "path reaches 0.6 in this run); 256→64 1×1 at 56×56, B = 8: E 0.55, compute ceiling "
        "1.38."
    )
    assert kernels.below_target_line(kernels.below_target(rows[2:])) == "Every case at E ≥ 0.6."


@pytest.mark.parametrize("numel", [64, 100, 8 * 64 * 56 * 56])
def test_the_streamed_write_covers_the_output(kernels, numel):
    from tieify.nn._kernel import kernel_available

    if not kernel_available():
        pytest.skip("tieify's kernel cannot be built here: the floor times the fill alone")
    out = kernels.stream_writer(numel)()
    assert out.numel() >= numel and out.numel() - numel < kernels.STREAM_WIDTH
    torch.testing.assert_close(out, torch.ones_like(out))


def _load(name: str):
    """Import ``benchmarks/<name>.py`` (which puts benchmarks/ on sys.path itself), with
    sys.path restored afterwards."""
    path = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path[:] = path


@pytest.fixture(scope="module")
def latency_model():
    yield from _load("latency_model")


@pytest.fixture(scope="module")
def entry_timing():
    yield from _load("entry_timing")


def test_latency_model_scores_separate_host_drift(latency_model):
    """A host that runs every plan 1.5× slower in the second half of the rounds: the
    fastest sample is the prediction (no error), the median sample is the slow half's (an
    error of a third), and the ground truth measured twice differs from itself by that third."""
    predicted = {"dense": 10.0, 0: 5.0, 1: 8.0}  # ms
    slowdown = [1.0, 1.0, 1.0, 1.5, 1.5, 1.5, 1.5]
    plans = [
        {"model": "m", "plan": k, "predicted_ms": v, "new_entries": 1} for k, v in predicted.items()
    ]
    # Three samples a round: the round's speed, 10% and 20% slower.
    samples = {
        k: [[v / 1e3 * f * g for g in (1.0, 1.1, 1.2)] for f in slowdown]
        for k, v in predicted.items()
    }
    remainder = {"nonlayer": 0.002, "scale": 1.0}
    stubbed = {"nonlayer": 0.001, "scale": 2.0}
    rows = latency_model.score_plans(plans, samples, remainder, stubbed)
    for r in rows:
        assert r["measured_ms"] == pytest.approx(r["predicted_ms"])
        # 21 samples: 9 of the fast rounds below 12 of the slow ones, the 11th is 1.5 p.
        assert r["measured_median_ms"] == pytest.approx(1.5 * r["predicted_ms"])
        assert r["ape"] == pytest.approx(0.0)
        assert r["ape_median"] == pytest.approx(1 / 3)  # |p − 1.5 p| / 1.5 p
        assert r["ape_in_rounds"] == pytest.approx(0.0)
        assert r["ape_self"] == pytest.approx(1 / 3)  # first half's fastest p, second's 1.5 p
        # Per-round medians 1.1 p and 1.65 p: (1.65 − 1.1) / 1.65.
        assert r["spread"] == pytest.approx(1 / 3)
    # Σ entries of the 8 ms plan = (8 − 2) / 1 ms; stubbed: 1 + 2 · 6 = 13 ms.
    assert rows[2]["predicted_stubbed_ms"] == pytest.approx(13.0)
    summary = latency_model.summarize(rows, ["m"])
    assert summary["n"] == 2  # the dense row calibrated and is not counted
    assert summary["mdape"] == pytest.approx(0.0)
    assert summary["mdape_median"] == pytest.approx(1 / 3)
    assert summary["mdape_self"] == pytest.approx(1 / 3)
    assert latency_model.split_halves([[3.0], [1.0, 2.0], [9.0, 8.0], [10.0]]) == (1.0, 8.0)


def test_latency_model_rescales_in_rounds_by_the_dense_models_drift(latency_model):
    """A calibration taken when the host was 1.25× faster than in the plans' rounds: every
    prediction is a fifth low, and the in-round rescaling (by the dense model's measured /
    predicted) removes exactly that."""
    predicted = {"dense": 8.0, 0: 4.0, 1: 6.0}
    plans = [
        {"model": "m", "plan": k, "predicted_ms": v, "new_entries": 0} for k, v in predicted.items()
    ]
    samples = {k: [[v * 1.25 / 1e3]] * 4 for k, v in predicted.items()}
    rows = latency_model.score_plans(
        plans, samples, {"nonlayer": 0.0, "scale": 1.0}, {"nonlayer": 0.0, "scale": 1.0}
    )
    for r in rows:
        assert r["ape"] == pytest.approx(0.2)  # |p − 1.25 p| / 1.25 p
        assert r["ape_in_rounds"] == pytest.approx(0.0)
        assert r["ape_stubbed"] == pytest.approx(0.2)
        assert r["ape_self"] == 0.0 and r["spread"] == 0.0


def test_entry_timing_scores_and_times_one_entry_at_a_time(entry_timing, monkeypatch):
    """The in-round error rescales by the dense model's measured / predicted time; the
    one-by-one table calls the timer once per entry, without the spread."""
    # Dense predicted 10, measured 12 (factor 1.2); plans predicted 5 and 10, measured 6.6, 9.
    e = entry_timing.errors([10.0, 5.0, 10.0], [12.0, 6.6, 9.0])
    assert e["dense_ratio"] == pytest.approx(10 / 12)
    # In-round: |6 − 6.6| / 6.6 and |12 − 9| / 9, median of the two.
    assert e["in_round"] == pytest.approx((0.6 / 6.6 + 3 / 9) / 2)
    assert e["total"] == pytest.approx((1.6 / 6.6 + 1 / 9) / 2)
    from tieify.latency import _table

    calls = []

    def fake(items, *, threads=None, repeats=7, min_seconds=None):
        calls.append((len(items), min_seconds))
        return dict.fromkeys(items, 1e-3)

    monkeypatch.setattr(_table, "time_modules", fake)
    convs = [torch.nn.Conv2d(4, 4, k) for k in (1, 3)]
    x = torch.randn(1, 4, 6, 6)
    table = entry_timing.OneByOneTable(persist=False)
    assert table.lookup_many([(c, x) for c in convs]) == [1e-3, 1e-3]
    assert calls == [(1, 0.0), (1, 0.0)] and table.measured == 2


@pytest.fixture(scope="module")
def gpu_timing():
    yield from _load("gpu_timing")


def test_gpu_timing_scores_the_rule_and_the_timed_choice_against_the_fastest_path(gpu_timing):
    """Per dtype, layout and B: the fastest single path (not ``auto``/``optimized``, which
    run one of them), and the two choices' times over its time; the Markdown names the path
    each choice ran."""

    def row(op, factor, path, ms, runs=None):
        return {
            "dtype": "bfloat16",
            "layout": "channels_last",
            "op": op,
            "factor": factor,
            "path": path,
            "ms": ms,
            "speedup_vs_dense": 8.0 / ms,
            "ideal_speedup": factor,
            "runs": runs or path,
        }

    rows = [
        row("group", 1, "-", 8.0),
        row("tied", 4, "fold", 4.0),
        row("tied", 4, "lift", 2.0),
        row("tied", 4, "grouped", 2.5),
        row("tied", 4, "auto", 2.5, runs="grouped"),
        row("tied", 4, "optimized", 1.9, runs="lift"),  # timed apart: may beat its path's row
    ]
    (s,) = gpu_timing.summarize(rows)
    assert (s["B"], s["fastest"], s["fastest_ms"], s["fastest_speedup"]) == (4, "lift", 2.0, 4.0)
    assert (s["auto"], s["auto_over_fastest"]) == ("grouped", 1.25)
    assert (s["optimized"], s["optimized_over_fastest"]) == ("lift", 0.95)
    res = {
        "feature_map": {"N": 1, "C": 8, "H": 4, "W": 4},
        "device": "cpu",
        "torch": torch.__version__,
        "note": "n",
        "rows": rows,
        "summary": [s],
    }
    md = gpu_timing.markdown(res).splitlines()
    assert "| tied | 4 | auto (grouped) | 2.500 | 3.20 | 4 |" in md
    assert (
        "| bfloat16 | channels_last | 4 | lift | 2.000 | 4.00 | grouped | 1.25 | lift | 0.95 |"
        in md
    )
    header = md.index("| op | G or B | path | ms | speed-up vs dense | ideal |")
    assert md[header + 1] == "|---|---:|---|---:|---:|---:|"  # numbers right-aligned


@pytest.fixture(scope="module")
def host_noise():
    yield from _load("host_noise")


def test_host_noise_reads_each_window_and_drops_the_partial_one(host_noise):
    """Calls every second for 20 s, 10 ms except a slow stretch (20 ms) from second 10 to 15
    and one 5 ms call at second 12: in 10-s windows the first is flat, the second's median is
    slow and its fastest call the 5 ms one; the last call starts a window that is dropped."""
    times = [0.020 if 10 <= t < 16 else 0.010 for t in range(20)]
    times[12] = 0.005
    calls = [(100.0 + t, s) for t, s in enumerate(times)] + [(120.0, 0.5)]
    ws = host_noise.windows(calls, 10)
    assert [len(w) for w in ws] == [10, 10]
    (row,) = host_noise.summarize(calls, lengths=(10,))
    assert row["windows"] == 2
    assert row["median"]["min"] == pytest.approx(10.0)  # ms
    assert row["median"]["max"] == pytest.approx(15.0)  # five 20 ms, four 10 ms, one 5 ms
    assert row["fastest"]["min"] == pytest.approx(5.0) and row["fastest"]["max"] == 10.0
    assert row["fastest"]["cv"] == pytest.approx(2.5 / 7.5)  # pstdev of 5 and 10 over 7.5
    res = {
        "model": "m",
        "size": 8,
        "threads": 1,
        "seconds": 21,
        "start": "now",
        "calls": 21,
        "median_ms": 10.0,
        "fastest_ms": 5.0,
        "torch": "t",
        "machine": "x",
        "loadavg_start": [0, 0, 0],
        "loadavg_end": [0, 0, 0],
        "rows": [row],
    }
    assert "| 10 s | 2 | 10.00–15.00 (20.0%) |" in host_noise.markdown(res)


@pytest.fixture(scope="module")
def models():
    yield from _load("models")


def test_models_profile_splits_a_forward_by_module_on_a_fake_clock(models, monkeypatch):
    """Each module advances a fake clock by a known time (a tied conv 5, a dense conv 7, a
    batch norm 2, a ReLU 1, a pool 4) and the code between modules by 3: the split counts each
    in its group, a tied conv once (not its children too), and the rest as what is left."""
    from torch import nn

    from tieify.nn import TiedConv2d

    clock = [0.0]
    monkeypatch.setattr(models.time, "perf_counter", lambda: clock[0])

    def costs(module: nn.Module, seconds: float) -> nn.Module:
        module.register_forward_hook(lambda m, i, o: clock.__setitem__(0, clock[0] + seconds))
        return module

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.tied = costs(TiedConv2d(4, 4, 1, B=2), 0.005)
            self.conv = costs(nn.Conv2d(4, 4, 1), 0.007)
            self.bn = costs(nn.BatchNorm2d(4), 0.002)
            self.relu = costs(nn.ReLU(), 0.001)
            self.pool = costs(nn.AdaptiveAvgPool2d(1), 0.004)

        def forward(self, x):
            y = self.relu(self.bn(self.conv(self.tied(x))))
            clock[0] += 0.003  # a residual add between modules
            return self.pool(y + x)

    split = models.module_split(Net().eval(), torch.randn(1, 4, 3, 3), rounds=2)
    expected = {"conv": 12.0, "norm": 2.0, "act": 1.0, "pool": 4.0, "other": 0.0, "rest": 3.0}
    assert split == pytest.approx({**expected, "total": 22.0})


def test_rule_setting_rows_give_each_copy_its_own_setting(models, monkeypatch):
    """Each copy of the tied model decides its layers' paths on its first call under its own
    setting of the rule's flag and keeps them: with the rule for a BLAS behind oneDNN the
    NCHW pointwise layer (128 channels a block, 14×14, two images) folds, with the other it
    does not, and ``rule`` has this process's setting (the suite's: keeps up)."""
    import argparse

    from torch import nn

    from tieify.nn import TiedConv2d, _paths

    def toy():
        return nn.Sequential(nn.Conv2d(3, 256, 1), TiedConv2d(256, 256, 1, B=2)).eval()

    monkeypatch.setattr(models, "build_case", lambda case: (toy(), toy()))
    timed = {}

    def fake_time_models(ms, x, rounds, target_s):
        timed.update(ms, x=x)
        return {k: [1.0 + i] for i, k in enumerate(ms)}

    monkeypatch.setattr(models, "time_models", fake_time_models)
    args = argparse.Namespace(cases=["toy"], batches=[2], size=14, rounds=1, target_s=0.0)
    settings = {"behind": {"_BLAS_BEHIND_ONEDNN": True}, "keeps_up": {"_BLAS_BEHIND_ONEDNN": False}}
    rows = models.rule_setting_rows(args, settings, ("nchw",))
    assert [(r["case"], r["layout"], r["batch"]) for r in rows] == [("toy", "nchw", 2)]
    assert rows[0]["behind"] == 3.0 and rows[0]["optimize"] == 5.0  # ratios to dense (1.0)
    x = timed["x"]
    assert x.shape == (2, 3, 14, 14) and x.is_contiguous()
    chosen = {k: _paths.select_path(timed[k][1], torch.randn(2, 256, 14, 14)) for k in settings}
    assert chosen["behind"] == "fold" and chosen["keeps_up"] != "fold"
    assert _paths.select_path(timed["rule"][1], torch.randn(2, 256, 14, 14)) != "fold"
    assert _paths._BLAS_BEHIND_ONEDNN is False  # the flag restored after each copy's call


def test_models_bandwidth_study_splits_samples_by_bandwidth(models):
    """Six samples: the lowest and the highest third by bandwidth (two each) give the
    medians, the ratio falls as the bandwidth rises (a negative correlation, computed by
    hand), and fewer than three samples is an error that says what to give."""
    rows = [(20, 0.200, 0.080), (30, 0.190, 0.070), (40, 0.200, 0.070)]
    rows += [(50, 0.180, 0.063), (60, 0.190, 0.060), (80, 0.180, 0.054)]
    samples = [{"copy_gbs": g, "dense_s": d, "tied_s": t} for g, d, t in rows]
    out = models.bandwidth_summary(list(reversed(samples)))
    assert out["samples"] == 6
    assert out["low"] == pytest.approx(
        {"copy_gbs": 25.0, "dense_ms": 195.0, "tied_ms": 75.0, "ratio": (0.4 + 0.07 / 0.19) / 2}
    )
    assert out["high"]["copy_gbs"] == 70.0 and out["high"]["ratio"] == pytest.approx(
        (0.06 / 0.19 + 0.3) / 2
    )
    g = [r[0] for r in rows]
    q = [t / d for _, d, t in rows]
    mg, mq = sum(g) / 6, sum(q) / 6
    cov = sum((a - mg) * (b - mq) for a, b in zip(g, q, strict=True))
    r = cov / (sum((a - mg) ** 2 for a in g) * sum((b - mq) ** 2 for b in q)) ** 0.5
    assert out["correlation"] == pytest.approx(r) and r < -0.9
    args = argparse.Namespace(threads=2, bandwidth=60.0)
    text = models.bandwidth_markdown([{"case": "r50", "batch": 8} | out], args, "glibc")
    row = "| r50 | 8 | 6 | 25 / 70 / 45 | 195.0 / 185.0 | 75.0 / 57.0 | 0.384 / 0.308 / 0.350 |"
    assert row + " -0.97 |" in text
    with pytest.raises(ValueError, match="at least 3; give --bandwidth more seconds"):
        models.bandwidth_summary(samples[:2])


def test_copy_probe_moves_its_bytes_both_ways(models):
    probe, moved = models.copy_probe(1 << 20)
    probe()
    assert moved == 2 << 20
    assert models.gb_per_s(moved, 1e-3) == pytest.approx(2 * 2**20 / 1e-3 / 1e9)


@pytest.fixture(scope="module")
def results():
    yield from _load("_results")


def test_tables_align_their_columns_and_reject_a_ragged_row(results):
    assert results.table(" | ms | name", "lrl", [["a", 1.5, "x"], ["", 2, ""]]) == [
        "| | ms | name |",
        "|---|---:|---|",
        "| a | 1.5 | x |",
        "| | 2 | |",
    ]
    with pytest.raises(ValueError, match="needs one of 'l' or 'r' for each of 2 columns"):
        results.table("a | b", "l", [])
    with pytest.raises(ValueError, match="a row of 1 cells in a table of 2 columns"):
        results.table("a | b", "lr", [["x"]])
    row = {"case": "r50", "batch": 8, "dense_ms": 200.0, "tied_ms": 60.04, "tied": 0.3002}
    row |= {"fused_ms": 50.0, "fused": 0.25, "fused_over_tied": 0.8328}
    assert results.against_table(
        "case | batch | dense ms | tied | fused | fused / tied",
        [row],
        lambda r: [r["case"], r["batch"]],
        ("tied", "fused"),
        "fused_over_tied",
    ) == [
        "| case | batch | dense ms | tied | fused | fused / tied |",
        "|---|---:|---:|---:|---:|---:|",
        "| r50 | 8 | 200.0 | 60.0 (0.300) | 50.0 (0.250) | 0.833 |",
    ]


@pytest.fixture(scope="module")
def zoo_coverage():
    yield from _load("zoo_coverage")


def test_zoo_coverage_records_each_function_and_names_what_failed(zoo_coverage, monkeypatch):
    functions = ["report", "save_load", "optimize", "fuse", "export", "onnx"]
    row = zoo_coverage.run_model("torchvision/resnet", "resnet18", {}, 32, 4, functions)
    assert row["status"] == "ok" and row["tied"] == 19 and row["left"] == 2
    results = {f: v["result"] for f, v in row["functions"].items()}
    onnx = "skipped (onnxruntime not installed)"
    if importlib.util.find_spec("onnxruntime"):
        onnx = "ok"
    fuse = results.pop("fuse")
    assert fuse.startswith("ok (") and fuse.endswith(" chains)"), fuse
    assert results == {f: "ok" for f in functions if f != "fuse"} | {"onnx": onnx}

    # a function that raises is recorded with its error and where it was raised; an exporter
    # that fails on the dense model too is not counted against tieify
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(zoo_coverage.tieify, "save", broken)
    monkeypatch.setattr(zoo_coverage, "_export", broken)
    row = zoo_coverage.run_model(
        "torchvision/resnet", "resnet18", {}, 32, 4, ["save_load", "export"]
    )
    results = {f: v["result"] for f, v in row["functions"].items()}
    assert results["save_load"].startswith("failed: RuntimeError: disk full (test_benchmarks.py:")
    assert results["export"] == "dense fails too (RuntimeError)"
    res = {
        "B": 4,
        "functions": ["save_load", "export"],
        "torch": "t",
        "torchvision": "tv",
        "timm": "not installed",
        "loadavg_start": [1, 1, 1],
        "loadavg_end": [1, 1, 1],
        "resnet152_tieify_seconds_median_of_5": 0.25,
        "models": [row],
    }
    md = zoo_coverage.markdown(res)
    assert "| torchvision/resnet | 1 | 19 | 2 | 0 | 0 | 0/1 | 0/1 (1 n/a) |" in md
    assert f"- resnet18: save_load: {results['save_load']}" in md
    assert "- resnet18: export: dense fails too (RuntimeError)" in md
    assert "1 function failure(s)" in md


@pytest.fixture(scope="module")
def training():
    yield from _load("training")


def test_training_benchmark_steps_under_each_rule_and_tabulates_them(training):
    """The inference rule's steps run with the training rule off, which comes back on even
    where a step raises; a layer row names each rule's path and its time over the fastest;
    the single-layer timing runs a real forward and backward on each path (tiny layers)."""
    from tieify.nn import _paths

    seen = []
    step = training.as_inference_rule(lambda: seen.append(_paths._TRAINING_RULE))
    step()
    assert seen == [False] and _paths._TRAINING_RULE

    def boom():
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        training.as_inference_rule(boom)()
    assert _paths._TRAINING_RULE
    saved, training.LAYERS = training.LAYERS, [(8, 16, 4, 1, 1, 2, 2), (8, 8, 6, 3, 2, 2, 2)]
    try:
        layers = training.layer_rows(argparse.Namespace(rounds=1))
    finally:
        training.LAYERS = saved
    assert [(r["k"], r["layout"]) for r in layers] == [
        (1, "nchw"), (1, "channels_last"), (3, "nchw"), (3, "channels_last")
    ]  # fmt: skip
    for r in layers:
        assert r["fastest"] in r["ms"] and r["training_rule"] in r["ms"]
        assert r["ms"][r["fastest"]] == min(r["ms"].values()) > 0
    assert layers[3]["training_rule"] == "grouped"  # strided k×k, channels-last
    row = {"case": "r50", "layout": "nchw", "batch": 8, "training_ms": 400.0}
    row |= {"inference_ms": 520.0, "inference_over_training": 1.3004}
    res = {"threads": 2, "rounds": 1, "torch": "t", "machine": "m", "loadavg_start": [0],
           "loadavg_end": [0], "rows": [row], "layers": layers}  # fmt: skip
    text = training.markdown(res)
    assert "| r50 | nchw | 8 | 400.0 | 520.0 | 1.300 |" in text
    fastest = layers[0]["ms"][layers[0]["fastest"]]
    rule = layers[0]["ms"][layers[0]["training_rule"]]
    assert f"| {layers[0]['training_rule']} | {rule / fastest:.2f} |" in text


@pytest.fixture(scope="module")
def pointwise_paths():
    yield from _load("pointwise_paths")


def test_path_tables_name_the_rule_for_inference(pointwise_paths, capsys):
    """The paths are timed for inference, so the table's rule column is the rule for
    inference, not the training rule a layer in training mode would get under autograd: a
    wide pointwise layer on a small channels-last input (72 pixels, 73,728 output elements)
    is a GEMM for inference where the BLAS keeps up with oneDNN, as the suite has it on every
    host (too few pixels for the kernel or widen), and widened in training (from 65,536
    output elements)."""
    from tieify.nn import TiedConv2d, _paths

    def make(ci, co, B):
        return TiedConv2d(ci, co, 1, B=B, bias=False)

    args = argparse.Namespace(batches=[2], rounds=1)
    pointwise_paths.table(args, [(1024, 1024, 6)], ("gemm", "widen"), make)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")]
    x = torch.randn(2, 1024, 6, 6).contiguous(memory_format=torch.channels_last)
    layer = make(1024, 1024, 2)
    with torch.inference_mode():
        assert _paths.default_path(layer, x) == "gemm"
    assert _paths.default_path(layer, x.requires_grad_()) == "widen"
    assert len(rows) == 3 and all(row.endswith("| gemm |") for row in rows)
