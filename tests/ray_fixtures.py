"""A real local Ray cluster for tests: ``ray start --head`` on 127.0.0.1 and free ports.

Used by tests/test_ray.py. The cluster lives in its own short temp dir (Unix socket paths are
limited to ~100 characters) and is stopped with ``ray stop --force`` even when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Explicit, so that a ~/.ray/auth_token left by an earlier local ray.init() does not turn
    # token authentication on for the cluster but not for the drivers (loopback only here).
    "RAY_AUTH_MODE": "disabled",
    "RAY_DEDUP_LOGS": "0",
    # Tune's Rich/AIR console tables are noise in captured test output.
    "RAY_AIR_NEW_OUTPUT": "0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_bin() -> str:
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.exists() else (shutil.which("ray") or "ray")


@dataclass
class Cluster:
    address: str
    temp_dir: str
    env: dict[str, str] = field(repr=False)


def start_cluster() -> Iterator[Cluster]:
    """Start a 2-CPU head node on loopback; yield it; always stop it."""
    temp_dir = tempfile.mkdtemp(prefix="tray", dir="/tmp")
    env = {**os.environ, **RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    cmd = [
        ray_bin(),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--dashboard-port={free_port()}",
        "--include-dashboard=false",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(
                f"ray start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        yield Cluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, env=env)
    finally:
        subprocess.run([ray_bin(), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def read_events(out: Path) -> list[dict]:
    path = out / "ray_trials.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate()`` until it returns a truthy value; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"driver exited (rc={proc.returncode}) before {what}")
        time.sleep(interval)
    proc.send_signal(signal.SIGKILL)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


TINY_RECIPE = """\
# Tiny search for the Ray tests: ResNet-8 of width 8 on 16x16 digits, 2 short epochs. A
# worker's first trial also builds its Evaluator (seconds), so trials can be killed mid-way.
name: ray-tiny
model:
  name: cifar_resnet
  kwargs: {depth: 8, width: 8}
  pretrain_epochs: 1
data:
  dataset: digits
  image_size: 16
  max_train_samples: 512
  max_val_samples: 256
  batch_size: 32
train:
  epochs: 2
  threads: 1
latency:
  batch_size: 1
  threads: 1
  repeats: 5
  warmup: 1
budgets:
  max_params: 6000
search:
  space: per_stage
  choices: [1, 2, 4, 8]
  objectives: [accuracy, latency_ms, params]
  sampler: nsga2
  population_size: 8
  save_weights: false
"""


def write_tiny_recipe(folder: Path, *, single_objective: bool = False) -> Path:
    """The tiny recipe; ``single_objective``: accuracy only, TPE, pruning on (ASHA on Ray)."""
    text = TINY_RECIPE
    if single_objective:
        text = text.replace("name: ray-tiny", "name: ray-tiny-single")
        text = text.replace("objectives: [accuracy, latency_ms, params]", "objectives: [accuracy]")
        text = text.replace("sampler: nsga2", "sampler: tpe\n  pruner: median")
    path = folder / ("ray_tiny_single.yaml" if single_objective else "ray_tiny.yaml")
    path.write_text(text)
    return path
