"""The Ray-free entry point: its MLflow run always ends, and user mistakes end in one line.

Runs are real: `python -m dist_trainer.torchrun` (and under torchrun) as subprocesses on a tmp
sqlite store, read back with MlflowClient. A subprocess costs ~7 s here (imports), so the
signal and error-message cases that need no fresh interpreter run in-process through `cli()`.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dist_trainer.models import MLP
from dist_trainer.torchrun import cli, gpu_count_error

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "torchrun_test"


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.experiment={EXPERIMENT}",
        f"scaling.storage_path={tmp_path / 'storage'}",
        "scaling.use_gpu=false",  # the same test on a GPU machine: gloo, CPU
        "model.hidden_sizes=[16]",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "tracking.system_metrics=false",
        *extra,
    ]


def _only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, "no MLflow experiment was created"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"expected one run, found {len(runs)}"
    return client, runs[0]


def _logged_losses(tmp_path: Path) -> int:
    """How many train/loss points the store holds so far: read with sqlite3, read-only, since an
    MlflowClient would race the job's own schema migration of a store it is still creating."""
    try:
        with closing(sqlite3.connect(f"file:{tmp_path / 'mlflow.db'}?mode=ro", uri=True)) as db:
            return db.execute("SELECT COUNT(*) FROM metrics WHERE key = 'train/loss'").fetchone()[0]
    except sqlite3.Error:  # not created yet, or its tables not yet
        return 0


def _env() -> dict[str, str]:
    # One thread per process: 2 ranks on 2 cores. PYTHONPATH (conftest) lets the child import
    # tests.crashing; no torchrun variables leak in from an outer launcher.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


# ------------------------------------------------------------------ MLflow run status, for real


def test_torchrun_two_ranks_run_ends_finished(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["-m", "dist_trainer.torchrun", *_overrides(tmp_path)]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = _only_run(tmp_path)  # rank 0 alone created it
    assert run.info.status == "FINISHED"
    assert "error" not in run.data.tags
    assert run.data.params["plan.world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3]


def test_failing_job_ends_failed_with_the_error(tmp_path):
    marker = tmp_path / "crashed"
    extra = [
        "model._target_=tests.crashing.CrashOnceMLP",
        f"+model.marker={marker}",
        "+model.crash_at_call=2",
    ]
    proc = _run([sys.executable, "-m", "dist_trainer.torchrun", *_overrides(tmp_path, *extra)])
    assert proc.returncode == 1
    assert "injected failure" in proc.stderr  # the traceback of a real failure is kept
    assert marker.exists()
    _, run = _only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: injected failure (tests.crashing)"


def test_ctrl_c_ends_killed(tmp_path):
    # Long enough to be interrupted mid-training: many epochs, no per-epoch validation/checkpoint.
    extra = [
        "trainer.max_steps=1000000",
        "trainer.max_epochs=100000",
        "trainer.val_every_n_epochs=100000",
        "trainer.checkpoint_every_n_steps=1000000",
        "trainer.log_every_n_steps=10",
    ]
    cmd = [sys.executable, "-m", "dist_trainer.torchrun", *_overrides(tmp_path, *extra)]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:  # a file, not a pipe: the child never blocks on a full pipe
        # A session of its own, so that Ctrl-C can reach its whole process group as a terminal's
        # does (the MLflow logger's child process included).
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        # Interrupted only once a training loss is in the store: the run is mid-training (the
        # logger's child process may take seconds to start, so a fixed sleep is no proof).
        deadline = time.monotonic() + 120
        logged_before = 0
        while not logged_before:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("training never logged a loss:\n" + log.read_text()[-3000:])
            time.sleep(0.2)
            logged_before = _logged_losses(tmp_path)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = log.read_text()
    assert proc.returncode == 130, rest[-3000:]
    assert rest.strip().splitlines()[-1] == "dist-trainer: interrupted"
    assert "logger process" not in rest, "the MLflow writer lives through Ctrl-C to write the rest"
    client, run = _only_run(tmp_path)
    assert run.info.status == "KILLED"
    assert run.data.tags["error"].startswith("KeyboardInterrupt")
    # What was logged before Ctrl-C is kept, and the points queued at that moment reach the store.
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= logged_before


class SigtermMLP(MLP):
    """An MLP that sends its own process SIGTERM at its second training forward."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        if self.training and self.calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)


def test_sigterm_ends_killed(tmp_path):
    # In-process: cli() turns SIGTERM (what torchrun sends the other ranks when one fails) into
    # an exception; the default handler would end the process with the run left RUNNING.
    before = signal.getsignal(signal.SIGTERM)
    rc = cli(_overrides(tmp_path, "model._target_=tests.test_torchrun.SigtermMLP"))
    assert rc == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # cli() put the handler back
    _, run = _only_run(tmp_path)
    assert run.info.status == "KILLED"
    assert run.data.tags["error"].startswith("Terminated: SIGTERM")


# ------------------------------------------------------------------ one line and exit 2


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("trainer.global_batch_size=0", "trainer.global_batch_size must be a positive integer"),
        ("trainer.nope=1", "Could not override 'trainer.nope'"),
        ("trainer.max_steps=abc", "Error merging override trainer.max_steps=abc ("),
    ],
)
def test_config_error_is_one_line_and_exit_2(tmp_path, capsys, override, says):
    assert cli(_overrides(tmp_path, override)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("dist-trainer: config error: ")
    assert says in err[0]
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was made


def test_processes_beyond_the_gpus_are_refused(tmp_path, capsys, monkeypatch):
    # One process more on this node than it has GPUs: with 0 GPUs, use_gpu=true asks for one.
    gpus = torch.cuda.device_count()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(gpus + 1))
    overrides = _overrides(tmp_path, "scaling.use_gpu=true")
    overrides.remove("scaling.use_gpu=false")
    assert cli(overrides) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("dist-trainer: ") and "Fix: " in err[0]
    expected = f"started {gpus + 1} processes" if gpus else "torch sees no CUDA device"
    assert expected in err[0]
    assert not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------ the GPU-count rule


@pytest.mark.parametrize(
    ("local_rank", "local_world", "gpus", "use_gpu", "refused"),
    [
        (0, 1, 1, "auto", False),
        (0, 8, 8, True, False),
        (7, 8, 8, "auto", False),
        (0, 2, 1, "auto", True),  # rank 0 has a GPU but would wait for rank 1 forever
        (1, 2, 1, True, True),
        (3, 1, 2, "auto", True),  # no LOCAL_WORLD_SIZE: the rank itself is past the GPUs
        (0, 2, 1, False, False),  # CPU processes: GPUs do not matter
        (0, 1, 0, "auto", False),  # no GPU: auto runs on CPU
        (0, 1, 0, True, True),
    ],
)
def test_gpu_count_rule(local_rank, local_world, gpus, use_gpu, refused):
    message = gpu_count_error(local_rank, local_world, gpus, use_gpu)
    assert (message is not None) is refused
    if message:
        assert "Fix: " in message


def test_gpu_count_message_names_counts_and_fix():
    message = gpu_count_error(0, 2, 1, "auto")
    assert message == (
        "torchrun started 2 processes on this node but it has 1 visible GPU(s). "
        "Fix: torchrun --nproc_per_node=1, or scaling.use_gpu=false for CPU processes"
    )
