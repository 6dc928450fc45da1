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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dist_trainer import processes, warm

__all__ = ["main"]

_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _say(message: str) -> None:
    print(f"[dist-trainer] {message}", flush=True)


# --- the state file ------------------------------------------------------------------------


def _write_state(state: dict[str, Any]) -> None:
    path = warm.state_path(Path(state["workdir"]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


# --- up ------------------------------------------------------------------------------------


def _ray_bin() -> str:
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.exists() else (shutil.which("ray") or "ray")


def _mlflow_bin() -> str:
    found = Path(sys.executable).with_name("mlflow")
    return str(found) if found.exists() else (shutil.which("mlflow") or "mlflow")


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
        f"--ray-client-server-port={processes.free_port()}",
        f"--dashboard-agent-listen-port={processes.free_port()}",
        f"--dashboard-agent-grpc-port={processes.free_port()}",
        f"--runtime-env-agent-port={processes.free_port()}",
        f"--metrics-export-port={processes.free_port()}",
    ]
    if cpus is not None:
        args.append(f"--num-cpus={cpus}")
    from dist_trainer.ray_cluster import RAY_TRAIN_ENV

    env = {**os.environ, **RAY_TRAIN_ENV, **state["env"]}
    env.pop("RAY_ADDRESS", None)
    return processes.spawn(args, folder / "ray.log", env, Path(state["workdir"]))


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
    return processes.spawn(args, folder / "mlflow.log", dict(os.environ), workdir)


def _wait_warm(state: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
    """Poll the service's queue until its group is warm; None if the service died first."""
    import ray

    deadline = time.monotonic() + timeout_s
    queue = None
    while time.monotonic() < deadline:
        if not processes.alive(state["service"]):
            return None
        if queue is None:
            queue = warm.service_queue(state)
        if queue is not None:
            view = ray.get(queue.status.remote())
            if view["group"]["state"] in ("warm", "failed"):
                return view
        time.sleep(0.5)
    return None


def up(args: argparse.Namespace) -> int:
    workdir = Path.cwd().resolve()
    folder = workdir / warm.STATE_DIR
    existing = warm.read_state(workdir)
    if existing is not None:
        if processes.running(existing.get("ray"), existing.get("temp_dir")) or processes.alive(
            existing.get("service")
        ):
            _say(f"a cluster is already up here ({warm.state_path(workdir)}):")
            code = status(args)
            if code:
                _say("it is not whole: dist-trainer cluster down, then dist-trainer cluster up")
            return code
        _say("cleaning up after a cluster that is no longer running")
        _down(existing, quiet=True)
    host = args.host
    if processes.port_in_use(host, args.port):
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
        "dashboard_port": processes.free_port(),
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
    state["ray"] = processes.record(ray_proc.pid)
    mlflow_proc = None
    if args.mlflow:
        port = args.mlflow_port
        if processes.port_in_use("127.0.0.1", port):
            _say(f"port {port} is in use: no MLflow server. Fix: --mlflow-port <free>")
        else:
            mlflow_proc = _start_mlflow(state, folder, port)
            state["mlflow"] = {
                **processes.record(mlflow_proc.pid),
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
        _say(f"ray start failed (exit {rc}):\n{processes.tail(folder / 'ray.log')}")
        _down(state, quiet=True)
        return 1
    _say(f"Ray head up in {time.perf_counter() - started:.1f} s; starting the warm worker group")
    env = {**os.environ, **state["env"]}
    env.pop("RAY_ADDRESS", None)
    service_log = folder / "service.log"
    service = processes.spawn(
        [sys.executable, "-m", "dist_trainer.service", "--state", str(warm.state_path(workdir))],
        service_log,
        env,
        workdir,
    )
    state["service"] = {**processes.record(service.pid), "log": str(service_log)}
    _write_state(state)
    try:
        warm.connect(state, folder / "cluster.log")
        view = _wait_warm(state, args.timeout)
    finally:
        import ray

        ray.shutdown()
    if view is None or view["group"]["state"] != "warm":
        why = (view or {}).get("group", {}).get("error") or "no warm group in time"
        _say(f"the service did not get ready ({why}):\n{processes.tail(service_log)}")
        _down(state, quiet=True)
        return 1
    if mlflow_proc is not None:
        if processes.wait_http(state["mlflow"]["url"] + "/health", mlflow_proc, 90):
            _say(f"MLflow server: {state['mlflow']['url']}")
        else:
            _say(f"the MLflow server did not start:\n{processes.tail(folder / 'mlflow.log')}")
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
    state = warm.read_state()
    if state is None:
        _say(f"no cluster is up here (no {warm.state_path()}); start one: dist-trainer cluster up")
        return 1
    ray_up = processes.running(state.get("ray"), state.get("temp_dir"))
    service_up = processes.alive(state.get("service"))
    print(f"cluster of {warm.state_path()} (started {_ago(state.get('started_at'))})")
    print(
        f"  Ray head    {state['address']}: {'up' if ray_up else 'NOT RUNNING'} "
        f"(pid {state['ray']['pid']}, temp dir {state['temp_dir']}, log "
        f"{Path(state['workdir']) / warm.STATE_DIR / 'ray.log'}); dashboard "
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
            f"  MLflow      {mlflow['url']}: {'up' if processes.alive(mlflow) else 'NOT RUNNING'} "
            f"(pid {mlflow['pid']}, store {mlflow['backend']})"
        )
    if not ray_up:
        print("  `dist-trainer cluster down` cleans up; then `dist-trainer cluster up`")
        return 1
    try:
        warm.connect(state, Path(state["workdir"]) / warm.STATE_DIR / "cluster.log")
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
        queue = warm.service_queue(state)
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
        f"({warm.SERVICE_ENV}=0 opts out)"
    )
    return 0 if service_up else 1


# --- down ----------------------------------------------------------------------------------


def _down(state: dict[str, Any], quiet: bool = False) -> dict[str, int]:
    """Stop what the state file names (service, MLflow server, Ray head), remove its files."""
    stopped = {}
    service = state.get("service")
    if processes.alive(service):
        # SIGTERM: the service ends queued jobs' runs KILLED, stops its group, then exits.
        with contextlib.suppress(OSError):
            os.kill(service["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 30
        while processes.alive(service) and time.monotonic() < deadline:
            time.sleep(0.2)
    stopped["service"] = processes.stop_session(service, None, grace_s=2)
    stopped["mlflow"] = processes.stop_session(state.get("mlflow"), None, grace_s=5)
    stopped["ray"] = processes.stop_session(state.get("ray"), state.get("temp_dir"), grace_s=3)
    if state.get("temp_dir") and Path(state["temp_dir"]).name.startswith("dt_ray_"):
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
    with contextlib.suppress(OSError):
        warm.state_path(Path(state["workdir"])).unlink()
    if not quiet:
        _say(
            "cluster down: stopped the service, "
            + ("the MLflow server, " if state.get("mlflow") else "")
            + f"the Ray head ({sum(stopped.values())} processes)"
        )
    return stopped


def down(args: argparse.Namespace | None = None) -> int:
    state = warm.read_state()
    if state is None:
        _say(f"no cluster is up here (no {warm.state_path()})")
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
