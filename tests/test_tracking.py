"""The MLflow side on a real sqlite store: batched logging, secrets, reachability checks."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from dist_trainer.config import ConfigError
from dist_trainer.run_logger import RunLogger
from dist_trainer.tracking import (
    check_tracking_uri,
    finish_job_run,
    normalize_tracking_uri,
    prepare_store,
    redact_params,
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


def test_logger_reports_a_broken_store(tmp_path):
    logger = RunLogger(f"sqlite:///{tmp_path}/mlflow.db", "no-such-run", flush_interval_s=0.01)
    logger.log_metrics({"x": 1.0}, step=1)
    with pytest.raises(RuntimeError, match="MLflow logging"):
        logger.close()
