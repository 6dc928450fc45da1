"""Studies: a Hydra sweep (`dist-trainer train -m ...`) as one MLflow parent run and one launch.

    dist-trainer train -m trainer.global_batch_size=32,64,128,256

A study is one parent run (tag `dist_trainer.role=study`) with one child run per job
(`mlflow.parentRunId`), named by the swept keys (`global_batch_size=64`). Jobs that need the same
workers (worker count, GPUs, CPUs and resources per worker, placement, cluster) run one after
another in ONE Ray Train worker group: starting a group costs ~15-20 s on a small machine, a
short job a few seconds, so a sweep of many short jobs would otherwise be mostly start-up. A job
needing other workers gets its own group.

Failures stay with their job. A config error (refused before launch) fails that child run
and the others go on. A job that fails inside the workers fails its child run; the group's
remaining jobs continue in a new worker group (a fresh group, rather than carrying on in ranks
that may disagree about where they stopped). When the study ends, the parent gets a summary
table of the children's key figures (`study_summary.md` and an MLflow table `study_runs.json`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from dist_trainer import tracking
from dist_trainer.config import ConfigError, load_config

__all__ = ["StudyJob", "StudyResult", "expand_sweep", "run_study", "with_preset_sweep"]

# What the summary table shows of each child (the report verb draws the full picture).
_SUMMARY_METRICS = (
    ("val/loss", "val loss"),
    ("val/accuracy", "val acc"),
    ("train/loss", "train loss"),
    ("perf/samples_per_s", "samples/s (last interval)"),
    ("perf/elapsed_s", "train time s"),
)


def with_preset_sweep(overrides: list[str]) -> list[str]:
    """`overrides` plus the sweep a preset declares in `hydra.sweeper.params` (Hydra's way for
    a config to carry its sweep, e.g. experiment=batch_size_study); the command line wins."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dist_trainer.config import CONF_DIR, open_target_overrides, register_configs

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    fixed = open_target_overrides(fixed)  # composes too: not inside the block below
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=fixed, return_hydra_config=True)
    declared = cfg.hydra.sweeper.get("params") or {}
    given = {o.get_key_element() for o in parsed}
    extra = [f"{key}={value}" for key, value in declared.items() if key not in given]
    return [*overrides, *extra]


