"""Worker groups: one Ray Train `fit()` per group, and a run that always ends.

`run_group` starts the workers of a job's `scaling` on Ray Train (dist_trainer.workers runs the
training loop in each); `run_and_finish` ends the job's MLflow run FINISHED, FAILED or KILLED
whatever happens; `launch` does both for verbs with one run of their own (bench-comm). The
driver, the warm service and studies run their groups through here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dist_trainer import tracking
from dist_trainer.config import JobConfig
from dist_trainer.jobs import Prepared, config_error_in, error_text, job_tags, ray_train_run_name
from dist_trainer.progress import ProgressReporter
from dist_trainer.ray_cluster import start_cluster, storage_path

__all__ = ["launch", "run_and_finish", "run_group"]


def run_group(
    job: JobConfig,
    worker_fn: Callable[[dict[str, Any]], None],
    worker_config: dict[str, Any],
    name: str,
    tracking_uri: str,
    use_gpu: bool,
) -> Any:
    """One Ray Train `fit()`: one worker group for `job.scaling` running `worker_fn`.

    `worker_fn` receives `worker_config` plus `tracking_uri`. Raises ConfigError when a worker
    found the user's mistake (one line), else Ray Train's own error. Each time Ray Train sees
    the workers fail, the running job's run records why (dist_trainer.attempts).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dist_trainer.ray_callbacks import FailureRecorder

    scaling = job.scaling
    elastic = (
        {
            "num_workers": (scaling.min_workers, scaling.max_workers),
            "elastic_resize_monitor_interval_s": scaling.elastic_resize_interval_s,
        }
        if scaling.elastic
        else {"num_workers": scaling.num_workers}
    )
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={**worker_config, "tracking_uri": tracking_uri},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            **elastic,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": job.scaling.cpus_per_worker,
                **job.scaling.resources_per_worker,
            },
            placement_strategy=job.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path(job.scaling.storage_path),
            failure_config=FailureConfig(max_failures=job.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[FailureRecorder(tracking_uri, _run_ids(worker_config))]
            if tracking_uri
            else [],
        ),
    )
    try:
        return trainer.fit()
    except Exception as exc:
        user_error = config_error_in(exc)
        if user_error is not None:
            raise user_error from exc
        raise


def _run_ids(worker_config: dict[str, Any]) -> list[str]:
    """The MLflow runs a worker group's config trains: its jobs', or the one run's."""
    jobs = worker_config.get("jobs") or []
    if jobs:
        return [job["run_id"] for job in jobs]
    return [worker_config["run_id"]] if worker_config.get("run_id") else []


def launch(
    prepared: Prepared,
    worker_fn: Callable[[dict[str, Any]], None],
    worker_config: dict[str, Any],
    run_name: str,
    params: dict[str, Any],
    artifacts: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
) -> tuple[str, Any, bool]:
    """Start Ray, create one MLflow run, run `worker_fn` on the workers, close the run.

    For verbs with one run (bench-comm): `worker_fn` receives `worker_config` plus `run_id`
    and `tracking_uri`. Returns the run id, Ray Train's result and whether workers used GPUs.
    The run ends FINISHED, FAILED (with the error as a tag) or KILLED, whatever happens.
    """
    job, uri = prepared.job, prepared.tracking_uri
    cluster = start_cluster(prepared.job, prepared.tracking_uri)
    run_id = tracking.start_job_run(
        uri,
        cluster.experiment_id,
        run_name,
        {**params, "scaling.resolved_use_gpu": cluster.use_gpu},
        {**job_tags(prepared), **(tags or {})},
        artifacts,
    )
    config = {**worker_config, "run_id": run_id}
    result = run_and_finish(job, worker_fn, config, run_id, uri, cluster.use_gpu)
    return run_id, result, cluster.use_gpu


def run_and_finish(
    job: JobConfig,
    worker_fn: Callable[[dict[str, Any]], None],
    worker_config: dict[str, Any],
    run_id: str,
    uri: str,
    use_gpu: bool,
    reporter: ProgressReporter | None = None,
) -> Any:
    """`run_group` for one run, which then ends FINISHED, FAILED (the error as a tag) or
    KILLED, whatever happens."""
    status, error = "FAILED", None
    if reporter is not None:
        reporter.start()
    try:
        result = run_group(job, worker_fn, worker_config, ray_train_run_name(run_id), uri, use_gpu)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status, error = "KILLED", "interrupted by the user"
        raise
    except Exception as exc:
        error = error_text(exc)
        raise
    finally:
        if reporter is not None:
            reporter.stop()
        tracking.finish_job_run(uri, run_id, status, error)
