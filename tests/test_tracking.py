"""The MLflow side on a real sqlite store: batched logging, secrets, reachability checks."""

from __future__ import annotations

import logging
import time

import pytest
from mlflow.tracking import MlflowClient

from dist_trainer.config import ConfigError
from dist_trainer.logger_process import LoggerProcess
from dist_trainer.run_logger import RunLogger
from dist_trainer.tracking import (
    REFUSED_TAG,
    check_tracking_uri,
    finish_job_run,
    normalize_tracking_uri,
    prepare_store,
    redact_params,
    run_notes,
    start_job_run,
)
from tests.conftest import free_port


@pytest.fixture
def store(tmp_path):
    uri = normalize_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return uri, prepare_store(uri, "exp")


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert normalize_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert normalize_tracking_uri("http://host:5000") == "http://host:5000"


def test_secrets_never_reach_params():
    safe = redact_params(
        {
            "tracking.uri": "http://alice:s3cret@mlflow.internal:5000",
            "tracking.tags.api_key": "abc123",
            "data.password": "hunter2",
            "scaling.address": "ray://head:10001",
            "optimizer.lr": 0.1,
        }
    )
    assert "s3cret" not in safe["tracking.uri"] and "mlflow.internal" in safe["tracking.uri"]
    assert safe["tracking.tags.api_key"] == "***" and safe["data.password"] == "***"
    assert safe["scaling.address"] == "ray://head:10001" and safe["optimizer.lr"] == "0.1"


def test_one_run_with_params_and_batched_metrics(store):
    uri, experiment_id = store
    run_id = start_job_run(
        uri, experiment_id, "r", {"a.b": 1, "token": "x"}, {"t": "v"}, {"config.yaml": "a: 1\n"}
    )
    logger = RunLogger(uri, run_id, flush_interval_s=0.05)
    t0 = time.time()
    for step in range(1, 251):
        logger.log_metrics({"train/loss": 1.0 / step, "perf/step_time_s": 0.01}, step=step)
    enqueue_s = time.time() - t0
    logger.log_params({"plan.total_steps": 250})
    logger.close()
    finish_job_run(uri, run_id, "FINISHED")
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a.b": "1", "token": "***", "plan.total_steps": "250"}
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 251))
    assert history[-1].value == pytest.approx(1 / 250)
    assert enqueue_s < 0.5, "logging must not wait on the store"
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]


def test_the_logger_process_sends_bursts_in_batches_and_a_lone_point_on_time(store):
    uri, experiment_id = store
    run_id = start_job_run(uri, experiment_id, "r", {}, {})
    logger = LoggerProcess(uri, run_id, flush_interval_s=0.05)
    try:
        assert logger.flush(), "the child process starts and answers"
        for step in range(1, 301):  # a burst: most calls wait for the timer's batch
            logger.log_metrics({"train/loss": 1.0 / step}, step=step)
            if step == 150:  # any other call sends what waits first: order holds
                logger.log_params({"plan.total_steps": 300})
        client = MlflowClient(uri)
        # No flush: the timer thread sends the burst's tail, and the child writes it.
        deadline = time.monotonic() + 20
        while len(client.get_metric_history(run_id, "train/loss")) < 300:
            assert time.monotonic() < deadline, "the points that waited were never sent"
            time.sleep(0.1)
        logger.log_metrics({"val/loss": 0.5}, step=300)  # a lone point, soon after the burst
        while not client.get_metric_history(run_id, "val/loss"):
            assert time.monotonic() < deadline, "a lone point waits for no later call"
            time.sleep(0.1)
        logger.log_metrics({"train/loss": 0.1}, step=301)
    finally:
        logger.close()  # sends what still waits
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 302))
    assert client.get_run(run_id).data.params == {"plan.total_steps": "300"}


def test_failed_job_keeps_its_reason(store):
    uri, experiment_id = store
    run_id = start_job_run(uri, experiment_id, "r", {}, {})
    finish_job_run(uri, run_id, "FAILED", "RuntimeError: boom")
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: boom"


def test_unreachable_stores_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"tracking\.uri=.*unreachable.*Fix"):
        check_tracking_uri(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    with pytest.raises(ConfigError, match=r"tracking\.uri=.*does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path}/missing/mlflow.db")
    check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # a new file in a real folder is fine


def test_a_store_that_refuses_a_write_never_fails_the_logger(tmp_path, caplog):
    """No such run: the store refuses every write; close() says so and does not raise."""
    logger = RunLogger(f"sqlite:///{tmp_path}/mlflow.db", "no-such-run", flush_interval_s=0.01)
    logger.log_metrics({"x": 1.0}, step=1)
    with caplog.at_level(logging.WARNING, logger="dist_trainer.run_logger"):
        logger.close()
    assert len(logger.refused) == 1 and logger.refused[0].startswith("metrics x at step 1: ")
    lines = [r.getMessage() for r in caplog.records]
    assert sum("MLflow refused a write" in line for line in lines) == 1, lines
    assert any("refused 1 write(s) for run no-such-run" in line for line in lines), lines


def test_a_refused_param_drops_only_that_param(tmp_path, caplog):
    """A param whose value changes (MLflow refuses it for good) is dropped alone: the metrics
    and other params of the same batch are written, one warning line is shown, and the run's
    tag names what was dropped, for the driver's end-of-job summary."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = prepare_store(uri, "refused")
    run_id = start_job_run(uri, experiment_id, "r", {"fixed": 1}, {})
    logger = RunLogger(uri, run_id, flush_interval_s=0.01)
    logger.log_params({"fixed": 1, "new": 2})  # the held value: dropped by the append rule
    logger.close()
    assert logger.refused == []
    # A race the append rule cannot see: the logger read the run (at its first write), then
    # another writer (a dead attempt's last flush) logged `late`. The store refuses `late`=3
    # but takes `other` and the metric batched with it.
    racing = RunLogger(uri, run_id, flush_interval_s=0.01)
    racing.log_metrics({"train/loss": 0.5}, step=1)
    client = MlflowClient(uri)
    deadline = time.monotonic() + 30
    while "train/loss" not in client.get_run(run_id).data.metrics:
        assert time.monotonic() < deadline, "the logger never wrote"
        time.sleep(0.02)
    client.log_param(run_id, "late", "1")
    racing.log_params({"late": 3, "other": 4})
    racing.log_metrics({"train/loss": 0.25}, step=2)
    with caplog.at_level(logging.WARNING, logger="dist_trainer.run_logger"):
        racing.close()
    assert len(racing.refused) == 1 and racing.refused[0].startswith("param late: ")
    assert "Changing param values is not allowed" in racing.refused[0]
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == {"fixed": "1", "new": "2", "late": "1", "other": "4"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (1, 0.5),
        (2, 0.25),
    ]
    assert run.data.tags[REFUSED_TAG].startswith("1 write(s) refused and dropped: param late")
    assert run_notes(uri, run_id) == [
        f"MLflow refused part of the run's data: {run.data.tags[REFUSED_TAG]}"
    ]
    warnings = [
        r.getMessage() for r in caplog.records if "MLflow refused a write" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
