"""`dist-trainer submit`: run a training job on a Ray cluster through Ray's Job Submission API.

    dist-trainer submit --address http://HEAD:8265 tracking.uri=http://mlflow:5000 [overrides]
    dist-trainer submit --follow ...          # stream the job's output until it ends

The job's driver runs on the cluster (`python -m dist_trainer.cli train <overrides>`), so the
laptop may disconnect. Its runtime environment carries what the driver needs there: this
package with its configs (a copy of `dist_trainer/` with `conf/` inside, as the wheel has it) and
the current folder as the working directory (your own model and data code; big folders such as
`.venv`, `mlruns`, `outputs` and checkpoints are left out). The overrides are checked here first
(config, batch plan), so a typo fails in a second, not on the cluster.

A tracking URI that is a file on this machine (`sqlite:`, `file:`) is refused for a cluster on
another machine: its workers could not write to it. On a head at 127.0.0.1 it is the same file.

Prints the job id, then the MLflow run id as soon as the job's driver has created the run, and
waits for the job to end: exit code 0 when it succeeded, 1 when it failed or was stopped.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from dist_trainer.config import CONF_DIR, ConfigError
from dist_trainer.ray_cluster import use_ray_token_if_there_is_one

__all__ = ["main", "runtime_env", "submit"]

_RUN_LINE = re.compile(r"MLflow run ([0-9a-f]{32})")
# Never shipped with the working directory: outputs, stores, environments, checkpoints.
_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "outputs",
    "multirun",
    ".ray_storage",
    ".dist_trainer",
    "__pycache__",
    "*.pt",
]
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _package_with_configs(into: Path) -> Path:
    """A copy of this package with `conf/` inside, as an installed wheel has it."""
    import dist_trainer

    source = Path(dist_trainer.__file__).resolve().parent
    target = into / "dist_trainer"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if not (target / "conf" / "config.yaml").exists():
        shutil.copytree(CONF_DIR, target / "conf")
    return target


def runtime_env(working_dir: Path, staging: Path, tracking_uri: str) -> dict:
    """The job's runtime environment: the package, the working folder, the tracking URI."""
    return {
        "working_dir": str(working_dir),
        "excludes": _EXCLUDES,
        "py_modules": [str(_package_with_configs(staging))],
        "env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"},
    }


def _check_store_for(address: str, tracking_uri: str) -> None:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if tracking_uri.startswith(("sqlite:", "file:")) and host not in _LOCAL_HOSTS:
        raise ConfigError(
            f"tracking.uri={tracking_uri!r} is a file on this machine; the job runs on the "
            f"cluster at {address}, whose nodes cannot write to it. Fix: tracking.uri=http://"
            "<mlflow server the cluster reaches>:5000 (e.g. dist-trainer cluster up --mlflow, "
            "or docker/compose.yaml's mlflow service)"
        )


def submit(address: str, overrides: list[str], follow: bool = False, working_dir: str = ".") -> int:
    """Check, submit, print the job and run ids, wait; the exit code says how it ended."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from dist_trainer.config import load_config
    from dist_trainer.jobs import prepare

    # ConfigError: one line, nothing submitted. The store must be reachable from the cluster,
    # not necessarily from here (http://mlflow:5000 inside a compose network).
    prepared = prepare(load_config(overrides), check_store=False)
    uri = prepared.tracking_uri
    _check_store_for(address, uri)
    # The job's driver must use the same store: an absolute sqlite path, not the cwd's.
    overrides = [o for o in overrides if not o.startswith("tracking.uri=")]
    overrides.append(f"tracking.uri={uri}")
    entrypoint = " ".join(
        ["python", "-m", "dist_trainer.cli", "train", *(_quote(o) for o in overrides)]
    )
    use_ray_token_if_there_is_one()
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - Ray's connection errors vary by version
        raise ConfigError(
            f"--address {address}: cannot reach Ray's job server ({exc}). Fix: the head's "
            "dashboard address, http://HEAD:8265 (ray start --head --dashboard-host=...)"
        ) from None
    with tempfile.TemporaryDirectory(prefix="dist_trainer_submit_") as staging:
        env = runtime_env(Path(working_dir).resolve(), Path(staging), uri)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env)
    print(f"[dist-trainer] submitted job {job_id} to {address}", flush=True)
    run_id = None
    if follow:
        import asyncio

        async def stream() -> None:
            nonlocal run_id
            async for chunk in client.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()
                found = _RUN_LINE.search(chunk)
                run_id = run_id or (found.group(1) if found else None)

        asyncio.run(stream())
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while True:
        status = client.get_job_status(job_id)
        if run_id is None:
            found = _RUN_LINE.search(client.get_job_logs(job_id))
            if found:
                run_id = found.group(1)
                print(f"[dist-trainer] MLflow run {run_id} ({uri})", flush=True)
        if status in terminal:
            break
        time.sleep(2.0)
    print(f"[dist-trainer] job {job_id}: {status.value}", flush=True)
    if status != JobStatus.SUCCEEDED:
        tail = client.get_job_logs(job_id).strip().splitlines()[-5:]
        for line in tail:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def _quote(override: str) -> str:
    import shlex

    return shlex.quote(override)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dist-trainer submit",
        description="Run a training job on a Ray cluster (Ray's Job Submission API).",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_JOB_ADDRESS", "http://127.0.0.1:8265"),
        help="the head's job server, http://HEAD:8265 (default: $RAY_JOB_ADDRESS or local)",
    )
    parser.add_argument("--follow", action="store_true", help="stream the job's output")
    parser.add_argument(
        "--working-dir", default=".", help="folder shipped as the job's working directory"
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        return submit(args.address, overrides, args.follow, args.working_dir)
    except ConfigError as exc:
        print(f"dist-trainer: config error: {exc}", file=sys.stderr)
        return 2
