"""Faults lose nothing and double nothing: a job that fails mid-run and resumes from its latest
checkpoint into the same MLflow run logs every step once in every metric series, and ends at
the step and with the weights of a run that never failed (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from dist_trainer.batching import plan_batches
from dist_trainer.checkpoint import LocalCheckpointSink
from dist_trainer.loop import Trainer, WorkerInfo
from dist_trainer.run_logger import RunLogger
from dist_trainer.tracking import (
    logged_steps,
    normalize_tracking_uri,
    prepare_store,
    start_job_run,
)
from tests.conftest import (
    EXACT_METRICS,
    MetricRecorder,
    assert_logged_weights_equal,
    job_config,
    job_overrides,
    metric_histories,
)

CPU = WorkerInfo(0, 1, 0, 0, torch.device("cpu"))
# breast_cancer: 455 training samples, 8 steps of 64 per epoch, 24 steps in 3 epochs. Logs every
# 3 steps and checkpoints every 5, so checkpoints fall inside log intervals (5, 10, 20).
JOB = [
    "trainer.precision=64",
    "trainer.global_batch_size=64",
    "trainer.max_epochs=3",
    "trainer.log_every_n_steps=3",
    "trainer.checkpoint_every_n_steps=5",
    "model._target_=tests.crashing.CrashOnceMLP",
]

FLOAT64_TOLERANCE = 1e-12


def _assert_each_step_once(histories: dict[str, list[tuple[int, float]]]) -> None:
    for key, points in histories.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), f"{key}: steps {steps}"


def _attempt(uri: str, run_id: str, overrides: list[str], sink) -> tuple[Trainer, RunLogger]:
    """One attempt at the job, as run_training does it: rank 0's logger, fit, close."""
    logger = RunLogger(uri, run_id, flush_interval_s=0.05)
    trainer = Trainer(job_config(*overrides), plan_batches(64, 1), CPU, logger=logger, sink=sink)
    try:
        trainer.fit()
    finally:
        logger.close()  # what reached the store before the failure
    return trainer


@pytest.fixture
def store(tmp_path):
    uri = normalize_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return uri, prepare_store(uri, "faults")


@pytest.mark.parametrize(
    ("crash_at_call", "resumes_at", "replays_logged_steps"),
    [
        # Forward calls: steps 1-8 are calls 1-8, validation 9, steps 9-16 calls 10-17, ...
        (12, 10, False),  # in step 11, just after the checkpoint at 10: nothing to drop
        (15, 10, True),  # in step 14: step 12 was logged after the checkpoint at 10
        (19, 15, True),  # in step 17: step 16 and its validation were logged after 15
    ],
)
def test_resumed_run_logs_every_step_once_and_ends_like_an_uninterrupted_run(
    store, tmp_path, crash_at_call, resumes_at, replays_logged_steps
):
    uri, experiment_id = store
    unused_marker = tmp_path / "never_crash"
    unused_marker.write_text("")
    straight_run = start_job_run(uri, experiment_id, "straight", {}, {})
    straight = _attempt(
        uri,
        straight_run,
        [*JOB, f"+model.marker={unused_marker}", "+model.crash_at_call=1"],
        LocalCheckpointSink(tmp_path / "straight"),
    )

    marker = tmp_path / "crashed"
    faulted = [*JOB, f"+model.marker={marker}", f"+model.crash_at_call={crash_at_call}"]
    run_id = start_job_run(uri, experiment_id, "faulted", {}, {})
    sink = LocalCheckpointSink(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="injected failure"):
        _attempt(uri, run_id, faulted, sink)
    assert marker.exists()
    before = logged_steps(uri, run_id)
    assert (before["train/loss"] > resumes_at) == replays_logged_steps, before
    logger = RunLogger(uri, run_id, flush_interval_s=0.05)
    resumed = Trainer(job_config(*faulted), plan_batches(64, 1), CPU, logger=logger, sink=sink)
    resumed.fit()
    logger.close()
    assert (logger.dropped > 0) == replays_logged_steps

    # Same step count and weights as the run that never failed.
    assert resumed.step == straight.step == 24
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(
            resumed.model.state_dict()[name], tensor, rtol=0, atol=FLOAT64_TOLERANCE
        )

    # Every step once per series, and the same series as the run that never failed: the
    # replay filled in what the first attempt had not logged and dropped what it had.
    got, want = metric_histories(uri, run_id), metric_histories(uri, straight_run)
    _assert_each_step_once(got)
    _assert_each_step_once(want)
    assert got.pop("checkpoint/load_s")[0][0] == resumes_at
    assert set(got) == set(want)
    for key, points in want.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], key
        if key in EXACT_METRICS:
            for (step, value), (_, expected) in zip(got[key], points, strict=True):
                assert math.isclose(value, expected, rel_tol=0, abs_tol=FLOAT64_TOLERANCE), (
                    key,
                    step,
                )
    assert [s for s, _ in got["train/loss"]] == [1, 3, 5, 6, 8, 9, 10, 12, 15, 16, 18, 20, 21, 24]
    assert [s for s, _ in got["checkpoint/save_s"]] == [5, 10, 15, 20, 24]
    assert [s for s, _ in got["val/loss"]] == [8, 16, 24]


