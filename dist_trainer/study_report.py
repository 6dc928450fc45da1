"""Study report: which global batch size? A sweep's runs read back from MLflow, plotted, summed up.

`dist-trainer report --experiment NAME [--run PARENT_ID]` takes the children of a study parent
run (tag `dist_trainer.role=study`; the latest one unless --run names it), or, without a parent,
every finished top-level training run of the experiment. It writes PNG plots, one self-contained
HTML page (the plots inlined as data URIs) and a markdown summary into --out, and logs them to
the parent run under `report/`, with the runs table as an MLflow table (`report/runs.json`).

The numbers and sentences come from dist_trainer.study_figures (pure, tested on plain dicts);
this module only reads MLflow through `MlflowClient` (no import of driver/report/bench_comm, so
the import graph stays one-way) and renders, with matplotlib's object API so no pyplot state or
backend switch leaks into the caller.
"""

from __future__ import annotations

import argparse
import base64
import html
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dist_trainer.config import ConfigError
from dist_trainer.study_figures import (
    COLUMNS,
    METRICS,
    RunFigures,
    default_target,
    findings,
    fmt_loss,
    run_figures,
    table_rows,
    usable,
)
from dist_trainer.tracking import (
    ROLE_TAG,
    check_tracking_uri,
    normalize_tracking_uri,
    redact_params,
)

__all__ = ["ReportError", "RunFigures", "StudyReport", "build_report", "findings", "main"]

PARENT_TAG = "mlflow.parentRunId"


class ReportError(Exception):
    """The user's to fix (no such experiment, no runs): one line, exit code 2."""


@dataclass
class StudyReport:
    """What `build_report` wrote: the folder, the page, the PNGs by name, the findings, every
    selected run (FAILED ones too), the study's parent run (None: top-level runs), the target
    val loss used, and a note for each plot left out."""

    out_dir: Path
    html_path: Path
    plots: dict[str, Path]
    findings: list[str]
    runs: list[RunFigures]
    parent_run_id: str | None
    target_val_loss: float | None = None
    notes: list[str] | None = None


# ------------------------------------------------------------------ plots
_SECTIONS = {  # name: (heading, what the plot shows, why there is none)
    "throughput": (
        "1. Samples/s vs global batch",
        "Median perf/samples_per_s over each run's log intervals (the warm-up interval skipped).",
        "No run logged perf/samples_per_s.",
    ),
    "time_to_target": (
        "2. Steps and wall time to the target val loss",
        "First validation at or below val loss {target} (wall time: val/elapsed_s); "
        "× marks a run that never reaches it.",
        "No run logged val/loss: there is no target to reach.",
    ),
    "loss_gap": (
        "3. Final loss and generalization gap",
        "Final train/loss and val/loss, and the gap (val − train), per global batch.",
        "No run logged both train/loss and val/loss.",
    ),
    "memory": (
        "4. Peak memory vs micro-batch size",
        "Peak memory of a worker: {memory} (CUDA allocator where logged, else host peak RSS).",
        "No run logged mem/peak_allocated_bytes_max or mem/peak_rss_bytes_max.",
    ),
    "communication": (
        "5. Communication fraction vs workers",
        "Median comm/fraction: the share of step time spent waiting on the all-reduce.",
        "No run logged comm/fraction (one worker each, or comm.enabled=false).",
    ),
}


def _figure(ncols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * ncols, 3.8), dpi=110, layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _lines(ax: Any, runs: list[RunFigures], x: str, y: str, prefix: str = "", **style) -> bool:
    """One line per worker count; False if no run has both numbers."""
    groups: dict[int, list[RunFigures]] = defaultdict(list)
    for r in runs:
        if getattr(r, x) is not None and getattr(r, y) is not None:
            groups[r.workers].append(r)
    for workers, group in sorted(groups.items()):
        points = sorted((getattr(r, x), getattr(r, y)) for r in group)
        label = f"{prefix}{workers} worker{'s' * (workers > 1)}"
        ax.plot(*zip(*points, strict=True), marker="o", label=label, **style)
    return bool(groups)


def _axes(ax: Any, ticks: list[int], xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)  # batch sizes come in powers of two
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


_TARGET_AXES = (("steps_to_target", "steps"), ("time_to_target_s", "wall time, s"))


