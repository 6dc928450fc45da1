"""`dist-trainer cluster up|status|down` and the warm worker group.

The end-to-end test starts real processes (its own Ray head on a free port with its own temp
dir, the service, `dist-trainer train` subprocesses): it never joins or stops the session's
shared Ray cluster of the other tests. The rest is pure: the queue's agreement rules and which
jobs may use the warm group.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from dist_trainer.service import JobQueue, forget_user_modules
from dist_trainer.warm import fits, mismatch
from tests.conftest import free_port, job_config
from tests.conftest import rank0_pid as rank0_pid_of

CLI = str(Path(sys.executable).with_name("dist-trainer"))
ROOT = Path(__file__).resolve().parents[1]


# --- pure --------------------------------------------------------------------------------


def _group(tmp_path: Path, **changes) -> dict:
    return {
        "num_workers": 2,
        "cpus_per_worker": 1.0,
        "use_gpu": "auto",
        "resolved_use_gpu": False,
        "placement_strategy": "PACK",
        "storage_path": str((tmp_path / ".ray_storage").resolve()),
        **changes,
    }


def test_which_jobs_the_warm_group_takes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"workdir": str(tmp_path.resolve()), "pythonpath": os.environ.get("PYTHONPATH", "")}
    group = _group(tmp_path)
    assert mismatch(job_config(), group, env) is None
    assert mismatch(job_config("scaling.use_gpu=false"), group, env) is None
    # A fault-tolerant job too: the service resumes it in a new group when its workers fail.
    assert mismatch(job_config("scaling.max_failures=2"), group, env) is None
    cases = {
        ("scaling.num_workers=1",): "scaling.num_workers=1 (the warm group has 2)",
        ("scaling.num_workers=[1,2]",): "scaling.num_workers=[1, 2] (the warm group has 2)",
        ("scaling.cpus_per_worker=0.5",): "scaling.cpus_per_worker=0.5",
        ("scaling.use_gpu=true",): "the warm group is on CPU",
        ("+scaling.resources_per_worker.memory=1e9",): "scaling.resources_per_worker",
        ("scaling.storage_path=elsewhere",): "scaling.storage_path=elsewhere",
    }
    for overrides, reason in cases.items():
        found = mismatch(job_config(*overrides), group, env)
        assert found is not None and reason in found, (overrides, found)
    assert "PYTHONPATH" in mismatch(job_config(), group, {**env, "pythonpath": "/else"})
    assert "working folder" in mismatch(job_config(), group, {**env, "workdir": "/else"})


@pytest.mark.parametrize(
    ("overrides", "free", "room"),
    [
        (["scaling.num_workers=2"], {"CPU": 2.0}, True),
        (["scaling.num_workers=2"], {"CPU": 1.0}, False),
        (["scaling.num_workers=[1,2]"], {"CPU": 1.0}, True),  # elastic: its minimum fits
        (["scaling.num_workers=[2,4]"], {"CPU": 1.0}, False),
        (["scaling.num_workers=1", "scaling.use_gpu=true"], {"CPU": 4.0}, False),
        (["scaling.num_workers=1", "+scaling.resources_per_worker.memory=2e9"],
         {"CPU": 4.0, "memory": 1e9}, False),
    ],
)  # fmt: skip
def test_whether_a_job_has_room_for_its_own_group_beside_the_warm_one(overrides, free, room):
    assert fits(job_config(*overrides), free) is room


def test_every_rank_runs_the_same_sequence_of_jobs():
    """Entry i means one thing to every rank: a job cancelled before any rank read it is a
    skip for all; once read, it is a job for all, even if cancelled (then it is aborted)."""

    async def scenario() -> None:
        queue = JobQueue(service_pid=1)
        start = await queue.new_group(1, {"num_workers": 2})
        assert start == 0
        for i in range(3):
            await queue.submit({"payload": {"i": i}, "tracking_uri": "u", "run_id": f"r{i}"})
        assert await queue.cancel(1, "changed my mind") == "cancelled"
        first = await queue.next_job(0, 0.1)  # rank 0 reads job 0: it runs
        assert await queue.cancel(0, "too late") == "aborting"
        assert await queue.next_job(0, 0.1) == first  # rank 1 still gets the same job
        assert first["kind"] == "job" and first["payload"] == {"i": 0}
        assert await queue.abort_requested()
        assert [await queue.next_job(1, 0.1) for _ in range(2)] == [{"kind": "skip"}] * 2
        assert (await queue.next_job(2, 0.1))["payload"] == {"i": 2}
        assert await queue.next_job(3, 0.05) is None  # nothing yet: wait
        await queue.finish(0, "KILLED", "too late")
        await queue.finish(2, "FINISHED")
        await queue.submit({"payload": {"i": 3}, "tracking_uri": "u", "run_id": "r3"})
        killed = await queue.stop("stopping")
        assert [e["run_id"] for e in killed] == ["r3"]
        assert await queue.next_job(3, 0.1) == {"kind": "skip"}
        assert await queue.next_job(4, 0.1) == {"kind": "stop"}
        status = await queue.status()
        assert [j["state"] for j in status["recent"]] == ["KILLED", "KILLED", "FINISHED", "KILLED"]
        # A new group after a failure starts at the first job that has not ended.
        queue2 = JobQueue(service_pid=1)
        for i in range(2):
            await queue2.submit({"payload": {}, "tracking_uri": "u", "run_id": f"r{i}"})
        await queue2.next_job(0, 0.1)
        await queue2.finish(0, "FAILED", "boom")
        assert await queue2.new_group(2, {"num_workers": 2}) == 1

    asyncio.run(scenario())


def test_user_modules_are_forgotten_after_a_job_libraries_are_not(tmp_path, monkeypatch):
    (tmp_path / "my_model_mod.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    import json.tool  # noqa: F401 - a library module imported during the "job"

    import my_model_mod  # noqa: F401

    dropped = forget_user_modules(before, (str(Path(json.__file__).resolve().parent.parent),))
    assert "my_model_mod" in dropped
    assert "my_model_mod" not in sys.modules and "json.tool" in sys.modules


# --- end to end --------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # never the session cluster of the other tests
    env.pop("DIST_TRAINER_SERVICE", None)
    return env


def _run(tmp_path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, *args], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _alive_in(state: dict) -> list[psutil.Process]:
    """Live processes of what `cluster up` started: its sessions, or naming its Ray temp dir."""
    sessions = {state["ray"]["pid"], state["service"]["pid"]}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            named = state["temp_dir"] in " ".join(proc.info["cmdline"] or [])
            if os.getsid(proc.pid) in sessions or named:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.slow
def test_train_jobs_run_in_the_warm_group_and_down_leaves_nothing(tmp_path):
    db = tmp_path / "mlflow.db"
    job = [f"tracking.uri=sqlite:///{db}", "trainer.max_epochs=1"]
    up = _run(tmp_path, "cluster", "up", "--port", str(free_port()), timeout=300)
    state = json.loads((tmp_path / ".dist_trainer" / "cluster.json").read_text())
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = _run(tmp_path, "cluster", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "warm group  warm, generation 1: 2 workers" in status.stdout, status.stdout
        rank0_pid = status.stdout.split("rank 0: pid ", 1)[1].split(",")[0]
        runs = []
        for _ in range(2):
            train = _run(tmp_path, "train", *job)
            assert train.returncode == 0, train.stdout + train.stderr
            assert "running in the warm worker group" in train.stdout, train.stdout
            runs.append(train.stdout.split("MLflow run ", 1)[1].split()[0])
        # A mistake only the workers see: one line, the run FAILED, and the group recovers.
        bad = _run(
            tmp_path,
            "train",
            *job,
            "data._target_=tests.user_code.make_data",
            "model._target_=tests.user_code.FlatOutput",
            "trainer.preflight=false",
        )
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert "config error: model._target_=tests.user_code.FlatOutput" in bad.stderr
        after = _run(tmp_path, "train", *job)
        assert after.returncode == 0, after.stdout + after.stderr
        assert "running in the warm worker group" in after.stdout
        runs.append(after.stdout.split("MLflow run ", 1)[1].split()[0])
        status = _run(tmp_path, "cluster", "status")
        assert "generation 2" in status.stdout and "FAILED" in status.stdout, status.stdout
    finally:
        down = _run(tmp_path, "cluster", "down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr

    client = MlflowClient(f"sqlite:///{db}")
    first, second, third = (client.get_run(r) for r in runs)
    assert [r.info.status for r in (first, second, third)] == ["FINISHED"] * 3
    # The first two jobs trained in the same, warm, processes; the third in the new group.
    assert rank0_pid_of(first) == rank0_pid_of(second) == rank0_pid
    assert rank0_pid_of(third) != rank0_pid
    assert {r.data.tags["dist_trainer.worker_group"] for r in (first, second, third)} == {"warm"}
    (failed,) = [
        r for r in client.search_runs([first.info.experiment_id]) if r.info.status == "FAILED"
    ]
    assert "multiclass task expects outputs [B,C]" in failed.data.tags["error"]

    assert not (tmp_path / ".dist_trainer" / "cluster.json").exists()
    assert not Path(state["temp_dir"]).exists()
    assert _alive_in(state) == [], [p.info for p in _alive_in(state)]
    for pid in (rank0_pid, state["service"]["pid"]):
        assert not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == "zombie"
