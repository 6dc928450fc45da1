"""Worker processes killed from outside (SIGKILL) while a real job runs, at several moments.

Each time the job takes a second attempt and ends as if it had never failed: its run is
FINISHED, every logged step appears once per metric series, the final step is an uninterrupted
run's, and the final weights equal that run's (float64, one process on the same global batches).
The run's tags count the attempts and say why each ended. Three ways a job runs are covered:
a plain Ray Train job (`scaling.max_failures`, Ray Train restarts the group), a study's child
(one worker group for the study's jobs), and a job in `cluster up`'s warm group (the service
starts a new group and resumes the job).

The model (tests.crashing.BlocksOnceMLP) stops at a chosen optimizer step on a chosen rank,
writes its pid and waits; the test's killer thread sends SIGKILL to that pid, as `kill -9`, the
kernel's out-of-memory killer or a lost node would end it: no exception, no cleanup.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dist_trainer.attempts import attempt_history, record_fields
from dist_trainer.batching import plan_batches
from dist_trainer.loop import Trainer, WorkerInfo
from dist_trainer.tracking import REFUSED_TAG
from tests.conftest import (
    EXACT_METRICS,
    MetricRecorder,
    assert_logged_weights_equal,
    free_port,
    job_config,
    job_overrides,
    metric_histories,
)

CPU = WorkerInfo(0, 1, 0, 0, torch.device("cpu"))
# breast_cancer: 455 training samples; global batch 64: 8 steps per epoch, 24 in 3 epochs.
# Logged every 2 steps, checkpointed every 5 (5, 10, 15, 20, and 24 at the end).
JOB = [
    "trainer.precision=64",
    "trainer.global_batch_size=64",
    "trainer.max_epochs=3",
    "trainer.log_every_n_steps=2",
    "trainer.checkpoint_every_n_steps=5",
    "scaling.max_failures=1",
    "model._target_=tests.crashing.BlocksOnceMLP",
]

FLOAT64_TOLERANCE = 1e-9


class Killer:
    """SIGKILLs the process whose pid appears in `marker` (a worker waiting to be killed)."""

    def __init__(self, marker: Path, timeout_s: float = 600) -> None:
        self.marker, self.killed_pid = marker, None
        self._deadline = time.monotonic() + timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            if self.marker.exists():
                self.killed_pid = int(self.marker.read_text())
                os.kill(self.killed_pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _straight(overrides: list[str], global_batch: int = 64) -> tuple[Trainer, MetricRecorder]:
    """The same job in one process, never killed (the marker is ignored: `at_step=0`)."""
    recorder = MetricRecorder()
    job = job_config(*overrides, "+model.at_step=0")
    trainer = Trainer(job, plan_batches(global_batch, 1), CPU, logger=recorder)
    trainer.fit()
    return trainer, recorder


def _assert_like_the_straight_run(uri: str, run_id: str, overrides: list[str], folder: Path,
                                  global_batch: int = 64) -> dict:  # fmt: skip
    """FINISHED, each step once, the straight run's steps, values and weights; two attempts."""
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("error")
    got = metric_histories(uri, run_id)
    for key, points in got.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"{key}: steps {steps}"
    straight, recorder = _straight(overrides, global_batch)
    assert max(s for s, _ in got["train/loss"]) == straight.step
    for key in EXACT_METRICS:
        assert [s for s, _ in got[key]] == [s for s, _ in recorder.points[key]], key
        for (step, value), (_, expected) in zip(got[key], recorder.points[key], strict=True):
            assert math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12), (key, step)
    assert_logged_weights_equal(uri, run_id, straight.model.state_dict(), folder, FLOAT64_TOLERANCE)
    tags = run.data.tags
    assert REFUSED_TAG not in tags, tags[REFUSED_TAG]
    assert not any(key.startswith("worker.") for key in run.data.params), run.data.params
    history = attempt_history(tags)
    assert len(history) == 2, tags
    (first, first_end), (second, second_end) = history
    assert first_end.startswith("worker group failed: rank "), first_end
    assert second_end == f"finished at step {straight.step}"
    assert record_fields(first)["from_step"] == "0"
    assert record_fields(first)["rank0_pid"] != record_fields(second)["rank0_pid"]
    # The run's page opens on its description: it lists the attempts.
    assert (
        "\n2 attempts (tags dist_trainer.attempt.*):\n- attempt 1: from_step=0;"
        in (tags["mlflow.note.content"])
    ), tags["mlflow.note.content"]
    return {"history": got, "attempts": history}


