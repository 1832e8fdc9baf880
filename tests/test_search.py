"""End-to-end search on a tiny model: files, front, constraints, failures, replay."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from _search_helpers import tiny_recipe

from tieify import SearchError
from tieify.search import load_recipe, search
from tieify.search._objective import Evaluator
from tieify.search._space import replay
from tieify.search._study import open_study, run_study


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _rows(out: Path) -> list[dict]:
    with (out / "trials.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_two_trial_search_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = search(_write(tmp_path, tiny_recipe()), out_dir=out, trials=2, progress=False)
    for name in (
        "pareto.json",
        "trials.csv",
        "pareto.png",
        "report.md",
        "best_plan.json",
        "study.journal",
    ):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(out)
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    assert summary["trials"] == 2 and summary["front"]
    on_disk = json.loads((out / "pareto.json").read_text())
    assert on_disk["front"] == json.loads(json.dumps(summary["front"], default=str))
    assert "Feasible Pareto front" in (out / "report.md").read_text()

    # Each front point replays: same plan -> same tied model, weights load, same accuracy.
    r = load_recipe(out.parent / "recipe.yaml", {})
    ev = Evaluator(r, out, log=False)  # reuses the cached baseline
    for point in summary["front"]:
        folder = out / point["plan_file"].rsplit("/", 1)[0]
        plan = json.loads((folder / "best_plan.json").read_text())
        tied = replay(ev.dense, plan)
        tied.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
        from tieify.search._train import accuracy

        assert accuracy(tied, ev.data.val) == pytest.approx(point["accuracy"])
        n = sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())
        assert n == point["params"]


def test_constraints_are_honoured(tmp_path: Path) -> None:
    raw = tiny_recipe(budgets={"max_params": 2500}, search={"space": "uniform"})
    out = tmp_path / "out"
    summary = search(_write(tmp_path, raw), out_dir=out, trials=6, progress=False, seed=1)
    rows = [r for r in _rows(out) if r["state"] == "COMPLETE"]
    params = [int(r["params"]) for r in rows]
    # the run saw both kinds of candidates, and only feasible ones reach the front
    assert any(p > 2500 for p in params) and any(p <= 2500 for p in params)
    assert all((r["feasible"] == "True") == (int(r["params"]) <= 2500) for r in rows)
    assert summary["front"]
    assert all(p["params"] <= 2500 and p["violation"] == 0 for p in summary["front"])
    assert summary["feasible"] == sum(p <= 2500 for p in params)


def test_no_feasible_point_lists_closest(tmp_path: Path, capsys) -> None:
    raw = tiny_recipe(budgets={"max_params": 10})
    out = tmp_path / "out"
    summary = search(_write(tmp_path, raw), out_dir=out, trials=2, progress=True)
    text = capsys.readouterr().out
    assert summary["front"] == [] and len(summary["closest"]) >= 1
    assert "No feasible point" in text and "closest" in text
    assert json.loads((out / "best_plan.json").read_text()) == {}
    assert "No feasible point" in (out / "report.md").read_text()


def test_failed_trials_are_recorded_and_study_goes_on(tmp_path: Path) -> None:
    space = tmp_path / "bad_space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "type": "custom",
                "decisions": [{"name": "B_layer1", "layers": ["layer1.*"], "choices": [3]}],
            }
        )
    )
    raw = tiny_recipe(search={"space": str(space)})
    out = tmp_path / "out"
    summary = search(_write(tmp_path, raw), out_dir=out, trials=2, progress=False)
    rows = _rows(out)
    assert [r["state"] for r in rows] == ["FAIL", "FAIL"]
    assert all(r["failed_reason"].startswith("unbuildable plan:") for r in rows)
    assert "B=3" in rows[0]["failed_reason"]
    assert len(summary["failed"]) == 2 and summary["front"] == []


def test_diverging_trial_is_recorded(tmp_path: Path) -> None:
    r = load_recipe(_write(tmp_path, tiny_recipe()), {})
    ev = Evaluator(r, tmp_path / "out", log=False)
    # the same evaluator, now fine-tuning with an absurd learning rate
    ev.recipe = dataclasses.replace(r, train=dataclasses.replace(r.train, lr=1e12, momentum=0.0))
    study = open_study(r, None, "diverge", False)
    run_study(study, ev, trials=2, progress=False)
    trials = study.get_trials()
    assert len(trials) == 2
    assert {t.state.name for t in trials} == {"FAIL"}
    assert all("diverged" in t.user_attrs["failed_reason"] for t in trials)


def test_existing_study_needs_resume(tmp_path: Path) -> None:
    path = _write(tmp_path, tiny_recipe())
    out = tmp_path / "out"
    search(path, out_dir=out, trials=1, progress=False)
    with pytest.raises(
        SearchError, match="already holds study 'tieify-tiny' with 1 trial.*--resume"
    ):
        search(path, out_dir=out, trials=2, progress=False)
    summary = search(path, out_dir=out, trials=2, resume=True, progress=False)
    assert summary["trials"] == 2


def test_ray_backend_without_ray_or_unknown_backend(tmp_path: Path) -> None:
    with pytest.raises(SearchError, match="backend must be one of optuna, ray"):
        search(None, backend="dask", out_dir=tmp_path)


def test_single_objective_reports_intermediate_accuracy(tmp_path: Path) -> None:
    raw = tiny_recipe(
        train={"epochs": 2},
        search={"objectives": ["accuracy"], "pruner": "median", "sampler": "tpe"},
    )
    out = tmp_path / "out"
    summary = search(
        _write(tmp_path, raw),
        out_dir=out,
        trials=2,
        progress=False,
        storage=f"sqlite:///{tmp_path / 'study.db'}",
    )
    assert (tmp_path / "study.db").is_file() and not (out / "study.journal").exists()
    import optuna

    study = optuna.load_study(
        study_name="tieify-tiny", storage=f"sqlite:///{tmp_path / 'study.db'}"
    )
    for t in study.get_trials():
        # one report per fine-tuning epoch; the last one is the final accuracy
        assert sorted(t.intermediate_values) == [1, 2]
        assert t.intermediate_values[2] == pytest.approx(t.user_attrs["accuracy"])
    assert summary["directions"] == ["maximize"] and len(summary["front"]) == 1


def test_user_evaluate_fn_replaces_fine_tuning(tmp_path: Path) -> None:
    seen = []

    def evaluate(model: torch.nn.Module) -> float:
        seen.append(sum(p.numel() for p in model.parameters()))
        return 0.25

    summary = search(
        _write(tmp_path, tiny_recipe()),
        out_dir=tmp_path / "o",
        trials=2,
        progress=False,
        evaluate_fn=evaluate,
    )
    assert all(p["accuracy"] == 0.25 for p in summary["front"])
    assert summary["baseline"]["accuracy"] == 0.25
    assert len(seen) >= 2  # the dense model and each distinct candidate


def _error_under_ctrl_c() -> FileNotFoundError:
    """What a library's cleanup raises when a Ctrl-C lands in it (seen from Optuna's
    journal lock): its own error, with the KeyboardInterrupt as context."""
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise FileNotFoundError("study.journal.lock.rename") from None
    except FileNotFoundError as exc:
        return exc


def test_interrupted_sees_a_ctrl_c_behind_a_cleanup_error() -> None:
    from tieify.search._study import interrupted

    err = _error_under_ctrl_c()
    assert err.__context__.__class__ is KeyboardInterrupt
    assert interrupted(err) and interrupted(KeyboardInterrupt())
    assert not interrupted(FileNotFoundError("x")) and not interrupted(ValueError("x"))


@pytest.mark.parametrize("error", ["ctrl_c", "cleanup_error_under_ctrl_c", "plain_error"])
def test_ctrl_c_in_a_trial_stops_the_search_and_keeps_results(tmp_path: Path, error) -> None:
    calls = []

    def evaluate(model: torch.nn.Module) -> float:
        calls.append(1)
        if len(calls) == 3:  # the dense baseline, trial 0, then trial 1 is interrupted
            if error == "ctrl_c":
                raise KeyboardInterrupt
            raise _error_under_ctrl_c() if error != "plain_error" else FileNotFoundError("x")
        return 0.5

    out = tmp_path / "o"
    kwargs = {"out_dir": out, "trials": 3, "progress": False, "evaluate_fn": evaluate}
    if error == "plain_error":  # an ordinary error fails that trial only
        summary = search(_write(tmp_path, tiny_recipe()), **kwargs)
        assert [r["state"] for r in _rows(out)] == ["COMPLETE", "FAIL", "COMPLETE"]
        assert summary["trials"] == 3
        return
    with pytest.raises(KeyboardInterrupt):
        search(_write(tmp_path, tiny_recipe()), **kwargs)
    rows = _rows(out)  # written on the way out
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL"]
    assert rows[1]["failed_reason"].startswith("interrupted:")
    assert (out / "pareto.json").is_file()


def test_timeout_stops_before_the_next_trial(tmp_path: Path) -> None:
    summary = search(
        _write(tmp_path, tiny_recipe()),
        out_dir=tmp_path / "o",
        trials=5,
        timeout=1e-9,
        progress=False,
    )
    assert summary["trials"] == 0 and summary["front"] == [] and summary["closest"] == []
    assert (tmp_path / "o" / "pareto.json").is_file()


def test_same_recipe_same_results(tmp_path: Path) -> None:
    """Seeded initialization, splits, shuffling and sampler: two runs agree on every metric."""
    path = _write(tmp_path, tiny_recipe())
    a = search(path, out_dir=tmp_path / "a", trials=2, progress=False)
    b = search(path, out_dir=tmp_path / "b", trials=2, progress=False)
    assert a["baseline"]["accuracy"] == b["baseline"]["accuracy"]
    # Every trial, not just the front: which points are on the front also depends on the
    # measured latency, which moves with the machine's load (two candidates of equal
    # accuracy swap places when their latencies do).
    keys = ("decisions", "accuracy", "params", "macs")
    rows_a, rows_b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert len(rows_a) == 2
    assert [{k: r[k] for k in keys} for r in rows_a] == [{k: r[k] for k in keys} for r in rows_b]
    da = torch.load(next((tmp_path / "a" / "baseline").glob("dense-*.pt")), weights_only=True)
    db = torch.load(next((tmp_path / "b" / "baseline").glob("dense-*.pt")), weights_only=True)
    for k in da:
        torch.testing.assert_close(da[k], db[k], rtol=0, atol=0)


def test_baseline_timed_on_another_machine_is_flagged(tmp_path: Path, monkeypatch, caplog) -> None:
    """A search resumed on another machine keeps its baseline and finished trials, and says
    that their latencies were timed elsewhere."""
    from tieify.latency import _machine

    r = load_recipe(_write(tmp_path, tiny_recipe()), {})
    first = Evaluator(r, tmp_path / "a", log=False)
    assert first.baseline["machine"] == _machine.machine_key("cpu")
    (saved,) = (tmp_path / "a" / "baseline").glob("baseline-*.json")
    before = saved.read_text()
    with caplog.at_level(logging.WARNING, logger="tieify.search"):
        Evaluator(r, tmp_path / "a", log=False)  # same machine: silent
    assert not [m for m in caplog.messages if "another machine" in m]
    monkeypatch.setattr(_machine, "_cpu_key", lambda: "Other CPU | x86_64 | AVX2 | 2 CPUs")
    with caplog.at_level(logging.WARNING, logger="tieify.search"):
        resumed = Evaluator(r, tmp_path / "a", log=False)
    (warning,) = [m for m in caplog.messages if "another machine" in m]
    assert first.baseline["machine"] in warning and "Other CPU" in warning
    assert resumed.baseline == first.baseline and saved.read_text() == before  # kept as is


def test_latency_mode_auto_predicts_once_the_table_is_warm(tmp_path: Path, monkeypatch) -> None:
    from tieify.latency import is_warm, predict_latency

    monkeypatch.setenv("TIEIFY_CACHE_DIR", str(tmp_path / "cache"))
    r = load_recipe(_write(tmp_path, tiny_recipe()), {})
    assert r.latency.mode == "auto"
    threads = r.latency.threads
    # A machine that never predicted this model measures, and the baseline says so.
    cold = Evaluator(r, tmp_path / "a", log=False)
    assert cold.latency_mode == "measured"
    assert cold.baseline["latency_mode"] == "measured"
    assert not is_warm(cold.dense, cold.latency_input, threads=threads)
    # Once a prediction filled the table for the dense model, a new search predicts.
    predict_latency(cold.dense, cold.latency_input, threads=threads)
    assert is_warm(cold.dense, cold.latency_input, threads=threads)
    warm = Evaluator(r, tmp_path / "b", log=False)
    assert warm.latency_mode == "predicted"
    expected = predict_latency(warm.dense, warm.latency_input, threads=threads)  # lookups only
    assert warm.baseline["latency_ms"] == round(1000.0 * expected, 5)
    # The first search keeps the mode its baseline recorded (a resumed run, Ray workers),
    # and a baseline from before modes were recorded counts as measured.
    assert Evaluator(r, tmp_path / "a", log=False).latency_mode == "measured"
    (old_baseline,) = (tmp_path / "a" / "baseline").glob("baseline-*.json")
    raw = json.loads(old_baseline.read_text())
    del raw["latency_mode"]
    old_baseline.write_text(json.dumps(raw))
    assert Evaluator(r, tmp_path / "a", log=False).latency_mode == "measured"
    # An explicit mode wins over the table.
    explicit = dataclasses.replace(r, latency=dataclasses.replace(r.latency, mode="measured"))
    assert Evaluator(explicit, tmp_path / "c", log=False).latency_mode == "measured"


def test_side_by_side_ms_is_the_fastest_round_and_the_ratio_the_rounds_median(
    monkeypatch,
) -> None:
    from tieify.latency import _predict
    from tieify.search import _objective

    calls = []

    def fake(models, x, **kwargs):
        calls.append((sorted(models), kwargs))
        # Per round: 4/8, 2/2, 3/6 -> ratios 0.5, 1.0, 0.5, median 0.5 (the fastest rounds'
        # ratio would be 2/2 = 1.0); the model's fastest round is 2 ms (its median 3 ms).
        return {"model": [4e-3, 2e-3, 3e-3], "dense": [8e-3, 2e-3, 6e-3]}

    monkeypatch.setattr(_predict, "measure_side_by_side", fake)
    tied, dense = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ms, ratio = _objective._side_by_side_ms(tied, dense, torch.randn(1, 2), 1, 3, 1)
    assert (ms, ratio) == (2.0, 0.5)
    assert calls == [
        (["dense", "model"], {"repeats": 3, "threads": 1, "warmup": 1, "sample_seconds": 0.005})
    ]


def test_latency_ratio_metric_and_budget(tmp_path: Path, monkeypatch) -> None:
    from tieify.latency import predict_latency

    monkeypatch.setenv("TIEIFY_CACHE_DIR", str(tmp_path / "cache"))
    raw = tiny_recipe(budgets={"max_latency_ratio": 0.8})
    r = load_recipe(_write(tmp_path, raw), {"latency.mode": "measured"})
    ev = Evaluator(r, tmp_path / "m", log=False)
    assert ev.baseline["latency_ratio"] == 1.0
    assert ev.constraint_names == ["max_latency_ratio"]
    # The budget is a relative overshoot of the ratio: 0.6 / 0.8 - 1 and 1.0 / 0.8 - 1.
    assert ev.constraints({"accuracy": 0.5, "latency_ratio": 0.6}) == [-0.25]
    assert ev.constraints({"accuracy": 0.5, "latency_ratio": 1.0}) == [0.25]
    params = {d.name: 4 for d in ev.space.decisions}
    measured = ev.evaluate(params)
    assert math.isfinite(measured["latency_ratio"]) and measured["latency_ratio"] > 0
    # Predicted: the ratio of the candidate's prediction to the dense model's (lookups once
    # the table holds both), whatever the machine does meanwhile.
    predicted_recipe = load_recipe(_write(tmp_path, raw), {"latency.mode": "predicted"})
    ev = Evaluator(predicted_recipe, tmp_path / "p", log=False)
    metrics = ev.evaluate(params)
    tied = replay(ev.dense, metrics["plan"])
    threads = predicted_recipe.latency.threads
    p_tied = predict_latency(tied, ev.latency_input, threads=threads)
    p_dense = predict_latency(ev.dense, ev.latency_input, threads=threads)
    assert metrics["latency_ms"] == round(1000.0 * p_tied, 5)
    assert metrics["latency_ratio"] == pytest.approx(p_tied / p_dense, rel=1e-4)
    # The search writes it to the trials table beside latency_ms.
    out = tmp_path / "out"
    search(_write(tmp_path, raw), out_dir=out, trials=2, progress=False)
    rows = _rows(out)
    assert all(float(row["latency_ratio"]) > 0 for row in rows)
    assert all((row["feasible"] == "True") == (float(row["latency_ratio"]) <= 0.8) for row in rows)
    assert "x dense" in (out / "report.md").read_text()


def test_front_table_keeps_decisions_and_numbers_whole_in_80_columns() -> None:
    from rich.console import Console

    from tieify.search._results import print_front

    point = {
        "index": 0,
        "trial": 32,
        "decisions": {"B_layer1": 1, "B_layer2": 2, "B_layer3": 4},
        "accuracy": 0.9916,
        "accuracy_drop": 0.0028,
        "latency_ms": 0.522,
        "latency_ratio": 0.909,
        "params": 24282,
        "macs": 2480000,
    }
    summary = {"front": [point], "closest": [], "trials": 40, "baseline": {}}
    console = Console(width=80, record=True)
    print_front(summary, console)
    text = console.export_text()
    for word in ("layer1=1", "layer2=2", "layer3=4", "99.16%", "0.522", "0.909x", "24.28k"):
        assert word in text, word
    assert "2.48M" in text and "…" not in text