def _plots(runs: list[RunFigures], target: float | None, out: Path) -> dict[str, Path]:
    """Write a PNG for each plot some run has numbers for; returns {name: path}."""
    plots: dict[str, Path] = {}
    batches = sorted({r.global_batch for r in runs})

    def save(name: str, fig: Any) -> None:
        plots[name] = out / f"{name}.png"
        fig.savefig(plots[name], format="png")

    fig, (ax,) = _figure()
    if _lines(ax, runs, "global_batch", "samples_per_s"):
        _axes(ax, batches, "global batch", "samples/s (median interval)", "Throughput")
        save("throughput", fig)
    fig, axes = _figure(2)
    if target is not None:
        for ax, (attr, unit) in zip(axes, _TARGET_AXES, strict=True):
            _lines(ax, runs, "global_batch", attr)
            top = 1.1 * max([getattr(r, attr) or 0 for r in runs] + [1e-9])
            for r in runs:
                if getattr(r, attr) is None:  # drawn above the others, so it is not missed
                    why = "not reached" if r.steps_to_target is None else "no val/elapsed_s"
                    ax.scatter([r.global_batch], [top], marker="x", color="red")
                    ax.annotate(
                        why,
                        (r.global_batch, top),
                        xytext=(0, 5),
                        ha="center",
                        textcoords="offset points",
                        fontsize=8,
                    )
            _axes(ax, batches, "global batch", unit, f"To val loss {fmt_loss(target)}")
            ax.set_ylim(0, top * 1.2)
            ax.margins(x=0.12)
            ax.legend(fontsize=8, loc="lower left")
        save("time_to_target", fig)
    fig, (loss_ax, gap_ax) = _figure(2)
    _lines(loss_ax, runs, "global_batch", "final_train_loss", prefix="train, ", linestyle="--")
    _lines(loss_ax, runs, "global_batch", "final_val_loss", prefix="val, ")
    if _lines(gap_ax, runs, "global_batch", "gap"):
        _axes(loss_ax, batches, "global batch", "loss", "Final loss")
        _axes(gap_ax, batches, "global batch", "val − train loss", "Generalization gap")
        gap_ax.axhline(0, color="grey", linewidth=0.8)
        save("loss_gap", fig)
    fig, (ax,) = _figure()
    mib = [
        replace(r, peak_memory_bytes=r.peak_memory_bytes / 2**20)
        for r in runs
        if r.peak_memory_bytes
    ]
    if _lines(ax, mib, "micro_batch", "peak_memory_bytes"):
        micro = sorted({r.micro_batch for r in mib if r.micro_batch})
        kinds = " and ".join(sorted({r.memory_kind for r in mib}))
        _axes(ax, micro, "micro-batch size", "peak MiB", f"Peak memory per worker ({kinds})")
        save("memory", fig)
    fig, (ax,) = _figure()
    comm = [r for r in runs if r.comm_fraction is not None]
    for gb in sorted({r.global_batch for r in comm}):
        points = sorted((r.workers, 100 * r.comm_fraction) for r in comm if r.global_batch == gb)
        ax.plot(*zip(*points, strict=True), marker="o", label=f"batch {gb}")
    if comm:
        workers = sorted({r.workers for r in comm})
        _axes(ax, workers, "workers", "exposed communication, % of step", "Communication")
        save("communication", fig)
    return plots


def _notes(plots: dict[str, Path], runs: list[RunFigures], target: float | None) -> dict:
    memory = " and ".join(sorted({r.memory_kind for r in runs if r.memory_kind}))
    return {
        name: shown.format(target=fmt_loss(target or 0), memory=memory) if name in plots else none
        for name, (_, shown, none) in _SECTIONS.items()
    }


