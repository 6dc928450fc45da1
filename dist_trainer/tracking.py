"""The MLflow tracking store as the driver uses it; with run_logger, all that talks to MLflow.

One run per training job: the driver creates it (`start_job_run`) and hands its id to the
workers; rank 0 logs training metrics into it through a `RunLogger` (dist_trainer.run_logger),
whose background thread batches writes so the training step never waits on the tracking store.
After a restart the workers log into the same run id, so a resumed job stays one run.

Here: checking and normalizing the store's URI, opening it (`prepare_store`), creating and
finishing runs, their tags, descriptions, text and table artifacts, and reading back what a run
holds (`latest_metrics`, `logged_steps`, `run_statuses`).

mlflow is imported lazily: in a worker the logger thread pays for the import while the first
steps already run.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dist_trainer.config import ConfigError

__all__ = [
    "BENCH_TAG",
    "ROLE_TAG",
    "DRIVER_TAG",
    "redact_uri",
    "REFUSED_TAG",
    "RESUMES_TAG",
    "WORKER_GROUP_TAG",
    "check_tracking_uri",
    "finish_job_run",
    "normalize_tracking_uri",
    "redact_params",
    "start_job_run",
    "prepare_store",
    "ui_url",
    "latest_metrics",
    "logged_steps",
    "logged_steps_of",
    "mlflow_client",
    "MAX_PARAMS_PER_BATCH",
    "URI_USERINFO",
    "log_table",
    "log_text",
    "run_statuses",
    "ended_runs",
    "set_description",
    "describe_job",
    "run_notes",
    "plan_text",
]

# MLflow's limits per log_batch call (mlflow/utils/validation.py); the metrics one is in
# run_logger.
MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_LENGTH = 6000

_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential|auth)", re.I)
URI_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<userinfo>[^@/\s]+)@", re.I)


def redact_uri(uri: str) -> str:
    """`uri` fit to print: credentials (user:password@) masked."""
    return URI_USERINFO.sub(r"\g<scheme>***@", uri)


def normalize_tracking_uri(uri: str) -> str:
    """Make a relative sqlite/file URI absolute, so workers in other folders hit the same store.

    `sqlite:///mlflow.db` is relative to the working directory (three slashes); the absolute form
    has four (`sqlite:////abs/path/mlflow.db`).
    """
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    if "://" not in uri:  # a plain folder is MLflow's file store
        return Path(uri).resolve().as_uri()
    return uri


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming `tracking.uri`, if the store cannot be reached or written."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(
                f"tracking.uri={uri!r}: folder {str(folder)!r} does not exist or is not writable. "
                "Fix: create it, or use tracking.uri=sqlite:///mlflow.db"
            )
    elif uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as response:
                response.read()
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as exc:
            shown = redact_uri(uri)
            raise ConfigError(
                f"tracking.uri={shown!r} is unreachable ({getattr(exc, 'reason', exc)}). "
                "Fix: start the server (mlflow server --port 5000) or use "
                "tracking.uri=sqlite:///mlflow.db"
            ) from None
    elif uri.startswith("file://"):
        folder = Path(uri[len("file://") :])
        parent = folder if folder.exists() else folder.parent
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"tracking.uri={uri!r} is not writable. Fix: choose another folder")


def redact_params(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow strings with secrets masked: credential-like keys and URI passwords."""
    safe: dict[str, str] = {}
    for key, value in params.items():
        text = "None" if value is None else str(value)
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            text = "***"
        else:
            text = URI_USERINFO.sub(r"\g<scheme>***@", text)
        safe[key] = text[:_MAX_PARAM_LENGTH]
    return safe


def mlflow_client(uri: str):
    """An MlflowClient for `uri` (mlflow imported only when one is made)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# Tags that say what a run is. Every module that writes or reads them takes them from here, so
# no reader has to import the writer (report -> bench_comm -> driver was a circle).
ROLE_TAG = "dist_trainer.role"
"""`study` (a study's parent run) or `job` (a training job's run)."""
DRIVER_TAG = "dist_trainer.driver"
"""`host:pid` of the process that drives a job run (dist-trainer resume checks it)."""
WORKER_GROUP_TAG = "dist_trainer.worker_group"
"""`warm` on a job run that ran in the warm group of `dist-trainer cluster up`."""
RESUMES_TAG = "dist_trainer.resumes"
"""How many times `dist-trainer resume` took a job run over from a driver that died."""
REFUSED_TAG = "dist_trainer.refused_writes"
"""What the store refused to take from a job's rank 0 (dist_trainer.run_logger), if anything."""
BENCH_TAG = "dist_trainer.kind"
"""`bench-comm` on an all-reduce sweep's run."""

# MLflow 3's UI opens an experiment in its GenAI view (traces, tokens) unless this tag says it
# holds model training; with it, the experiment opens on the training runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def prepare_store(uri: str, experiment: str) -> str:
    """Open the store (a new sqlite file gets its schema here) and return the experiment id."""
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            experiment_id = client.create_experiment(experiment)
        except Exception:  # another job of a sweep created it first
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            experiment_id = found.experiment_id
    else:
        experiment_id = found.experiment_id
    if found is None or found.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    return experiment_id


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of a run (or experiment): the server itself, or `make ui`'s address."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    base = URI_USERINFO.sub(r"\g<scheme>", base)  # never print credentials
    # The UI's workflow switch (GenAI | Model training) starts on GenAI in a fresh browser,
    # whatever the experiment's kind; this parameter opens it on model training.
    page = f"{base}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{page}?workflowType=machine_learning"


