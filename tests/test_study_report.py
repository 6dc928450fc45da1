"""The study report: a small batch-size study really trained in-process into a real MLflow
sqlite store, read back, plotted and summed up; the findings on hand-made runs."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from dist_trainer.batching import plan_batches
from dist_trainer.config import flatten, load_config
from dist_trainer.loop import Trainer, WorkerInfo
from dist_trainer.run_logger import RunLogger
from dist_trainer.study_figures import (
    default_target,
    findings,
    fmt_gap,
    fmt_loss,
    fmt_ratio,
    run_figures,
)
from dist_trainer.study_report import build_report, main
from dist_trainer.tracking import (
    finish_job_run,
    normalize_tracking_uri,
    prepare_store,
    start_job_run,
)
from tests.conftest import job_config

EXPERIMENT = "batch-study"
BATCHES = (32, 64, 128)
PLOTS = ("throughput", "time_to_target", "loss_gap", "memory")  # one worker each: no comm plot
ROLE = "dist_trainer.role"
PARENT = "mlflow.parentRunId"


def _overrides(global_batch: int) -> list[str]:
    return [
        f"trainer.global_batch_size={global_batch}",
        "scaling.num_workers=1",
        "trainer.max_epochs=4",
        "trainer.log_every_n_steps=2",
        "tracking.system_metrics=false",
        "telemetry.enabled=false",
    ]


def _log(uri: str, run_id: str, history: dict[str, list[tuple[int, float]]]) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, s) for k, points in history.items() for s, v in points]
    MlflowClient(uri).log_batch(run_id, metrics=metrics)


def _store(root: Path, experiment: str) -> tuple[str, str]:
    uri = normalize_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:  # artifacts under root, not ./mlruns
        client.create_experiment(experiment, (root / "artifacts" / experiment).as_uri())
    return uri, prepare_store(uri, experiment)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A parent run, 3 children trained for real (batch 32, 64, 128) and one FAILED child."""
    root = tmp_path_factory.mktemp("study")
    uri, experiment_id = _store(root, EXPERIMENT)
    parent = start_job_run(uri, experiment_id, "batch study", {}, {ROLE: "study"})
    tags = {PARENT: parent, ROLE: "job"}
    children = {}
    for gb in BATCHES:
        overrides = _overrides(gb)
        job, plan = job_config(*overrides), plan_batches(gb, 1, None)
        params = {
            **flatten(OmegaConf.to_container(load_config(overrides), resolve=True)),
            **plan.as_params(),
        }
        run_id = start_job_run(uri, experiment_id, f"global_batch_size={gb}", params, tags)
        logger = RunLogger(uri, run_id, flush_interval_s=0.05)
        Trainer(job, plan, WorkerInfo(0, 1, 0, 0, torch.device("cpu")), logger=logger).fit()
        logger.close()
        finish_job_run(uri, run_id, "FINISHED")
        children[gb] = run_id
    # Crashed early with numbers that, if counted, would become the baseline and the target.
    failed = start_job_run(
        uri,
        experiment_id,
        "global_batch_size=16",
        {**params, "trainer.global_batch_size": 16, "plan.micro_batch_size": 16},
        tags,
    )
    _log(uri, failed, {"perf/samples_per_s": [(1, 9e9)], "val/loss": [(1, 1e-6)]})
    finish_job_run(uri, failed, "FAILED", "RuntimeError: out of memory")
    finish_job_run(uri, parent, "FINISHED")
    started = time.perf_counter()
    report = build_report(uri, EXPERIMENT, out_dir=root / "report")
    build_s = time.perf_counter() - started
    return SimpleNamespace(
        uri=uri,
        parent=parent,
        children=children,
        failed=failed,
        report=report,
        root=root,
        build_s=build_s,
    )


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _expected(client: MlflowClient, run_id: str, target: float) -> dict:
    """The report's numbers, recomputed from the run's MLflow histories."""
    sps = [v for _, v in _history(client, run_id, "perf/samples_per_s")]
    val = _history(client, run_id, "val/loss")
    elapsed = dict(_history(client, run_id, "val/elapsed_s"))
    step = next(s for s, v in val if v <= target)
    train = _history(client, run_id, "train/loss")
    assert len(sps) > 2  # so the warm-up interval is skipped
    return {
        "sps": statistics.median(sps[1:]),
        "step": step,
        "time": elapsed[step],
        "gap": val[-1][1] - train[-1][1],
    }


