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


def run(cmd: list[str], env: dict[str, str], label: str, timeout: float = 240) -> None:
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    WALL[label] = time.monotonic() - start
    assert proc.returncode == 0, f"{label} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"


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
    for te, tr in zip(t_emb, t_ray):
        # Budgets reached Optuna as constraints (Ray's OptunaSearch alone drops them).
        assert tr.constraints.keys() == te.constraints.keys() and tr.constraints
        assert tr.user_attrs.keys() == te.user_attrs.keys()
        assert tr.user_attrs["plan"] == te.user_attrs["plan"]
        assert tr.user_attrs["params"] == te.user_attrs["params"]
        assert tr.user_attrs["macs"] == te.user_attrs["macs"]
        assert len(tr.values) == len(te.values)

    for name in RESULT_FILES:
        assert (ray_out / name).is_file(), name
        assert (emb / name).is_file(), name
    assert csv_header(ray_out / "trials.csv") == csv_header(emb / "trials.csv")
    for name in ("pareto.json", "best_plan.json"):
        a = json.loads((emb / name).read_text())
        b = json.loads((ray_out / name).read_text())
        assert keys_tree(b) == keys_tree(a), name
    assert (ray_out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    events = read_events(ray_out)
    assert done_counts(events) == {n: 1 for n in range(TRIALS)}
    assert max_running(events) <= 2
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
    proc = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        def some_done():
            study_file = out / "study.journal"
            if not study_file.exists():
                return None
            done = [
                t for t in load_study(out).get_trials() if t.state.is_finished()
            ]
            return done or None

        wait_for(some_done, proc, 180, "a trial to complete")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    before = {t.number: t for t in load_study(out).get_trials() if t.state.is_finished()}
    assert before and len(before) < TRIALS

    run(cmd + ["--resume"], cluster.env, "ray resume")

    trials = load_study(out).get_trials()
    for number, t in before.items():  # kept, unchanged
        assert trials[number].state == t.state
        assert trials[number].values == t.values
        assert trials[number].datetime_complete == t.datetime_complete
    counted = [t for t in trials if not str(t.user_attrs.get("failed_reason", "")).startswith(
        "interrupted"
    )]
    assert len(counted) == TRIALS
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
    events = read_events(out)
    assert all(c == 1 for c in done_counts(events).values()), events
    assert set(done_counts(events)) == {t.number for t in counted}
