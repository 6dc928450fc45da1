"""Run the training loop without Ray: under torchrun, or as one plain process.

    python -m dist_trainer.torchrun trainer.max_steps=5                    # one process
    torchrun --nproc_per_node=1 -m dist_trainer.torchrun scaling.use_gpu=true
    torchrun --nproc_per_node=4 -m dist_trainer.torchrun trainer.global_batch_size=256

Takes the same Hydra overrides as `dist-trainer train`. The plan's world size is the number of
processes torchrun starts (`scaling.num_workers` is ignored). Rank 0 creates the MLflow run
unless `tracking.uri=none` (e.g. a GPU box without mlflow) and always ends it: FINISHED,
FAILED (the error kept as the run's `error` tag) or KILLED (Ctrl-C, SIGTERM). Checkpoints go to
`<scaling.storage_path>/torchrun/latest.pt`; rerunning resumes from it.

Mistakes the user fixes (a bad config key, more processes on a node than it has GPUs) end with
one line on stderr, `dist-trainer: ...` naming the fix, and exit code 2, before any process
group or MLflow run exists. `main()` raises them instead (ConfigError), for callers in Python.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from dist_trainer.batching import BatchPlanError, plan_batches
from dist_trainer.checkpoint import LocalCheckpointSink
from dist_trainer.config import ConfigError, flatten, load_config, resolve_config
from dist_trainer.loop import WorkerInfo, run_training

__all__ = ["LaunchError", "Terminated", "cli", "gpu_count_error", "main"]

log = logging.getLogger(__name__)


class LaunchError(ConfigError):
    """The processes do not fit the machine (more per node than GPUs); the message has the fix."""


class Terminated(BaseException):
    """SIGTERM (torchrun stopping its workers, a scheduler's kill) as an exception, so the
    MLflow run is still ended. A BaseException, like KeyboardInterrupt: nothing may swallow it."""


def gpu_count_error(
    local_rank: int, local_world_size: int, device_count: int, use_gpu: Any
) -> str | None:
    """Why this process cannot have a GPU of its own, or None when it can (or runs on CPU).

    Args:
        local_rank: this process's rank on its node (torchrun's LOCAL_RANK): its GPU index.
        local_world_size: processes on this node (torchrun's LOCAL_WORLD_SIZE).
        device_count: GPUs this process sees (torch.cuda.device_count()).
        use_gpu: `scaling.use_gpu`: "auto", True or False.
    """
    if use_gpu is False:
        return None
    if device_count == 0:
        if use_gpu is True:
            return (
                "scaling.use_gpu=true but torch sees no CUDA device. Fix: scaling.use_gpu=auto "
                "(CPU processes with gloo), or run where torch.cuda.is_available() is true"
            )
        return None  # auto: CPU processes
    # Every process of the node decides alike (not only those past the last GPU), so none is
    # left waiting for its peers in init_process_group.
    processes = max(local_world_size, local_rank + 1)
    if processes > device_count:
        return (
            f"torchrun started {processes} processes on this node but it has {device_count} "
            f"visible GPU(s). Fix: torchrun --nproc_per_node={device_count}, or "
            "scaling.use_gpu=false for CPU processes"
        )
    return None


def _compose(overrides: list[str]):
    """The composed config; Hydra's override errors become ConfigError (one line, no trace)."""
    from hydra.errors import HydraException

    try:
        return load_config(overrides)
    except HydraException as exc:
        # The cause's first line says what was wrong (e.g. a value that is not an int).
        cause = str(exc.__cause__ or "").strip().split("\n", 1)[0]
        cause = f" ({cause})" if cause else ""
        raise ConfigError(f"{exc}{cause}") from None


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train with `argv` as Hydra overrides; return rank 0's last metrics.

    Raises ConfigError for a mistake in the config, LaunchError (a ConfigError) for processes
    that do not fit the node's GPUs; both before any process group or MLflow run exists.
    """
    overrides = list(sys.argv[1:] if argv is None else argv)
    cfg = _compose(overrides)
    job = resolve_config(cfg)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    problem = gpu_count_error(
        local_rank,
        int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        torch.cuda.device_count(),
        job.scaling.use_gpu,
    )
    if problem:
        raise LaunchError(problem)
    use_gpu = torch.cuda.is_available() and job.scaling.use_gpu is not False
    # Known before the process group exists: torchrun sets these, a plain process is one rank.
    torchrun = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0)) if torchrun else 0
    try:
        plan = plan_batches(
            job.trainer.global_batch_size,
            int(os.environ["WORLD_SIZE"]) if torchrun else 1,
            job.trainer.micro_batch_cap,
        )
    except BatchPlanError as exc:
        raise ConfigError(str(exc)) from None
    uri = None if job.tracking.uri == "none" else job.tracking.uri
    if uri and rank == 0:
        from dist_trainer import tracking

        uri = tracking.normalize_tracking_uri(uri)
        tracking.check_tracking_uri(uri)

    if use_gpu:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_gpu else "gloo"
    timeout = timedelta(minutes=10)
    if torchrun:
        dist.init_process_group(backend, timeout=timeout)
    else:  # a world of one: an in-memory store, no port to find or env to set
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    try:
        info = WorkerInfo.from_process_group()
        if not use_gpu:
            info = WorkerInfo(
                info.rank, info.world_size, info.local_rank, info.node_rank, torch.device("cpu")
            )
        return _train(cfg, job, plan, info, uri)
    finally:
        dist.destroy_process_group()


def _train(cfg, job, plan, info: WorkerInfo, uri: str | None) -> dict[str, float]:
    """Rank 0 opens the MLflow run; whatever happens, it ends it with the matching status."""
    from dist_trainer import tracking

    run_id: list[str | None] = [None]
    status, error = "FAILED", None
    try:
        if uri and info.rank == 0:
            params = {**flatten(OmegaConf.to_container(cfg, resolve=True)), **plan.as_params()}
            experiment_id = tracking.prepare_store(uri, job.tracking.experiment)
            run_id[0] = tracking.start_job_run(
                uri,
                experiment_id,
                job.tracking.run_name or "torchrun",
                params,
                {"mlflow.source.name": "dist_trainer.torchrun", **job.tracking.tags},
            )
        dist.broadcast_object_list(run_id, src=0)
        sink = LocalCheckpointSink(Path(job.scaling.storage_path) / "torchrun")
        metrics = run_training(job, plan, info, tracking_uri=uri, run_id=run_id[0], sink=sink)
        status = "FINISHED"
    except KeyboardInterrupt:
        status, error = "KILLED", "KeyboardInterrupt: interrupted by the user"
        raise
    except Terminated:
        status, error = "KILLED", "Terminated: SIGTERM (torchrun stops all workers if one fails)"
        raise
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if info.rank == 0 and uri and run_id[0]:
            try:
                tracking.finish_job_run(uri, run_id[0], status, error)
            except Exception as exc:
                if status == "FINISHED":
                    raise
                # Do not hide the training error behind a tracking-store one.
                log.warning("could not mark MLflow run %s %s: %s", run_id[0], status, exc)
    if info.rank == 0:
        print({k: round(v, 6) for k, v in metrics.items() if "/" in k and "node" not in k})
    return metrics


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def cli(argv: list[str] | None = None) -> int:
    """`python -m dist_trainer.torchrun`: main() with user mistakes as one line and exit 2."""
    # Local rank 0 speaks for the node: its peers got the same config and see the same GPUs.
    quiet = int(os.environ.get("LOCAL_RANK", 0)) != 0
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main(argv)
    except ConfigError as exc:
        if not quiet:
            line = " ".join(str(exc).split())  # Hydra's messages span lines
            label = "" if isinstance(exc, LaunchError) else "config error: "
            print(f"dist-trainer: {label}{line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not quiet:
            print("dist-trainer: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