def test_report_findings_match_the_runs(study):
    client, report = MlflowClient(study.uri), study.report
    target = max(
        min(v for _, v in _history(client, r, "val/loss")) for r in study.children.values()
    )
    assert report.target_val_loss == target and report.parent_run_id == study.parent
    fig = {gb: _expected(client, run_id, target) for gb, run_id in study.children.items()}
    text = report.html_path.read_text()
    base = fig[32]
    for gb in (64, 128):
        f = fig[gb]
        sentence = (
            f"batch {gb}: {fmt_ratio(f['sps'] / base['sps'])} the samples/s of batch 32, "
            f"reaches val loss {fmt_loss(target)} in {fmt_ratio(f['time'] / base['time'])} the "
            f"wall time ({f['step']} vs {base['step']} steps), gap {fmt_gap(f['gap'])}."
        )
        assert sentence in report.findings and sentence in text
    assert f"Target val loss: {fmt_loss(target)} (by default" in text
    fastest = min(fig, key=lambda gb: fig[gb]["time"])
    assert any(
        s.startswith(f"Fastest to val loss {fmt_loss(target)}: batch {fastest},")
        for s in report.findings
    )
    widest = max(fig, key=lambda gb: fig[gb]["gap"])
    assert f"Largest generalization gap: batch {widest}, {fmt_gap(fig[widest]['gap'])}" in text
    assert study.build_s < 15


def test_every_plot_is_a_png_inlined_in_one_self_contained_page(study):
    report = study.report
    assert sorted(report.plots) == sorted(PLOTS)
    for path in report.plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 300 and width > 500
    text = report.html_path.read_text()
    assert text.count("src='data:image/png;base64,") == len(PLOTS)
    for external in ('src="http', "src='http", "<script", "<link", "url("):
        assert external not in text
    assert "No run logged comm/fraction" in text  # the skipped plot says why
    assert report.notes == ["No run logged comm/fraction (one worker each, or comm.enabled=false)."]


def test_artifacts_are_logged_to_the_parent(study):
    client = MlflowClient(study.uri)
    logged = {a.path for a in client.list_artifacts(study.parent, "report")}
    expected = {f"report/{name}.png" for name in PLOTS}
    assert expected | {"report/report.html", "report/summary.md", "report/runs.json"} == logged
    table = json.loads(
        Path(client.download_artifacts(study.parent, "report/runs.json")).read_text()
    )
    assert len(table["data"]) == 4 and "status" in table["columns"]
    summary = Path(client.download_artifacts(study.parent, "report/summary.md")).read_text()
    assert all(s in summary for s in study.report.findings)


def test_a_failed_child_is_in_the_table_not_in_the_findings(study):
    report = study.report
    failed = [r for r in report.runs if r.run_id == study.failed]
    assert len(failed) == 1 and failed[0].status == "FAILED"
    assert "global_batch_size=16</td><td>FAILED" in report.html_path.read_text()
    assert not any("batch 16" in s for s in report.findings)
    assert report.target_val_loss > 1e-3  # its val loss does not set the default target


