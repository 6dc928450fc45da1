"""`dist-trainer cluster up|status|down`: a local Ray head and a warm worker group, as a service.

    dist-trainer cluster up [--workers 2] [--cpus-per-worker 1] [--mlflow] [--port 6379]
    dist-trainer train ...           # runs in the warm worker group when its scaling matches
    dist-trainer cluster status      # resources, the warm group, running and queued jobs
    dist-trainer cluster down        # stops everything `up` started, nothing else

`up` starts, each detached from the terminal in its own session and recorded in
`.dist_trainer/cluster.json` (in the working folder, where `train` looks for it):

* a Ray head (`ray start --head`) with its own temp dir, so `ray.init()` elsewhere on the machine
  (another job, a test suite) never finds and joins it, and `down` can tell its processes from
  any other Ray's. By default every one of its sockets listens on 127.0.0.1 only
  (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, Ray's single-machine mode; whoever joins needs the same
  variable, which `train`, `status` and the service set from the state file) and Ray's token
  authentication is on (`RAY_AUTH_MODE=token`, the token in ~/.ray/auth_token);
* optionally an MLflow server (`--mlflow`) on 127.0.0.1 over ./mlflow.db, the UI kept open;
* the service (`python -m dist_trainer.service`): one Ray Train worker group kept warm, which
  runs submitted jobs one after another (see dist_trainer.service).

`dist-trainer train` (the hook in driver.train, `run_in_service`) submits its job to the warm
group when the service is up here and the job's `scaling` matches the group (workers, CPUs per
worker, GPU or not, no extra resources, placement, storage path, `max_failures=0`, the same
PYTHONPATH); the driver still checks the config, creates the MLflow run and shows progress. A
job that does not match runs its own worker group: on the service's Ray cluster when its free
resources can place it, else on a local cluster of its own, as without the service. Opt out with
`DIST_TRAINER_SERVICE=0`, or set `scaling.address` to another cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = [
    "SERVICE_ENV",
    "STATE_FILE",
    "main",
    "mismatch",
    "read_state",
    "run_in_service",
    "state_path",
]

STATE_DIR = ".dist_trainer"
STATE_FILE = "cluster.json"
SERVICE_ENV = "DIST_TRAINER_SERVICE"
"""Set to 0 to never use a running service (each `train` starts its own worker group)."""
_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


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


def _write_state(state: dict[str, Any]) -> None:
    path = state_path(Path(state["workdir"]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


# --- processes -----------------------------------------------------------------------------


def _record(pid: int) -> dict[str, Any]:
    """A pid with its start time: a later check never mistakes a reused pid for ours."""
    import psutil

    return {"pid": pid, "create_time": psutil.Process(pid).create_time()}


def _alive(record: dict[str, Any] | None) -> bool:
    import psutil

    if not record:
        return False
    try:
        proc = psutil.Process(record["pid"])
        return (
            abs(proc.create_time() - record["create_time"]) < 1e-3
            and proc.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def _session_is_ours(record: dict[str, Any]) -> bool:
    """Whether session id `record["pid"]` is still the one `cluster up` started.

    While any process of a session lives, the kernel does not hand its id out as a new pid
    (POSIX), so the id is ours unless a process with that pid exists and started at another time
    (then our session had ended entirely and the pid was reused).
    """
    import psutil

    try:
        return abs(psutil.Process(record["pid"]).create_time() - record["create_time"]) < 1e-3
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _members(record: dict[str, Any] | None, marker: str | None = None) -> list[Any]:
    """The live processes of the session `cluster up` started a server in (none of them calls
    setsid), plus any whose command line names `marker` (the Ray temp dir) and their
    descendants (Ray's workers rename themselves `ray::...`)."""
    import psutil

    if not record:
        return []
    sid = record["pid"] if _session_is_ours(record) else None
    found: dict[int, Any] = {}
    named = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            in_session = sid is not None and os.getsid(proc.pid) == sid
            has_marker = bool(marker) and marker in " ".join(proc.info["cmdline"] or [])
        except (psutil.Error, OSError):
            continue
        if in_session or has_marker:
            found[proc.pid] = proc
        if has_marker:
            named.append(proc)
    for proc in named:
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
    live = []
    for pid, proc in found.items():
        with contextlib.suppress(psutil.Error):
            if pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
    return live


def _running(record: dict[str, Any] | None, marker: str | None = None) -> bool:
    return bool(_members(record, marker))


def _stop_session(record: dict[str, Any] | None, marker: str | None, grace_s: float) -> int:
    """SIGTERM every live process of the recorded session, SIGKILL what is left after
    `grace_s`, then sweep again (a dying raylet may have started a worker meanwhile).
    Returns how many processes were signalled."""
    import psutil

    total = 0
    for attempt in range(3):
        members = _members(record, marker)
        if not members:
            break
        total += len(members)
        for proc in members:
            with contextlib.suppress(psutil.Error):
                if attempt == 0:
                    proc.terminate()
                else:
                    proc.kill()
        _, alive = psutil.wait_procs(members, timeout=grace_s if attempt == 0 else 5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
    return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _spawn(args: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A server detached from this terminal: its own session, stdin closed, output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


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


def _connect(state: dict[str, Any], log: Path | None = None) -> str | None:
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


def _queue(state: dict[str, Any]) -> Any | None:
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
    if s.max_failures:
        return f"scaling.max_failures={s.max_failures} (the warm group restarts no job)"
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


def _fits(job: Any) -> bool:
    """Whether the service cluster's free resources can place the job's own worker group."""
    import ray

    free = ray.available_resources()
    s = job.scaling
    if free.get("CPU", 0.0) + 1e-9 < s.num_workers * s.cpus_per_worker:
        return False
    if s.use_gpu is True and free.get("GPU", 0.0) < s.num_workers:
        return False
    return all(free.get(k, 0.0) >= s.num_workers * v for k, v in s.resources_per_worker.items())


def _join_for_own_group(prepared: Any, state: dict[str, Any], reason: str, joined: bool) -> None:
    """Not the warm group: the job's own group on the service's cluster if it fits, else the
    normal local cluster. Leaves Ray disconnected; the driver joins its usual way."""
    import ray

    job = prepared.job
    fits = _fits(job)
    if joined:
        ray.shutdown()
    if fits:
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
    if not _alive(state.get("service")):
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
            connected = _connect(state)
        except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
            _say(f"cannot join the service's Ray head ({exc}); this job starts its own group")
            return None
        if connected is None:
            return None  # this process is on another cluster already (a notebook, a test)
        joined = connected == "joined"
        queue = _queue(state)
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

    from dist_trainer import driver, report, tracking
    from dist_trainer.config import ConfigError
    from dist_trainer.progress import ProgressReporter

    job, plan, uri = prepared.job, prepared.plan, prepared.tracking_uri
    use_gpu = bool(view["group"].get("use_gpu", False))
    cluster = driver.Cluster(use_gpu, experiment_id)
    run_id = driver.create_job_run(
        prepared, cluster, driver._run_name(prepared), {"dist_trainer.worker_group": "warm"}
    )
    _say(f"MLflow run {run_id} in experiment '{job.tracking.experiment}'")
    pids = ", ".join(str(w["pid"]) for w in view["group"].get("workers", {}).values())
    _say(
        f"running in the warm worker group of `dist-trainer cluster up` ({job.scaling.num_workers} "
        f"workers{', pids ' + pids if pids else ''}); their output: {state['service']['log']}"
    )
    reporter = ProgressReporter(uri, run_id, enabled=show_progress)
    entry = {
        "payload": driver.job_payload(prepared, run_id),
        "tracking_uri": uri,
        "run_id": run_id,
        "name": driver._run_name(prepared),
        "experiment": job.tracking.experiment,
        "submitter_pid": os.getpid(),
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
    tracking.set_description(uri, run_id, tracking.describe_job(plan.describe(), metrics))
    elapsed = time.perf_counter() - t_start
    summary = report.comm_summary(uri, run_id, plan.world_size, "nccl" if use_gpu else "gloo")
    if summary is not None:
        tracking.log_text(uri, run_id, summary.to_markdown(), "comm_summary.md")
    ProgressReporter(uri, run_id).summary(
        metrics, elapsed, summary, tracking.ui_url(uri, experiment_id, run_id)
    )
    return driver.JobResult(
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


# --- up ------------------------------------------------------------------------------------


def _ray_bin() -> str:
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.exists() else (shutil.which("ray") or "ray")


def _mlflow_bin() -> str:
    found = Path(sys.executable).with_name("mlflow")
    return str(found) if found.exists() else (shutil.which("mlflow") or "mlflow")


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return True
        time.sleep(0.5)
    return False


def _start_ray(state: dict[str, Any], folder: Path, cpus: int | None) -> subprocess.Popen:
    host = state["host"]
    args = [
        _ray_bin(),
        "start",
        "--head",
        f"--port={state['port']}",
        f"--node-ip-address={host}",
        f"--temp-dir={state['temp_dir']}",
        # The dashboard (~0.6 s, ~120 MB) serves Ray's State API, which Ray Train's placement
        # group cleaner polls; without it that actor logs a warning every few seconds.
        "--include-dashboard=true",
        f"--dashboard-host={host}",
        f"--dashboard-port={state['dashboard_port']}",
        "--disable-usage-stats",
        # Every port of our own: defaults (10001, 52365, 8265, ...) collide with another Ray.
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]
    if cpus is not None:
        args.append(f"--num-cpus={cpus}")
    from dist_trainer.driver import RAY_TRAIN_ENV

    env = {**os.environ, **RAY_TRAIN_ENV, **state["env"]}
    env.pop("RAY_ADDRESS", None)
    return _spawn(args, folder / "ray.log", env, Path(state["workdir"]))


def _start_mlflow(state: dict[str, Any], folder: Path, port: int) -> subprocess.Popen:
    workdir = Path(state["workdir"])
    args = [
        _mlflow_bin(),
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        str(workdir / "mlartifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return _spawn(args, folder / "mlflow.log", dict(os.environ), workdir)


def _wait_warm(state: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
    """Poll the service's queue until its group is warm; None if the service died first."""
    import ray

    deadline = time.monotonic() + timeout_s
    queue = None
    while time.monotonic() < deadline:
        if not _alive(state["service"]):
            return None
        if queue is None:
            queue = _queue(state)
        if queue is not None:
            view = ray.get(queue.status.remote())
            if view["group"]["state"] in ("warm", "failed"):
                return view
        time.sleep(0.5)
    return None


def up(args: argparse.Namespace) -> int:
    workdir = Path.cwd().resolve()
    folder = workdir / STATE_DIR
    existing = read_state(workdir)
    if existing is not None:
        if _running(existing.get("ray"), existing.get("temp_dir")) or _alive(
            existing.get("service")
        ):
            _say(f"a cluster is already up here ({state_path(workdir)}):")
            code = status(args)
            if code:
                _say("it is not whole: dist-trainer cluster down, then dist-trainer cluster up")
            return code
        _say("cleaning up after a cluster that is no longer running")
        _down(existing, quiet=True)
    host = args.host
    if _port_in_use(host, args.port):
        _say(f"port {args.port} is in use on {host}. Fix: dist-trainer cluster up --port <free>")
        return 2
    folder.mkdir(parents=True, exist_ok=True)
    # Short: Ray's socket paths live under it (AF_UNIX paths are limited to 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix=f"dt_ray_{args.port}_")
    storage = args.storage_path
    state: dict[str, Any] = {
        "version": 1,
        "workdir": str(workdir),
        "host": host,
        "port": args.port,
        "address": f"{host}:{args.port}",
        "temp_dir": temp_dir,
        "dashboard_port": _free_port(),
        "auth_mode": "token",
        "env": {"RAY_AUTH_MODE": "token", **(_LOOPBACK_ENV if host == "127.0.0.1" else {})},
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "started_at": time.time(),
        "group": {
            "num_workers": args.workers,
            "cpus_per_worker": args.cpus_per_worker,
            "use_gpu": {"auto": "auto", "true": True, "false": False}[args.use_gpu],
            "placement_strategy": "PACK",
            "storage_path": storage if "://" in storage else str((workdir / storage).resolve()),
        },
        "ray": None,
        "service": None,
        "mlflow": None,
    }
    try:
        return _bring_up(state, args, folder)
    except BaseException:  # Ctrl-C or a bug: leave nothing running behind
        _say("cluster up did not finish: stopping what it started")
        _down(state, quiet=True)
        raise


def _bring_up(state: dict[str, Any], args: argparse.Namespace, folder: Path) -> int:
    workdir, host = Path(state["workdir"]), state["host"]
    started = time.perf_counter()
    _say(f"starting a Ray head on {host}:{args.port} (log {folder / 'ray.log'})")
    ray_proc = _start_ray(state, folder, args.cpus)
    state["ray"] = _record(ray_proc.pid)
    mlflow_proc = None
    if args.mlflow:
        port = args.mlflow_port
        if _port_in_use("127.0.0.1", port):
            _say(f"port {port} is in use: no MLflow server. Fix: --mlflow-port <free>")
        else:
            mlflow_proc = _start_mlflow(state, folder, port)
            state["mlflow"] = {
                **_record(mlflow_proc.pid),
                "url": f"http://127.0.0.1:{port}",
                "backend": f"sqlite:///{workdir / 'mlflow.db'}",
                "log": str(folder / "mlflow.log"),
            }
    _write_state(state)
    try:
        rc = ray_proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        rc = -1
    if rc != 0:
        _say(f"ray start failed (exit {rc}):\n{_tail(folder / 'ray.log')}")
        _down(state, quiet=True)
        return 1
    _say(f"Ray head up in {time.perf_counter() - started:.1f} s; starting the warm worker group")
    env = {**os.environ, **state["env"]}
    env.pop("RAY_ADDRESS", None)
    service_log = folder / "service.log"
    service = _spawn(
        [sys.executable, "-m", "dist_trainer.service", "--state", str(state_path(workdir))],
        service_log,
        env,
        workdir,
    )
    state["service"] = {**_record(service.pid), "log": str(service_log)}
    _write_state(state)
    try:
        _connect(state, folder / "cluster.log")
        view = _wait_warm(state, args.timeout)
    finally:
        import ray

        ray.shutdown()
    if view is None or view["group"]["state"] != "warm":
        why = (view or {}).get("group", {}).get("error") or "no warm group in time"
        _say(f"the service did not get ready ({why}):\n{_tail(service_log)}")
        _down(state, quiet=True)
        return 1
    if mlflow_proc is not None:
        if _wait_http(state["mlflow"]["url"] + "/health", mlflow_proc, 90):
            _say(f"MLflow server: {state['mlflow']['url']}")
        else:
            _say(f"the MLflow server did not start:\n{_tail(folder / 'mlflow.log')}")
    workers = view["group"]["workers"]
    _say(
        f"up in {time.perf_counter() - started:.1f} s: warm group of {len(workers)} workers "
        f"(pids {', '.join(str(w['pid']) for w in workers.values())}). `dist-trainer train` from "
        "this folder now runs in it; `dist-trainer cluster status`, `dist-trainer cluster down`"
    )
    return 0


# --- status --------------------------------------------------------------------------------


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    s = time.time() - t
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago"


def _job_line(job: dict[str, Any]) -> str:
    took = ""
    if job.get("started_at") and job.get("ended_at"):
        took = f" in {job['ended_at'] - job['started_at']:.1f} s"
    elif job.get("started_at"):
        took = f" for {time.time() - job['started_at']:.0f} s"
    error = f": {job['error']}" if job.get("error") and job["state"] != "FINISHED" else ""
    return (
        f"#{job['index']} {job.get('name', '')} run {job.get('run_id')} {job['state']}{took}{error}"
    )


def status(args: argparse.Namespace | None = None) -> int:
    state = read_state()
    if state is None:
        _say(f"no cluster is up here (no {state_path()}); start one: dist-trainer cluster up")
        return 1
    ray_up = _running(state.get("ray"), state.get("temp_dir"))
    service_up = _alive(state.get("service"))
    print(f"cluster of {state_path()} (started {_ago(state.get('started_at'))})")
    print(
        f"  Ray head    {state['address']}: {'up' if ray_up else 'NOT RUNNING'} "
        f"(pid {state['ray']['pid']}, temp dir {state['temp_dir']}, log "
        f"{Path(state['workdir']) / STATE_DIR / 'ray.log'}); dashboard "
        f"http://{state['host']}:{state['dashboard_port']}"
    )
    service = state.get("service") or {}
    print(
        f"  service     {'up' if service_up else 'NOT RUNNING'} (pid {service.get('pid')}, log "
        f"{service.get('log')})"
    )
    if state.get("mlflow"):
        mlflow = state["mlflow"]
        print(
            f"  MLflow      {mlflow['url']}: {'up' if _alive(mlflow) else 'NOT RUNNING'} "
            f"(pid {mlflow['pid']}, store {mlflow['backend']})"
        )
    if not ray_up:
        print("  `dist-trainer cluster down` cleans up; then `dist-trainer cluster up`")
        return 1
    try:
        _connect(state, Path(state["workdir"]) / STATE_DIR / "cluster.log")
        import ray

        total, free = ray.cluster_resources(), ray.available_resources()
        keys = [k for k in ("CPU", "GPU", "memory", "object_store_memory") if k in total]
        shown = []
        for key in keys:
            if "memory" in key:
                shown.append(f"{key} {free.get(key, 0) / 2**30:.1f}/{total[key] / 2**30:.1f} GiB")
            else:
                shown.append(f"{key} {free.get(key, 0):g}/{total[key]:g}")
        print(f"  resources   free/total: {', '.join(shown)}")
        queue = _queue(state)
        view = ray.get(queue.status.remote()) if queue is not None else None
    finally:
        ray.shutdown()
    if view is None:
        print("  warm group  none (the service has no queue)")
        return 1
    group = view["group"]
    g = state["group"]
    workers = group.get("workers", {})
    pids = ", ".join(f"rank {r}: pid {w['pid']}" for r, w in workers.items())
    print(
        f"  warm group  {group['state']}, generation {group['generation']}: {g['num_workers']} "
        f"workers x {g['cpus_per_worker']:g} CPU, {'GPU' if group.get('use_gpu') else 'CPU'}"
        + (f" ({pids})" if pids else "")
        + (f", warm since {_ago(group['warm_at'])}" if group.get("warm_at") else "")
    )
    if group.get("error"):
        print(f"              error: {group['error']}")
    for label, jobs in (("running", view["running"]), ("queued", view["queued"])):
        print(f"  {label:<11} {len(jobs) or 'none'}")
        for job in jobs:
            print(f"    {_job_line(job)}")
    if view["recent"]:
        print(f"  done        {view['submitted'] - len(view['running']) - len(view['queued'])}")
        for job in view["recent"][-5:]:
            print(f"    {_job_line(job)}")
    print(
        f"  joins       scaling.num_workers={g['num_workers']} scaling.cpus_per_worker="
        f"{g['cpus_per_worker']:g}, from {state['workdir']}; other jobs get their own group "
        f"({SERVICE_ENV}=0 opts out)"
    )
    return 0 if service_up else 1


# --- down ----------------------------------------------------------------------------------


def _down(state: dict[str, Any], quiet: bool = False) -> dict[str, int]:
    """Stop what the state file names (service, MLflow server, Ray head), remove its files."""
    stopped = {}
    service = state.get("service")
    if _alive(service):
        # SIGTERM: the service ends queued jobs' runs KILLED, stops its group, then exits.
        with contextlib.suppress(OSError):
            os.kill(service["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(service) and time.monotonic() < deadline:
            time.sleep(0.2)
    stopped["service"] = _stop_session(service, None, grace_s=2)
    stopped["mlflow"] = _stop_session(state.get("mlflow"), None, grace_s=5)
    stopped["ray"] = _stop_session(state.get("ray"), state.get("temp_dir"), grace_s=3)
    if state.get("temp_dir") and Path(state["temp_dir"]).name.startswith("dt_ray_"):
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
    with contextlib.suppress(OSError):
        state_path(Path(state["workdir"])).unlink()
    if not quiet:
        _say(
            "cluster down: stopped the service, "
            + ("the MLflow server, " if state.get("mlflow") else "")
            + f"the Ray head ({sum(stopped.values())} processes)"
        )
    return stopped


def down(args: argparse.Namespace | None = None) -> int:
    state = read_state()
    if state is None:
        _say(f"no cluster is up here (no {state_path()})")
        return 0
    _down(state)
    return 0


# --- the verb ------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dist-trainer cluster",
        description="A local Ray head and a warm worker group that `dist-trainer train` jobs "
        "from this folder run in (state in ./.dist_trainer/).",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    p_up = verbs.add_parser("up", help="start the Ray head, the warm group (and MLflow)")
    p_up.add_argument("--workers", type=int, default=2, help="workers of the warm group")
    p_up.add_argument("--cpus-per-worker", type=float, default=1.0)
    p_up.add_argument("--use-gpu", choices=("auto", "true", "false"), default="auto")
    p_up.add_argument("--cpus", type=int, default=None, help="CPUs Ray offers (default: all)")
    p_up.add_argument("--port", type=int, default=6379, help="the Ray head's (GCS) port")
    p_up.add_argument(
        "--host",
        default="127.0.0.1",
        help="127.0.0.1 (default: every socket on loopback) or this machine's IP, for other "
        "nodes to join (Ray then listens on all interfaces; token authentication stays on)",
    )
    p_up.add_argument("--storage-path", default=".ray_storage", help="the group's checkpoints")
    p_up.add_argument("--mlflow", action="store_true", help="also an MLflow server on ./mlflow.db")
    p_up.add_argument("--mlflow-port", type=int, default=5000)
    p_up.add_argument("--timeout", type=float, default=180, help="seconds to wait for warm")
    verbs.add_parser("status", help="resources, the warm group, running and queued jobs")
    verbs.add_parser("down", help="stop everything `up` started here")
    args = parser.parse_args(argv)
    if args.verb == "up" and args.workers < 1:
        parser.error("--workers must be >= 1")
    return {"up": up, "status": status, "down": down}[args.verb](args)
