"""A search killed with SIGKILL mid-study resumes with --resume and keeps its trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from _search_helpers import tiny_recipe

#: Trials the resumed search adds to those completed before the kill.
EXTRA_TRIALS = 3


def _study(out: Path) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    return optuna.load_study(study_name="tieify-tiny", storage=storage)


def _complete(out: Path) -> list[optuna.trial.FrozenTrial]:
    if not (out / "study.journal").is_file():
        return []
    try:
        trials = _study(out).get_trials()
    except KeyError:  # study not created yet
        return []
    return [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]


def test_resume_after_sigkill(tmp_path: Path) -> None:
    # epochs: 3 so that a trial is in flight most of the time when the kill lands
    raw = tiny_recipe(train={"epochs": 3}, data={"max_train_samples": 256})
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tieify", "search", str(recipe), "--out", str(out), "--quiet"]
    cmd += ["--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Far more trials than can finish before the kill lands: trials of this tiny recipe take
    # tenths of a second, and a study of 6 sometimes finished before the kill landed.
    proc = subprocess.Popen(
        cmd + ["--trials", "1000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 240
    try:
        while len(_complete(out)) < 2:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no 2 trials completed in time"
            time.sleep(0.05)
        time.sleep(0.3)  # let the next trial start
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {t.number: (t.params, t.values) for t in _complete(out)}
    assert 2 <= len(before) < 1000
    total = len(before) + EXTRA_TRIALS  # --trials counts the study's trials, old and new

    again = subprocess.run(
        cmd + ["--trials", str(total), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    trials = _study(out).get_trials()
    after = {t.number: (t.params, t.values) for t in trials if t.state.name == "COMPLETE"}
    # every trial completed before the kill is kept, unchanged
    assert all(after[n] == v for n, v in before.items())
    interrupted = [t for t in trials if t.state.name == "FAIL"]
    assert all(t.user_attrs["failed_reason"].startswith("interrupted") for t in interrupted)
    assert len(interrupted) <= 1  # at most the trial in flight is lost
    assert len(after) == total
    assert len(trials) == total + len(interrupted)


def test_ctrl_c_writes_results_so_far(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "tieify",
        "search",
        str(recipe),
        "--trials",
        "1000",
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    try:
        while not _complete(out):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted: results so far written" in output
    summary = json.loads((out / "pareto.json").read_text())
    assert 1 <= summary["states"]["COMPLETE"] < 1000