# ------------------------------------------------------------------ pages
def _html(title: str, lead: str, sentences: list[str], plots: dict, notes: dict, rows: list) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
        "body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 7px;text-align:right}td:first-child,th{text-align:left}img{max-width:100%}"
        f"</style></head><body><h1>{e(title)}</h1><p>{e(lead)}</p><h2>Findings</h2><ul>",
        *(f"<li>{e(s)}</li>" for s in sentences),
        "</ul>",
    ]
    for name, (heading, _, _) in _SECTIONS.items():
        parts.append(f"<h2>{e(heading)}</h2><p>{e(notes[name])}</p>")
        if name in plots:
            data = base64.b64encode(plots[name].read_bytes()).decode("ascii")
            parts.append(f"<img alt='{e(heading)}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>6. Runs</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in COLUMNS))
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    return "".join(parts) + "</table></body></html>\n"


def _markdown(title: str, lead: str, sentences: list[str], rows: list[list[str]]) -> str:
    lines = [f"# {title}", "", lead, "", "## Findings", "", *(f"- {s}" for s in sentences)]
    lines += ["", "## Runs", "", "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ MLflow
def _search(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _select_runs(client: Any, experiment: str, parent_run_id: str | None) -> tuple[Any, list]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"no experiment named {experiment!r} in this tracking store")
    experiment_id, parent = found.experiment_id, parent_run_id
    if parent is None:
        studies = client.search_runs(
            [experiment_id],
            f"tags.`{ROLE_TAG}` = 'study'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        parent = studies[0].info.run_id if studies else None
    else:
        from mlflow.exceptions import MlflowException

        try:  # children live in the parent's experiment, whatever --experiment says
            experiment_id = client.get_run(parent).info.experiment_id
        except MlflowException:
            raise ReportError(f"no run with id {parent!r} (--run)") from None
    if parent is not None:
        children = _search(client, experiment_id, f"tags.`{PARENT_TAG}` = '{parent}'")
        if not children:
            raise ReportError(f"study run {parent} has no child runs")
        return parent, children
    runs = [
        r
        for r in _search(client, experiment_id, "attributes.status = 'FINISHED'")
        if PARENT_TAG not in r.data.tags and "trainer.global_batch_size" in r.data.params
    ]
    if not runs:
        raise ReportError(f"experiment {experiment!r} has no finished training runs")
    return None, runs


def _load_run(client: Any, run: Any) -> dict[str, Any]:
    metrics = {}
    for key in METRICS:
        if key in run.data.metrics:  # only keys the run logged: one query each
            history = client.get_metric_history(run.info.run_id, key)
            metrics[key] = [
                (m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))
            ]
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "params": dict(run.data.params),
        "metrics": metrics,
    }


def _log_to_parent(client: Any, parent: str, out: Path, files: list[Path], rows: list) -> None:
    for path in files:
        client.log_artifact(parent, str(path), "report")
    table = {c: [row[i] for row in rows] for i, c in enumerate([*COLUMNS, "run_id"])}
    existing = {a.path for a in client.list_artifacts(parent, "report")}
    if "report/runs.json" not in existing:
        client.log_table(parent, table, "report/runs.json")
    else:  # log_table appends to an existing table; a re-run replaces it in the same format
        import pandas as pd

        path = out / "runs.json"
        pd.DataFrame(table).to_json(path, orient="split", index=False)
        client.log_artifact(parent, str(path), "report")


def build_report(
    tracking_uri: str,
    experiment: str,
    parent_run_id: str | None = None,
    out_dir: str | Path = "report",
    target_val_loss: float | None = None,
    log_to_parent: bool = True,
) -> StudyReport:
    """Read the study's runs, write plots + report.html + summary.md into `out_dir`, log them."""
    uri = normalize_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise ReportError(f"no MLflow store at {uri[len('sqlite:///') :]} (--tracking-uri)")
    if uri.startswith(("http://", "https://")):  # MLflow would retry for minutes
        try:
            check_tracking_uri(uri)
        except ConfigError as exc:
            raise ReportError(str(exc).replace("tracking.uri", "--tracking-uri")) from None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent, selected = _select_runs(client, experiment, parent_run_id)
    raw = [_load_run(client, r) for r in selected]
    target = target_val_loss if target_val_loss is not None else default_target(raw)
    runs = sorted(
        (run_figures(r, target) for r in raw),
        key=lambda r: (r.workers or 0, r.global_batch or 0, r.name),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(usable(runs), target, out)
    notes = _notes(plots, usable(runs), target)
    sentences = findings(runs, target)
    how = (
        "--target-val-loss"
        if target_val_loss is not None
        else "by default: the largest of the runs' best val losses, so every run reaches it"
    )
    title = f"Which batch size? Experiment {experiment}"
    lead = (
        f"{len(runs)} runs ({len(usable(runs))} finished and plotted)"
        + (f" of study run {parent}" if parent else ", top-level runs (no study parent)")
        + f"; store {redact_params({'u': uri})['u']}. Target val loss: "
        + (f"{fmt_loss(target)} ({how})." if target is not None else "none (no val/loss).")
    )
    rows = table_rows(runs, target)
    html_path, summary = out / "report.html", out / "summary.md"
    html_path.write_text(_html(title, lead, sentences, plots, notes, rows), encoding="utf-8")
    summary.write_text(_markdown(title, lead, sentences, rows), encoding="utf-8")
    if log_to_parent and parent is not None:
        rows = [[*row, r.run_id] for row, r in zip(rows, runs, strict=True)]
        _log_to_parent(client, parent, out, [*plots.values(), html_path, summary], rows)
    skipped = [notes[n] for n in _SECTIONS if n not in plots]
    return StudyReport(out, html_path, plots, sentences, runs, parent, target, skipped)


def main(argv: list[str]) -> int:
    """`dist-trainer report ...`: 0 on success, 2 (one line on stderr) when there is nothing."""
    parser = argparse.ArgumentParser(
        prog="dist-trainer report", description="Plots and findings of a batch-size study."
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--run", help="the study's parent run id (default: the latest study)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--out", help="output folder (default: report/<run id or experiment>)")
    parser.add_argument("--target-val-loss", type=float, help="default: every run reaches it")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: a code, not an exit from our caller
        return int(exc.code or 0)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.run or args.experiment)
    try:
        report = build_report(
            args.tracking_uri,
            args.experiment,
            args.run,
            args.out or Path("report") / name,
            args.target_val_loss,
        )
    except ReportError as exc:
        print(f"dist-trainer: {exc}", file=sys.stderr)
        return 2
    print(f"[dist-trainer] report: {report.html_path.resolve()}")
    if report.parent_run_id:
        print(f"[dist-trainer] logged under report/ in study run {report.parent_run_id}")
    for sentence in report.findings:
        print(f"  - {sentence}")
    return 0