def test_resumed_logger_only_appends_per_key(store):
    """The rule itself: per key, points at steps the run holds (or below) are dropped, the
    first values stand; a key with fewer steps is filled in; held params keep their value."""
    uri, experiment_id = store
    run_id = start_job_run(uri, experiment_id, "r", {"worker.rank0_pid": 1}, {})
    first = RunLogger(uri, run_id, flush_interval_s=0.01)
    for step in range(1, 11):
        first.log_metrics({"train/loss": float(step)}, step=step)
    for step in range(1, 6):
        first.log_metrics({"val/loss": float(step)}, step=step)
    first.close()
    assert logged_steps(uri, run_id) == {"train/loss": 10, "val/loss": 5}

    second = RunLogger(uri, run_id, flush_interval_s=0.01)
    second.resume()
    second.log_params({"worker.rank0_pid": 2, "plan.total_steps": 12})  # a restart's new pid
    for step in range(3, 13):
        second.log_metrics({"train/loss": -float(step), "val/loss": -float(step)}, step=step)
    second.log_metrics({"train/loss": 0.0}, step=12)  # twice at one step: the first stands
    second.close()  # no "Changing param values is not allowed"
    assert second.dropped == 8 + 3 + 1

    history = metric_histories(uri, run_id)
    _assert_each_step_once(history)
    assert history["train/loss"] == [(s, float(s)) for s in range(1, 11)] + [
        (11, -11.0),
        (12, -12.0),
    ]
    assert history["val/loss"] == [(s, float(s)) for s in range(1, 6)] + [
        (s, -float(s)) for s in range(6, 13)
    ]
    params = MlflowClient(uri).get_run(run_id).data.params
    assert params == {"worker.rank0_pid": "1", "plan.total_steps": "12"}


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_resumes_the_same_run_logging_every_step_once(ray_cluster, tmp_path):
    """Ray Train, 2 DDP workers, scaling.max_failures=1: rank 1 is SIGKILLed in step 13, after
    the checkpoint at step 10 and after rank 0 logged step 12. The group restarts, resumes from
    step 10 into the same run, and finishes like a run that never failed."""
    from dist_trainer import driver
    from dist_trainer.config import load_config

    marker = tmp_path / "killed"
    overrides = job_overrides(
        tmp_path,
        "trainer.precision=64",
        "trainer.max_epochs=3",
        "trainer.log_every_n_steps=2",
        "trainer.checkpoint_every_n_steps=5",
        "scaling.max_failures=1",
        "telemetry.interval_s=0.2",  # MLflow's system/* every second, across the restart
        "model._target_=tests.crashing.DiesOnceMLP",
        f"+model.marker={marker}",
        # Rank 1's training forwards: 1 in step 1, 2 in step 2 (the exposed-comm probe's
        # extra micro-step), then 1 per step: call 14 is step 13.
        "+model.die_at_call=14",
        "+model.rank=1",
        "+model.delay_s=1.5",  # rank 0's logger flushes step 12 meanwhile
    )
    result = driver.train(load_config(overrides), show_progress=False)
    assert marker.exists(), "the worker was never killed"

    client = MlflowClient(result.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert [r.info.run_id for r in runs] == [result.run_id]
    assert runs[0].info.status == "FINISHED"
    got = metric_histories(result.tracking_uri, result.run_id)
    _assert_each_step_once(got)  # train/*, val/*, perf/*, comm/*, mem/*, checkpoint/*, system/*
    assert any(key.startswith("system/") for key in got), sorted(got)
    assert [s for s, _ in got["checkpoint/load_s"]] == [10]
    assert [s for s, _ in got["checkpoint/save_s"]] == [5, 10, 15, 20, 24]
    assert all(v >= 0 for _, v in got["checkpoint/save_s"])

    # The run that never failed, in one process (equal to 2 DDP workers in float64).
    recorder = MetricRecorder()
    job = job_config(*overrides)
    straight = Trainer(job, plan_batches(64, 1), CPU, logger=recorder)
    straight.fit()
    assert straight.step == 24 == max(s for s, _ in got["train/loss"])
    for key in EXACT_METRICS:
        assert [s for s, _ in got[key]] == [s for s, _ in recorder.points[key]], key
        for (step, value), (_, expected) in zip(got[key], recorder.points[key], strict=True):
            assert math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12), (key, step)
    assert_logged_weights_equal(
        result.tracking_uri,
        result.run_id,
        straight.model.state_dict(),
        tmp_path,
        FLOAT64_TOLERANCE,
    )


