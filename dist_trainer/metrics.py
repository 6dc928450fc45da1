"""Turning one log interval's raw timings into the numbers the loop logs.

For dist_trainer.loop: a clock that stamps on the host (CPU) or as CUDA events (resolved only at
log time, so the hot path never synchronizes), the interval's sums and the one all-gather that
turns them into metrics, the comm/* figures from the per-rank columns, and the NVML keys each
worker reports.
"""

from __future__ import annotations

import math
import resource
import time
from typing import Any

import torch
import torch.distributed as dist

from dist_trainer import comm
from dist_trainer.tasks import Predictions

__all__ = ["GPU_KEYS", "IntervalMetrics", "StepClock", "comm_metrics", "mean"]

# The NVML figures each worker reports per log interval (a subset of GpuSampler.snapshot()).
GPU_KEYS = (
    "gpu_util_mean",
    "gpu_util_max",
    "gpu_mem_used_bytes_max",
    "power_w_mean",
    "temp_c_max",
    "sm_clock_mhz_mean",
)


# Predictions held for counting together, at most (elements of outputs): ~1 MB in float32.
_PENDING_ELEMENTS = 1 << 18
# Micro-steps whose figures wait in lists before they are summed (an interval longer is folded).
_FOLD_EVERY = 1024


def _sum(values: list[torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
    return torch.stack(values).sum(dtype=dtype)  # summed in `dtype`: one op


class StepClock:
    """Stamps on the host (CPU) or as CUDA events (GPU), resolved only when metrics are logged."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def stamp(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()  # only at log time: the events are long done by then
        return start.elapsed_time(end) / 1000.0


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def comm_metrics(cols: dict[str, list[float]], world: int) -> dict[str, float]:
    """comm/* from the per-rank columns: mean over ranks, and the max where a rank can lag.

    A rank's all-reduce time includes waiting for peers that reach the collective later; the
    rank that arrives last waits least, so the minimum over ranks is the transfer itself and is
    what the bandwidths are computed from (comparable with bench-comm, which starts ranks
    together).
    """
    comm_s, exposed = _finite(cols["comm_s"]), _finite(cols["exposed_s"])
    if not comm_s:
        return {}
    nbytes = mean(_finite(cols["comm_bytes"]))
    transfer_s = min(comm_s)
    out = {
        "comm/allreduce_s": mean(comm_s),
        "comm/allreduce_s_max": max(comm_s),
        "comm/allreduce_s_min": transfer_s,
        "comm/bytes": nbytes,
        "comm/buckets": mean(_finite(cols["buckets"])),
        "comm/algbw_gbps": comm.algbw_gbps(nbytes, transfer_s) if transfer_s > 0 else math.nan,
        "comm/busbw_gbps": (
            comm.busbw_gbps(nbytes, transfer_s, world) if transfer_s > 0 else math.nan
        ),
    }
    if exposed:
        out["comm/exposed_s"] = mean(exposed)
        out["comm/exposed_s_max"] = max(exposed)
        out["comm/fraction"] = mean(_finite(cols["exposed_fraction"]))
    return out


class IntervalMetrics:
    """One log interval's sums on the device, and the one all-gather that turns them into metrics.

    The loop adds each micro-step's loss sum, its predictions (or correct count) and its
    count of targets, device tensors held without an op (no sync, no small tensor op per
    micro-step), and each step's global sample count as a Python int; `collect()` sums them
    and gathers every rank's figures in one collective, every `trainer.log_every_n_steps`
    steps.

    Args:
        device: Where the sums live.
        rank, world_size, node_rank, local_rank: Where this worker sits.
        distributed: Whether a process group is up (else a world of one).
        seconds: The clock's `seconds(start, end)`, to resolve exposed-comm stamps.
        defer_predictions: Hold predictions until the interval counts them (up to ~1 MB of
            outputs). False counts them at once: for outputs that a later call may overwrite
            (a compiled model's CUDA-graph buffers).
    """

    def __init__(
        self,
        device: torch.device,
        rank: int,
        world_size: int,
        node_rank: int,
        local_rank: int,
        distributed: bool,
        seconds: Any,
        defer_predictions: bool = True,
    ) -> None:
        self.device, self.rank, self.world_size = device, rank, world_size
        self.node_rank, self.local_rank = node_rank, local_rank
        self.distributed = distributed
        self._max_pending = _PENDING_ELEMENTS if defer_predictions else -1
        self._seconds = seconds
        self._ids: list[tuple[int, int]] | None = None
        self.reset()

    def reset(self) -> None:
        # Each micro-step's figures wait in lists, summed once per interval: appending a tensor
        # costs no op, where `total += x` is an op (a kernel launch on a GPU) per micro-step.
        self._loss_sums: list[torch.Tensor] = []
        self._counts: list[torch.Tensor] = []  # device counts (targets masked)
        self._corrects: list[torch.Tensor] = []
        self._pending: list[Predictions] = []  # counted together (Predictions.correct_of)
        self._pending_elements = 0
        self._host_count = 0  # counts known on the host (every target counts): no device op
        self.samples = 0  # global samples of the interval's optimizer steps
        self.steps = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._start = time.perf_counter()
        self.paused_s = 0.0  # validation and checkpoints inside the interval: not step time

    def add_micro_step(
        self,
        loss_sum: torch.Tensor,
        correct: torch.Tensor | Predictions,
        count: torch.Tensor | int,
    ) -> None:
        """One micro-step's detached loss sum, its correct count (or its predictions, counted
        with the others' later) and its count of targets (an int where known on the host)."""
        sums = self._loss_sums
        sums.append(loss_sum)
        if type(correct) is Predictions:
            self._pending.append(correct)
            self._pending_elements += correct.outputs.numel()
            # Held outputs are bounded (an LM's logits are counted at once): memory stays flat.
            if self._pending_elements > self._max_pending:
                self._count_pending()
        else:
            self._corrects.append(correct)
        if type(count) is int:
            self._host_count += count
        else:
            self._counts.append(count)
        if len(sums) >= _FOLD_EVERY:  # a very long interval: fold, bounded lists
            self._fold()

    def _count_pending(self) -> None:
        if self._pending:
            self._corrects.append(Predictions.correct_of(self._pending))
            self._pending, self._pending_elements = [], 0

    def _fold(self) -> None:
        """Each list summed into one tensor (float64 for the loss, int64 for the counts)."""
        self._count_pending()
        for name, dtype in (("_loss_sums", torch.float64), ("_corrects", None), ("_counts", None)):
            values = getattr(self, name)
            if len(values) > 1:
                setattr(self, name, [_sum(values, dtype)])

    def _totals(self) -> list[torch.Tensor]:
        """The interval's loss sum (float64), correct and device count (int64), 0-dim each."""
        self._fold()
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        return [
            self._loss_sums[0].to(torch.float64) if self._loss_sums else zero,
            self._corrects[0] if self._corrects else zero,
            self._counts[0] if self._counts else zero,
        ]

    def add_step(self, global_count: int) -> None:
        self.samples += global_count
        self.steps += 1

    def _gather(self, values: list[float], on_device: list[torch.Tensor]) -> list[list[float]]:
        """Every rank's vector, as `world` rows of floats (one collective, one device read)."""
        if not self.distributed and self.device.type == "cpu":  # no copy to make: read them
            return [[t.item() for t in on_device] + values]
        local = torch.cat(
            [
                torch.stack([t.to(torch.float64) for t in on_device]),
                torch.tensor(values, dtype=torch.float64, device=self.device),
            ]
        )
        if not self.distributed:
            return [local.tolist()]
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local)
        return torch.stack(out).tolist()

    def collect(
        self,
        *,
        steps_comm: list[comm.StepComm],
        pairs: list[comm.ExposedPair],
        per_rank_extra: dict[str, float],
        gpu: dict[str, float],
        comm_enabled: bool,
        flops_per_sample: float | None = None,
        peak_tflops: float | None = None,
    ) -> dict[str, float]:
        """All-gather the interval's figures and return the metrics (every rank), then reset."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._start
        extra_s = sum(self._seconds(*p.compute) for p in pairs if p.extra)
        measured_steps_s = sum(self._seconds(*p.step) for p in pairs)
        exposed = [
            comm.exposed_comm_s(self._seconds(*p.sync), self._seconds(*p.compute)) for p in pairs
        ]
        per_rank = {
            "comm_s": mean([s.allreduce_s for s in steps_comm]),
            "comm_bytes": mean([s.bytes for s in steps_comm]),
            "buckets": mean([s.buckets for s in steps_comm]),
            "exposed_s": mean(exposed),
            # Share of the measured steps' own time, so a slow step is not set against the mean.
            "exposed_fraction": sum(exposed) / measured_steps_s if exposed else math.nan,
            "step_s": (wall - extra_s - self.paused_s) / max(1, self.steps),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0,
            **per_rank_extra,
        }
        keys = sorted(per_rank) + [f"gpu.{k}" for k in GPU_KEYS]
        values = [per_rank[k] for k in sorted(per_rank)] + [gpu.get(k, math.nan) for k in GPU_KEYS]
        # Python floats from here on: a handful of numbers per rank, no small tensor ops.
        values = [float(self._host_count), *values]
        rows = self._gather(values, self._totals())
        loss_sum, correct, count = (sum(row[i] for row in rows) for i in range(3))
        count += sum(row[3] for row in rows)
        cols = {k: [row[4 + i] for row in rows] for i, k in enumerate(keys)}
        step_s = max(cols["step_s"])  # the slowest rank sets the pace
        samples_per_s = self.samples / max(1e-12, step_s * self.steps)
        metrics = {
            # Over the counted targets (samples, or tokens for lm; ignored ones left out).
            "train/loss": float(loss_sum) / max(1.0, float(count)),
            "train/accuracy": float(correct) / max(1.0, float(count)),
            "perf/step_time_s": step_s,
            "perf/samples_per_s": samples_per_s,
            "mem/peak_rss_bytes_max": max(cols["peak_rss"]),
        }
        if flops_per_sample:
            metrics["perf/tflops"] = flops_per_sample * samples_per_s / 1e12
            if peak_tflops:
                metrics["perf/mfu"] = metrics["perf/tflops"] / (peak_tflops * self.world_size)
        if comm_enabled:
            metrics.update(comm_metrics(cols, self.world_size))
        for key in ("peak_allocated_bytes", "peak_reserved_bytes", "grad_scale", "skipped"):
            found = _finite(cols.get(key, []))
            if found:
                reduce = min(found) if key == "grad_scale" else max(found)
                name = {"grad_scale": "amp/grad_scale", "skipped": "amp/skipped_steps"}
                metrics[name.get(key, f"mem/{key}_max")] = reduce
        metrics.update(self._per_worker(cols))
        self.reset()
        return {k: v for k, v in metrics.items() if not math.isnan(v)}

    def _per_worker(self, cols: dict[str, list[float]]) -> dict[str, float]:
        """Telemetry named for the worker it comes from: node and local rank in the key."""
        out: dict[str, float] = {}
        for rank, (node, local) in enumerate(self._worker_ids()):
            where = f"node{node}/rank{local}"
            out[f"mem/{where}/peak_rss_bytes"] = cols["peak_rss"][rank]
            if "peak_allocated_bytes" in cols:
                out[f"mem/{where}/peak_allocated_bytes"] = cols["peak_allocated_bytes"][rank]
            for key in GPU_KEYS:
                out[f"system/{where}/{key}"] = cols[f"gpu.{key}"][rank]
        return out

    def _worker_ids(self) -> list[tuple[int, int]]:
        if self._ids is None:
            mine = torch.tensor([self.node_rank, self.local_rank], device=self.device)
            if self.distributed:
                out = [torch.empty_like(mine) for _ in range(self.world_size)]
                dist.all_gather(out, mine)
            else:
                out = [mine]
            self._ids = [tuple(int(v) for v in t.tolist()) for t in out]
        return self._ids
