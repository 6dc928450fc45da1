"""Turning one log interval's raw timings into the numbers the loop logs.

Pure helpers for dist_trainer.loop: a clock that stamps on the host (CPU) or as CUDA events
(resolved only at log time, so the hot path never synchronizes), the comm/* figures from the
per-rank columns gathered once per interval, and the NVML keys each worker reports.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from dist_trainer import comm

__all__ = ["GPU_KEYS", "StepClock", "comm_metrics", "mean"]

# The NVML figures each worker reports per log interval (a subset of GpuSampler.snapshot()).
GPU_KEYS = (
    "gpu_util_mean",
    "gpu_util_max",
    "gpu_mem_used_bytes_max",
    "power_w_mean",
    "temp_c_max",
    "sm_clock_mhz_mean",
)


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


def comm_metrics(cols: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """comm/* from the per-rank columns: mean over ranks, and the max where a rank can lag.

    A rank's all-reduce time includes waiting for peers that reach the collective later; the
    rank that arrives last waits least, so the minimum over ranks is the transfer itself and is
    what the bandwidths are computed from (comparable with bench-comm, which starts ranks
    together).
    """
    comm_s, exposed = cols["comm_s"], cols["exposed_s"]
    if comm_s.isnan().all():
        return {}
    nbytes = float(cols["comm_bytes"].nanmean())
    transfer_s = float(comm_s[~comm_s.isnan()].min())
    out = {
        "comm/allreduce_s": float(comm_s.nanmean()),
        "comm/allreduce_s_max": float(comm_s[~comm_s.isnan()].max()),
        "comm/allreduce_s_min": transfer_s,
        "comm/bytes": nbytes,
        "comm/buckets": float(cols["buckets"].nanmean()),
        "comm/algbw_gbps": comm.algbw_gbps(nbytes, transfer_s) if transfer_s > 0 else math.nan,
        "comm/busbw_gbps": (
            comm.busbw_gbps(nbytes, transfer_s, world) if transfer_s > 0 else math.nan
        ),
    }
    if not exposed.isnan().all():
        out["comm/exposed_s"] = float(exposed.nanmean())
        out["comm/exposed_s_max"] = float(exposed[~exposed.isnan()].max())
        out["comm/fraction"] = float(cols["exposed_fraction"].nanmean())
    return out
