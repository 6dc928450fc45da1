"""Shared fixtures: one Ray cluster per session, outputs under tmp_path, no leftover groups."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch.distributed as dist

from dist_trainer.config import load_config, resolve_config
from dist_trainer.ray_cluster import RAY_ENV_DEFAULTS
from dist_trainer.run_logger import NullLogger

# Fast Ray Train health checks and teardown, set before any raylet starts (workers inherit it).
for _key, _value in {**RAY_ENV_DEFAULTS, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}.items():
    os.environ.setdefault(_key, _value)


# Ray workers import test helpers (tests.crashing) by module path, like a user's own model.
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster shared by every Ray test (2 CPUs, like this machine)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides that keep a job's MLflow store and Ray storage inside tmp_path."""
    return [
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"scaling.storage_path={tmp_path / 'ray_storage'}",
        *extra,
    ]


def job_config(*overrides: str):
    """A composed and checked JobConfig."""
    return resolve_config(load_config(list(overrides)))


def metric_histories(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run as its (step, value) points."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in client.get_run(run_id).data.metrics
    }


def assert_logged_weights_equal(uri: str, run_id: str, reference: dict, folder: Path, tol: float):
    """The run's `model/state_dict.pt` artifact equals `reference` to relative error `tol`."""
    import torch
    from mlflow.tracking import MlflowClient

    path = MlflowClient(uri).download_artifacts(run_id, "model/state_dict.pt", str(folder))
    weights = torch.load(Path(path), weights_only=True)
    assert weights.keys() == reference.keys()
    flat = torch.cat([weights[k].flatten() for k in reference])
    flat_ref = torch.cat([reference[k].flatten() for k in reference])
    rel_error = ((flat - flat_ref).norm() / flat_ref.norm()).item()
    assert rel_error < tol, f"relative error {rel_error:.3g}"


def run_cluster_job(module: str, tmp_path: Path, overrides: list[str], timeout_s: int) -> dict:
    """Run `python -m <module> tmp_path *overrides` (a script that starts its own simulated Ray
    cluster) and return the JSON of its last `RESULT ` line."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": _ROOT, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", module, str(tmp_path), *overrides],
        cwd=_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def rank0_pid(run) -> str:
    """The pid of the process that was rank 0 in a run's (only) attempt."""
    from dist_trainer.attempts import attempt_history, record_fields

    (record, _), *_ = attempt_history(run.data.tags)
    return record_fields(record)["rank0_pid"]


# Metrics that depend only on the data and the weights: equal to float64 precision between a
# faulted run and one that never failed.
EXACT_METRICS = (
    "train/loss",
    "train/accuracy",
    "train/lr",
    "train/epoch",
    "val/loss",
    "val/accuracy",
)


class MetricRecorder(NullLogger):
    """A logger that keeps what rank 0 would log, per key, in memory: a run that never failed,
    to compare a faulted run's MLflow histories with."""

    def __init__(self) -> None:
        self.points: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.points.setdefault(key, []).append((step, value))
