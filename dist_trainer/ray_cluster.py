"""Ray for one job: start a local cluster or join `scaling.address`, and check it can run it.

Every check here needs a live cluster (its resources, its nodes' addresses), so it runs after
dist_trainer.driver's config checks and before the job's MLflow run exists: a cluster that cannot
place the workers, or cannot reach a file tracking store, is refused in one line.

Launch time matters here (a 2-worker CPU job spends most of its first 30 s in Ray and imports),
so `ray.init` and the MLflow store set-up run in threads while the driver imports Ray Train.
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_trainer import console, tracking
from dist_trainer.config import ConfigError, JobConfig

__all__ = [
    "Cluster",
    "RAY_DRIVER_ENV",
    "RAY_ENV_DEFAULTS",
    "RAY_TRAIN_ENV",
    "file_store_conflict",
    "start_cluster",
    "storage_path",
    "use_ray_token_if_there_is_one",
]


def _start_ray_in_background(scaling: Any) -> Future:
    """Run `_start_ray` in a daemon thread that then stays alive until the process exits.

    Ray starts its GCS and raylet with a parent-death signal bound to the *thread* that spawns
    them: if that thread ended, the local cluster would die with it. A daemon thread is not
    joined at exit, so Ray's own atexit shutdown still finds its processes alive.
    """
    future: Future = Future()

    def keeper() -> None:
        try:
            future.set_result(_start_ray(scaling))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)
            return
        threading.Event().wait()  # park forever

    threading.Thread(target=keeper, name="dist-trainer-ray", daemon=True).start()
    return future


# Ray Train V2 levers measured on a 2-core machine (cold launch ~30 s to the first step). The
# health-check interval sets what each checkpoint report and the teardown cost (about one
# interval each), but every poll interrupts every worker: 0.2 s cost 3-5% of steady throughput
# on 2 cores (scripts/bench_launch.py --variants dt,dt_hc2), Ray's default 2 s makes reports
# slow; 1 s is the middle. The preemption watcher competes with DDP's first torch._dynamo
# import. They are Ray Train's own settings (ray/train/v2/_internal/constants.py; a test checks
# this Ray still reads them), set only for the job's Ray processes through its runtime
# environment, never in this process's environment; a value already in the user's environment
# wins.
RAY_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Train V2 re-routes worker print() through its logger, which shows each line twice here.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# Read by the driver itself when it prints the workers' output: every line, not deduplicated
# across workers (a rank's warning must not vanish because another rank said it first).
RAY_DRIVER_ENV = {"RAY_DEDUP_LOGS": "0"}
RAY_ENV_DEFAULTS = {**RAY_TRAIN_ENV, **RAY_DRIVER_ENV}


def _start_ray(scaling: Any) -> None:
    """Join `scaling.address` or start a local cluster; an unreachable address is a ConfigError."""
    import ray

    for key, value in RAY_DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    if scaling.address and scaling.address != "auto":
        _check_reachable(scaling.address)
        use_ray_token_if_there_is_one()
    if ray.is_initialized():  # already started in this process (tests, notebooks)
        return
    console.quiet_libraries()
    kwargs: dict[str, Any] = {
        "log_to_driver": True,
        "configure_logging": False,
        "runtime_env": {"env_vars": {k: os.environ.get(k, v) for k, v in RAY_TRAIN_ENV.items()}},
    }
    if scaling.address:
        import dist_trainer

        # Ship this package to the cluster's workers (conf/ is not needed there).
        kwargs["runtime_env"]["py_modules"] = [str(Path(dist_trainer.__file__).parent)]
    try:
        ray.init(address=scaling.address, **kwargs)
        console.route_worker_output()
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"scaling.address={scaling.address!r}: cannot join the Ray cluster ({exc}). Fix: "
            "start it (ray start --head) and pass its address, or drop scaling.address to run "
            "on a local cluster"
        ) from None


def use_ray_token_if_there_is_one() -> None:
    """Ray's clusters require a token by default. `ray start` and `ray.init(address="auto")`
    pick up the token they find, but a client given an address (ray.init("host:port"), the
    job client) sends one only in token mode: set it, as Ray's own CLI would, when there is a
    token and the user has not chosen a mode."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return  # the user chose
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH", str(Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or Path(token_file).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray caches its config at import: refresh it, as ray.init does for a token
            from ray._raylet import Config

            Config.initialize("")
        except (ImportError, AttributeError):
            pass


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A TCP connect to the head first: ray.init on a dead address hangs for minutes."""
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"scaling.address={address!r}: cannot reach the Ray head ({exc}). Fix: start it "
            "(ray start --head), check host:port (GCS port, default 6379; ray:// client port "
            "10001), or drop scaling.address to run on a local cluster"
        ) from None


def storage_path(given: str) -> str:
    """What Ray Train gets: a URI (s3://, gs://, ...) as given, a local folder made absolute."""
    if "://" in given:
        return given
    folder = Path(given).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def file_store_conflict(tracking_uri: str, node_ips: list[str], here: str) -> str | None:
    """Why a file store (sqlite:, file:) cannot serve this cluster, or None.

    Such a store is a file on this machine: workers on other machines would write to a file of
    their own (or fail), so their metrics would never reach the run.
    """
    others = sorted(set(node_ips) - {here})
    if not tracking_uri.startswith(("sqlite:", "file:")) or not others:
        return None
    return (
        f"tracking.uri={tracking_uri!r} is a file on this machine, but the Ray cluster has "
        f"nodes on {', '.join(others)} whose workers would write to it. Fix: start an MLflow "
        "server that every node reaches (mlflow server --host 0.0.0.0 --port 5000 ...) and set "
        "tracking.uri=http://<this host>:5000"
    )


def _check_shared_store(tracking_uri: str) -> None:
    import ray

    alive = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    problem = file_store_conflict(tracking_uri, alive, ray.util.get_node_ip_address())
    if problem:
        raise ConfigError(problem)


def _check_resources(job: JobConfig) -> bool:
    """Whether workers get GPUs; refuse worker counts the cluster cannot place."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0.0)
    scaling = job.scaling
    if scaling.use_gpu is True and gpus == 0:
        raise ConfigError(
            "scaling.use_gpu=true but the Ray cluster has no GPUs. Fix: scaling.use_gpu=auto "
            "(CPU workers with gloo here) or join a cluster with GPUs (scaling.address=...)"
        )
    use_gpu = scaling.use_gpu is True or (scaling.use_gpu == "auto" and gpus > 0)
    # An elastic job needs room for its minimum now; Ray Train grows it as more fits.
    workers = scaling.min_workers
    asked = f"scaling.num_workers={scaling.num_workers}" + (
        f" (at least {workers})" if scaling.elastic else ""
    )
    if use_gpu and workers > gpus:
        raise ConfigError(
            f"{asked} but the cluster has {gpus} GPU(s) and each worker takes one. "
            f"Fix: scaling.num_workers={gpus}"
        )
    needed = workers * scaling.cpus_per_worker
    if needed > cpus:
        fit = int(cpus // scaling.cpus_per_worker)
        raise ConfigError(
            f"{asked} x scaling.cpus_per_worker={scaling.cpus_per_worker} needs {needed:g} "
            f"CPUs but the cluster has {cpus:g}. "
            f"Fix: scaling.num_workers={max(1, fit)} or lower scaling.cpus_per_worker"
        )
    for name, amount in scaling.resources_per_worker.items():
        if workers * amount > resources.get(name, 0):
            raise ConfigError(
                f"scaling.resources_per_worker.{name}={amount} x {workers} workers "
                f"exceeds the cluster's {resources.get(name, 0):g}. Fix: lower it or drop it"
            )
    return use_gpu


@dataclass
class Cluster:
    """Ray joined or started, resources checked, the MLflow experiment ready."""

    use_gpu: bool
    experiment_id: str


def start_cluster(job: JobConfig, uri: str) -> Cluster:
    """Start or join Ray (in a thread, while Ray Train imports the store `uri` opens), check
    that the cluster can place the job's workers, and return what launching needs."""
    ray_ready = _start_ray_in_background(job.scaling)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist-trainer-mlflow")
    store_ready: Future = pool.submit(tracking.prepare_store, uri, job.tracking.experiment)
    import ray.train.torch  # noqa: F401 - imported while Ray starts

    try:
        ray_ready.result()
        use_gpu = _check_resources(job)
        _check_shared_store(uri)
        experiment_id = store_ready.result()
    finally:
        pool.shutdown(wait=True)
    return Cluster(use_gpu, experiment_id)
