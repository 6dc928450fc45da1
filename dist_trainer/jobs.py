"""A job before it runs: checked, planned, its MLflow run made; what it hands back after.

The launch path's shared ground: the driver (`dist-trainer train`), the warm service, studies,
`resume` and `submit` all build their jobs here, and their worker groups in
dist_trainer.groups. Nothing here starts Ray or a worker: every check that can fail on user
input runs before any training worker starts, so a bad value costs seconds and leaves no
half-made run behind.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dist_trainer import tracking
from dist_trainer.batching import (
    BatchPlan,
    BatchPlanError,
    describe_elastic,
    elastic_params,
    plan_batches,
    plan_elastic,
)
from dist_trainer.config import ConfigError, JobConfig, flatten, resolve_config
from dist_trainer.ray_cluster import Cluster

__all__ = [
    "JobResult",
    "Prepared",
    "check_user_code",
    "config_error_in",
    "create_job_run",
    "driver_tag",
    "error_text",
    "job_payload",
    "job_tags",
    "prepare",
    "ray_train_run_name",
    "run_name",
]


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


def job_tags(prepared: Prepared) -> dict[str, str]:
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


def run_name(prepared: Prepared) -> str:
    job = prepared.job
    if job.tracking.run_name:
        return job.tracking.run_name
    model = str(job.model["_target_"]).rsplit(".", 1)[-1]
    data = str(job.data["_target_"]).rsplit(".", 1)[-1]
    # What differs between runs first: the UI cuts names at ~18 characters.
    workers = job.scaling.describe_workers()
    return f"batch={job.trainer.global_batch_size} workers={workers} {model} {data}"


def error_text(exc: BaseException) -> str:
    """A failure in one line's worth: a ConfigError's message, else its type and message."""
    if isinstance(exc, ConfigError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def ray_train_run_name(run_id: str) -> str:
    """The Ray Train run (its folder under scaling.storage_path) of MLflow run `run_id`."""
    return f"dist_trainer-{run_id}"


def driver_tag() -> str:
    """`host:pid` of this driver, a job run's DRIVER_TAG: resume refuses to take over a run
    whose driver still runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def config_error_in(exc: BaseException) -> ConfigError | None:
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
            **job_tags(prepared),
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
