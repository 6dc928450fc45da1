"""`dist-trainer bench-comm`: all-reduce time and bandwidth over message sizes, on the workers
training would use (same Ray scaling, gloo on CPU or NCCL on GPU).

Each size (1 KiB to 256 MiB, doubling, by default) is warmed up, then timed `comm.sweep_repeats`
times as blocking all-reduces; the median, maxed over ranks, is the point. Rank 0 logs the curve
into the job's own MLflow run (metrics `bench_comm/time_s`, `bench_comm/algbw_gbps`,
`bench_comm/busbw_gbps` with the message size in bytes as the step), the α-β fit (latency α,
bus bandwidth β: t(S) = α + S·2(n−1)/n / β for a ring all-reduce), a CSV and a PNG. A later
training run in the same store compares its achieved bus bandwidth against this curve
(dist_trainer.report).
"""

from __future__ import annotations

import csv
import os
import tempfile
from typing import Any

import torch

from dist_trainer import sweep as comm_sweep
from dist_trainer.config import ConfigError
from dist_trainer.run_logger import RunLogger
from dist_trainer.tracking import BENCH_TAG

__all__ = ["run_bench_comm", "sweep_and_log"]

# Tag that marks bench-comm runs, so training runs can find their reference curve.


def sweep_and_log(
    rank: int,
    world_size: int,
    device: torch.device,
    sweep: dict[str, int],
    tracking_uri: str | None,
    run_id: str | None,
) -> list[comm_sweep.SweepPoint]:
    """Every rank sweeps; rank 0 fits, plots and logs. Needs an initialized process group."""
    sizes = comm_sweep.default_sweep_sizes(sweep["min_bytes"], sweep["max_bytes"])
    points = comm_sweep.allreduce_sweep(
        sizes, warmup=sweep["warmup"], repeats=sweep["repeats"], device=device
    )
    if rank != 0:
        return points
    fit = comm_sweep.fit_alpha_beta(
        [p.size_bytes for p in points], [p.time_s for p in points], world_size
    )
    backend = "nccl" if device.type == "cuda" else "gloo"
    for p in points:
        print(
            f"  {p.size_bytes:>11,d} B  {p.time_s * 1e6:>10.1f} us  algbw "
            f"{p.algbw_gbps:8.3f} GB/s  busbw {p.busbw_gbps:8.3f} GB/s",
            flush=True,
        )
    print(
        f"  alpha-beta fit: alpha {fit.alpha_s * 1e6:.1f} us, beta "
        f"{fit.beta_bytes_per_s / 1e9:.3f} GB/s, r2 {fit.r2:.4f}",
        flush=True,
    )
    if not (tracking_uri and run_id):
        return points
    logger = RunLogger(tracking_uri, run_id)
    folder = tempfile.mkdtemp(prefix="dist_trainer_bench_comm_")
    try:
        for p in points:
            logger.log_metrics(
                {
                    "bench_comm/time_s": p.time_s,
                    "bench_comm/algbw_gbps": p.algbw_gbps,
                    "bench_comm/busbw_gbps": p.busbw_gbps,
                },
                step=p.size_bytes,
            )
        logger.log_metrics(
            {
                "bench_comm/alpha_s": fit.alpha_s,
                "bench_comm/beta_gbps": fit.beta_bytes_per_s / 1e9,
                "bench_comm/fit_r2": fit.r2,
            },
            step=0,
        )
        logger.log_params({"bench_comm.backend": backend, "bench_comm.sizes": len(points)})
        table = os.path.join(folder, "allreduce_sweep.csv")
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["size_bytes", "time_s", "algbw_gbps", "busbw_gbps"])
            writer.writerows([p.size_bytes, p.time_s, p.algbw_gbps, p.busbw_gbps] for p in points)
        plot = os.path.join(folder, "allreduce_sweep.png")
        comm_sweep.plot_sweep(points, fit, plot, f"all-reduce, {backend}, {world_size} workers")
        logger.log_artifact(table)
        logger.log_artifact(plot)
    finally:
        logger.close()
    return points


def _bench_comm_fn(config: dict[str, Any]) -> None:
    """Ray Train worker entry for the sweep."""
    import ray.train
    from ray.train.torch import get_device

    context = ray.train.get_context()
    sweep_and_log(
        context.get_world_rank(),
        context.get_world_size(),
        get_device(),
        config["sweep"],
        config["tracking_uri"],
        config["run_id"],
    )


def run_bench_comm(cfg: Any) -> str:
    """Driver side: same checks and worker set-up as `train`, its own MLflow run; returns its id."""
    from dist_trainer.groups import launch
    from dist_trainer.jobs import prepare

    prepared = prepare(cfg)
    job = prepared.job
    if job.scaling.elastic:
        raise ConfigError(
            f"scaling.num_workers={job.scaling.num_workers}: bench-comm measures one worker "
            f"count. Fix: scaling.num_workers={job.scaling.max_workers}"
        )
    sweep = {
        "min_bytes": job.comm.sweep_min_bytes,
        "max_bytes": job.comm.sweep_max_bytes,
        "warmup": job.comm.sweep_warmup,
        "repeats": job.comm.sweep_repeats,
    }
    print(
        f"[dist-trainer] all-reduce sweep {sweep['min_bytes']:,d} to {sweep['max_bytes']:,d} "
        f"bytes on {job.scaling.num_workers} workers",
        flush=True,
    )
    run_id, _, _ = launch(
        prepared,
        _bench_comm_fn,
        {"sweep": sweep},
        job.tracking.run_name or f"bench-comm-w{job.scaling.num_workers}",
        {
            "scaling.num_workers": job.scaling.num_workers,
            "scaling.use_gpu": job.scaling.use_gpu,
            "scaling.cpus_per_worker": job.scaling.cpus_per_worker,
            **{f"comm.sweep_{k}": v for k, v in sweep.items()},
        },
        tags={BENCH_TAG: "bench-comm"},
    )
    print(
        f"[dist-trainer] bench-comm run {run_id}: curve, alpha-beta fit and "
        "allreduce_sweep.png are in MLflow (`make ui`)",
        flush=True,
    )
    return run_id
