"""The driver: check everything, start or join Ray, create the job's MLflow run, launch workers.

Flow: composed config -> checked JobConfig -> BatchPlan -> tracking store and Ray cluster
checked (dist_trainer.jobs) -> one MLflow run -> Ray Train TorchTrainer(dist_trainer.workers.
train_fn) (dist_trainer.groups) -> result. Every check that can fail on user input runs before
any training worker starts, so a bad value costs seconds and leaves no half-made run behind.

Starting or joining Ray and checking the cluster can place the job: dist_trainer.ray_cluster.
The job-level names that used to live here (`prepare`, `Prepared`, `JobResult`, `launch`, ...)
are in dist_trainer.jobs and dist_trainer.groups and still import from here.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from dist_trainer import report, tracking
from dist_trainer.groups import launch, run_and_finish, run_group
from dist_trainer.jobs import (
    JobResult,
    Prepared,
    check_user_code,
    create_job_run,
    job_payload,
    prepare,
    run_name,
)
from dist_trainer.progress import ProgressReporter
from dist_trainer.ray_cluster import Cluster, start_cluster

__all__ = [
    "JobResult",
    "Prepared",
    "check_user_code",
    "create_job_run",
    "job_payload",
    "launch",
    "prepare",
    "run_group",
    "train",
    "train_in_run",
]


def train(cfg: DictConfig | dict, show_progress: bool = True) -> JobResult:
    """Run one training job end to end and return its result (raises ConfigError on bad input)."""
    t_start = time.perf_counter()
    prepared = prepare(cfg)
    job = prepared.job
    print(f"[dist-trainer] {prepared.describe_plan()}", flush=True)
    check_user_code(prepared)
    from dist_trainer.warm import run_in_service  # `dist-trainer cluster up`'s warm group

    warm = run_in_service(prepared, t_start, show_progress)
    if warm is not None:
        return warm
    cluster = start_cluster(prepared.job, prepared.tracking_uri)
    run_id = create_job_run(prepared, cluster, run_name(prepared))
    print(
        f"[dist-trainer] MLflow run {run_id} in experiment '{job.tracking.experiment}'", flush=True
    )
    return train_in_run(prepared, cluster, run_id, t_start, show_progress)


def train_in_run(
    prepared: Prepared, cluster: Cluster, run_id: str, t_start: float, show_progress: bool = True
) -> JobResult:
    """Run the job into its MLflow run (new, or resumed by dist_trainer.resume), then give the
    run its description, communication summary and the terminal its summary.

    The Ray Train run is named after the MLflow run, so a driver started again for the same
    run (dist-trainer resume) finds the checkpoints of the one that died."""
    from dist_trainer.workers import train_fn

    job, plan, uri = prepared.job, prepared.plan, prepared.tracking_uri
    reporter = ProgressReporter(uri, run_id, enabled=show_progress)
    config = {"jobs": [job_payload(prepared, run_id)]}
    result = run_and_finish(job, train_fn, config, run_id, uri, cluster.use_gpu, reporter)
    metrics = tracking.latest_metrics(uri, run_id)
    text = tracking.plan_text(uri, run_id, prepared.describe_plan())
    notes = tracking.run_notes(uri, run_id)
    tracking.set_description(uri, run_id, tracking.describe_job(text, metrics, notes))
    elapsed = time.perf_counter() - t_start
    # An elastic job's comm figures compare against the size it finished with.
    world_size = int(metrics.get("plan/world_size", plan.world_size))
    summary = report.comm_summary(uri, run_id, world_size, "nccl" if cluster.use_gpu else "gloo")
    if summary is not None:
        tracking.log_text(uri, run_id, summary.to_markdown(), "comm_summary.md")
    ProgressReporter(uri, run_id).summary(
        metrics,
        elapsed,
        summary,
        tracking.ui_url(uri, cluster.experiment_id, run_id),
        notes,
    )
    checkpoint = result.checkpoint.path if result.checkpoint else None
    return JobResult(
        run_id, job.tracking.experiment, uri, metrics, plan, checkpoint, {"total_s": elapsed}
    )
