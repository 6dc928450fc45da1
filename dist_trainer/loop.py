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

With `trainer.max_micro_batch_size=auto` the plan handed in is provisional: before wrapping the
model in DDP, each rank probes the largest micro-batch that fits, the ranks agree on the smallest
(one all-reduce) and the Trainer re-solves the plan with it (dist_trainer.autobatch); `self.plan`
is the plan it trains with.

Faults (a worker dies, Ray Train restarts the group, `scaling.max_failures`): the job resumes
from its latest checkpoint (model, optimizer, scheduler, GradScaler, step, epoch, position in the
epoch, every rank's random generators for dropout; the data order depends only on (seed,
epoch)), so it ends at the same step with the same weights as a run without the failure. The
steps between that checkpoint and the failure run twice; their metrics are logged once:
- The first attempt's points stand. At the start of every attempt, rank 0's logger reads the
  last step the run holds per metric key and drops points at steps up to it
  (dist_trainer.run_logger.RunLogger.start_attempt): the replay fills in only what never
  reached the store, also when the failure came before the first checkpoint (the replay then
  starts at step 0).
- What differs per attempt (host, pid, the step it resumed from) is a tag of the attempt
  (dist_trainer.attempts), never a param: MLflow refuses to change a param.
- Every checkpoint closes a log interval (it logs train/* and perf/* at its step, as
  validation does), so a replay's intervals are exactly the first attempt's: no logged interval
  straddles a checkpoint, and every step's samples count in exactly one logged point.
- `checkpoint/save_s` (state, write and Ray's report, which waits for every rank) is logged at
  each checkpoint's step, `checkpoint/load_s` at the step a resumed attempt starts from.
- `perf/elapsed_s` and `val/elapsed_s` continue from the checkpoint's value: training time to
  reach the step, without the work lost to the failure or the restart.

An elastic resize (`scaling.num_workers=[min, max]`) is such a restart with another world size:
the plan is re-solved for it (same global batch, other accumulation), and nothing in the
checkpoint depends on the world size (the data order depends only on (seed, epoch); optimizer
state is the same on every rank), so the job still ends with the weights of a run that never
resized. The split is logged as `plan/world_size`, `plan/accumulation_steps` and
`plan/micro_batch_size` at step 0 and at the step of each resize.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dist_trainer import autobatch, comm, hf, perf, telemetry
from dist_trainer.batching import BatchPlan
from dist_trainer.build import (
    build_collate,
    build_data,
    build_loss,
    build_model,
    build_optimizer,
    build_scheduler,
)
from dist_trainer.checkpoint import CheckpointSink, LocalCheckpointSink, rng_state, set_rng_state
from dist_trainer.config import ConfigError, JobConfig, Precision
from dist_trainer.loading import BatchFeed, FedStep
from dist_trainer.logger_process import LoggerProcess
from dist_trainer.metrics import IntervalMetrics, StepClock
from dist_trainer.preflight import flops_per_sample
from dist_trainer.run_logger import NullLogger, SystemMetrics
from dist_trainer.sampling import GlobalBatchSampler, shard_for_rank
from dist_trainer.tasks import (
    OutputShapeError,
    Predictions,
    TargetCount,
    check_outputs,
    forward_batch,
    loss_sum_and_predictions,
    loss_sums,
    split_outputs,
)

__all__ = ["Trainer", "WorkerInfo", "run_training"]

log = logging.getLogger(__name__)

# How long a new attempt waits for its start to be on record in the run (see Trainer.fit).
_ATTEMPT_RECORD_WAIT_S = 20.0
# One do-nothing context for every step that needs none (nullcontext is reusable).
_NO_CONTEXT = contextlib.nullcontext()


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
    """One worker's share of a training job. `fit()` runs it; tests drive `train_step()`.

    With `trainer.max_micro_batch_size=auto`, `plan` is re-solved with the micro-batch the
    workers agree on (`self.plan`, `self.auto_batch`); every rank must construct its Trainer.
    """

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
        precision = job.trainer.precision
        self.dtype = precision.param_dtype
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = job.trainer.tf32
            torch.backends.cudnn.allow_tf32 = job.trainer.tf32
        torch.manual_seed(job.trainer.seed)  # same init on every rank (DDP also broadcasts it)

        self.data = build_data(job)
        self.loss = build_loss(job)
        for criterion in (self.loss.fn, self.loss.sum_fn):
            if isinstance(criterion, torch.nn.Module):  # e.g. a class weight tensor
                criterion.to(self.device)
        batching = {"target_key": job.data_options.target_key, "collate": build_collate(job)}
        feed = (self.device, self.dtype, job.loader)
        self.train_feed = BatchFeed(self.data.train, *feed, **batching)
        self.val_feed = BatchFeed(self.data.val, *feed, **batching)
        self.model = build_model(job, self.data).to(device=self.device, dtype=self.dtype)
        # A world of one trains the bare model: DDP would all-reduce over one rank, which costs
        # host time every step (its reducer, a collective's hand-off) and syncs nothing.
        self.distributed = dist.is_available() and dist.is_initialized() and info.world_size > 1
        # What a step's loss is divided by: its global batch's counted targets (tasks.py).
        self.targets = TargetCount(
            self.data.task, self.loss, self.distributed, self.train_feed.resident_targets
        )
        self.autocast = (
            torch.autocast(self.device.type, dtype=precision.autocast_dtype)
            if precision.autocast_dtype is not None
            else _NO_CONTEXT
        )
        self._first_outputs_checked = False
        self.auto_batch: autobatch.AutoMicroBatch | None = None
        if job.trainer.auto_micro_batch:  # on the bare model, before DDP exists
            self.auto_batch = self._find_micro_batch(plan)
            self.plan = plan = self.auto_batch.plan
        # divide=False: the hook sums and the loss scale carries the 1/world_size.
        self.meter = comm.CommMeter(enabled=job.comm.enabled and self.distributed, divide=False)
        self.ddp: torch.nn.Module = self.model
        if self.distributed:
            bucket = (
                {"bucket_cap_mb": job.scaling.bucket_cap_mb} if job.scaling.bucket_cap_mb else {}
            )
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **bucket,
            )
            self.meter.attach(self.ddp)
        # Compile the DDP module, not the bare model: DDP's graph optimizer then splits the
        # graph at bucket boundaries so the all-reduce still overlaps the backward pass.
        self.forward = torch.compile(self.ddp) if job.trainer.compile else self.ddp
        # float16 needs loss scaling against underflow; bfloat16 has float32's exponent range.
        self.scaler = (
            torch.amp.GradScaler(self.device.type) if precision is Precision.FP16_MIXED else None
        )
        self.skipped_steps = 0
        self.sampler = GlobalBatchSampler(
            len(self.data.train),
            plan,
            info.rank,
            job.trainer.seed,
            drop_last=job.trainer.drop_last,
        )
        epoch_steps = self.sampler.steps_per_epoch * job.trainer.max_epochs
        self.total_steps = min(job.trainer.max_steps or epoch_steps, epoch_steps)
        self.optimizer = build_optimizer(job.optim, self.model.parameters(), plan.global_batch_size)
        self.scheduler = build_scheduler(self.optimizer, job.optim, self.total_steps)
        # Read per step: kept as plain ints (not through the config's attribute chain).
        self._log_every = job.trainer.log_every_n_steps
        self._checkpoint_every = job.trainer.checkpoint_every_n_steps
        self._grad_clip_norm = job.trainer.grad_clip_norm
        self.step = 0  # optimizer steps taken
        self.epoch = 0
        self.step_in_epoch = 0
        self._elapsed_before = 0.0  # training seconds before the checkpoint this run resumed
        self._resumed_world_size: int | None = None  # the world size of the checkpoint resumed from
        self._fit_started: float | None = None
        self.clock = StepClock(self.device)
        self.probe = comm.ExposedCommProbe(
            self.clock.stamp, self.meter.enabled, job.comm.probe_every_n_steps
        )
        self.interval = IntervalMetrics(
            self.device,
            info.rank,
            info.world_size,
            info.node_rank,
            info.local_rank,
            self.distributed,
            self.clock.seconds,
            # A compiled model may hand back buffers its next call overwrites (CUDA graphs).
            defer_predictions=not job.trainer.compile,
        )
        self.flops_per_sample = flops_per_sample(
            job, self.data, self.loss, self.dtype, plan.micro_batch_size
        )
        self.peak_tflops = perf.peak_tflops(
            self.device, precision, job.trainer.tf32, job.trainer.peak_tflops_per_device
        )
        self.sampler_gpu = (
            telemetry.GpuSampler.for_device(self.device, job.telemetry.interval_s)
            if job.telemetry.enabled and self.device.type == "cuda"
            else None
        )

    # ---------------------------------------------------------------- auto micro-batch
    def _find_micro_batch(self, plan: BatchPlan) -> autobatch.AutoMicroBatch:
        """Probe, agree, re-solve (dist_trainer.autobatch); rank 0 logs the outcome."""
        autobatch.check_auto_config(self.job.trainer, self.device)
        probe = autobatch.MicroStepProbe(
            self.model,
            self._probe_batch,
            self._probe_step,
            self.device,
            memory_mb=self.job.trainer.micro_batch_memory_mb,
            reserve=autobatch.reserve_bytes(self.model, self.job.optim.optimizer, self.distributed),
        )
        found = autobatch.find_micro_batch(plan, probe, distributed=self.distributed)
        if self.info.rank == 0:
            log.info("%s", found.describe())
        return found

    def _probe_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` training samples on the device (repeated if the split is smaller)."""
        count = len(self.data.train)
        if count < 1:
            raise ValueError("the training split is empty")
        batches = self.train_feed.batches(torch.arange(size) % count, size)
        try:
            return next(batches)
        finally:
            batches.close()

    def _probe_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """A micro-step's forward and backward on the bare model: nothing is all-reduced."""
        with self.autocast:
            outputs = forward_batch(self.model, x, y, self.loss)
            if not self._first_outputs_checked:
                self._check_first_outputs(outputs, y)
            loss_sum, _, _ = loss_sums(self.data.task, outputs, y, self.loss)
        loss_sum.backward()

    # ---------------------------------------------------------------- steps
    def _loss_scale(self, step: FedStep) -> float | torch.Tensor:
        # The sum of per-target losses times this makes the all-reduced gradient the mean over
        # the whole global batch's counted targets: the meter's hook sums over ranks (no
        # division pass over the gradients); DDP's built-in hook averages, so then the scale
        # carries world_size. The count is a device tensor where ignored targets make each
        # step count them (one small all-reduce, tasks.TargetCount).
        world = 1 if self.meter.attached else self.info.world_size
        if self.targets.per_sample is not None:  # known on the host: no tensor work
            return world / max(1, step.global_count * self.targets.per_sample)
        count = self.targets.of_step([y for _, y in step.micro_batches], step.global_count)
        if isinstance(count, torch.Tensor):
            return world / count.clamp_min(1).to(self.dtype)
        return world / max(1, count)

    def _micro_step(
        self, x: Any, y: torch.Tensor, scale: float | torch.Tensor, sync: bool
    ) -> tuple[torch.Tensor, Predictions, torch.Tensor | int]:
        """Forward and backward of one micro-batch; returns its (loss sum, predictions, count)."""
        syncs = sync or not self.distributed
        with _NO_CONTEXT if syncs else self.ddp.no_sync():
            with self.autocast:
                outputs = forward_batch(self.forward, x, y, self.loss)
                if not self._first_outputs_checked:
                    self._check_first_outputs(outputs, y)
                loss_sum, predictions, count = loss_sum_and_predictions(
                    self.data.task, outputs, y, self.loss, count_on_host=True
                )
            loss = loss_sum * scale
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        return loss_sum.detach(), predictions, count

    def train_step(self, step: FedStep) -> None:
        """One optimizer step: accumulate the micro-steps, all-reduce once, update."""
        micro = step.micro_batches
        scale = self._loss_scale(step)
        last = len(micro) - 1
        timing = self.probe.begin(
            self.step, [len(y) for _, y in micro] if self.probe.enabled else []
        )
        if timing.extra:  # compute-only reference for comm/exposed_s; its gradients are dropped
            with timing.time("extra"):
                self._micro_step(*micro[0], scale, sync=False)
            self.optimizer.zero_grad(set_to_none=True)
        timing.start()
        for i, (x, y) in enumerate(micro):
            with timing.time(i):
                sums = self._micro_step(x, y, scale, sync=i == last)
            self.interval.add_micro_step(*sums)
        self._optimizer_step()
        self.meter.end_step()
        timing.end()
        self.step += 1
        self.interval.add_step(step.global_count)

    def _optimizer_step(self) -> None:
        clip = self._grad_clip_norm
        if self.scaler is None:
            if clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
        else:
            if clip:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the step on inf/nan gradients
            self.scaler.update()
            # A skipped step lowers the scale. GradScaler.step has synced already (it reads
            # found_inf on the host), so reading the scale costs no further stall.
            self.skipped_steps += self.scaler.get_scale() < scale_before
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _check_first_outputs(self, outputs: Any, y: torch.Tensor) -> None:
        """Once, on the first micro-batch: outputs that do not fit the task or the loss."""
        self._first_outputs_checked = True
        try:
            check_outputs(self.data.task, outputs, y, self.loss)
        except OutputShapeError as exc:
            raise ConfigError(
                f"model._target_={self.job.model['_target_']} on data._target_="
                f"{self.job.data['_target_']}: {exc}. Fix: {exc.fix(self.data.task)}"
            ) from None
        if self.info.rank == 0 and self.data.task != "lm" and self.loss.takes_logits:
            detached = split_outputs(outputs, self.loss)[0].detach()
            if detached.numel() and bool(((detached >= 0) & (detached <= 1)).all()):
                log.warning(
                    "every output of the first batch lies in [0, 1], but %s takes logits: if "
                    "the model ends in a sigmoid/softmax, use loss._target_=torch.nn.BCELoss "
                    "(binary) or drop the final activation",
                    self.loss.name,
                )

    # ---------------------------------------------------------------- metrics
    def log_interval(self) -> dict[str, float]:
        """All-gather the interval's numbers; rank 0 logs them. Returns what was logged."""
        per_rank = dict(telemetry.peak_device_memory(self.device))
        if self.scaler is not None:
            per_rank["grad_scale"] = self.scaler.get_scale()
            per_rank["skipped"] = float(self.skipped_steps)
        metrics = self.interval.collect(
            steps_comm=self.meter.collect(),
            pairs=self.probe.take(),
            per_rank_extra=per_rank,
            gpu=self.sampler_gpu.snapshot() if self.sampler_gpu else {},
            comm_enabled=self.meter.enabled,
            flops_per_sample=self.flops_per_sample,
            peak_tflops=self.peak_tflops,
        )
        metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["perf/elapsed_s"] = self.elapsed_s()
        metrics["train/epoch"] = self.epoch + self.step_in_epoch / self.sampler.steps_per_epoch
        self.logger.log_metrics(metrics, step=self.step)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation over this rank's share of the split, summed over ranks."""
        self.model.eval()
        idx = shard_for_rank(torch.arange(len(self.data.val)), self.info.rank, self.info.world_size)
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        loss_sum, correct, count = zero.clone(), zero.clone(), zero.clone()
        for x, y in self.val_feed.batches(idx, max(1, 2 * self.plan.micro_batch_size)):
            with self.autocast:
                outputs = forward_batch(self.model, x, y, self.loss)
                ls, c, n = loss_sums(self.data.task, outputs, y, self.loss)
            loss_sum += ls
            correct += c
            count += n
        totals = torch.stack([loss_sum, correct, count, zero + len(idx)])
        if self.distributed:
            dist.all_reduce(totals)
        self.model.train()
        loss_sum, correct, count, _ = totals.tolist()
        # Both over the counted targets (samples, or tokens for lm; ignored ones left out).
        return {"val/loss": loss_sum / max(1.0, count), "val/accuracy": correct / max(1.0, count)}

    # ---------------------------------------------------------------- state
    def elapsed_s(self) -> float:
        """Training wall time to this step: before the resumed checkpoint, plus this attempt's."""
        if self._fit_started is None:
            return self._elapsed_before
        return self._elapsed_before + time.perf_counter() - self._fit_started

    def state(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "elapsed_s": self.elapsed_s(),
            "world_size": self.plan.world_size,
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def _gather_rng_states(self) -> list[dict[str, Any]] | None:
        """Every rank's random generators (dropout masks; a dataset's own draws are seeded per
        batch by dist_trainer.loading), on rank 0 for its checkpoint; None on the other ranks."""
        mine = rng_state(self.device)
        if not self.distributed:
            return [mine]
        states: list[Any] | None = [None] * self.info.world_size if self.info.rank == 0 else None
        # NCCL moves the pickled objects through the *current* CUDA device: make it this rank's.
        cuda = self.device.type == "cuda"
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            dist.gather_object(mine, states, dst=0)
        return states

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self._elapsed_before = state.get("elapsed_s", 0.0)
        self._resumed_world_size = state.get("world_size", self.plan.world_size)
        rng = state.get("rng")
        if rng is not None and len(rng) == self.info.world_size:
            # Each rank draws on where it stopped, as if the job had never stopped.
            set_rng_state(rng[self.info.rank], self.device)
        elif rng is not None and self.info.rank == 0:
            log.info(
                "resized from %d to %d ranks: dropout and other model randomness draw anew",
                len(rng),
                self.info.world_size,
            )

    def checkpoint(self, metrics: dict[str, float]) -> None:
        """Save a checkpoint at this step (every rank: the sink may be a barrier); rank 0 logs
        what it cost as `checkpoint/save_s` (with the wait for MLflow to hold the metrics logged
        so far). Call it at most once per step."""
        self._last_checkpoint = self.step
        if not self.sink.persists:  # nowhere to keep it (one process, no folder): no work
            return
        started = time.perf_counter()
        # The steps up to this checkpoint must be in the run before it exists: an attempt that
        # resumes from it replays only the steps after it (a no-op on ranks other than 0).
        if not self.logger.flush():
            log.warning("MLflow has not taken the metrics up to step %d yet", self.step)
        rng = self._gather_rng_states()  # a collective: every rank
        state = {**self.state(), "rng": rng} if self.info.rank == 0 else None
        self.sink.save(state, {"step": self.step, **metrics}, self.step)
        save_s = time.perf_counter() - started
        self.interval.paused_s += save_s
        self.logger.log_metrics({"checkpoint/save_s": save_s}, step=self.step)

    def _resume(self) -> None:
        """Load the latest checkpoint, if any (logged as checkpoint/load_s at its step)."""
        started = time.perf_counter()
        resumed = self.sink.latest()
        if resumed is None:
            return
        self.load_state(resumed)
        load_s = time.perf_counter() - started
        self.logger.log_metrics({"checkpoint/load_s": load_s}, step=self.step)
        log.info("resumed from step %d (epoch %d) in %.2f s", self.step, self.epoch, load_s)

    # ---------------------------------------------------------------- run
    def _should_log(self) -> bool:
        return self.step == 1 or self.step % self._log_every == 0

    def _should_checkpoint(self) -> bool:
        every = self._checkpoint_every
        return bool(every) and self.step % every == 0 and self.step < self.total_steps

    def _should_validate(self, epoch_done: bool, finished: bool) -> bool:
        every = self.job.trainer.val_every_n_epochs
        return finished or (epoch_done and (self.epoch + 1) % every == 0)

    def fit(self) -> dict[str, float]:
        """Train to `total_steps`, validating, logging and checkpointing on the way.

        Resumes from the sink's latest checkpoint if there is one (see the module docstring:
        replayed steps are not logged twice)."""
        self._resume()
        # Before anything else is logged: the logger reads what the run holds first, so a
        # replay (from a checkpoint, or from step 0) logs each step once.
        self.logger.start_attempt(self.step, self._attempt_details())
        if self.info.rank == 0:
            self.logger.log_params(self._run_params())
        if self._resumed_world_size != self.plan.world_size:  # a fresh start or an elastic resize
            if self._resumed_world_size is not None and self.info.rank == 0:
                log.info(
                    "resized from %d to %d workers: %s",
                    self._resumed_world_size,
                    self.plan.world_size,
                    self.plan.describe(),
                )
            self.logger.log_metrics(self._plan_metrics(), step=self.step)
        # Wait until the attempt is on record: rank 0's logger is a child process that needs a
        # few seconds to start, and a worker killed before it wrote the attempt would leave a
        # run whose history lacks that attempt. Bounded: an unreachable store costs this once.
        self.logger.flush(timeout_s=_ATTEMPT_RECORD_WAIT_S)
        if self.sampler_gpu:
            self.sampler_gpu.start()
        elif self.job.telemetry.enabled and self.info.rank == 0:
            log.info("GPU telemetry is off: workers run on %s", self.device.type)
        self._last_checkpoint = self.step
        # Training wall time (continued from a resumed checkpoint's), so runs compare by time to
        # a validation loss.
        self._fit_started = time.perf_counter()
        last: dict[str, float] = {}
        self.interval.reset()
        try:
            while self.step < self.total_steps:
                for fed in self.train_feed.steps(self.sampler, self.epoch, self.step_in_epoch):
                    if self.step >= self.total_steps:
                        break
                    self.train_step(fed)
                    self.step_in_epoch += 1
                    checkpoint = self._should_checkpoint()
                    # A checkpoint closes the log interval: a resumed run's intervals are then
                    # the same as the first attempt's (the module docstring).
                    if self._should_log() or checkpoint:
                        last.update(self.log_interval())
                    if checkpoint:
                        self.checkpoint(last)
                last.update(self._end_of_epoch_or_run(last))
        finally:
            if self.sampler_gpu:
                self.sampler_gpu.stop()
            self.train_feed.close()
            self.val_feed.close()
        return last

    def _end_of_epoch_or_run(self, last: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        epoch_done = self.step_in_epoch >= self.sampler.steps_per_epoch
        finished = self.step >= self.total_steps
        validate = self._should_validate(epoch_done, finished)
        every_epoch = epoch_done and not self.job.trainer.checkpoint_every_n_steps
        checkpoint = (finished or every_epoch) and self._last_checkpoint != self.step
        # The interval closes where validation or a checkpoint needs it closed (and at the
        # end); an epoch's end alone does not cut it: short epochs log every n steps too.
        if self.interval.steps and (validate or finished or (checkpoint and self.sink.persists)):
            out.update(self.log_interval())
        if validate:
            started = time.perf_counter()
            val = self.evaluate()
            self.interval.paused_s += time.perf_counter() - started
            val["val/elapsed_s"] = self.elapsed_s()
            self.logger.log_metrics(val, step=self.step)
            out.update(val)
        if epoch_done:
            self.epoch += 1
            self.step_in_epoch = 0
        if checkpoint:
            self.checkpoint({**last, **out})
        return out

    def _run_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "plan.steps_per_epoch": self.sampler.steps_per_epoch,
            "plan.total_steps": self.total_steps,
            "data.train_samples": len(self.data.train),
            "data.val_samples": len(self.data.val),
            "data.in_memory": self.train_feed.in_memory,
            "model.parameters": sum(p.numel() for p in self.model.parameters()),
            "loss.name": self.loss.name,
        }
        if self.flops_per_sample:
            params["model.flops_per_sample"] = int(self.flops_per_sample)
        if self.peak_tflops:
            params["perf.peak_tflops_per_device"] = self.peak_tflops
        if self.auto_batch is not None:  # the driver logged a provisional plan without these
            params.update(self.auto_batch.as_params())
        return params

    def _attempt_details(self) -> dict[str, Any]:
        """What differs per attempt (dist_trainer.attempts): tags, not params."""
        details: dict[str, Any] = {
            "host": socket.gethostname(),
            # Which process trained it: jobs of a study share their worker group's processes.
            "rank0_pid": os.getpid(),
            "world_size": self.info.world_size,
        }
        if self.auto_batch is not None:
            details["auto_probe_s"] = round(self.auto_batch.seconds, 4)
        return details

    def _plan_metrics(self) -> dict[str, float]:
        return {
            "plan/world_size": self.plan.world_size,
            "plan/accumulation_steps": self.plan.accumulation_steps,
            "plan/micro_batch_size": self.plan.micro_batch_size,
        }

    def log_final_weights(self) -> None:
        """Rank 0: the trained weights as an MLflow artifact (model/state_dict.pt), and where
        the model has `save_pretrained` (Hugging Face) that folder too, as model/pretrained/,
        which `from_pretrained` loads."""
        if self.info.rank != 0 or not self.job.tracking.log_model:
            return
        folder = tempfile.mkdtemp(prefix="dist_trainer_model_")
        path = os.path.join(folder, "state_dict.pt")
        torch.save(self.model.state_dict(), path)
        self.logger.log_artifact(path, "model")  # the logger thread reads it before close()
        for file, artifact_dir in hf.save_pretrained(self.model, os.path.join(folder, "hf")):
            self.logger.log_artifact(file, f"model/pretrained{artifact_dir}")


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
    # Rank 0 writes through a child process: MLflow's CPU time stays off the training step.
    logger = (
        LoggerProcess(tracking_uri, run_id) if info.rank == 0 and run_id and tracking_uri else None
    )
    # One host monitor per node (local rank 0): MLflow already does CPU and host memory well.
    host = (
        SystemMetrics(tracking_uri, run_id, f"node{info.node_rank}", job.telemetry.interval_s * 5)
        if job.tracking.system_metrics and info.local_rank == 0 and run_id and tracking_uri
        else None
    )
    try:
        trainer = Trainer(job, plan, info, logger=logger, sink=sink)
        if info.rank == 0:  # trainer.plan: re-solved when trainer.max_micro_batch_size=auto
            log.info("%s; %d steps", trainer.plan.describe(), trainer.total_steps)
        try:
            metrics = trainer.fit()
        except BaseException as exc:
            error = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {error[-1] if error else ''}"
            trainer.logger.end_attempt(f"failed at step {trainer.step}: {reason}")
            raise
        trainer.logger.end_attempt(f"finished at step {trainer.step}")
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
