"""Run the training loop without Ray: under torchrun, or as one plain process.

    python -m dist_trainer.torchrun trainer.max_steps=5                    # one process
    torchrun --nproc_per_node=1 -m dist_trainer.torchrun scaling.use_gpu=true
    torchrun --nproc_per_node=4 -m dist_trainer.torchrun trainer.global_batch_size=256

Takes the same Hydra overrides as `dist-trainer train`. The plan's world size is the number of
processes torchrun starts (`scaling.num_workers` is ignored). Rank 0 creates the MLflow run
unless `tracking.uri=none` (e.g. a GPU box without mlflow). Checkpoints go to
`<scaling.storage_path>/torchrun/latest.pt`; rerunning resumes from it.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from dist_trainer.batching import plan_batches
from dist_trainer.checkpoint import LocalCheckpointSink
from dist_trainer.config import flatten, load_config, resolve_config
from dist_trainer.loop import WorkerInfo, run_training

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    overrides = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(overrides)
    job = resolve_config(cfg)
    use_gpu = torch.cuda.is_available() and job.scaling.use_gpu is not False
    if job.scaling.use_gpu is True and not torch.cuda.is_available():
        raise SystemExit("scaling.use_gpu=true but torch sees no CUDA device")
    if use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" not in os.environ:  # one plain process: a world of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if use_gpu else "gloo", timeout=timedelta(minutes=10))
    try:
        info = WorkerInfo.from_process_group()
        if not use_gpu:
            info = WorkerInfo(
                info.rank, info.world_size, info.local_rank, info.node_rank, torch.device("cpu")
            )
        plan = plan_batches(
            job.trainer.global_batch_size, info.world_size, job.trainer.micro_batch_cap
        )
        uri = None if job.tracking.uri == "none" else job.tracking.uri
        run_id = [None]
        if uri and info.rank == 0:
            from dist_trainer import tracking

            uri = tracking.normalize_tracking_uri(uri)
            params = {**flatten(OmegaConf.to_container(cfg, resolve=True)), **plan.as_params()}
            experiment_id = tracking.prepare_store(uri, job.tracking.experiment)
            run_id[0] = tracking.start_job_run(
                uri,
                experiment_id,
                job.tracking.run_name or "torchrun",
                params,
                {"mlflow.source.name": "dist_trainer.torchrun"},
            )
        dist.broadcast_object_list(run_id, src=0)
        sink = LocalCheckpointSink(Path(job.scaling.storage_path) / "torchrun")
        metrics = run_training(job, plan, info, tracking_uri=uri, run_id=run_id[0], sink=sink)
        if info.rank == 0:
            print({k: round(v, 6) for k, v in metrics.items() if "/" in k and "node" not in k})
        return metrics
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