def latest_metrics(uri: str, run_id: str) -> dict[str, float]:
    """The run's latest value of every metric."""
    return dict(mlflow_client(uri).get_run(run_id).data.metrics)


def logged_steps_of(client: Any, run_id: str, run: Any = None) -> dict[str, int]:
    """`logged_steps` through a client at hand (and the run, if already read)."""
    run = run or client.get_run(run_id)
    # Per key, MLflow keeps the point at the largest step as the run's latest metric: one query,
    # not the whole history (mlflow.system_metrics reads it the same way).
    latest = getattr(run.data, "_metric_objs", None)
    if latest is not None:
        return {m.key: int(m.step) for m in latest}
    return {
        key: max(int(m.step) for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics
    }


def logged_steps(uri: str, run_id: str) -> dict[str, int]:
    """The last step the run has logged, per metric key (keys never logged are absent)."""
    return logged_steps_of(mlflow_client(uri), run_id)


def start_job_run(
    uri: str,
    experiment_id: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    artifacts: dict[str, str] | None = None,
) -> str:
    """Create the job's one run with its params, tags and text artifacts; return its id."""
    client = mlflow_client(uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in redact_params(params).items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
    for name, text in (artifacts or {}).items():
        client.log_text(run_id, text, name)
    return run_id


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    """A text artifact from the driver (summaries, reports)."""
    mlflow_client(uri).log_text(run_id, text, artifact_file)


def plan_text(uri: str, run_id: str, planned: str) -> str:
    """The plan a job trained with: `planned`, or with trainer.max_micro_batch_size=auto the
    split the workers found and logged (plan.micro_batch_size, plan.accumulation_steps)."""
    params = mlflow_client(uri).get_run(run_id).data.params
    if "plan.auto_micro_batch_size" not in params:
        return planned
    return (
        f"global batch {params['plan.global_batch_size']} = micro-batch "
        f"{params['plan.micro_batch_size']} x {params['plan.accumulation_steps']} accumulation "
        f"step(s) x {params['plan.world_size']} worker(s) (trainer.max_micro_batch_size=auto)"
    )


def run_notes(uri: str, run_id: str) -> list[str]:
    """Lines for a job's end-of-run summary: the attempts it took (when more than one) and what
    the store refused to take (dist_trainer.attempts, REFUSED_TAG)."""
    from dist_trainer.attempts import attempt_history

    tags = mlflow_client(uri).get_run(run_id).data.tags
    notes = []
    history = attempt_history(tags)
    if len(history) > 1:
        notes.append(f"{len(history)} attempts (tags dist_trainer.attempt.*):")
        for n, (record, end) in enumerate(history, 1):
            notes.append(f"  attempt {n}: {record} -> {end or 'no end recorded'}")
    if REFUSED_TAG in tags:
        notes.append(f"MLflow refused part of the run's data: {tags[REFUSED_TAG]}")
    return notes


def describe_job(plan_text: str, metrics: dict[str, float], notes: list[str] | None = None) -> str:
    """A job run's description: its plan, final figures and `notes` (run_notes: attempts,
    refused writes), first on its page in the UI."""
    figures = [
        ("val/loss", "val loss", "{:.4g}"),
        ("val/accuracy", "val accuracy", "{:.4g}"),
        ("train/loss", "train loss (last interval)", "{:.4g}"),
        ("perf/samples_per_s", "samples/s (last interval)", "{:,.0f}"),
        ("perf/elapsed_s", "training time", "{:.3g} s"),
    ]
    lines = [
        f"- {label}: {fmt.format(metrics[key])}" for key, label, fmt in figures if key in metrics
    ]
    extra = "".join(f"\n{note.strip()}\n" if not note.startswith(" ") else f"- {note.strip()}\n"
                    for note in notes or [])  # fmt: skip
    return f"{plan_text}\n\n" + "\n".join(lines) + "\n" + extra


def set_description(uri: str, run_id: str, markdown: str) -> None:
    """The run's description (markdown), shown at the top of its page in the UI."""
    mlflow_client(uri).set_tag(run_id, "mlflow.note.content", markdown[:5000])


def log_table(
    uri: str, run_id: str, columns: list[str], rows: list[list[Any]], artifact_file: str
) -> None:
    """An MLflow table artifact (shown as a table in the UI's artifact view)."""
    data = {c: [row[i] for row in rows] for i, c in enumerate(columns)}
    mlflow_client(uri).log_table(run_id, data=data, artifact_file=artifact_file)


def run_statuses(uri: str, run_ids: list[str]) -> dict[str, str]:
    """Each run's status (RUNNING, FINISHED, FAILED, KILLED)."""
    client = mlflow_client(uri)
    return {run_id: client.get_run(run_id).info.status for run_id in run_ids}


def ended_runs(uri: str, run_ids: list[str]) -> set[str]:
    """The runs among `run_ids` that have ended (FINISHED, FAILED or KILLED)."""
    statuses = run_statuses(uri, run_ids)
    return {run_id for run_id, status in statuses.items() if status != "RUNNING"}


def finish_job_run(uri: str, run_id: str, status: str, error: str | None = None) -> None:
    """Mark the run FINISHED / FAILED / KILLED; a failure keeps its reason as a tag."""
    client = mlflow_client(uri)
    if error:
        client.set_tag(run_id, "error", error[:5000])
    client.set_terminated(run_id, status=status)
