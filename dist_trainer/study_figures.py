"""Pure figures of a batch-size study: plain run data in, numbers and sentences out.

No MLflow and no matplotlib here, so every number and sentence of the study report
(dist_trainer.study_report) is testable on hand-made dicts. A run is given as
`{"run_id", "name", "status", "params": {dotted key: str}, "metrics": {key: [(step, value)]}}`,
the way MLflow stores it: params as strings, metric histories in step order.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COLUMNS",
    "METRICS",
    "RunFigures",
    "default_target",
    "findings",
    "fmt_gap",
    "fmt_loss",
    "fmt_rate",
    "fmt_ratio",
    "fmt_seconds",
    "run_figures",
    "table_rows",
    "usable",
]


# The metric histories the figures read (the contract with the training loop).
METRICS = (
    "train/loss",
    "train/accuracy",
    "val/loss",
    "val/accuracy",
    "val/elapsed_s",
    "perf/samples_per_s",
    "comm/fraction",
    "mem/peak_rss_bytes_max",
    "mem/peak_allocated_bytes_max",
    # An elastic job's split, per (re)start.
    "plan/world_size",
    "plan/micro_batch_size",
    "plan/accumulation_steps",
)


@dataclass(frozen=True)
class RunFigures:
    """One run's numbers for the report; None where the run did not log what they need."""

    run_id: str
    name: str
    status: str
    global_batch: int | None
    workers: int | None
    micro_batch: int | None
    accumulation: int | None
    peak_lr: float | None
    samples_per_s: float | None  # median over log intervals, warm-up interval skipped
    final_train_loss: float | None
    final_val_loss: float | None
    gap: float | None  # final val loss - final train loss
    best_val_loss: float | None
    best_val_accuracy: float | None
    steps_to_target: int | None  # None: never reached the target val loss
    time_to_target_s: float | None
    peak_memory_bytes: float | None
    memory_kind: str | None  # "CUDA allocator" or "host RSS"
    comm_fraction: float | None


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(params: dict[str, str], *keys: str) -> int | None:
    for key in keys:
        value = _float(params.get(key))
        if value is not None:
            return int(value)
    return None


def _peak_lr(params: dict[str, str], global_batch: int | None) -> float | None:
    if "optim.peak_lr" in params:
        return _float(params["optim.peak_lr"])
    # Older runs did not log it: redo the launcher's lr scaling from the config params.
    lr, base = _float(params.get("optim.optimizer.lr")), _float(params.get("optim.base_batch_size"))
    scaling = params.get("optim.lr_scaling", "none")
    if lr is None or scaling in ("none", "None"):
        return lr
    if not base or not global_batch:
        return None
    ratio = global_batch / base
    return lr * (ratio if scaling == "linear" else math.sqrt(ratio))


def _median_after_warmup(values: list[float]) -> float | None:
    values = [v for v in values if math.isfinite(v)]
    if len(values) > 2:
        values = values[1:]  # the first interval holds DDP's set-up and allocator warm-up
    return statistics.median(values) if values else None


def run_figures(run: dict[str, Any], target: float | None) -> RunFigures:
    """Figures of one run given as plain data.

    Args:
        run: {"run_id", "name", "status", "params": {dotted key: str},
            "metrics": {key: [(step, value), ...] in step order}}.
        target: validation loss to reach; None: no time-to-target figures.
    """
    params, metrics = run["params"], run["metrics"]

    def values(key: str) -> list[float]:
        return [v for _, v in metrics.get(key, ()) if math.isfinite(v)]

    def last(key: str) -> int | None:
        found = values(key)
        return int(found[-1]) if found else None

    gb = _int(params, "trainer.global_batch_size", "plan.global_batch_size")
    train, val = values("train/loss"), values("val/loss")
    final_train, final_val = (train[-1] if train else None), (val[-1] if val else None)
    steps = time_s = None
    if target is not None:
        elapsed: dict[int, float] = {}
        for step, value in metrics.get("val/elapsed_s", ()):
            elapsed.setdefault(step, value)  # a resumed run may repeat a step: keep the first
        for step, loss in metrics.get("val/loss", ()):
            if loss <= target:
                steps, time_s = int(step), elapsed.get(step)
                break
    cuda, rss = values("mem/peak_allocated_bytes_max"), values("mem/peak_rss_bytes_max")
    memory, kind = (
        (max(cuda), "CUDA allocator") if cuda else (max(rss), "host RSS") if rss else (None, None)
    )
    accuracy = values("val/accuracy")
    return RunFigures(
        run_id=run["run_id"],
        name=run.get("name") or run["run_id"][:8],
        status=run.get("status", "FINISHED"),
        global_batch=gb,
        # An elastic job's split is in plan/* metrics (its params say "1-2"): the one it ended on.
        workers=_int(params, "plan.world_size", "scaling.num_workers") or last("plan/world_size"),
        micro_batch=_int(params, "plan.micro_batch_size") or last("plan/micro_batch_size"),
        accumulation=_int(params, "plan.accumulation_steps") or last("plan/accumulation_steps"),
        peak_lr=_peak_lr(params, gb),
        samples_per_s=_median_after_warmup(values("perf/samples_per_s")),
        final_train_loss=final_train,
        final_val_loss=final_val,
        gap=None if final_train is None or final_val is None else final_val - final_train,
        best_val_loss=min(val) if val else None,
        best_val_accuracy=max(accuracy) if accuracy else None,
        steps_to_target=steps,
        time_to_target_s=time_s,
        peak_memory_bytes=memory,
        memory_kind=kind,
        comm_fraction=_median_after_warmup(values("comm/fraction")),
    )