def test_main_reports_a_study_and_refuses_what_is_not_there(study, capsys):
    out = study.root / "again"
    assert main(["--experiment", EXPERIMENT, "--tracking-uri", study.uri, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert str((out / "report.html").resolve()) in stdout and study.report.findings[0] in stdout
    client = MlflowClient(study.uri)  # a second report replaces the table, it does not append
    table = json.loads(
        Path(client.download_artifacts(study.parent, "report/runs.json")).read_text()
    )
    assert len(table["data"]) == 4
    capsys.readouterr()  # MLflow's own download progress bar (where tqdm is installed)
    for argv in (
        ["--experiment", "nope", "--tracking-uri", study.uri],
        ["--experiment", EXPERIMENT, "--tracking-uri", study.uri, "--run", "0" * 32],
        ["--experiment", EXPERIMENT, "--tracking-uri", f"sqlite:///{study.root}/missing.db"],
    ):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("dist-trainer: ") and captured.err.count("\n") == 1


def test_top_level_runs_without_a_study_and_a_comm_plot(tmp_path):
    """No study parent: the finished top-level runs, two worker counts, nothing logged back."""
    uri, experiment_id = _store(tmp_path, "loose")
    for workers, gb, sps, comm in (
        (1, 64, 1000.0, None),
        (2, 64, 1800.0, 0.2),
        (2, 256, 6000.0, 0.05),
        (2, 512, 1.0, 0.9),
    ):
        plan = {"plan.world_size": workers, "plan.micro_batch_size": gb // workers}
        params = {"trainer.global_batch_size": gb, **plan, "plan.accumulation_steps": 1}
        run_id = start_job_run(uri, experiment_id, f"w{workers}-gb{gb}", params, {})
        history = {
            "perf/samples_per_s": [(1, sps / 10), (2, sps), (3, sps)],
            "train/loss": [(3, 0.5)],
            "val/loss": [(3, 0.55)],
            "val/elapsed_s": [(3, 10_000 / sps)],
            "mem/peak_rss_bytes_max": [(3, 2**30)],
        }
        if comm is not None:
            history["comm/fraction"] = [(2, comm), (3, comm)]
        _log(uri, run_id, history)
        finish_job_run(uri, run_id, "FAILED" if gb == 512 else "FINISHED")
    report = build_report(uri, "loose", out_dir=tmp_path / "out")
    assert report.parent_run_id is None and "communication" in report.plots
    assert "batch 256 on 2 workers: 3.3× the samples/s of batch 64" in report.findings[0]
    assert len(report.runs) == 3  # the FAILED top-level run is not a finished training run
    assert "top-level runs (no study parent)" in report.html_path.read_text()
    client = MlflowClient(uri)  # no parent: nothing is logged back to any run
    assert all(client.list_artifacts(r.run_id) == [] for r in report.runs)


# ---------------------------------------------------------------- findings on plain data
def _run(gb, sps=(), val=(), elapsed=(), train=((99, 0.2),), workers=1, status="FINISHED"):
    return {
        "run_id": f"id{gb}-{workers}",
        "name": f"gb{gb}",
        "status": status,
        "params": {"trainer.global_batch_size": str(gb), "plan.world_size": str(workers)},
        "metrics": {
            "perf/samples_per_s": [(i + 1, v) for i, v in enumerate(sps)],
            "val/loss": list(val),
            "val/elapsed_s": list(elapsed),
            "train/loss": list(train),
        },
    }


BASE = _run(32, (1, 100, 100, 100), [(10, 0.5), (20, 0.3)], [(10, 1.0), (20, 2.0)])
CASES = {
    "faster, sooner": (
        [BASE, _run(128, (1, 300, 310, 320), [(5, 0.4), (10, 0.25)], [(5, 0.8), (10, 1.6)])],
        0.3,
        [
            "batch 128: 3.1× the samples/s of batch 32, reaches val loss 0.3 in 0.80× the wall "
            "time (10 vs 20 steps), gap +0.05.",
            "Fastest to val loss 0.3: batch 128, in 1.60 s, 10 steps.",
            "Largest generalization gap: batch 32, +0.1 (final val loss 0.3 − train 0.2).",
        ],
    ),
    "never reaches": (
        [BASE, _run(128, (1, 300, 300), [(5, 0.4), (10, 0.35)], [(5, 0.8), (10, 1.6)])],
        0.3,
        [
            "batch 128: 3.0× the samples/s of batch 32, never reaches val loss 0.3 (best "
            "0.35), gap +0.15.",
            "Fastest to val loss 0.3: batch 32, in 2.00 s, 20 steps.",
            "Largest generalization gap: batch 128, +0.15 (final val loss 0.35 − train 0.2).",
        ],
    ),
    "baseline never reaches; two intervals: no warm-up skip": (
        [BASE, _run(64, (50, 150), [(4, 0.2)], [(4, 12.5)], train=[(4, 0.25)])],
        0.25,
        [
            "batch 64: 1.0× the samples/s of batch 32, reaches val loss 0.25 in 12.5 s (batch "
            "32 never does), gap -0.05.",
            "Fastest to val loss 0.25: batch 64, in 12.5 s, 4 steps.",
            "Largest generalization gap: batch 32, +0.1 (final val loss 0.3 − train 0.2).",
        ],
    ),
    "none reaches; a failed run is left out": (
        [BASE, _run(16, (9e9,), [(1, 0.001)], [(1, 0.1)], status="FAILED")],
        0.1,
        [
            "No run reaches val loss 0.1.",
            "Largest generalization gap: batch 32, +0.1 (final val loss 0.3 − train 0.2).",
        ],
    ),
    "each worker count against its own smallest batch": (
        [
            BASE,
            _run(64, (1, 400, 400), workers=2, train=()),
            _run(256, (1, 1000, 1000), workers=2, train=()),
        ],
        None,
        [
            "batch 256 on 2 workers: 2.5× the samples/s of batch 64.",
            "Largest generalization gap: batch 32 on 1 worker, +0.1 (final val loss 0.3 − "
            "train 0.2).",
        ],
    ),
}


@pytest.mark.parametrize("runs,target,expected", CASES.values(), ids=CASES.keys())
def test_findings_on_plain_runs(runs, target, expected):
    assert findings([run_figures(r, target) for r in runs], target) == expected


def test_run_figures_on_plain_data():
    run = _run(256, val=[(5, 0.4), (10, 0.3)], elapsed=[(5, 1.0), (10, 2.0)])
    run["params"].update(
        {"optim.optimizer.lr": "0.1", "optim.lr_scaling": "linear", "optim.base_batch_size": "64"}
    )
    run["metrics"]["mem/peak_rss_bytes_max"] = [(10, 5e9)]
    run["metrics"]["mem/peak_allocated_bytes_max"] = [(5, 1e9), (10, 2e9)]
    fig = run_figures(run, 0.35)
    assert (fig.steps_to_target, fig.time_to_target_s) == (10, 2.0)
    assert (fig.peak_memory_bytes, fig.memory_kind) == (2e9, "CUDA allocator")
    assert fig.peak_lr == pytest.approx(0.4)  # older run: scaled from the config params
    run["params"]["optim.peak_lr"] = "0.3"  # logged by the launcher: taken as is
    assert run_figures(run, None).peak_lr == 0.3 and run_figures(run, None).steps_to_target is None
    failed = _run(16, val=[(1, 0.01)], status="FAILED")
    assert default_target([BASE, run, failed]) == 0.3


def test_an_elastic_run_counts_with_the_split_it_ended_on():
    """Its params hold only what stays fixed (plan.world_size=1-2); plan/* metrics the rest."""
    run = _run(64, sps=(1, 100, 100), val=[(8, 0.4)], elapsed=[(8, 1.0)])
    run["params"].update({"plan.world_size": "1-2", "scaling.num_workers": "[1, 2]"})
    run["metrics"].update(
        {
            "plan/world_size": [(0, 1.0), (4, 2.0)],
            "plan/micro_batch_size": [(0, 16.0), (4, 16.0)],
            "plan/accumulation_steps": [(0, 4.0), (4, 2.0)],
        }
    )
    fig = run_figures(run, None)
    assert (fig.workers, fig.micro_batch, fig.accumulation) == (2, 16, 2)
