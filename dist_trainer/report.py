"""Reports read back from MLflow runs: the end-of-run communication summary.

The summary answers what a performance engineer asks first: how much of a step was compute and
how much waited on communication, and how the all-reduce bandwidth the job achieved compares
with what the same workers reach in isolation (the latest `dist-trainer bench-comm` run in the
same store with the same worker count and backend), at the job's own bucket size.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from dist_trainer import comm

__all__ = ["CommSummary", "comm_summary", "reference_busbw"]

_SUMMARY_KEYS = (
    "perf/step_time_s",
    "comm/allreduce_s",
    "comm/exposed_s",
    "comm/fraction",
    "comm/bytes",
    "comm/buckets",
    "comm/busbw_gbps",
)


@dataclass(frozen=True)
class CommSummary:
    """Medians over a run's log intervals (the first interval, warm-up, is skipped if possible).

    Args:
        step_time_s: optimizer step time.
        allreduce_s: time with a gradient all-reduce in flight, per step.
        exposed_s: communication the step waited for (not hidden behind backward).
        exposed_fraction: exposed_s / step time.
        bytes_per_step: gradient bytes all-reduced per step.
        buckets_per_step: DDP buckets per step.
        busbw_gbps: bus bandwidth achieved (nccl-tests definition).
        reference_busbw_gbps: bench-comm's bus bandwidth at the mean bucket size, if known.
        reference_run_id: the bench-comm run it came from.
    """

    step_time_s: float
    allreduce_s: float
    exposed_s: float
    exposed_fraction: float
    bytes_per_step: float
    buckets_per_step: float
    busbw_gbps: float
    reference_busbw_gbps: float | None
    reference_run_id: str | None

    def to_markdown(self) -> str:
        pct = 100 * self.exposed_fraction
        rows = [
            ("step time", f"{self.step_time_s * 1e3:.2f} ms"),
            ("compute share", f"{100 - pct:.1f} %"),
            ("exposed communication share", f"{pct:.1f} % ({self.exposed_s * 1e3:.2f} ms)"),
            ("all-reduce in flight per step", f"{self.allreduce_s * 1e3:.2f} ms"),
            (
                "gradient bytes per step",
                f"{self.bytes_per_step:,.0f} in {self.buckets_per_step:g} bucket(s)",
            ),
            ("bus bandwidth achieved", f"{self.busbw_gbps:.3f} GB/s"),
        ]
        if self.reference_busbw_gbps:
            ratio = self.busbw_gbps / self.reference_busbw_gbps
            rows.append(
                (
                    "bench-comm at the same bucket size",
                    f"{self.reference_busbw_gbps:.3f} GB/s (achieved/curve {ratio:.2f}; "
                    f"run {self.reference_run_id})",
                )
            )
        else:
            rows.append(
                (
                    "bench-comm reference",
                    "none yet: run `dist-trainer bench-comm` with the same scaling",
                )
            )
        lines = ["| communication, whole run (median over log intervals) | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        return "\n".join(lines) + "\n"


def _median_history(client: Any, run_id: str, key: str) -> float:
    values = [m.value for m in client.get_metric_history(run_id, key)]
    values = [v for v in values if not math.isnan(v)]
    if len(values) > 2:
        values = values[1:]  # the first interval includes DDP's first-iteration set-up
    return statistics.median(values) if values else math.nan


def reference_busbw(
    client: Any, world_size: int, backend: str, bucket_bytes: float
) -> tuple[float, str] | None:
    """Bus bandwidth of the latest matching bench-comm run at `bucket_bytes` (log-log interp.)."""
    from dist_trainer.tracking import BENCH_TAG

    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        filter_string=(
            f"tags.`{BENCH_TAG}` = 'bench-comm' and attributes.status = 'FINISHED' and "
            f"params.`scaling.num_workers` = '{world_size}' and "
            f"params.`bench_comm.backend` = '{backend}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs or not bucket_bytes > 0:
        return None
    run_id = runs[0].info.run_id
    curve = sorted(
        (m.step, m.value) for m in client.get_metric_history(run_id, "bench_comm/time_s")
    )
    if not curve:
        return None
    sizes = [s for s, _ in curve]
    if bucket_bytes <= sizes[0]:
        time_s = curve[0][1]
    elif bucket_bytes >= sizes[-1]:
        time_s = curve[-1][1]
    else:
        i = next(k for k, s in enumerate(sizes) if s >= bucket_bytes)
        (s0, t0), (s1, t1) = curve[i - 1], curve[i]
        w = math.log(bucket_bytes / s0) / math.log(s1 / s0)
        time_s = math.exp((1 - w) * math.log(t0) + w * math.log(t1))
    return comm.busbw_gbps(bucket_bytes, time_s, world_size), run_id


def comm_summary(uri: str, run_id: str, world_size: int, backend: str) -> CommSummary | None:
    """The summary of a finished training run; None if it logged no communication figures."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    med = {key: _median_history(client, run_id, key) for key in _SUMMARY_KEYS}
    if math.isnan(med["comm/allreduce_s"]):
        return None
    mean_bucket = med["comm/bytes"] / med["comm/buckets"] if med["comm/buckets"] else math.nan
    reference = reference_busbw(client, world_size, backend, mean_bucket)
    return CommSummary(
        step_time_s=med["perf/step_time_s"],
        allreduce_s=med["comm/allreduce_s"],
        exposed_s=med["comm/exposed_s"],
        exposed_fraction=med["comm/fraction"],
        bytes_per_step=med["comm/bytes"],
        buckets_per_step=med["comm/buckets"],
        busbw_gbps=med["comm/busbw_gbps"],
        reference_busbw_gbps=reference[0] if reference else None,
        reference_run_id=reference[1] if reference else None,
    )
