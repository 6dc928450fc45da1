"""The Ray driver end to end on a real local cluster, real DDP (gloo) and a real MLflow store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dist_trainer import driver
from dist_trainer.config import ConfigError, load_config
from tests.conftest import free_port, job_overrides, rank0_pid

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
USER_DATA = ["data._target_=tests.user_code.make_data"]
CLI = str(Path(sys.executable).with_name("dist-trainer"))


def _runs(tmp_path: Path) -> list:
    db = tmp_path / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model._target_=no.such.Model"], r"model\._target_='no\.such\.Model' cannot be imported"),
        (["trainer.global_batch_size=0"], r"trainer\.global_batch_size must be a positive"),
        (["trainer.global_batch_size=255"], r"Nearest valid global batch sizes: 252 .*256"),
        (["trainer.max_micro_batch_size=-2"], r"trainer\.max_micro_batch_size must be"),
        (["scaling.num_workers=4"], r"scaling\.num_workers=4 .* needs 4 CPUs .* has 2"),
        (["scaling.use_gpu=true"], r"scaling\.use_gpu=true but the Ray cluster has no GPUs"),
        ([f"tracking.uri=http://127.0.0.1:{free_port()}"], r"tracking\.uri=.* is unreachable"),
        (["tracking.uri=sqlite:////no/such/folder/mlflow.db"], r"tracking\.uri=.*does not exist"),
        ([f"scaling.address=127.0.0.1:{free_port()}"], r"scaling\.address=.*cannot reach"),
        # The user's own model, data and loss: caught in the driver (preflight), not the workers.
        (
            ["model._target_=tests.user_code.TinyNet", "model.width=3"],
            r"model\.width=3: tests\.user_code\.TinyNet does not accept 'width' \(it takes: no",
        ),
        (
            [*USER_DATA, "model._target_=tests.user_code.NoParams"],
            r"model\._target_=tests\.user_code\.NoParams has no trainable parameters",
        ),
        (
            [*USER_DATA, "model._target_=tests.user_code.FlatOutput"],
            r"FlatOutput on data\._target_=.*multiclass task expects outputs \[B,C\].*got outputs",
        ),
        (
            ["model._target_=tests.user_code.TinyNet"],  # 6 inputs, breast_cancer has 30
            r"TinyNet fails on a batch of data\._target_=dist_trainer\.data\.breast_cancer "
            r"\(inputs \(32, 30\)\).*in_features=30",
        ),
        (
            ["trainer.drop_last=true", "trainer.global_batch_size=1024"],
            r"trainer\.drop_last=true with 455 training samples",
        ),
        (
            ["loss._target_=torch.nn.CrossEntropyLoss", "loss.smoothing=0.1"],
            r"loss\.smoothing=0\.1: torch\.nn\.CrossEntropyLoss does not accept 'smoothing'",
        ),
        (["loss._target_=torch.nn.BCELoss", "loss.reduction=mean"], r"loss\.reduction='mean'"),
        (
            # A built-in key the user changed is theirs: refused, not silently dropped.
            ["model._target_=tests.user_code.WideNet", "model.hidden_sizes=[16]"],
            r"model\.hidden_sizes=\[16\]: tests\.user_code\.WideNet does not accept .*width",
        ),
    ],
)
def test_bad_input_fails_before_any_worker_starts(ray_cluster, tmp_path, overrides, message):
    import ray

    cpus_before = ray.available_resources().get("CPU")
    cfg = load_config(job_overrides(tmp_path, *overrides))
    with pytest.raises(ConfigError, match=message):
        driver.train(cfg, show_progress=False)
    assert not (tmp_path / "ray_storage").exists(), "a Ray Train run was started"
    assert _runs(tmp_path) == [], "a run was logged for a job that never started"
    assert ray.available_resources().get("CPU") == cpus_before


def test_two_workers_one_run_with_params_metrics_artifacts(ray_cluster, tmp_path):
    cfg = load_config(
        job_overrides(tmp_path, "trainer.max_epochs=2", "trainer.max_micro_batch_size=16")
    )
    result = driver.train(cfg, show_progress=False)
    runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.run_id == result.run_id
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["trainer.global_batch_size"] == "64"
    assert params["scaling.num_workers"] == "2"
    assert (
        params["plan.world_size"],
        params["plan.micro_batch_size"],
        params["plan.accumulation_steps"],
    ) == ("2", "16", "2")
    assert params["model._target_"] == "dist_trainer.models.MLP"
    assert float(params["optim.peak_lr"]) == 1e-3  # adamw preset, no lr scaling
    client = MlflowClient(result.tracking_uri)
    loss = client.get_metric_history(result.run_id, "train/loss")
    steps = [m.step for m in loss]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == 16
    for key in (
        "train/lr",
        "val/loss",
        "val/accuracy",
        "perf/samples_per_s",
        "perf/step_time_s",
        "comm/allreduce_s",
        "comm/bytes",
    ):
        assert key in run.data.metrics, key
    # Better than always predicting the majority class of the validation split.
    from dist_trainer.data import breast_cancer

    val_y = breast_cancer(seed=0).val.tensors[1]
    majority = max(val_y.mean().item(), 1 - val_y.mean().item())
    assert run.data.metrics["val/accuracy"] > majority
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "batch_plan.txt", "model"} <= artifacts
    assert run.data.tags["mlflow.source.git.commit"]
    assert run.data.tags["torch"] and run.data.tags["ray"]
    assert result.checkpoint_path and Path(result.checkpoint_path).exists()
    # Its page opens on the plan and the final figures.
    description = client.get_run(result.run_id).data.tags["mlflow.note.content"]
    assert description.startswith("global batch 64 = micro-batch 16 x 2 accumulation")
    assert f"- val loss: {run.data.metrics['val/loss']:.4g}" in description


def test_worker_failure_restarts_and_resumes_the_same_run(ray_cluster, tmp_path):
    marker = tmp_path / "crashed"
    cfg = load_config(
        job_overrides(
            tmp_path,
            "trainer.max_epochs=3",
            "scaling.max_failures=1",
            "model._target_=tests.crashing.CrashOnceMLP",
            f"+model.marker={marker}",
            "+model.crash_at_call=12",  # in epoch 2, after the epoch-1 checkpoint
        )
    )
    result = driver.train(cfg, show_progress=False)
    assert marker.exists(), "the injected failure never happened"
    runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [
        m.step
        for m in MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "val/loss")
    ]
    assert steps[-1] == 24  # 3 epochs x 8 steps, finished after the restart


@pytest.mark.slow
def test_cli_train_end_to_end(tmp_path):
    """The README's own-model recipe as a user runs it: the user's class (a plain __init__),
    data factory and loss function (its argument set without `+`), its own embedded Ray."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    recipe = [
        "model._target_=tests.user_code.TinyNet",
        "data._target_=tests.user_code.make_data",
        "loss._target_=tests.user_code.focal_loss",
        "loss.gamma=1.5",
        "trainer.max_epochs=10",
        "optim.optimizer.lr=0.02",
    ]
    proc = subprocess.run(
        [CLI, "train", *job_overrides(tmp_path, *recipe)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "left out model.hidden_sizes, model.dropout" in proc.stdout
    # Ray's and MLflow's own lines are in the log file it names, not on the terminal.
    terminal = proc.stdout + proc.stderr
    for noise in ("TrainingReport", "Token authentication", "TrainController", "mlflow.system"):
        assert noise not in terminal, noise
    log_file = Path(re.search(r"own output: (\S+dist_trainer\.log)", proc.stdout).group(1))
    assert "Reporting training result" in log_file.read_text()
    runs = _runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id in proc.stdout
    assert "make ui" in proc.stdout
    assert run.data.params["loss._target_"] == "tests.user_code.focal_loss"
    assert run.data.params["loss.gamma"] == "1.5"
    assert run.data.metrics["val/accuracy"] > 0.8


@pytest.mark.slow
def test_cli_multirun_is_one_study_in_one_worker_group(ray_cluster, tmp_path):
    """`-m` over two global batch sizes: one parent run, two children linked to it and named
    by the swept key, both trained by the same worker processes (one worker group)."""
    proc = subprocess.run(
        [
            CLI,
            "train",
            "-m",
            "trainer.global_batch_size=32,128",
            "trainer.max_epochs=1",
            f"scaling.address={ray_cluster}",
            *job_overrides(tmp_path),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _runs(tmp_path)
    assert len(runs) == 3
    (parent,) = [r for r in runs if r.data.tags.get("dist_trainer.role") == "study"]
    children = [r for r in runs if r is not parent]
    assert {r.info.experiment_id for r in runs} == {parent.info.experiment_id}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert sorted(r.info.run_name for r in children) == [
        "batch=128",
        "batch=32",
    ]
    assert sorted(int(r.data.params["trainer.global_batch_size"]) for r in children) == [32, 128]
    assert all(r.info.status == "FINISHED" for r in runs)
    # One worker group: the same rank-0 process trained both jobs.
    assert len({rank0_pid(r) for r in children}) == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"study_summary.md", "study_runs.json"} <= artifacts
    summary = client.download_artifacts(parent.info.run_id, "study_summary.md", str(tmp_path))
    text = Path(summary).read_text()
    for child in children:
        assert child.info.run_name in text and child.info.run_id in text
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}" in proc.stdout
    # The study's page opens on its findings: the report ran when the study ended.
    description = client.get_run(parent.info.run_id).data.tags["mlflow.note.content"]
    assert description.startswith("## Findings\n- batch 128: ") and "## Jobs" in description
    assert "study report: " in proc.stdout
    # The report verb on this real study: its findings, logged back to the parent.
    from dist_trainer.study_report import main as report_main

    out = tmp_path / "report"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (
        report_main(["--experiment", "dist_trainer", "--tracking-uri", uri, "--out", str(out)]) == 0
    )
    html = (out / "report.html").read_text()
    assert "batch=128" in html and "the samples/s of batch 32" in html
    assert "Fastest to val loss" in html
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/throughput.png"} <= logged


@pytest.mark.slow
def test_a_failing_job_fails_its_child_and_the_study_goes_on(ray_cluster, tmp_path):
    from dist_trainer.study import run_study

    result = run_study(
        job_overrides(
            tmp_path,
            "trainer.global_batch_size=32,48,64",
            "model._target_=tests.crashing.FailsAtMicroBatch",
            "model.micro_batch=24",  # 48 over 2 workers: only the middle job fails
            "trainer.max_epochs=1",
        ),
        show_progress=False,
    )
    statuses = {job.name: job.status for job in result.jobs}
    assert statuses == {
        "batch=32": "FINISHED",
        "batch=48": "FAILED",
        "batch=64": "FINISHED",
    }
    runs = {r.info.run_name: r for r in _runs(tmp_path)}
    assert runs["batch=48"].info.status == "FAILED"
    assert "injected failure at micro-batch 24" in runs["batch=48"].data.tags["error"]
    assert runs["batch=64"].info.status == "FINISHED"
    assert "val/loss" in runs["batch=64"].data.metrics
    parent = runs[result.jobs[0].name].data.tags["mlflow.parentRunId"]
    assert MlflowClient(result.tracking_uri).get_run(parent).data.tags["error"] == (
        "1 of 3 jobs failed"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.global_batch_size=255"], "trainer.global_batch_size=255 cannot be split"),
        (
            ["model._target_=tests.user_code.TinyNet", "model.width=3"],
            "model.width=3: tests.user_code.TinyNet does not accept 'width'",
        ),
    ],
)
def test_cli_reports_config_errors_in_one_line(tmp_path, overrides, message):
    started = time.perf_counter()
    proc = subprocess.run(
        [CLI, "train", *overrides, *job_overrides(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"config error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "Ray" not in proc.stderr + proc.stdout  # refused before Ray started
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not (tmp_path / "ray_storage").exists()
    assert _runs(tmp_path) == []


def test_a_mistake_only_workers_see_is_one_line_and_fails_the_run(ray_cluster, tmp_path):
    """preflight off (e.g. data too costly to build in the driver): the first micro-step in the
    workers finds the wrong output shape; the driver gets one line, the run ends FAILED."""
    cfg = load_config(
        job_overrides(
            tmp_path,
            *USER_DATA,
            "model._target_=tests.user_code.FlatOutput",
            "trainer.preflight=false",
        )
    )
    with pytest.raises(ConfigError) as caught:
        driver.train(cfg, show_progress=False)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith("model._target_=tests.user_code.FlatOutput on data._target_=")
    assert "multiclass task expects outputs [B,C]" in message
    (run,) = _runs(tmp_path)
    assert run.info.status == "FAILED"


def _plain_seed_tutorial_accuracy(seed: int) -> float:
    """The seed tutorial's own PyTorch loop, written plainly: one process, no dist_trainer."""
    import torch
    from torch import nn

    from dist_trainer.data import breast_cancer

    bundle = breast_cancer(num_features=10, seed=0)
    (x, y), (x_val, y_val) = bundle.train.tensors, bundle.val.tensors
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1), nn.Sigmoid())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    criterion = nn.BCELoss()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(10):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 32):
            idx = order[i : i + 32]
            loss = criterion(model(x[idx]).squeeze(1), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return ((model(x_val).squeeze(1) > 0.5).float() == y_val).float().mean().item()


@pytest.mark.slow
def test_seed_tutorial_through_ray_matches_the_plain_loop(ray_cluster, tmp_path):
    """experiment=seed_tutorial (sigmoid outputs, BCELoss) with 2 workers reaches the plain
    loop's validation accuracy (its mean over 5 initializations) within 0.02. Before the loss
    could be chosen, it predicted one class: accuracy = the positive share, 0.61."""
    cfg = load_config(job_overrides(tmp_path, "experiment=seed_tutorial", "scaling.num_workers=2"))
    result = driver.train(cfg, show_progress=False)
    assert result.plan.world_size == 2
    plain = [_plain_seed_tutorial_accuracy(seed) for seed in range(5)]
    reference = sum(plain) / len(plain)
    accuracy = result.metrics["val/accuracy"]
    assert abs(accuracy - reference) <= 0.02, (accuracy, plain)
    from dist_trainer.data import breast_cancer

    positive_share = breast_cancer(num_features=10, seed=0).val.tensors[1].mean().item()
    assert accuracy > max(positive_share, 1 - positive_share) + 0.2


def test_auto_micro_batch_through_ray_logs_the_plan_the_workers_found(ray_cluster, tmp_path):
    """A budget too small for 32 samples a worker: the workers agree on a smaller micro-batch,
    log it, and the run's description shows the split they trained with."""
    cfg = load_config(
        job_overrides(
            tmp_path,
            "trainer.max_micro_batch_size=auto",
            "trainer.micro_batch_memory_mb=2.2",  # params + grads ~2.1 MiB: few samples fit
            "model.hidden_sizes=[512,512]",
            "trainer.max_epochs=1",
        )
    )
    result = driver.train(cfg, show_progress=False)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    params = run.data.params
    micro, accumulation = (
        int(params["plan.micro_batch_size"]),
        int(params["plan.accumulation_steps"]),
    )
    assert accumulation > 1 and micro * accumulation * 2 == 64
    assert run.data.tags["mlflow.note.content"].startswith(
        f"global batch 64 = micro-batch {micro} x {accumulation} accumulation step(s) x 2"
    )
