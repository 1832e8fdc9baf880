"""Ray Tune backend of ``tieify search`` on a real local Ray cluster (no mocks).

One 2-CPU head node is started per module with ``ray start --head`` on 127.0.0.1 (free ports,
own temp dir) and stopped with ``ray stop --force`` even when a test fails. Every search is
the real ``tieify search`` CLI, as a subprocess, joining that cluster with ``--ray-address``:
4 trials, 2 at once, on a tiny recipe (tiny model, tiny data, 1 epoch).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
optuna = pytest.importorskip("optuna")

from ray_fixtures import (  # noqa: E402
    Cluster,
    read_events,
    start_cluster,
    wait_for,
    write_tiny_recipe,
)

pytestmark = pytest.mark.slow

TRIALS = 4
RESULT_FILES = ("pareto.json", "trials.csv", "pareto.png", "report.md", "best_plan.json")
WALL: dict[str, float] = {}


@pytest.fixture(scope="module")
def cluster():
    yield from start_cluster()


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    return write_tiny_recipe(tmp_path_factory.mktemp("recipe"))


def search_cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tieify",
        "search",
        str(recipe),
        "--trials",
        str(TRIALS),
        "--seed",
        "0",
        "--out",
        str(out),
        *extra,
    ]


def ray_args(cluster: Cluster) -> list[str]:
    return [
        "--backend",
        "ray",
        "--ray-address",
        cluster.address,
        "--max-concurrent",
        "2",
        "--cpus-per-trial",
        "1",
    ]


def run(cmd: list[str], env: dict[str, str], label: str, timeout: float = 240) -> str:
    """Run a search to completion; returns its stderr (log lines)."""
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    WALL[label] = time.monotonic() - start
    assert proc.returncode == 0, f"{label} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.stderr


def load_study(out: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    (name,) = optuna.study.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def keys_tree(obj):
    """The nested key structure of a JSON value (lists: the structure of their first item)."""
    if isinstance(obj, dict):
        return {k: keys_tree(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list):
        return [keys_tree(obj[0])] if obj else []
    return type(obj).__name__ if obj is not None else None


def csv_header(path: Path) -> list[str]:
    with path.open(newline="") as fh:
        return next(csv.reader(fh))


def done_counts(events: list[dict]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for e in events:
        if e["event"] == "done":
            counts[e["trial"]] = counts.get(e["trial"], 0) + 1
    return counts


def max_running(events: list[dict]) -> int:
    running: set[tuple[int, int]] = set()
    peak = 0
    for e in sorted(events, key=lambda e: e["time"]):
        if e["event"] == "start":
            running.add((e["trial"], e["pid"]))
        elif e["event"] == "done":
            running = {r for r in running if r[0] != e["trial"]}
        peak = max(peak, len(running))
    return peak


# ------------------------------------------------------------------------------------------


def test_ray_matches_embedded_backend(cluster: Cluster, recipe: Path, tmp_path: Path) -> None:
    """Same recipe and seed: same first candidates, same store content, same output schema."""
    emb, ray_out = tmp_path / "embedded", tmp_path / "ray"
    run(search_cmd(recipe, emb), cluster.env, "embedded")
    run(search_cmd(recipe, ray_out, *ray_args(cluster)), cluster.env, "ray")

    s_emb, s_ray = load_study(emb), load_study(ray_out)
    t_emb, t_ray = s_emb.get_trials(), s_ray.get_trials()
    assert len(t_emb) == len(t_ray) == TRIALS
    assert [t.state for t in t_ray] == [optuna.trial.TrialState.COMPLETE] * TRIALS
    # The sampler proposes the same candidates, trial by trial (Ray asks two at once).
    assert [t.params for t in t_ray] == [t.params for t in t_emb]
    assert s_ray.directions == s_emb.directions
    for te, tr in zip(t_emb, t_ray, strict=True):
        # Budgets reached Optuna as constraints (Ray's OptunaSearch alone drops them).
        assert tr.constraints.keys() == te.constraints.keys() and tr.constraints
        # Same stored metrics (an embedded trial may reuse an identical earlier candidate's).
        skip = {"reused_from", "seconds"}
        assert tr.user_attrs.keys() - skip == te.user_attrs.keys() - skip
        assert tr.user_attrs["plan"] == te.user_attrs["plan"]
        assert tr.user_attrs["params"] == te.user_attrs["params"]
        assert tr.user_attrs["macs"] == te.user_attrs["macs"]
        assert len(tr.values) == len(te.values)

    for name in RESULT_FILES:
        assert (ray_out / name).is_file(), name
        assert (emb / name).is_file(), name
    front = json.loads((ray_out / "pareto.json").read_text())["front"]
    assert front  # the budget (max_params) leaves feasible candidates
    for point in front:
        assert (ray_out / point["plan_file"]).is_file()
        assert s_ray.trials[point["trial"]].constraints  # feasible by its stored constraints
        assert all(v <= 0 for v in s_ray.trials[point["trial"]].constraints.values())
    assert csv_header(ray_out / "trials.csv") == csv_header(emb / "trials.csv")
    a = json.loads((emb / "pareto.json").read_text())
    b = json.loads((ray_out / "pareto.json").read_text())
    assert b.keys() == a.keys()
    assert b["front"][0].keys() == a["front"][0].keys()
    assert b["baseline"].keys() == a["baseline"].keys()
    assert (b["objectives"], b["directions"], b["budgets"]) == (
        a["objectives"],
        a["directions"],
        a["budgets"],
    )
    plan_a = json.loads((emb / "best_plan.json").read_text())
    plan_b = json.loads((ray_out / "best_plan.json").read_text())
    assert keys_tree(plan_b).keys() == keys_tree(plan_a).keys()
    assert (ray_out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    events = read_events(ray_out)
    assert done_counts(events) == {n: 1 for n in range(TRIALS)}
    assert max_running(events) == 2  # --max-concurrent 2 on 2 CPUs: two at once, never more

    # One store for both backends: Ray continues the embedded study (--resume, one more trial).
    run(
        search_cmd(recipe, emb, *ray_args(cluster), "--resume", "--trials", str(TRIALS + 1)),
        cluster.env,
        "ray resumes embedded",
    )
    grown = load_study(emb).get_trials()
    assert len(grown) == TRIALS + 1 and grown[-1].state == optuna.trial.TrialState.COMPLETE
    assert [(t.params, t.values) for t in grown[:TRIALS]] == [(t.params, t.values) for t in t_emb]
    print(f"\nwall time, {TRIALS} trials: " + ", ".join(f"{k} {v:.1f}s" for k, v in WALL.items()))


def test_killed_worker_is_retried(cluster: Cluster, recipe: Path, tmp_path: Path) -> None:
    """SIGKILL one trial's worker process mid-trial: Ray retries it, the search completes."""
    out = tmp_path / "fault"
    proc = subprocess.Popen(
        search_cmd(recipe, out, *ray_args(cluster), "--max-failures", "2"),
        env=cluster.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def running_trial():
            events = read_events(out)
            done = {e["trial"] for e in events if e["event"] == "done"}
            starts = [e for e in events if e["event"] == "start" and e["trial"] not in done]
            return starts[0] if starts else None

        victim = wait_for(running_trial, proc, 180, "a trial to start")
        os.kill(victim["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]

    events = read_events(out)
    starts = [e for e in events if e["event"] == "start" and e["trial"] == victim["trial"]]
    assert len(starts) >= 2, events  # the killed attempt and its retry
    assert starts[-1]["pid"] != victim["pid"]
    assert done_counts(events) == {n: 1 for n in range(TRIALS)}
    trials = load_study(out).get_trials()
    assert len(trials) == TRIALS
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    print(f"\nfault test killed pid {victim['pid']} running trial {victim['trial']}")


def test_killed_driver_resumes(cluster: Cluster, recipe: Path, tmp_path: Path) -> None:
    """SIGKILL the driver mid-search, rerun with --resume: nothing completed is lost or rerun."""
    out = tmp_path / "resume"
    cmd = search_cmd(recipe, out, *ray_args(cluster))
    proc = subprocess.Popen(
        cmd, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:

        def some_done():
            if not (out / "study.journal").exists():
                return None
            try:
                trials = load_study(out).get_trials()
            except ValueError:  # the journal exists, the study is not created yet
                return None
            return [t for t in trials if t.state.is_finished()] or None

        # Reading the journal costs CPU the search needs: poll it 5 times a second.
        wait_for(some_done, proc, 180, "a trial to complete", interval=0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    killed_at = time.time()
    old_pids = {e["pid"] for e in read_events(out)}  # the dead driver's workers
    before = {t.number: t for t in load_study(out).get_trials() if t.state.is_finished()}
    assert before and len(before) < TRIALS

    log = run(cmd + ["--resume"], cluster.env, "ray resume")
    assert "resuming Ray Tune experiment" in log  # Tuner.restore, not a fresh Tune run

    trials = load_study(out).get_trials()
    for number, t in before.items():  # kept, unchanged
        assert trials[number].state == t.state
        assert trials[number].values == t.values
        assert trials[number].datetime_complete == t.datetime_complete
    counted = [
        t
        for t in trials
        if not str(t.user_attrs.get("failed_reason", "")).startswith("interrupted")
    ]
    assert len(counted) == TRIALS
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
    # Trials the store had finished were not trained again (a restored one reports "skip");
    # a trial whose worker finished but whose result the dead driver never recorded is run
    # again, which is right: the store never had it.
    events = read_events(out)
    after = [e for e in events if e["time"] > killed_at and e["pid"] not in old_pids]
    assert after  # the resumed run did work
    assert not [e for e in after if e["event"] == "start" and e["trial"] in before], events
    assert all(c == 1 for c in done_counts(after).values()), events
    assert {t.number for t in counted} <= set(done_counts(events))


def test_single_objective_reports_to_optuna_with_asha(cluster: Cluster, tmp_path: Path) -> None:
    """One objective: ASHA may stop trials; Optuna gets every intermediate accuracy; the
    store is an Optuna storage URL (what optuna-dashboard opens)."""
    recipe = write_tiny_recipe(tmp_path, single_objective=True)
    out, url = tmp_path / "single", f"sqlite:///{tmp_path / 'study.db'}"
    run(search_cmd(recipe, out, *ray_args(cluster), "--storage", url), cluster.env, "ray single")

    study = optuna.load_study(study_name="tieify-ray-tiny-single", storage=url)
    assert [d.name for d in study.directions] == ["MAXIMIZE"]
    trials = study.get_trials()
    assert len(trials) == TRIALS
    states = {t.state for t in trials}
    assert states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert optuna.trial.TrialState.COMPLETE in states  # ASHA always lets the first one finish
    trained = [t for t in trials if "reused_from" not in t.user_attrs]
    assert trained  # a candidate equal to a completed one reuses its metrics, as embedded
    for t in trained:
        steps = sorted(t.intermediate_values)
        assert steps and all(0.0 <= v <= 1.0 for v in t.intermediate_values.values())
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert len(steps) == 2  # train.epochs: one report per epoch
        else:
            assert t.user_attrs["pruned"] is True
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert 0.0 <= t.values[0] <= 1.0 and t.constraints
    assert (out / "pareto.json").is_file() and (out / "trials.csv").is_file()


def test_without_ray_the_cli_says_how_to_install(recipe: Path, tmp_path: Path) -> None:
    """Ray unimportable (as without the extra): one-line error naming the pip command."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from tieify.cli import main\n"
        f"sys.exit(main({search_cmd(recipe, tmp_path / 'out', '--backend', 'ray')[3:]!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("tieify search: error: backend='ray' needs Ray Tune")
    assert "pip install 'tieify[ray]'" in lines[-1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpus_per_trial": 0}, "cpus_per_trial must be > 0"),
        ({"gpus_per_trial": -1}, "gpus_per_trial must be >= 0"),
        ({"max_concurrent": 0}, "max_concurrent must be None"),
        ({"max_failures": -2}, "max_failures must be an integer >= 0"),
    ],
)
def test_bad_ray_settings_fail_before_any_work(
    recipe: Path, tmp_path: Path, kwargs: dict, message: str
) -> None:
    from tieify import SearchError
    from tieify.search import search

    with pytest.raises(SearchError, match=message):
        search(str(recipe), backend="ray", out_dir=tmp_path, trials=2, progress=False, **kwargs)
    assert not (tmp_path / "study.journal").exists()


def test_the_searcher_pickles_a_sampler_that_holds_a_thread_lock():
    """Tune pickles the searcher when the Tuner is made (tuner.pkl) and in its checkpoints;
    Optuna 5.1's NSGA-II sampler holds a threading lock, which pickle refuses. The pickle
    carries the sampler without it: the copy has an unheld lock of its own and proposes the
    same candidates as the original."""
    import threading

    from ray import cloudpickle

    from tieify.search._ray_searcher import TieifyOptunaSearch

    sampler = optuna.samplers.NSGAIISampler(seed=3, population_size=4)
    sampler._test_lock = threading.Lock()  # as 5.1's own, whichever Optuna runs here
    with sampler._test_lock:
        copied = cloudpickle.loads(cloudpickle.dumps(TieifyOptunaSearch(sampler, False)))
    other = copied._tieify_sampler
    assert type(other) is optuna.samplers.NSGAIISampler and other is not sampler
    assert other._test_lock is not sampler._test_lock and not other._test_lock.locked()

    def proposals(s):
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=s)
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_int("b", 1, 8)), 10)
        return [t.params for t in study.trials]

    assert proposals(other) == proposals(sampler)