def default_target(runs: list[dict[str, Any]]) -> float | None:
    """The largest of the finished runs' best val losses: the lowest loss every run reaches."""
    best = [
        min(v for _, v in r["metrics"]["val/loss"])
        for r in runs
        if r.get("status", "FINISHED") == "FINISHED" and r["metrics"].get("val/loss")
    ]
    return max(best) if best else None


def fmt_ratio(x: float) -> str:
    """12×, 3.1×, 0.80×, 0.083×: two significant digits, enough to rank batch sizes."""
    # The thresholds sit where rounding would carry into the next format (9.96 -> "10").
    return f"{x:.0f}×" if x >= 9.95 else f"{x:.1f}×" if x >= 0.995 else f"{x:#.2g}×"


def fmt_loss(x: float) -> str:
    return f"{x:.3g}"


def fmt_gap(x: float) -> str:
    return f"{x:+.3g}"


def fmt_seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s" if s < 600 else f"{s / 60:.1f} min"


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def usable(runs: list[RunFigures]) -> list[RunFigures]:
    # FAILED/KILLED/RUNNING runs stop early: their losses and speeds would mislead the plots.
    return [r for r in runs if r.status == "FINISHED" and r.global_batch and r.workers]


def _label(run: RunFigures, with_workers: bool) -> str:
    return f"batch {run.global_batch}" + (
        f" on {run.workers} worker{'s' * (run.workers > 1)}" if with_workers else ""
    )


def _vs_baseline(run: RunFigures, base: RunFigures, target: float) -> str:
    goal = f"val loss {fmt_loss(target)}"
    if run.steps_to_target is None:
        best = f" (best {fmt_loss(run.best_val_loss)})" if run.best_val_loss is not None else ""
        return f"never reaches {goal}{best}"
    if base.steps_to_target is None:
        when = fmt_seconds(run.time_to_target_s) if run.time_to_target_s is not None else ""
        return (
            f"reaches {goal} in {when or f'{run.steps_to_target} steps'} (batch "
            f"{base.global_batch} never does)"
        )
    steps = f"{run.steps_to_target} vs {base.steps_to_target} steps"
    if run.time_to_target_s is not None and base.time_to_target_s:
        ratio = fmt_ratio(run.time_to_target_s / base.time_to_target_s)
        return f"reaches {goal} in {ratio} the wall time ({steps})"
    return f"reaches {goal} in {steps}"


def findings(runs: list[RunFigures], target: float | None) -> list[str]:
    """One sentence per finding, each batch size against the smallest of its worker count."""
    ok = usable(runs)
    with_workers = len({r.workers for r in ok}) > 1
    groups: dict[int, list[RunFigures]] = defaultdict(list)
    for run in ok:
        groups[run.workers].append(run)
    out = []
    for workers in sorted(groups):
        base, *others = sorted(groups[workers], key=lambda r: r.global_batch)
        for run in others:
            parts = []
            if run.samples_per_s and base.samples_per_s:
                ratio = fmt_ratio(run.samples_per_s / base.samples_per_s)
                parts.append(f"{ratio} the samples/s of batch {base.global_batch}")
            if target is not None:
                parts.append(_vs_baseline(run, base, target))
            if run.gap is not None:
                parts.append(f"gap {fmt_gap(run.gap)}")
            if parts:
                out.append(f"{_label(run, with_workers)}: {', '.join(parts)}.")
    reached = [r for r in ok if r.steps_to_target is not None]
    if target is not None and not reached:
        out.append(f"No run reaches val loss {fmt_loss(target)}.")
    elif reached:
        timed = [r for r in reached if r.time_to_target_s is not None]
        fastest = (
            min(timed, key=lambda r: r.time_to_target_s)
            if timed
            else min(reached, key=lambda r: r.steps_to_target)
        )
        when = f"{fmt_seconds(fastest.time_to_target_s)}, " if timed else ""
        out.append(
            f"Fastest to val loss {fmt_loss(target)}: {_label(fastest, with_workers)}, in "
            f"{when}{fastest.steps_to_target} steps."
        )
    gaps = [r for r in ok if r.gap is not None]
    if gaps:
        worst = max(gaps, key=lambda r: r.gap)
        out.append(
            f"Largest generalization gap: {_label(worst, with_workers)}, {fmt_gap(worst.gap)} "
            f"(final val loss {fmt_loss(worst.final_val_loss)} − train "
            f"{fmt_loss(worst.final_train_loss)})."
        )
    return out


COLUMNS = (
    "run",
    "status",
    "global batch",
    "workers",
    "micro × accum",
    "peak LR",
    "samples/s",
    "final train loss",
    "final val loss",
    "gap",
    "best val acc",
    "to target",
)


def table_rows(runs: list[RunFigures], target: float | None) -> list[list[str]]:
    """The runs table as text, one row per run, in COLUMNS order."""

    def f(value: float | None, fmt: Any) -> str:
        return "—" if value is None else fmt(value)

    rows = []
    for r in runs:
        plan = f"{r.micro_batch} × {r.accumulation}" if r.micro_batch else "—"
        reach = "not reached" if r.steps_to_target is None else f"{r.steps_to_target} steps"
        if r.time_to_target_s is not None:
            reach = f"{fmt_seconds(r.time_to_target_s)} / {reach}"
        rows.append(
            [
                r.name,
                r.status,
                f(r.global_batch, str),
                f(r.workers, str),
                plan,
                f(r.peak_lr, "{:.3g}".format),
                f(r.samples_per_s, fmt_rate),
                f(r.final_train_loss, fmt_loss),
                f(r.final_val_loss, fmt_loss),
                f(r.gap, fmt_gap),
                f(r.best_val_accuracy, "{:.3f}".format),
                reach if r.status == "FINISHED" and target is not None else "—",
            ]
        )
    return rows
