"""The training loop every worker runs: DDP, exact gradient accumulation, honest metrics.

It knows nothing of Ray. The Ray glue (dist_trainer.workers) hands it a checkpoint sink; it also
runs under torchrun or as one process (dist_trainer.torchrun):

    torchrun --nproc_per_node=1 -m dist_trainer.torchrun trainer.max_steps=20     # one GPU
    torchrun --nproc_per_node=8 -m dist_trainer.torchrun                          # one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=host:29500 -m dist_trainer.torchrun

Per optimizer step each rank runs `plan.accumulation_steps` micro-steps, all but the last under
`no_sync()` so gradients are all-reduced once. Each micro-step's loss is the *sum* of per-sample
losses divided by global_count, the samples of the step's whole global batch over all ranks; the
all-reduce sums over ranks, so the applied gradient is the mean over the global batch, exactly
what one process would compute on it (also for a short last batch, where global_count is
smaller). With DDP's built-in hook, which averages over ranks, the scale is world/global_count.
Logged numbers are all-gathered over ranks every `trainer.log_every_n_steps` steps (one small
collective); nothing syncs per step.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dist_trainer import comm, telemetry
from dist_trainer.batching import BatchPlan
from dist_trainer.build import build_data, build_model, build_optimizer, build_scheduler
from dist_trainer.checkpoint import CheckpointSink, LocalCheckpointSink
from dist_trainer.config import JobConfig
from dist_trainer.metrics import GPU_KEYS, StepClock, comm_metrics, mean
from dist_trainer.sampling import GlobalBatchSampler, StepBatch, shard_for_rank
from dist_trainer.tasks import loss_sums
from dist_trainer.tracking import NullLogger, RunLogger, SystemMetrics

__all__ = ["Trainer", "WorkerInfo", "run_training"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerInfo:
    """Where this worker sits.

    Args:
        rank: global rank (0 logs training metrics).
        world_size: number of ranks.
        local_rank: rank within the node (the GPU index on that node).
        node_rank: index of the node.
        device: torch device this worker computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    device: torch.device

    @classmethod
    def from_process_group(cls) -> WorkerInfo:
        """Read rank/world from the process group and torchrun's environment variables."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        node_rank = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", 0)))
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        return cls(rank, world, local_rank, node_rank, device)


class Trainer:
    """One worker's share of a training job. `fit()` runs it; tests drive `train_step()`."""

    def __init__(
        self,
        job: JobConfig,
        plan: BatchPlan,
        info: WorkerInfo,
        logger: NullLogger | None = None,
        sink: CheckpointSink | None = None,
    ) -> None:
        if plan.world_size != info.world_size:
            raise ValueError(
                f"the plan is for {plan.world_size} workers but {info.world_size} are running"
            )
        self.job, self.plan, self.info = job, plan, info
        self.logger = logger or NullLogger()
        self.sink = sink or LocalCheckpointSink(None)
        self.device = info.device
        self.dtype = getattr(torch, job.trainer.dtype)
        torch.manual_seed(job.trainer.seed)  # same init on every rank (DDP also broadcasts it)

        self.data = build_data(job)
        self.train_x, self.train_y = self._on_device(self.data.train)
        self.val_x, self.val_y = self._on_device(self.data.val)
        self.model = build_model(job, self.data).to(device=self.device, dtype=self.dtype)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.ddp: torch.nn.Module = self.model
        # divide=False: the hook sums and train_step's loss scale carries the 1/world_size.
        self.meter = comm.CommMeter(enabled=job.comm.enabled and self.distributed, divide=False)
        if self.distributed:
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                bucket_cap_mb=job.scaling.bucket_cap_mb,
            )
            self.meter.attach(self.ddp)
        self.sampler = GlobalBatchSampler(
            len(self.train_x), plan, info.rank, job.trainer.seed, drop_last=job.trainer.drop_last
        )
        epoch_steps = self.sampler.steps_per_epoch * job.trainer.max_epochs
        self.total_steps = min(job.trainer.max_steps or epoch_steps, epoch_steps)
        self.optimizer = build_optimizer(job.optim, self.model.parameters(), plan.global_batch_size)
        self.scheduler = build_scheduler(self.optimizer, job.optim, self.total_steps)
        self.step = 0  # optimizer steps taken
        self.epoch = 0
        self.step_in_epoch = 0
        self.clock = StepClock(self.device)
        self.sampler_gpu = (
            telemetry.GpuSampler.for_device(self.device, job.telemetry.interval_s)
            if job.telemetry.enabled and self.device.type == "cuda"
            else None
        )
        self._reset_interval()

    # ---------------------------------------------------------------- data
    def _on_device(self, dataset: Any) -> tuple[Any, Any]:
        """TensorDatasets move to the device once; other datasets are collated per micro-batch."""
        tensors = getattr(dataset, "tensors", None)
        if tensors is not None and len(tensors) == 2:
            x, y = (t.to(self.device) for t in tensors)
            if x.is_floating_point():
                x = x.to(self.dtype)
            if y.is_floating_point():
                y = y.to(self.dtype)
            return x, y
        return dataset, None

    def _fetch(
        self, x_all: Any, y_all: Any, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if y_all is not None:
            idx = idx.to(self.device, non_blocking=True)
            return x_all[idx], y_all[idx]
        items = [x_all[int(i)] for i in idx]
        if not items:
            raise ValueError("an empty micro-batch from a non-tensor dataset cannot be collated")
        x, y = torch.utils.data.default_collate(items)
        x = x.to(self.device, dtype=self.dtype if x.is_floating_point() else None)
        y = y.to(self.device, dtype=self.dtype if y.is_floating_point() else None)
        return x, y

    # ---------------------------------------------------------------- steps
    def _micro_step(self, idx: torch.Tensor, scale: float, sync: bool) -> tuple[torch.Tensor, ...]:
        x, y = self._fetch(self.train_x, self.train_y, idx)
        with contextlib.nullcontext() if sync or not self.distributed else self.ddp.no_sync():
            loss_sum, correct, count = loss_sums(self.data.task, self.ddp(x), y)
            (loss_sum * scale).backward()
        return loss_sum.detach(), correct, count

    def train_step(self, batch: StepBatch) -> None:
        """One optimizer step: accumulate the micro-steps, all-reduce once, update."""
        # Scale the sum of per-sample losses so the all-reduced gradient is the mean over the
        # whole global batch: the meter's hook sums over ranks (no division pass over the
        # gradients), DDP's built-in hook averages, so then the scale carries world_size.
        world = 1 if self.meter.attached else self.info.world_size
        scale = world / batch.global_count
        micro = batch.micro_batches
        stamps = []
        probe = (
            self.meter.enabled
            and len(micro) == 1
            # Step 1 (not 0: DDP's first iteration builds its buckets), then every N steps.
            and (
                self.step == 1
                or (self.step > 0 and self.step % self.job.comm.probe_every_n_steps == 0)
            )
        )
        if probe:  # compute-only reference for comm/exposed_s; its gradients are thrown away
            t0 = self.clock.stamp()
            self._micro_step(micro[0], scale, sync=False)
            stamps.append((t0, self.clock.stamp()))
            self.optimizer.zero_grad(set_to_none=True)
        step_start = self.clock.stamp() if self.meter.enabled else None
        for i, idx in enumerate(micro):
            timed = self.meter.enabled and i >= len(micro) - 2
            t0 = self.clock.stamp() if timed else None
            loss_sum, correct, count = self._micro_step(idx, scale, sync=i == len(micro) - 1)
            if timed:
                stamps.append((t0, self.clock.stamp()))
            self._loss_sum += loss_sum
            self._correct += correct
            self._count += count
        if self.job.trainer.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.job.trainer.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.end_step()
        self.step += 1
        self._samples += batch.global_count
        self._steps += 1
        # (compute-only micro-step, synchronizing micro-step), comparable only at equal sizes.
        if len(stamps) == 2 and all(len(m) == len(micro[-1]) for m in micro):
            step_span = (step_start, self.clock.stamp())
            self._exposed_pairs.append((stamps[0], stamps[1], probe, step_span))

    def _reset_interval(self) -> None:
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        self._loss_sum, self._correct, self._count = zero.clone(), zero.clone(), zero.clone()
        self._samples = 0
        self._steps = 0
        # (compute-only stamps, synchronizing stamps, was a probe, the whole step's stamps)
        self._exposed_pairs: list[tuple[Any, Any, bool, Any]] = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._interval_start = time.perf_counter()
        self._paused_s = 0.0  # validation and checkpoints inside the interval: not step time

    # ---------------------------------------------------------------- metrics
    def _gather(self, values: list[float], on_device: list[torch.Tensor]) -> torch.Tensor:
        """Every rank's vector, as a [world, K] float64 tensor (one collective)."""
        local = torch.cat(
            [
                torch.stack(on_device).to(torch.float64),
                torch.tensor(values, dtype=torch.float64, device=self.device),
            ]
        )
        if not self.distributed:
            return local[None].cpu()
        out = [torch.empty_like(local) for _ in range(self.info.world_size)]
        dist.all_gather(out, local)
        return torch.stack(out).cpu()

    def log_interval(self) -> dict[str, float]:
        """All-gather the interval's numbers; rank 0 logs them. Returns what was logged."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._interval_start
        probe_s = sum(self.clock.seconds(a0, a1) for (a0, a1), _, p, _ in self._exposed_pairs if p)
        measured_steps_s = sum(self.clock.seconds(*span) for *_, span in self._exposed_pairs)
        exposed = [
            comm.exposed_comm_s(self.clock.seconds(*sync), self.clock.seconds(*compute))
            for compute, sync, _, _ in self._exposed_pairs
        ]
        steps_comm = self.meter.collect()
        nan = float("nan")
        per_rank = {
            "comm_s": mean([s.allreduce_s for s in steps_comm]),
            "comm_bytes": mean([s.bytes for s in steps_comm]),
            "buckets": mean([s.buckets for s in steps_comm]),
            "exposed_s": mean(exposed),
            # Share of the measured steps' own time, so a slow step is not set against the mean.
            "exposed_fraction": sum(exposed) / measured_steps_s if exposed else float("nan"),
            "step_s": (wall - probe_s - self._paused_s) / max(1, self._steps),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0,
            **telemetry.peak_device_memory(self.device),
        }
        gpu = self.sampler_gpu.snapshot() if self.sampler_gpu else {}
        keys = sorted(per_rank) + [f"gpu.{k}" for k in GPU_KEYS]
        values = [per_rank[k] for k in sorted(per_rank)] + [gpu.get(k, nan) for k in GPU_KEYS]
        table = self._gather(values, [self._loss_sum, self._correct, self._count])
        loss_sum, correct, count = table[:, 0].sum(), table[:, 1].sum(), table[:, 2].sum()
        cols = {k: table[:, 3 + i] for i, k in enumerate(keys)}
        step_s = float(cols["step_s"].max())  # the slowest rank sets the pace
        metrics = {
            "train/loss": float(loss_sum) / max(1, self._samples),
            "train/accuracy": float(correct) / max(1.0, float(count)),
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/epoch": self.epoch + self.step_in_epoch / self.sampler.steps_per_epoch,
            "perf/step_time_s": step_s,
            "perf/samples_per_s": self._samples / max(1e-12, step_s * self._steps),
            "mem/peak_rss_bytes_max": float(cols["peak_rss"].max()),
        }
        if self.meter.enabled:
            metrics.update(comm_metrics(cols, self.info.world_size))
        for key in ("peak_allocated_bytes", "peak_reserved_bytes"):
            if key in cols:
                metrics[f"mem/{key}_max"] = float(cols[key].max())
        metrics.update(self._per_worker_metrics(cols))
        metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}
        self.logger.log_metrics(metrics, step=self.step)
        self._reset_interval()
        return metrics

    def _per_worker_metrics(self, cols: dict[str, torch.Tensor]) -> dict[str, float]:
        """Telemetry named for the worker it comes from: node and local rank in the key."""
        out: dict[str, float] = {}
        local_ranks = self._worker_ids()
        for rank, (node, local) in enumerate(local_ranks):
            where = f"node{node}/rank{local}"
            out[f"mem/{where}/peak_rss_bytes"] = float(cols["peak_rss"][rank])
            if "peak_allocated_bytes" in cols:
                out[f"mem/{where}/peak_allocated_bytes"] = float(cols["peak_allocated_bytes"][rank])
            for key in GPU_KEYS:
                out[f"system/{where}/{key}"] = float(cols[f"gpu.{key}"][rank])
        return out

    def _worker_ids(self) -> list[tuple[int, int]]:
        if not hasattr(self, "_ids"):
            mine = torch.tensor([self.info.node_rank, self.info.local_rank], device=self.device)
            if self.distributed:
                out = [torch.empty_like(mine) for _ in range(self.info.world_size)]
                dist.all_gather(out, mine)
            else:
                out = [mine]
            self._ids = [tuple(int(v) for v in t.tolist()) for t in out]
        return self._ids

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation over this rank's share of the split, summed over ranks."""
        self.model.eval()
        idx = shard_for_rank(torch.arange(len(self.val_x)), self.info.rank, self.info.world_size)
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        loss_sum, correct, count = zero.clone(), zero.clone(), zero.clone()
        for chunk in idx.split(max(1, 2 * self.plan.micro_batch_size)):
            x, y = self._fetch(self.val_x, self.val_y, chunk)
            ls, c, n = loss_sums(self.data.task, self.model(x), y)
            loss_sum += ls
            correct += c
            count += n
        totals = torch.stack([loss_sum, correct, count, zero + len(idx)])
        if self.distributed:
            dist.all_reduce(totals)
        self.model.train()
        loss_sum, correct, count, samples = totals.tolist()
        return {"val/loss": loss_sum / max(1.0, samples), "val/accuracy": correct / max(1.0, count)}

    # ---------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]

    def checkpoint(self, metrics: dict[str, float]) -> None:
        started = time.perf_counter()
        state = self.state() if self.info.rank == 0 else None
        self.sink.save(state, {"step": self.step, **metrics}, self.step)
        self._last_checkpoint = self.step
        self._paused_s += time.perf_counter() - started

    # ---------------------------------------------------------------- run
    def fit(self) -> dict[str, float]:
        """Train to `total_steps`, validating, logging and checkpointing on the way."""
        trainer = self.job.trainer
        resumed = self.sink.latest()
        if resumed is not None:
            self.load_state(resumed)
            log.info("resumed from step %d (epoch %d)", self.step, self.epoch)
        if self.info.rank == 0:
            self.logger.log_params(
                {
                    "plan.steps_per_epoch": self.sampler.steps_per_epoch,
                    "plan.total_steps": self.total_steps,
                    "data.train_samples": len(self.train_x),
                    "data.val_samples": len(self.val_x),
                    "model.parameters": sum(p.numel() for p in self.model.parameters()),
                }
            )
        if self.sampler_gpu:
            self.sampler_gpu.start()
        elif self.job.telemetry.enabled and self.info.rank == 0:
            log.info("GPU telemetry is off: workers run on %s", self.device.type)
        self._last_checkpoint = self.step
        last: dict[str, float] = {}
        self._reset_interval()
        while self.step < self.total_steps:
            order = self.sampler.epoch_order(self.epoch)
            while (
                self.step_in_epoch < self.sampler.steps_per_epoch and self.step < self.total_steps
            ):
                self.train_step(self.sampler.step(order, self.step_in_epoch))
                self.step_in_epoch += 1
                if self.step == 1 or self.step % trainer.log_every_n_steps == 0:
                    last.update(self.log_interval())
                every = trainer.checkpoint_every_n_steps
                if every and self.step % every == 0 and self.step < self.total_steps:
                    self.checkpoint(last)
            epoch_done = self.step_in_epoch >= self.sampler.steps_per_epoch
            finished = self.step >= self.total_steps
            if self._steps:
                last.update(self.log_interval())
            if finished or (epoch_done and (self.epoch + 1) % trainer.val_every_n_epochs == 0):
                started = time.perf_counter()
                val = self.evaluate()
                self._paused_s += time.perf_counter() - started
                self.logger.log_metrics(val, step=self.step)
                last.update(val)
            if epoch_done:
                self.epoch += 1
                self.step_in_epoch = 0
            if (finished or (epoch_done and not trainer.checkpoint_every_n_steps)) and (
                self._last_checkpoint != self.step
            ):
                self.checkpoint(last)
        if self.sampler_gpu:
            self.sampler_gpu.stop()
        return last

    def log_final_weights(self) -> None:
        """Rank 0: the trained weights as an MLflow artifact (model/state_dict.pt)."""
        if self.info.rank != 0 or not self.job.tracking.log_model:
            return
        folder = tempfile.mkdtemp(prefix="dist_trainer_model_")
        path = os.path.join(folder, "state_dict.pt")
        torch.save(self.model.state_dict(), path)
        self.logger.log_artifact(path, "model")  # the logger thread reads it before close()


def run_training(
    job: JobConfig,
    plan: BatchPlan,
    info: WorkerInfo,
    *,
    tracking_uri: str | None,
    run_id: str | None,
    sink: CheckpointSink | None = None,
) -> dict[str, float]:
    """Build a Trainer, fit it, log final weights; rank 0 logs into MLflow run `run_id`."""
    logging.basicConfig(level=logging.INFO if info.rank == 0 else logging.WARNING)
    logger = RunLogger(tracking_uri, run_id) if info.rank == 0 and run_id and tracking_uri else None
    # One host monitor per node (local rank 0): MLflow already does CPU and host memory well.
    host = (
        SystemMetrics(tracking_uri, run_id, f"node{info.node_rank}", job.telemetry.interval_s * 5)
        if job.tracking.system_metrics and info.local_rank == 0 and run_id and tracking_uri
        else None
    )
    try:
        trainer = Trainer(job, plan, info, logger=logger, sink=sink)
        if info.rank == 0:
            log.info("%s; %d steps", plan.describe(), trainer.total_steps)
        metrics = trainer.fit()
        trainer.log_final_weights()
        # A DDP model still alive at interpreter exit can make gloo abort (pytorch#179291).
        del trainer
        gc.collect()
    finally:
        if host is not None:
            host.stop()
        if logger is not None:
            logger.close()
    return metrics
