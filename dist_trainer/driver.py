"""The driver: check everything, start or join Ray, create the job's MLflow run, launch workers.

Flow: composed config -> checked JobConfig -> BatchPlan -> tracking store and Ray cluster
checked -> one MLflow run -> Ray Train TorchTrainer(dist_trainer.workers.train_fn) -> result.
Every check that can fail on user input runs before any training worker starts, so a bad value
costs seconds and leaves no half-made run behind.

Starting or joining Ray and checking the cluster can place the job: dist_trainer.ray_cluster.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dist_trainer import report, tracking
from dist_trainer.batching import (
    BatchPlan,
    BatchPlanError,
    describe_elastic,
    elastic_params,
    plan_batches,
    plan_elastic,
)
from dist_trainer.config import ConfigError, JobConfig, flatten, resolve_config
from dist_trainer.progress import ProgressReporter
from dist_trainer.ray_cluster import Cluster, start_cluster, storage_path

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

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    """What a finished job hands back.

    Args:
        run_id: the job's MLflow run.
        experiment: its MLflow experiment name.
        tracking_uri: the (absolute) tracking URI.
        metrics: the run's latest metrics.
        plan: the batch plan used.
        checkpoint_path: where Ray Train stored the last checkpoint, if any.
    """

    run_id: str
    experiment: str
    tracking_uri: str
    metrics: dict[str, float]
    plan: BatchPlan
    checkpoint_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Prepared:
    """A job that passed every check that needs no Ray cluster."""

    job: JobConfig
    plan: BatchPlan  # elastic jobs: the plan at scaling.num_workers' max
    config: dict[str, Any]  # the resolved config as plain containers
    tracking_uri: str
    elastic_plans: dict[int, BatchPlan] | None = None  # per worker count, elastic jobs only

    def describe_plan(self) -> str:
        """What a step is, for the console and the run's description."""
        if self.elastic_plans:
            return describe_elastic(self.elastic_plans)
        return self.plan.describe()

    def plan_params(self) -> dict[str, Any]:
        """The plan as MLflow params (elastic: only what stays fixed)."""
        if self.elastic_plans:
            return elastic_params(self.elastic_plans)
        return self.plan.as_params()


def prepare(cfg: DictConfig | dict, check_store: bool = True) -> Prepared:
    """Every check that needs neither Ray nor a worker: config keys, batch plan, tracking store
    (`check_store=False` where only the cluster must reach it: `submit`)."""
    job = resolve_config(cfg)
    if job.tracking.uri == "none":
        raise ConfigError(
            "tracking.uri=none is only for python -m dist_trainer.torchrun; a launched job "
            "logs one MLflow run. Fix: tracking.uri=sqlite:///mlflow.db"
        )
    scaling, trainer = job.scaling, job.trainer
    elastic_plans = None
    try:
        if scaling.elastic:
            elastic_plans = plan_elastic(
                trainer.global_batch_size,
                scaling.min_workers,
                scaling.max_workers,
                trainer.micro_batch_cap,
            )
            # The plan at full size; workers started with fewer re-solve it (dist_trainer.workers).
            plan = elastic_plans[scaling.max_workers]
        else:
            plan = plan_batches(
                trainer.global_batch_size, scaling.num_workers, trainer.micro_batch_cap
            )
    except BatchPlanError as exc:
        raise ConfigError(str(exc)) from None
    uri = tracking.normalize_tracking_uri(job.tracking.uri)
    if check_store:
        tracking.check_tracking_uri(uri)
    container = OmegaConf.to_container(
        cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg), resolve=True
    )
    container.pop("hydra", None)
    return Prepared(job, plan, container, uri, elastic_plans)


def _tags(prepared: Prepared) -> dict[str, str]:
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import ray

    return {
        "mlflow.source.name": "dist-trainer",
        "mlflow.source.git.commit": commit or "unknown",
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        **{str(k): str(v) for k, v in prepared.job.tracking.tags.items()},
    }


def _run_name(prepared: Prepared) -> str:
    job = prepared.job
    if job.tracking.run_name:
        return job.tracking.run_name
    model = str(job.model["_target_"]).rsplit(".", 1)[-1]
    data = str(job.data["_target_"]).rsplit(".", 1)[-1]
    # What differs between runs first: the UI cuts names at ~18 characters.
    workers = job.scaling.describe_workers()
    return f"batch={job.trainer.global_batch_size} workers={workers} {model} {data}"


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
        user_error = _config_error_in(exc)
        if user_error is not None:
            raise user_error from exc
        raise


