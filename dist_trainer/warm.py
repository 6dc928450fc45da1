"""What `dist-trainer train` does when `dist-trainer cluster up`'s warm service is up here.

`dist-trainer train` (the hook in driver.train, `run_in_service`) submits its job to the warm
group when the service is up here and the job's `scaling` matches the group (workers, CPUs per
worker, GPU or not, no extra resources, placement, storage path, the same PYTHONPATH); the
driver still checks the config, creates the MLflow run and shows progress. With
`scaling.max_failures=N` the service runs a job whose workers fail up to N more times, each
time in a new group that resumes it from its latest checkpoint (dist_trainer.service). A
job that does not match runs its own worker group: on the service's Ray cluster when its free
resources can place it, else on a local cluster of its own, as without the service. Opt out with
`DIST_TRAINER_SERVICE=0`, or set `scaling.address` to another cluster.

The service is found through the state file `cluster up` writes (`read_state`), joined
with the same environment (`connect`), and reached through its job queue actor
(`service_queue`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from dist_trainer.processes import alive

__all__ = [
    "SERVICE_ENV",
    "STATE_DIR",
    "STATE_FILE",
    "connect",
    "mismatch",
    "read_state",
    "run_in_service",
    "service_queue",
    "state_path",
]

STATE_DIR = ".dist_trainer"
STATE_FILE = "cluster.json"
SERVICE_ENV = "DIST_TRAINER_SERVICE"
"""Set to 0 to never use a running service (each `train` starts its own worker group)."""


def _say(message: str) -> None:
    print(f"[dist-trainer] {message}", flush=True)


# --- the state file ------------------------------------------------------------------------


def state_path(workdir: Path | None = None) -> Path:
    return (workdir or Path.cwd()) / STATE_DIR / STATE_FILE


def read_state(workdir: Path | None = None) -> dict[str, Any] | None:
    path = state_path(workdir)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- joining the service's cluster ---------------------------------------------------------


def _apply_env(state: dict[str, Any]) -> None:
    """What a process needs to join this head (loopback mode, token auth), before ray.init."""
    for key, value in state.get("env", {}).items():
        os.environ[key] = value
    if "ray._private.ray_constants" in sys.modules and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in (
        state.get("env", {})
    ):
        # Ray reads this variable once, when imported: an imported Ray needs the constant too.
        constants = sys.modules["ray._private.ray_constants"]
        constants.ENABLE_RAY_CLUSTER = state["env"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0"
    if "ray._raylet" in sys.modules:
        # Ray caches its settings (the authentication mode) when imported: read them again.
        sys.modules["ray._raylet"].Config.initialize("")


def _quiet_ray(log: Path | None) -> None:
    """Ray's driver-side lines go to a log file (a job's own, as dist_trainer.console does)."""
    from dist_trainer import console

    if console.verbose():
        return
    handler = logging.FileHandler(log or console.log_path(), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray._private", "ray.util", "ray.train"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False


def connect(state: dict[str, Any], log: Path | None = None) -> str | None:
    """ray.init to the service's head (fast when warm): "joined"; "already" when this process
    was connected to it before (leave that connection be); None when connected elsewhere."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        here = sys.modules["ray"].get_runtime_context().gcs_address
        return "already" if _same_cluster(here, state) else None
    _apply_env(state)
    import ray

    from dist_trainer.service import NAMESPACE

    _quiet_ray(log)
    ray.init(
        address=state["address"],
        namespace=NAMESPACE,
        log_to_driver=False,
        configure_logging=False,
    )
    return "joined"


def _same_cluster(address: str | None, state: dict[str, Any]) -> bool:
    """Whether `address` (scaling.address, or where this process is connected) is the head's."""
    if not address or "://" in address:
        return False
    host, _, port = address.rpartition(":")
    local = {"127.0.0.1", "localhost", state.get("host", "127.0.0.1")}
    return port == str(state["port"]) and host in local


