"""`dist-trainer resume RUN_ID`: a new driver for a job whose driver died.

A driver can die (the laptop sleeps, the terminal closes, an out-of-memory kill): with it go its
Ray Train run and the workers, and its MLflow run stays RUNNING, or ends KILLED or FAILED. The
job need not start over. `resume` starts a driver for the same job:

- the config is the one the run logged (its `config.yaml` artifact), not today's conf/; only
  where and how it runs may change (RESUMABLE_KEYS: the cluster's address, failures allowed,
  where the checkpoints are, if their folder moved);
- the Ray Train run has the same name (`dist_trainer-<run id>`) and storage, so Ray Train
  restores its latest checkpoint, and the workers resume from it as after a worker failure;
- it logs into the same MLflow run, which goes back to RUNNING: the steps replayed since the
  checkpoint are logged once (dist_trainer.run_logger.RunLogger.resume), and the run ends with
  the step count and the weights of a job that never stopped (with the same seed).

It refuses a run whose driver still runs here (the run's DRIVER_TAG names host and pid), a
FINISHED run, a study's job, and a run it cannot find, each with one line naming the fix. A
RUNNING run whose driver ran on another host cannot be checked from here: `--force` says it is
dead. Without a checkpoint the job restarts from step 0, in the same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from dist_trainer import driver, jobs, tracking
from dist_trainer.config import ConfigError
from dist_trainer.ray_cluster import start_cluster

__all__ = ["RESUMABLE_KEYS", "main", "resume"]

RESUMABLE_KEYS = (
    "scaling.address",
    "scaling.max_failures",
    "scaling.storage_path",
    "scaling.elastic_resize_interval_s",
)
"""What a resumed job may change: where and how it runs, never what it computes."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _check_takeover(run: Any, force: bool) -> None:
    """Refuse to resume a run that is done, not a job, or still driven by a live process."""
    run_id, tags, status = run.info.run_id, run.data.tags, run.info.status
    if tags.get(tracking.ROLE_TAG) != "job" or "mlflow.parentRunId" in tags:
        raise ConfigError(
            f"run {run_id} is not a `dist-trainer train` job (a study, one of its jobs, or a "
            "benchmark): resume continues single jobs. Fix: start it again"
        )
    if tags.get(tracking.WORKER_GROUP_TAG) == "warm":
        raise ConfigError(
            f"run {run_id} ran in the warm worker group of `dist-trainer cluster up`, which "
            "drives it (dist-trainer cluster status); resume continues jobs launched on their "
            "own. Fix: start it again"
        )
    if status == "FINISHED":
        raise ConfigError(f"run {run_id} is FINISHED: nothing to resume")
    if status not in ("RUNNING", "SCHEDULED"):
        return  # FAILED or KILLED: its driver has ended
    host, _, pid = tags.get(tracking.DRIVER_TAG, "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        if _pid_alive(int(pid)):
            raise ConfigError(
                f"run {run_id} is RUNNING and its driver (pid {pid}) is alive on this host. "
                f"Fix: wait for it, or stop it first (kill {pid})"
            )
        return
    if not force:
        where = f"on {host}" if host else "on an unknown host"
        raise ConfigError(
            f"run {run_id} is RUNNING and its driver ran {where}, which cannot be checked from "
            f"here. Fix: make sure that driver is gone, then add --force"
        )


def _logged_config(uri: str, run_id: str, overrides: list[str]) -> dict[str, Any]:
    """The config the run trained with, with the allowed overrides applied."""
    client = tracking.mlflow_client(uri)
    with tempfile.TemporaryDirectory(prefix="dist_trainer_resume_") as folder:
        try:
            path = client.download_artifacts(run_id, "config.yaml", folder)
        except Exception as exc:  # noqa: BLE001 - any failure means the same fix
            raise ConfigError(
                f"run {run_id} has no readable config.yaml artifact ({exc}); only runs started "
                "by dist-trainer train can be resumed"
            ) from None
        config = OmegaConf.load(path)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.lstrip("+") not in RESUMABLE_KEYS:
            raise ConfigError(
                f"{override!r}: a resumed job keeps the config it started with; only "
                f"{', '.join(RESUMABLE_KEYS)} may change. Fix: drop it, or start a new run "
                "with dist-trainer train"
            )
        OmegaConf.update(config, key.lstrip("+"), yaml.safe_load(value))
    config.tracking.uri = uri  # the store the run is in, whatever the config said
    return OmegaConf.to_container(config, resolve=True)


def _checkpoint_note(prepared: jobs.Prepared, run_id: str) -> str:
    """Where the checkpoints are; which one Ray Train restores, the workers say as they start
    (it is the latest one Ray Train registered, not the latest folder: a worker may have
    written one more while its driver was dying)."""
    storage = prepared.job.scaling.storage_path
    folder = storage if "://" in storage else Path(storage).resolve()
    name = jobs.ray_train_run_name(run_id)
    if isinstance(folder, Path) and not (folder / name).is_dir():
        return (
            f"no checkpoints in {folder / name}: the job starts again from step 0, in the same "
            "run (scaling.storage_path=... if they are elsewhere)"
        )
    return f"Ray Train restores the latest checkpoint of {name} in {folder}"


def resume(
    run_id: str,
    tracking_uri: str,
    overrides: list[str] | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> jobs.JobResult:
    """Drive job run `run_id` to its end from its latest checkpoint (the module docstring)."""
    t_start = time.perf_counter()
    uri = tracking.normalize_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise ConfigError(
            f"no MLflow store at {uri}. Fix: run dist-trainer resume in the folder the job ran "
            "in, or pass --tracking-uri (the store the job logged to)"
        )
    tracking.check_tracking_uri(uri)
    client = tracking.mlflow_client(uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MlflowException: no such run
        raise ConfigError(
            f"no run {run_id} in {tracking.redact_uri(uri)} ({exc}). Fix: "
            "--tracking-uri (the store the job logged to)"
        ) from None
    _check_takeover(run, force)
    prepared = jobs.prepare(_logged_config(uri, run_id, list(overrides or [])))
    print(f"[dist-trainer] {prepared.describe_plan()}", flush=True)
    print(f"[dist-trainer] {_checkpoint_note(prepared, run_id)}", flush=True)
    cluster = start_cluster(prepared.job, prepared.tracking_uri)
    resumes = int(run.data.tags.get(tracking.RESUMES_TAG, "0")) + 1
    client.set_tag(run_id, tracking.DRIVER_TAG, jobs.driver_tag())
    client.set_tag(run_id, tracking.RESUMES_TAG, str(resumes))
    client.update_run(run_id, status="RUNNING")
    print(f"[dist-trainer] MLflow run {run_id} resumed (resume {resumes})", flush=True)
    return driver.train_in_run(prepared, cluster, run_id, t_start, show_progress)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dist-trainer resume",
        description="Continue a job whose driver died, from its latest checkpoint, in its run.",
    )
    parser.add_argument("run_id", help="the job's MLflow run id (printed at its start)")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="the store the job logged to (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="take over a RUNNING run whose driver ran on another host (make sure it is gone)",
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        resume(args.run_id, args.tracking_uri, overrides, args.force)
    except ConfigError as exc:
        print(f"dist-trainer: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the run holds the error (its `error` tag)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(f"dist-trainer: the job failed: {type(exc).__name__}: {first_line}", file=sys.stderr)
        return 1
    return 0