def expand_sweep(overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """Hydra's basic sweep: every combination of the swept values, as one override list per
    job, and the keys that were swept (`a=1,2 b=x,y` gives four jobs, keys [a, b])."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for job in batches[0]], swept


# Short names for the keys studies sweep most: the MLflow UI cuts run names at ~18 characters,
# so the part that differs must come early ("batch=64", not "global_batch_size=64").
_SHORT_KEYS = {
    "trainer.global_batch_size": "batch",
    "trainer.max_micro_batch_size": "micro",
    "scaling.num_workers": "workers",
    "optim.optimizer.lr": "lr",
    "optim.lr_scaling": "lr_scaling",
    "trainer.precision": "precision",
}


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's name in run names: an alias, its last part, or whole where that is ambiguous."""
    names = {k: _SHORT_KEYS.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    if len(set(names.values())) < len(names):
        return {k: k for k in keys}
    return names


def _job_name(overrides: list[str], swept: list[str]) -> str:
    """The child's run name: the swept keys' values (`batch=64`, `batch=64,workers=4`)."""
    names = _short_keys(swept)
    values = {}
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") in swept:
            values[key.lstrip("+~")] = value
    return ",".join(f"{names[k]}={v}" for k, v in values.items())


@dataclass
class StudyJob:
    """One job of a study and what became of it."""

    name: str
    overrides: list[str]
    prepared: Any = None  # jobs.Prepared when its config passed the checks
    run_id: str | None = None
    status: str = "PENDING"
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def group_key(self) -> tuple:
        """Jobs with equal keys can share one worker group."""
        s = self.prepared.job.scaling
        return (
            s.describe_workers(),
            s.use_gpu,
            s.cpus_per_worker,
            tuple(sorted(s.resources_per_worker.items())),
            s.placement_strategy,
            s.address,
            s.max_failures,
            s.elastic_resize_interval_s,
            s.storage_path,
        )


@dataclass
class StudyResult:
    """What a study hands back: the parent run and every job."""

    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    jobs: list[StudyJob]
    seconds: float

    @property
    def failed(self) -> list[StudyJob]:
        return [j for j in self.jobs if j.status != "FINISHED"]


def _summary_rows(jobs: list[StudyJob]) -> tuple[list[str], list[list[Any]]]:
    columns = ["job", "status", *(label for _, label in _SUMMARY_METRICS), "run id"]
    rows = []
    for job in jobs:
        figures = [job.metrics.get(key) for key, _ in _SUMMARY_METRICS]
        rows.append([job.name, job.status, *figures, job.run_id or "-"])
    return columns, rows


def _summary_markdown(columns: list[str], rows: list[list[Any]], failures: list[StudyJob]) -> str:
    def cell(value: Any) -> str:
        return (
            f"{value:.4g}" if isinstance(value, float) else ("-" if value is None else str(value))
        )

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    lines += [f"\n{job.name}: {job.error}" for job in failures if job.error]
    return "\n".join(lines) + "\n"


def run_study(overrides: list[str], show_progress: bool = True) -> StudyResult:
    """Run every job of the sweep in `overrides`; the parent run summarizes them."""
    from dist_trainer.jobs import check_user_code, create_job_run, job_tags, prepare
    from dist_trainer.progress import ProgressReporter
    from dist_trainer.ray_cluster import start_cluster
    from dist_trainer.workers import train_fn

    started = time.perf_counter()
    overrides = with_preset_sweep(overrides)
    job_overrides, swept = expand_sweep(overrides)
    jobs = [StudyJob(_job_name(o, swept) or f"job{i}", o) for i, o in enumerate(job_overrides)]
    for job in jobs:  # every check that needs no Ray, for every job, before anything starts
        try:
            job.prepared = prepare(load_config(job.overrides))
            check_user_code(job.prepared)
        except ConfigError as exc:
            job.status, job.error = "FAILED", str(exc)
            print(f"[dist-trainer] {job.name}: config error: {exc}", flush=True)
    ready = [j for j in jobs if j.prepared is not None]
    if not ready:
        raise ConfigError(f"every job of the study was refused; the first: {jobs[0].error}")
    first = ready[0].prepared
    uri, experiment = first.tracking_uri, first.job.tracking.experiment
    for job in ready:
        if (job.prepared.tracking_uri, job.prepared.job.tracking.experiment) != (uri, experiment):
            raise ConfigError(
                f"{job.name}: a study logs into one MLflow experiment; tracking.uri and "
                "tracking.experiment must not be swept. Fix: run separate sweeps"
            )
    cluster = start_cluster(first.job, first.tracking_uri)
    sweep_text = " ".join(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept)
    names = _short_keys(swept)
    short_text = " ".join(
        f"{names[o.split('=', 1)[0].lstrip('+~')]}={o.split('=', 1)[1]}"
        for o in overrides
        if o.split("=", 1)[0].lstrip("+~") in swept
    )
    parent = tracking.start_job_run(
        uri,
        cluster.experiment_id,
        first.job.tracking.run_name or f"study {short_text}",
        {"study.sweep": sweep_text, "study.jobs": len(jobs)},
        {**job_tags(first), tracking.ROLE_TAG: "study"},
    )
    print(
        f"[dist-trainer] study {parent}: {len(jobs)} jobs ({sweep_text}) in experiment "
        f"'{experiment}'",
        flush=True,
    )
    status = "FAILED"
    try:
        for job in jobs:
            if job.prepared is not None:
                job.run_id = create_job_run(
                    job.prepared, cluster, job.name, {"mlflow.parentRunId": parent}
                )
            else:  # refused before launch: a FAILED child says why
                job.run_id = tracking.start_job_run(
                    uri, cluster.experiment_id, job.name, {}, {"mlflow.parentRunId": parent}
                )
                tracking.finish_job_run(uri, job.run_id, "FAILED", job.error)
        groups: dict[tuple, list[StudyJob]] = {}
        for job in ready:
            groups.setdefault(job.group_key(), []).append(job)
        for members in groups.values():
            _run_group(members, cluster, uri, train_fn, ProgressReporter, show_progress)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        for job in jobs:
            if job.run_id and job.status in ("PENDING", "RUNNING"):
                tracking.finish_job_run(uri, job.run_id, "KILLED", "interrupted by the user")
        raise
    finally:
        for job in jobs:
            if job.run_id and job.status == "FINISHED":
                job.metrics = tracking.latest_metrics(uri, job.run_id)
                text = tracking.plan_text(uri, job.run_id, job.prepared.plan.describe())
                notes = tracking.run_notes(uri, job.run_id)
                description = tracking.describe_job(text, job.metrics, notes)
                tracking.set_description(uri, job.run_id, description)
        columns, rows = _summary_rows(jobs)
        failures = [j for j in jobs if j.status != "FINISHED"]
        summary = _summary_markdown(columns, rows, failures)
        tracking.log_text(uri, parent, summary, "study_summary.md")
        tracking.log_table(uri, parent, columns, rows, "study_runs.json")
        findings = _report(uri, experiment, parent, jobs)
        # The parent's description is the first thing its page shows: what the study found.
        note = "".join(f"- {f}\n" for f in findings)
        tracking.set_description(
            uri, parent, (f"## Findings\n{note}\n" if note else "") + f"## Jobs\n{summary}"
        )
        tracking.finish_job_run(
            uri, parent, status, f"{len(failures)} of {len(jobs)} jobs failed" if failures else None
        )
    result = StudyResult(parent, cluster.experiment_id, uri, jobs, time.perf_counter() - started)
    _print_summary(result, columns, rows)
    return result


def _report(uri: str, experiment: str, parent: str, jobs: list[StudyJob]) -> list[str]:
    """The report verb's plots and findings, logged to the parent; never fails the study."""
    if sum(j.status == "FINISHED" for j in jobs) < 2:
        return []
    from dist_trainer.console import log_path
    from dist_trainer.study_report import build_report

    try:
        report = build_report(uri, experiment, parent, out_dir=log_path().parent / "report")
    except Exception as exc:  # noqa: BLE001 - the runs are logged; the report can be redone
        print(f"[dist-trainer] no study report ({exc}); try dist-trainer report", flush=True)
        return []
    print(f"[dist-trainer] study report: {report.html_path}", flush=True)
    for sentence in report.findings:
        print(f"  - {sentence}", flush=True)
    return report.findings


def _run_group(members, cluster, uri, train_fn, reporter_cls, show_progress) -> None:
    """The jobs of one worker set-up, in as few worker groups as failures allow."""
    from dist_trainer.groups import run_group
    from dist_trainer.jobs import error_text, job_payload

    pending = list(members)
    while pending:
        for job in pending:
            job.status = "RUNNING"
        reporter = reporter_cls(
            uri,
            [j.run_id for j in pending],
            enabled=show_progress,
            labels=[j.name for j in pending],
        )
        reporter.start()
        error: Exception | None = None
        try:
            run_group(
                pending[0].prepared.job,
                train_fn,
                {"jobs": [job_payload(j.prepared, j.run_id) for j in pending]},
                f"dist_trainer-study-{pending[0].run_id}",
                uri,
                cluster.use_gpu,
            )
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - the failing job's, reported in its run
            error = exc
        finally:
            reporter.stop()
        statuses = tracking.run_statuses(uri, [j.run_id for j in pending])
        done = [j for j in pending if statuses[j.run_id] == "FINISHED"]
        for job in done:
            job.status = "FINISHED"
        rest = [j for j in pending if j not in done]
        if error is None:
            for job in rest:  # cannot happen unless a worker lost its store connection
                job.status, job.error = "FAILED", "the worker group ended without finishing it"
                tracking.finish_job_run(uri, job.run_id, "FAILED", job.error)
            return
        failed, pending = rest[0], rest[1:]
        failed.status, failed.error = "FAILED", error_text(error).strip().splitlines()[-1]
        tracking.finish_job_run(uri, failed.run_id, "FAILED", failed.error)
        print(f"[dist-trainer] {failed.name} failed: {failed.error}", flush=True)
        if pending:
            print(
                f"[dist-trainer] going on with {len(pending)} job(s) in a new worker group",
                flush=True,
            )


def _print_summary(result: StudyResult, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log or a pipe: room for every column (rich assumes 80)
        console = Console(width=120)
    table = Table(title=f"study {result.parent_run_id}")
    for column in columns[:-1]:
        if column == "job":  # the part of the name that differs between jobs: never cut it
            table.add_column(column, no_wrap=True, min_width=max(len(r[0]) for r in rows))
        else:
            table.add_column(column, justify="left" if column == "status" else "right")
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v or "-") for v in row[:-1]))
    console.print(table)
    failed = result.failed
    console.print(
        f"{len(result.jobs) - len(failed)} of {len(result.jobs)} jobs finished in "
        f"{result.seconds:.1f} s."
        + (f" Failed: {', '.join(j.name for j in failed)}." if failed else "")
    )
    parent_url = tracking.ui_url(result.tracking_uri, result.experiment_id, result.parent_run_id)
    console.print(f"Study: {parent_url}", soft_wrap=True)
    for job in result.jobs:
        if job.run_id:
            url = tracking.ui_url(result.tracking_uri, result.experiment_id, job.run_id)
            console.print(f"  {job.name}: {url}", soft_wrap=True)