def service_queue(state: dict[str, Any]) -> Any | None:
    import ray

    from dist_trainer.service import NAMESPACE, QUEUE_NAME

    try:
        return ray.get_actor(QUEUE_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def mismatch(job: Any, group: dict[str, Any], env: dict[str, Any]) -> str | None:
    """Why `job` cannot run in the warm group (one phrase), or None when it can.

    Args:
        job: the job's JobConfig.
        group: the warm group's set-up (the state file's `group`, plus `resolved_use_gpu`).
        env: the service's `workdir` and `pythonpath`, compared with this process's.
    """
    s = job.scaling
    if s.num_workers != group["num_workers"]:
        return f"scaling.num_workers={s.num_workers} (the warm group has {group['num_workers']})"
    if float(s.cpus_per_worker) != float(group["cpus_per_worker"]):
        return (
            f"scaling.cpus_per_worker={s.cpus_per_worker:g} (the warm group has "
            f"{group['cpus_per_worker']:g})"
        )
    gpu = group.get("resolved_use_gpu", False)
    if s.use_gpu is not True and s.use_gpu is not False and s.use_gpu != "auto":
        return f"scaling.use_gpu={s.use_gpu}"
    if (s.use_gpu is True and not gpu) or (s.use_gpu is False and gpu):
        return (
            f"scaling.use_gpu={str(s.use_gpu).lower()} (the warm group is on {('CPU', 'GPU')[gpu]})"
        )
    if s.use_gpu == "auto" and group["use_gpu"] not in ("auto", gpu):
        return f"scaling.use_gpu=auto (the warm group was started with use_gpu={group['use_gpu']})"
    if s.resources_per_worker:
        return f"scaling.resources_per_worker={dict(s.resources_per_worker)}"
    if s.placement_strategy != group.get("placement_strategy", "PACK"):
        return f"scaling.placement_strategy={s.placement_strategy}"
    storage = s.storage_path if "://" in s.storage_path else str(Path(s.storage_path).resolve())
    if storage != group["storage_path"]:
        return (
            f"scaling.storage_path={s.storage_path} (the warm group's is {group['storage_path']})"
        )
    if os.environ.get("PYTHONPATH", "") != env.get("pythonpath", ""):
        return "PYTHONPATH differs from the one `cluster up` ran with (the workers import from it)"
    if str(Path.cwd().resolve()) != env.get("workdir"):
        return "another working folder than `cluster up`'s"
    return None


def fits(job: Any, free: dict[str, float]) -> bool:
    """Whether `free` resources (the service cluster's) can place the job's own worker group."""
    s = job.scaling
    workers = s.min_workers  # an elastic job starts with what fits, from its minimum
    if free.get("CPU", 0.0) + 1e-9 < workers * s.cpus_per_worker:
        return False
    if s.use_gpu is True and free.get("GPU", 0.0) < workers:
        return False
    return all(free.get(k, 0.0) >= workers * v for k, v in s.resources_per_worker.items())


def _join_for_own_group(prepared: Any, state: dict[str, Any], reason: str, joined: bool) -> None:
    """Not the warm group: the job's own group on the service's cluster if it fits, else the
    normal local cluster. Leaves Ray disconnected; the driver joins its usual way."""
    import ray

    job = prepared.job
    room = fits(job, ray.available_resources())
    if joined:
        ray.shutdown()
    if room:
        _apply_env(state)  # the driver joins this head below: it needs the same mode
        job.scaling.address = f"{state['host']}:{state['port']}"
        prepared.config.setdefault("scaling", {})["address"] = job.scaling.address
        _say(
            f"not the warm worker group: {reason}; its own worker group on the service's Ray "
            f"cluster ({job.scaling.address})"
        )
    else:
        _say(
            f"not the warm worker group: {reason}; the service's Ray cluster has no room for "
            "another group, so a local Ray cluster of its own (dist-trainer cluster status)"
        )


def _latest_checkpoint(storage: str, run_id: str) -> str | None:
    """The job's last checkpoint folder in the warm group's storage, if it is still there."""
    if "://" in storage:
        return None
    found = sorted(Path(storage).glob(f"dist_trainer-warm-*/{run_id}-step_*"))
    return str(found[-1]) if found else None


def run_in_service(prepared: Any, t_start: float, show_progress: bool = True) -> Any | None:
    """The hook in driver.train: run the job in the service's warm group and return its
    JobResult, or None to go on the normal path (no service here, opted out, or a job that
    needs another group; then `prepared` may point at the service's cluster)."""
    if os.environ.get(SERVICE_ENV, "1").lower() in ("0", "false", "no", "off"):
        return None
    state = read_state()
    if state is None:
        return None
    scaling = prepared.job.scaling
    if scaling.address and not _same_cluster(scaling.address, state):
        return None  # the user chose another cluster
    if not alive(state.get("service")):
        _say(
            f"{state_path()} names a service that is not running (dist-trainer cluster status); "
            "this job starts a worker group of its own"
        )
        return None
    from concurrent.futures import ThreadPoolExecutor

    from dist_trainer import tracking

    uri, job = prepared.tracking_uri, prepared.job
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist-trainer-mlflow") as pool:
        store_ready = pool.submit(tracking.prepare_store, uri, job.tracking.experiment)
        try:
            connected = connect(state)
        except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
            _say(f"cannot join the service's Ray head ({exc}); this job starts its own group")
            return None
        if connected is None:
            return None  # this process is on another cluster already (a notebook, a test)
        joined = connected == "joined"
        queue = service_queue(state)
        if queue is None:
            _join_for_own_group(prepared, state, "the service has no job queue (yet)", joined)
            return None
        import ray

        view = ray.get(queue.status.remote())
        group = {**state["group"], "resolved_use_gpu": view["group"].get("use_gpu", False)}
        reason = mismatch(job, group, state)
        if reason is None and view["group"]["state"] == "failed":
            reason = f"the warm group cannot start ({view['group'].get('error')})"
        if reason is not None:
            _join_for_own_group(prepared, state, reason, joined)
            return None
        experiment_id = store_ready.result()
    try:
        return _run_warm(prepared, state, queue, experiment_id, view, t_start, show_progress)
    finally:
        if joined:
            ray.shutdown()


def _run_warm(prepared, state, queue, experiment_id, view, t_start, show_progress) -> Any:
    import ray

    from dist_trainer import jobs, report, tracking
    from dist_trainer.config import ConfigError
    from dist_trainer.progress import ProgressReporter
    from dist_trainer.ray_cluster import Cluster

    job, plan, uri = prepared.job, prepared.plan, prepared.tracking_uri
    use_gpu = bool(view["group"].get("use_gpu", False))
    cluster = Cluster(use_gpu, experiment_id)
    run_id = jobs.create_job_run(
        prepared, cluster, jobs.run_name(prepared), {tracking.WORKER_GROUP_TAG: "warm"}
    )
    _say(f"MLflow run {run_id} in experiment '{job.tracking.experiment}'")
    pids = ", ".join(str(w["pid"]) for w in view["group"].get("workers", {}).values())
    _say(
        f"running in the warm worker group of `dist-trainer cluster up` ({job.scaling.num_workers} "
        f"workers{', pids ' + pids if pids else ''}); their output: {state['service']['log']}"
    )
    reporter = ProgressReporter(uri, run_id, enabled=show_progress)
    entry = {
        "payload": jobs.job_payload(prepared, run_id),
        "tracking_uri": uri,
        "run_id": run_id,
        "name": jobs.run_name(prepared),
        "experiment": job.tracking.experiment,
        "submitter_pid": os.getpid(),
        "max_failures": job.scaling.max_failures,
    }
    index = None
    try:
        submitted = ray.get(queue.submit.remote(entry))
        index = submitted["index"]
        if submitted["ahead"]:
            _say(f"queued behind {submitted['ahead']} job(s) (dist-trainer cluster status)")
        elif view["group"]["state"] != "warm":
            _say(f"the warm group is {view['group']['state']}; the job starts when it is ready")
        reporter.start()
        while True:
            try:
                result = ray.get(queue.wait.remote(index, 2.0), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                text = (
                    f"the dist-trainer service stopped while the job waited ({type(exc).__name__})"
                )
                tracking.finish_job_run(uri, run_id, "FAILED", text)
                raise RuntimeError(f"{text}; see {state['service']['log']}") from None
            if result["state"] in ("FINISHED", "FAILED", "KILLED"):
                break
    except KeyboardInterrupt:
        if index is not None:
            with contextlib.suppress(Exception):
                ray.get(queue.cancel.remote(index, "interrupted by the user"), timeout=10)
        tracking.finish_job_run(uri, run_id, "KILLED", "interrupted by the user")
        raise
    finally:
        reporter.stop()
    if result["state"] != "FINISHED":
        error = result.get("error") or result["state"]
        if result.get("config_error"):
            raise ConfigError(error)
        raise RuntimeError(
            f"the job {result['state']} in the warm worker group: {error} "
            f"(the workers' output: {state['service']['log']})"
        )
    metrics = tracking.latest_metrics(uri, run_id)
    notes = tracking.run_notes(uri, run_id)
    tracking.set_description(uri, run_id, tracking.describe_job(plan.describe(), metrics, notes))
    elapsed = time.perf_counter() - t_start
    summary = report.comm_summary(uri, run_id, plan.world_size, "nccl" if use_gpu else "gloo")
    if summary is not None:
        tracking.log_text(uri, run_id, summary.to_markdown(), "comm_summary.md")
    ProgressReporter(uri, run_id).summary(
        metrics,
        elapsed,
        summary,
        tracking.ui_url(uri, experiment_id, run_id),
        notes,
    )
    return jobs.JobResult(
        run_id,
        job.tracking.experiment,
        uri,
        metrics,
        plan,
        _latest_checkpoint(state["group"]["storage_path"], run_id),
        {"total_s": elapsed, "queued_s": _queued_s(result)},
    )


def _queued_s(entry: dict[str, Any]) -> float:
    if entry.get("started_at") and entry.get("submitted_at"):
        return max(0.0, entry["started_at"] - entry["submitted_at"])
    return 0.0
