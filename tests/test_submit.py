"""`dist-trainer submit` against a real Ray head with its job server, started by the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dist_trainer.config import ConfigError
from dist_trainer.submit import _check_store_for
from tests.conftest import free_port

CLI = str(Path(sys.executable).with_name("dist-trainer"))
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.mark.parametrize(
    ("address", "uri", "refused"),
    [
        ("http://10.1.2.3:8265", "sqlite:////tmp/mlflow.db", True),
        ("http://head:8265", "file:///tmp/mlruns", True),
        ("http://127.0.0.1:8265", "sqlite:////tmp/mlflow.db", False),  # the same machine
        ("http://localhost:8265", "sqlite:////tmp/mlflow.db", False),
        ("http://10.1.2.3:8265", "http://mlflow:5000", False),
    ],
)
def test_a_file_store_is_refused_for_a_remote_cluster(address, uri, refused):
    if refused:
        with pytest.raises(ConfigError, match=r"tracking\.uri=.*Fix: tracking\.uri=http://"):
            _check_store_for(address, uri)
    else:
        _check_store_for(address, uri)


def test_submit_refuses_bad_input_before_submitting(tmp_path):
    proc = subprocess.run(
        [CLI, "submit", "--address", "http://10.1.2.3:8265", "trainer.global_batch_size=255"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("dist-trainer: config error: trainer.global_batch_size=255")


@dataclass
class _Head:
    job_server: str  # http://127.0.0.1:<dashboard port>, for submit
    gcs: str  # 127.0.0.1:<port>, for scaling.address


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with its job server on 127.0.0.1, in its own process group and temp dir, on
    free ports (the test session's own cluster may hold Ray's default ones); token
    authentication on, Ray's default."""
    ports = {name: free_port() for name in ("gcs", "dashboard", "agent", "grpc", "client", "env")}
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are long
    head = subprocess.Popen(
        [
            RAY, "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
            f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--dashboard-port={ports['dashboard']}",
            f"--dashboard-agent-listen-port={ports['agent']}",
            f"--dashboard-agent-grpc-port={ports['grpc']}",
            f"--ray-client-server-port={ports['client']}",
            f"--runtime-env-agent-port={ports['env']}",
            f"--temp-dir={temp_dir}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # As a head runs in its environment (activated): a job's `python` is this one.
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:  # it answers (401: token auth is on): it is up
                break
            except OSError:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise RuntimeError("the Ray head did not come up") from None
                time.sleep(1)
        yield _Head(address, f"127.0.0.1:{ports['gcs']}")
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head and every process it started
        head.wait(timeout=30)


@pytest.mark.slow
def test_submit_runs_the_job_on_the_head_and_logs_one_run(ray_head, tmp_path):
    store = tmp_path / "mlflow.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    proc = None
    for _ in range(3):  # the head's job agent may need a few more seconds after its API is up
        proc = subprocess.run(
            [
                CLI, "submit", "--address", ray_head.job_server,
                "trainer.max_epochs=1",
                f"tracking.uri=sqlite:///{store}",
                f"scaling.storage_path={tmp_path / 'ray_storage'}",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        if "No available agent" not in proc.stderr:
            break
        time.sleep(5)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "submitted job raysubmit_" in proc.stdout
    assert "SUCCEEDED" in proc.stdout
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert f"MLflow run {run.info.run_id}" in proc.stdout
    assert run.info.status == "FINISHED" and "val/loss" in run.data.metrics
    print(f"submit to result: {time.perf_counter() - started:.1f} s")


@pytest.mark.slow
def test_train_joins_a_head_by_its_address(ray_head, tmp_path):
    """`dist-trainer train scaling.address=HOST:PORT` against `ray start --head` (token auth on):
    the driver sends the token Ray's CLI left in ~/.ray, as with `scaling.address=auto`."""
    store = tmp_path / "mlflow.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    proc = subprocess.run(
        [CLI, "train", f"scaling.address={ray_head.gcs}", "trainer.max_epochs=1",
         f"tracking.uri=sqlite:///{store}", f"scaling.storage_path={tmp_path / 'ray_storage'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and "val/loss" in run.data.metrics
