"""`dist-trainer resume RUN_ID`: a driver killed mid-run, a new one continues the same Ray Train
run and MLflow run from the latest checkpoint, and the job ends like one that never stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dist_trainer import tracking
from dist_trainer.batching import plan_batches
from dist_trainer.config import ConfigError
from dist_trainer.loop import Trainer, WorkerInfo
from dist_trainer.resume import resume
from dist_trainer.tracking import normalize_tracking_uri, prepare_store, start_job_run
from tests.conftest import assert_logged_weights_equal, job_config

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("dist-trainer"))
FLOAT64_TOLERANCE = 1e-12
# breast_cancer: 8 steps of 64 per epoch, 32 in 4 epochs; ~0.3 s per step on 2 workers.
JOB = [
    "trainer.precision=64",
    "trainer.max_epochs=4",
    "trainer.checkpoint_every_n_steps=5",
    "model._target_=tests.crashing.SlowMLP",
]


@pytest.fixture
def store(tmp_path):
    uri = normalize_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return uri, prepare_store(uri, "resume")


def _job_run(uri: str, experiment_id: str, tags: dict[str, str], status: str | None = None):
    run_id = start_job_run(
        uri, experiment_id, "job", {}, {tracking.ROLE_TAG: "job", **tags}, {"config.yaml": "{}"}
    )
    if status:
        MlflowClient(uri).set_terminated(run_id, status)
    return run_id


@pytest.mark.parametrize(
    ("tags", "status", "refusal"),
    [
        ({}, "FINISHED", "is FINISHED: nothing to resume"),
        # Its driver is this very process: alive.
        ({tracking.DRIVER_TAG: f"{socket.gethostname()}:{os.getpid()}"}, None,
         f"driver \\(pid {os.getpid()}\\) is alive on this host. Fix: wait for it"),
        ({tracking.DRIVER_TAG: "other-host:123"}, None,
         "ran on other-host, which cannot be checked from here. Fix: .* --force"),
        ({tracking.ROLE_TAG: "study"}, "FAILED", "is not a `dist-trainer train` job"),
        ({tracking.WORKER_GROUP_TAG: "warm"}, "KILLED", "ran in the warm worker group"),
    ],
)  # fmt: skip
def test_resume_refuses_runs_it_must_not_take_over(store, tags, status, refusal):
    uri, experiment_id = store
    run_id = _job_run(uri, experiment_id, tags, status)
    with pytest.raises(ConfigError, match=refusal):
        resume(run_id, uri, show_progress=False)
    assert MlflowClient(uri).get_run(run_id).info.status == (status or "RUNNING")


def test_resume_refuses_an_unknown_run_and_changes_to_what_the_job_computes(store):
    uri, experiment_id = store
    with pytest.raises(ConfigError, match="no run 0123abc in .*Fix: --tracking-uri"):
        resume("0123abc", uri, show_progress=False)
    missing = uri.replace("mlflow.db", "elsewhere.db")
    with pytest.raises(ConfigError, match="no MLflow store at .*elsewhere.db. Fix: "):
        resume("0123abc", missing, show_progress=False)
    assert not Path(missing[len("sqlite:///") :]).exists()  # and none was made
    dead_driver = {tracking.DRIVER_TAG: f"{socket.gethostname()}:999999999"}
    run_id = _job_run(uri, experiment_id, dead_driver)
    with pytest.raises(ConfigError, match="'optim.lr=1.0': a resumed job keeps the config"):
        resume(run_id, uri, ["optim.lr=1.0"], show_progress=False)


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_killed_driver_is_resumed_into_the_same_run(tmp_path):
    """`dist-trainer train` (2 DDP workers, local Ray) is SIGKILLed once its checkpoint at step
    10 exists; `dist-trainer resume RUN_ID` continues the same Ray Train run and MLflow run: every
    step once, and the weights of one process that trained on every global batch (float64)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    uri = normalize_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = subprocess.Popen(
        [CLI, "train", f"tracking.uri={uri}", *JOB, "+model.delay_s=0.3"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # what it started can be cleaned up if the test fails
    )
    storage = tmp_path / ".ray_storage"
    try:
        _wait_for(
            lambda: any(storage.glob("dist_trainer-*/*-step_00000010")) or first.poll() is not None,
            240,
            "the checkpoint at step 10",
        )
        assert first.poll() is None, first.stdout.read()
        first.send_signal(signal.SIGKILL)  # the driver only: its Ray cluster goes with it
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "RUNNING"  # a dead driver closes nothing
    run_id = run.info.run_id

    resumed = subprocess.run(
        [CLI, "resume", run_id, "--tracking-uri", uri],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"MLflow run {run_id} resumed" in resumed.stdout

    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.RESUMES_TAG] == "1"
    history = {
        key: [m.step for m in client.get_metric_history(run_id, key)] for key in run.data.metrics
    }
    for key, steps in history.items():
        assert steps == sorted(set(steps)), f"{key}: steps {steps}"
    (load_step,) = history["checkpoint/load_s"]
    assert load_step >= 10 and load_step % 5 == 0
    assert max(history["train/loss"]) == 32
    assert history["val/loss"] == [8, 16, 24, 32]

    reference = Trainer(
        job_config(*JOB, "+model.delay_s=0"),
        plan_batches(64, 1),
        WorkerInfo(0, 1, 0, 0, torch.device("cpu")),
    )
    reference.fit()
    assert_logged_weights_equal(
        uri, run_id, reference.model.state_dict(), tmp_path, FLOAT64_TOLERANCE
    )