# The moments: (optimizer step the worker is killed in, its rank, the steps it may resume
# from). Ray Train registers a checkpoint when its controller next polls the workers after the
# report: a worker killed right after a checkpoint may resume from the one before it.
MOMENTS = {
    "before the first checkpoint": (3, 1, {0}),
    "right after a checkpoint": (11, 0, {5, 10}),  # rank 0: its logger dies with unsent points
    "in the last epoch": (22, 1, {15, 20}),
}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_job_survives_a_worker_killed(ray_cluster, tmp_path, moment):
    from dist_trainer import driver
    from dist_trainer.config import load_config

    at_step, rank, resumes_from = MOMENTS[moment]
    marker = tmp_path / "killed"
    overrides = job_overrides(tmp_path, *JOB, f"+model.marker={marker}", f"+model.rank={rank}")
    killer = Killer(marker)
    try:
        result = driver.train(
            load_config([*overrides, f"+model.at_step={at_step}"]), show_progress=False
        )
    finally:
        killer.stop()
    assert killer.killed_pid is not None, "the worker was never killed"
    found = _assert_like_the_straight_run(result.tracking_uri, result.run_id, overrides, tmp_path)
    (_, first_end), (second, _) = found["attempts"]
    assert f"rank {rank}: " in first_end, first_end
    resumed = int(record_fields(second)["from_step"])
    assert resumed in resumes_from, (resumed, resumes_from)
    load = found["history"].get("checkpoint/load_s", [])
    assert [s for s, _ in load] == ([resumed] if resumed else [])


@pytest.mark.ray
@pytest.mark.slow
def test_a_study_child_survives_a_worker_killed(ray_cluster, tmp_path):
    """Two jobs in one worker group; rank 1 is killed in the second job's step 3, before its
    first checkpoint. The group restarts: the first job (finished) is not run again, the
    second starts over from step 0 in its own run, and both end like uninterrupted runs."""
    from dist_trainer.study import run_study

    marker = tmp_path / "killed"
    overrides = job_overrides(
        tmp_path, *JOB, f"+model.marker={marker}", "+model.rank=1", "+model.micro_batch=16"
    )
    killer = Killer(marker)
    try:
        result = run_study(
            [*overrides, "trainer.global_batch_size=64,32", "+model.at_step=3"],
            show_progress=False,
        )
    finally:
        killer.stop()
    assert killer.killed_pid is not None, "the worker was never killed"
    by_name = {job.name: job for job in result.jobs}
    assert {name: job.status for name, job in by_name.items()} == {
        "batch=64": "FINISHED",
        "batch=32": "FINISHED",
    }
    client = MlflowClient(result.tracking_uri)
    untouched = client.get_run(by_name["batch=64"].run_id)
    assert len(attempt_history(untouched.data.tags)) == 1, untouched.data.tags
    # The second job: killed at micro-batches of 16 (global 32 over 2 workers) only.
    killed = [*overrides, "trainer.global_batch_size=32"]
    _assert_like_the_straight_run(
        result.tracking_uri, by_name["batch=32"].run_id, killed, tmp_path, global_batch=32
    )


@pytest.mark.slow
def test_a_warm_group_job_survives_a_worker_killed(tmp_path):
    """`cluster up`, then a job with scaling.max_failures=1 in the warm group; rank 1 is killed
    in step 12, after the checkpoints at steps 5 and 10. The service starts a new group, which
    restores the latest checkpoint Ray Train registered and resumes the job in the same run."""
    cli = str(Path(sys.executable).with_name("dist-trainer"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("DIST_TRAINER_SERVICE", None)

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [cli, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
        )

    marker = tmp_path / "killed"
    db = tmp_path / "mlflow.db"
    overrides = [
        f"tracking.uri=sqlite:///{db}",
        *JOB,
        f"+model.marker={marker}",
        "+model.rank=1",
    ]
    up = run("cluster", "up", "--port", str(free_port()))
    killer = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        killer = Killer(marker)
        train = run("train", *overrides, "+model.at_step=12")
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        assert "running in the warm worker group" in train.stdout, train.stdout
        assert "2 attempts" in train.stdout, train.stdout[-3000:]
        run_id = train.stdout.split("MLflow run ", 1)[1].split()[0]
    finally:
        if killer is not None:
            killer.stop()
        down = run("cluster", "down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert killer.killed_pid is not None, "the worker was never killed"
    found = _assert_like_the_straight_run(f"sqlite:///{db}", run_id, overrides, tmp_path)
    (_, first_end), (second, _) = found["attempts"]
    assert "rank 1: " in first_end, first_end
    # Not from scratch: the new group found the checkpoint (10, or 5 if Ray Train's controller
    # had not registered 10 when the worker died).
    assert record_fields(second)["from_step"] in ("5", "10"), second