def _run_ids(worker_config: dict[str, Any]) -> list[str]:
    """The MLflow runs a worker group's config trains: its jobs', or the one run's."""
    jobs = worker_config.get("jobs") or []
    if jobs:
        return [job["run_id"] for job in jobs]
    return [worker_config["run_id"]] if worker_config.get("run_id") else []


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


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
        {**_tags(prepared), **(tags or {})},
        artifacts,
    )
    config = {**worker_config, "run_id": run_id}
    result = _run_and_finish(job, worker_fn, config, run_id, uri, cluster.use_gpu)
    return run_id, result, cluster.use_gpu


def _run_and_finish(
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
        error = _error_text(exc)
        raise
    finally:
        if reporter is not None:
            reporter.stop()
        tracking.finish_job_run(uri, run_id, status, error)


def ray_train_run_name(run_id: str) -> str:
    """The Ray Train run (its folder under scaling.storage_path) of MLflow run `run_id`."""
    return f"dist_trainer-{run_id}"


def driver_tag() -> str:
    """`host:pid` of this driver, a job run's DRIVER_TAG: resume refuses to take over a run
    whose driver still runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _config_error_in(exc: BaseException) -> ConfigError | None:
    """A ConfigError a worker raised (a mistake only the workers could see), as one line."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        if isinstance(current, ConfigError):
            # Ray's RayTaskError(ConfigError) carries the worker's traceback in its str().
            message = getattr(current, "args", ("",))[0] if current.args else str(current)
            return ConfigError(str(message).strip().splitlines()[-1] if message else "")
        todo.extend(getattr(current, "worker_failures", {}).values())
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException):
            todo.append(cause)
    return None


def job_payload(prepared: Prepared, run_id: str) -> dict[str, Any]:
    """What a worker needs to run one job: its resolved config, its plan and its run."""
    plan = prepared.plan
    return {
        "job": prepared.config,
        "plan": {
            "global_batch_size": plan.global_batch_size,
            "world_size": plan.world_size,
            "micro_batch_size": plan.micro_batch_size,
            "accumulation_steps": plan.accumulation_steps,
        },
        "run_id": run_id,
    }


def create_job_run(
    prepared: Prepared,
    cluster: Cluster,
    run_name: str,
    tags: dict[str, str] | None = None,
) -> str:
    """The job's one MLflow run: the whole resolved config and the plan as params."""
    plan, plan_params = prepared.plan, prepared.plan_params()
    plan_text = "\n".join(
        [prepared.describe_plan(), *(f"{k}: {v}" for k, v in plan_params.items())]
    )
    from dist_trainer.build import scaled_lr

    params = {
        **flatten(prepared.config),
        **plan_params,
        "optim.peak_lr": scaled_lr(prepared.job.optim, plan.global_batch_size),
        "scaling.resolved_use_gpu": cluster.use_gpu,
    }
    return tracking.start_job_run(
        prepared.tracking_uri,
        cluster.experiment_id,
        run_name,
        params,
        {
            **_tags(prepared),
            tracking.ROLE_TAG: "job",
            tracking.DRIVER_TAG: driver_tag(),
            **(tags or {}),
        },
        {
            "config.yaml": OmegaConf.to_yaml(OmegaConf.create(prepared.config)),
            "batch_plan.txt": plan_text + "\n",
        },
    )


def check_user_code(prepared: Prepared) -> None:
    """The user's model, data and loss, checked before Ray starts (trainer.preflight)."""
    job = prepared.job
    if job.trainer.auto_micro_batch:
        import torch

        from dist_trainer.autobatch import check_auto_config

        # Workers on CPU need a memory budget to search with: say so before Ray starts when
        # they will surely be CPU workers (the Ray path checks again in the workers).
        local_cpu = job.scaling.address is None and not torch.cuda.is_available()
        if job.scaling.use_gpu is False or local_cpu:
            check_auto_config(job.trainer, "cpu")
    if prepared.job.trainer.preflight:
        from dist_trainer.preflight import preflight  # imports torch: only when it runs

        for note in preflight(prepared.job, prepared.plan).notes:
            print(f"[dist-trainer] {note}", flush=True)


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
    run_id = create_job_run(prepared, cluster, _run_name(prepared))
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
    result = _run_and_finish(job, train_fn, config, run_id, uri, cluster.use_gpu, reporter)
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