# Dropout draws from each rank's generators: a resumed job restores them from the checkpoint.
DROPOUT = [*JOB, "model.dropout=0.3", "model.hidden_sizes=[32,32]"]


def test_a_resumed_job_with_dropout_ends_with_the_weights_of_one_that_never_failed(tmp_path):
    """Crashed in step 14, resumed from step 10: the dropout masks drawn after the resume are
    those the uninterrupted run drew (the checkpoint holds the generators)."""
    # The marker (tmp_path) exists: this run never crashes.
    straight = Trainer(
        job_config(*DROPOUT, f"+model.marker={tmp_path}", "+model.crash_at_call=1"),
        plan_batches(64, 1),
        CPU,
    )  # fmt: skip (the marker exists: never crashes)
    straight.fit()
    faulted = [*DROPOUT, f"+model.marker={tmp_path / 'crashed'}", "+model.crash_at_call=15"]
    sink = LocalCheckpointSink(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="injected failure"):
        Trainer(job_config(*faulted), plan_batches(64, 1), CPU, sink=sink).fit()
    resumed = Trainer(job_config(*faulted), plan_batches(64, 1), CPU, sink=sink)
    resumed.fit()
    assert resumed.step == straight.step == 24
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(
            resumed.model.state_dict()[name], tensor, rtol=0, atol=FLOAT64_TOLERANCE
        )


def _dropout_ranks(rank: int, port: int, overrides: list[str], folder: str, out: str) -> None:
    """2 DDP ranks: the job straight, then stopped at step 11 (its checkpoint) and resumed."""
    import gc
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    info = WorkerInfo(rank, 2, rank, 0, torch.device("cpu"))
    plan = plan_batches(64, 2)
    runs = []
    try:
        straight = Trainer(job_config(*overrides), plan, info)
        straight.fit()
        sink = LocalCheckpointSink(folder)
        Trainer(job_config(*overrides, "trainer.max_steps=11"), plan, info, sink=sink).fit()
        resumed = Trainer(job_config(*overrides), plan, info, sink=sink)
        resumed.fit()
        runs = [straight, resumed]
        if rank == 0:
            torch.save([r.model.state_dict() for r in runs] + [resumed.step], out)
    finally:
        del runs
        gc.collect()  # DDP models alive at exit can make gloo abort (pytorch#179291)
        dist.destroy_process_group()


def test_each_rank_resumes_its_own_dropout_draws(tmp_path):
    """2 DDP ranks draw different dropout masks; each rank's generators are in the checkpoint,
    so the resumed job ends with the weights of the run that never stopped."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    overrides = [
        "trainer.precision=64",
        "trainer.global_batch_size=64",
        "trainer.max_epochs=3",
        "optim=adam",  # a constant lr: stopping at step 11 changes no schedule
        "model.dropout=0.3",
        "model.hidden_sizes=[32,32]",
    ]
    out = tmp_path / "out.pt"
    mp.spawn(_dropout_ranks, args=(free_port(), overrides, str(tmp_path / "ckpt"), str(out)),
             nprocs=2)  # fmt: skip
    straight, resumed, steps = torch.load(out, weights_only=False)
    assert steps == 24
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=FLOAT64_TOLERANCE)
