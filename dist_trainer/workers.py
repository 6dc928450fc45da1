"""What Ray Train runs in each worker: read the Ray context, run the group's jobs one by one.

The only place where the worker side touches Ray; dist_trainer.loop stays Ray-free.

One worker group (one `TorchTrainer.fit()`) runs every job of a study that needs the same
workers, one after another: each job gets a fresh model, optimizer, seed, data order and its
own MLflow run, and memory is released between jobs. Starting the group (processes, imports,
process group) is the expensive part on a small machine; a job inside it costs its training.

Checkpoints are namespaced by the job's run id, so a job never resumes from another job's
state; after a worker-group restart (`scaling.max_failures`) the latest checkpoint says which
job was running, the jobs before it are done, and that one resumes, in its own MLflow run: the
steps it replays since the checkpoint are not logged twice (dist_trainer.loop's docstring).
Ray Train kills the old group's workers before it starts the new one, so the old rank 0's logger
writes nothing once the new one has read what the run holds.

An elastic job (`scaling.num_workers=[min, max]`) resizes the same way: Ray Train stops the
group and starts one of the new size, which resumes from the latest checkpoint with the plan
re-solved for its world size; the run records each start's split as plan/* metrics.
"""

from __future__ import annotations

import gc
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import torch
from ray.train.torch import get_device

from dist_trainer import tracking
from dist_trainer.batching import BatchPlan, plan_batches
from dist_trainer.config import ConfigError, JobConfig, resolve_config
from dist_trainer.loop import WorkerInfo, run_training

__all__ = ["RayCheckpointSink", "train_fn"]

_STATE_FILE = "state.pt"
# What Ray Train keeps with each checkpoint (and prints): the full set lives in MLflow.
_REPORTED = ("step", "train/loss", "val/loss", "val/accuracy")


def _checkpoint_job(checkpoint: ray.train.Checkpoint | None) -> str | None:
    """The run id a checkpoint belongs to (its folder is `<run_id>-step_<N>`)."""
    if checkpoint is None:
        return None
    return Path(checkpoint.path).name.split("-step_", 1)[0]


class RayCheckpointSink:
    """Checkpoints of one job through `ray.train.report` (rank 0 writes; every rank reports)."""

    persists = True

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def latest(self) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()
        if _checkpoint_job(checkpoint) != self.run_id:  # none, or an earlier job's
            return None
        with checkpoint.as_directory() as folder:
            return torch.load(Path(folder) / _STATE_FILE, map_location="cpu", weights_only=False)

    def save(self, state: dict[str, Any] | None, metrics: dict[str, float], step: int) -> None:
        with tempfile.TemporaryDirectory(prefix="dist_trainer_ckpt_") as folder:
            checkpoint = None
            if state is not None:
                torch.save(state, Path(folder) / _STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            # A barrier over all workers: every rank reports the same number of times.
            ray.train.report(
                {k: v for k, v in metrics.items() if k in _REPORTED},
                checkpoint=checkpoint,
                checkpoint_dir_name=f"{self.run_id}-step_{step:08d}",
            )


def _log_like_the_driver(rank: int) -> None:
    """dist_trainer's own log lines, marked so the driver's console can pick them out of the
    workers' output (dist_trainer.console); Ray configures the root logger before us."""
    logger = logging.getLogger("dist_trainer")
    if not any(getattr(h, "dist_trainer", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.dist_trainer = True
        handler.setFormatter(logging.Formatter("[dist-trainer] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _placement(rank: int) -> tuple[int, int]:
    """(node index, rank on that node) by Ray node, for telemetry keys (`node1/rank0`).

    Ray Train's node rank groups workers by IP address, so two Ray nodes on one machine (a
    simulated cluster, or one raylet per GPU group) would look like one node. Node ids tell
    them apart: nodes are numbered in the order of their first rank, so rank 0 is on node0.
    """
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, mine)
    return list(dict.fromkeys(nodes)).index(mine), nodes[:rank].count(mine)


def _plan_for(plan: BatchPlan, world_size: int, job: JobConfig) -> BatchPlan:
    """The driver's plan, re-solved for the workers Ray Train started: an elastic job
    (`scaling.num_workers=[min, max]`) may run with any count in its range, and after a resize
    the same global batch is split over the new count (the driver checked every count)."""
    if plan.world_size == world_size:
        return plan
    return plan_batches(plan.global_batch_size, world_size, job.trainer.micro_batch_cap)


def _jobs_to_run(jobs: list[dict[str, Any]], uri: str, info: WorkerInfo) -> list[dict[str, Any]]:
    """The group's jobs still to run: after a restart, from the one its latest checkpoint
    belongs to, less those whose runs have ended (a job that finished, then the next one
    failed before its first checkpoint: the latest checkpoint is the finished job's).

    Rank 0 decides and tells the others: a rank's `get_checkpoint()` is the latest checkpoint
    it reported itself, and only rank 0 reports state (dist_trainer.loop), so inside a warm
    group the ranks' views differ."""
    import torch.distributed as dist

    chosen: list[Any] = [None]
    if info.rank == 0:
        pending = jobs
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            run_ids = [job["run_id"] for job in jobs]
            resumed = _checkpoint_job(checkpoint)
            pending = jobs[run_ids.index(resumed) :] if resumed in run_ids else jobs
            ended = tracking.ended_runs(uri, [job["run_id"] for job in pending])
            pending = [job for job in pending if job["run_id"] not in ended]
        chosen[0] = [job["run_id"] for job in pending]
    if info.world_size > 1:
        device = info.device if info.device.type == "cuda" else None
        dist.broadcast_object_list(chosen, src=0, device=device)
    return [job for job in jobs if job["run_id"] in chosen[0]]


def train_fn(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point: `config["jobs"]` in order, from the driver."""
    context = ray.train.get_context()
    _log_like_the_driver(context.get_world_rank())
    node_rank, local_rank = _placement(context.get_world_rank())
    info = WorkerInfo(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=local_rank,
        node_rank=node_rank,
        device=get_device(),  # Ray's own mapping of this worker to its GPU
    )
    jobs = config["jobs"]
    uri = config["tracking_uri"]
    for job in _jobs_to_run(jobs, uri, info):
        try:
            job_config = resolve_config(job["job"])
            run_training(
                job_config,
                _plan_for(BatchPlan(**job["plan"]), info.world_size, job_config),
                info,
                tracking_uri=uri,
                run_id=job["run_id"],
                sink=RayCheckpointSink(job["run_id"]),
            )
        except ConfigError as exc:
            # The user's mistake, found where only a worker sees it (e.g. a model that cannot
            # run on meta tensors): raised without the loop's frames, so Ray prints a short
            # traceback, and the driver turns it into one line (jobs.config_error_in).
            raise ConfigError(str(exc)).with_traceback(None) from None
        if info.rank == 0:
            # The driver learns from the store which jobs of the group are done.
            tracking.finish_job_run(uri, job["run_id"], "FINISHED")
        gc.collect()  # the next job starts from the memory this one had
        if info.device.type == "cuda":
            torch.cuda.empty_cache()
