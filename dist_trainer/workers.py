"""What Ray Train runs in each worker: read the Ray context, hand the loop a checkpoint sink.

The only place where the worker side touches Ray; dist_trainer.loop stays Ray-free.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray.train
import torch
from ray.train.torch import get_device

from dist_trainer.batching import BatchPlan
from dist_trainer.config import ConfigError, resolve_config
from dist_trainer.loop import WorkerInfo, run_training

__all__ = ["RayCheckpointSink", "train_fn"]

_STATE_FILE = "state.pt"
# What Ray Train keeps with each checkpoint (and prints): the full set lives in MLflow.
_REPORTED = ("step", "train/loss", "val/loss", "val/accuracy")


class RayCheckpointSink:
    """Checkpoints through `ray.train.report` (rank 0 writes; every rank reports)."""

    def latest(self) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
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
                checkpoint_dir_name=f"step_{step:08d}",
            )


def train_fn(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point; `config` comes from the driver."""
    context = ray.train.get_context()
    info = WorkerInfo(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        node_rank=context.get_node_rank(),
        device=get_device(),
    )
    try:
        run_training(
            resolve_config(config["job"]),
            BatchPlan(**config["plan"]),
            info,
            tracking_uri=config["tracking_uri"],
            run_id=config["run_id"],
            sink=RayCheckpointSink(),
        )
    except ConfigError as exc:
        # The user's mistake, found where only a worker sees it (e.g. a model that cannot run
        # on meta tensors): raised without the loop's frames, so Ray prints a short traceback,
        # and the driver turns it into one line (driver._config_error_in).
        raise ConfigError(str(exc)).with_traceback(None) from None
