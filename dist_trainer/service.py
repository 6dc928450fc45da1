"""The warm worker group behind `dist-trainer cluster up`: one Ray Train group that runs jobs.

Joining a warm Ray cluster still costs ~13-17 s per job on a small machine, because every
`TorchTrainer.fit()` starts new worker processes, imports torch and forms a process group. The
service pays that once: this process (`python -m dist_trainer.service --state FILE`, started
and detached by `dist-trainer cluster up`) joins the cluster's head and runs ONE `fit()` whose
workers loop over a job queue until told to stop.

    train driver --submit--> JobQueue actor <--next_job(i)-- every rank of the warm group
         ^                      (named, in this service's job)        |
         +---- MLflow run (progress, FINISHED/FAILED) <---------------+  rank 0 logs

* The queue is an async named actor (`QUEUE_NAME` in `NAMESPACE`) owned by this process: when
  the service goes, the queue goes, and a waiting driver learns it at once.
* Ranks agree on the next job without a collective: entry i of the queue is immutable once a
  rank has read it, and every rank reads entries by index, so all ranks run the same sequence
  (a job cancelled before any rank read it is a `skip` for all of them; `stop` ends the loop).
  An idle group makes no collective call, so it can wait for days without a gloo timeout.
* Each job runs exactly as `dist_trainer.workers.train_fn` runs one job: a fresh Trainer
  (model, optimizer, seed, data order), its own MLflow run, rank 0 marks it FINISHED.
* A job that raises fails the group (Ray Train ends the `fit()`): this process marks that job's
  run FAILED with the error (a user's ConfigError as one line) and starts a new group for the
  jobs after it. A fresh group is the robust choice: ranks that failed mid-collective cannot be
  trusted to agree on where they are.
* Faults: a job with `scaling.max_failures=N` whose workers fail (a worker killed, a lost node;
  not a config error) is queued again at its place, up to N times, and the new group resumes it
  from its latest checkpoint into the same MLflow run, as Ray Train's own restart does. Every
  group of the service has the same Ray Train run name, so a new group's
  `ray.train.get_checkpoint()` is the latest one any group reported; the job's run id in the
  checkpoint's folder name tells whether it is that job's (dist_trainer.workers). The run's
  attempt tags say why each attempt ended (dist_trainer.attempts).
* A job cancelled while it runs (Ctrl-C in its driver) or a `cluster down` during a job kills
  the group's workers (the same path: the run ends KILLED, a new group starts unless stopping).
* User modules a job imported (outside site-packages and the Python install) are forgotten after
  it, so an edit to your model applies to the next job; dist_trainer itself and libraries stay
  as they were when the group started (restart the service after editing dist_trainer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import os
import signal
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

__all__ = [
    "NAMESPACE",
    "QUEUE_NAME",
    "TERMINAL",
    "JobQueue",
    "main",
    "warm_train_fn",
]

NAMESPACE = "dist_trainer"
QUEUE_NAME = "dist_trainer_jobs"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
_POLL_S = 0.02  # how often a waiting call looks at the queue (inside the actor: cheap)
_RECENT = 20  # finished entries `status` returns


class JobQueue:
    """The service's queue and its view of the warm group (a Ray async actor, see `main`).

    Entries are appended, never removed: index i means the same job to every rank. States:
    QUEUED -> RUNNING (the first rank read it) -> FINISHED | FAILED | KILLED; a job KILLED while
    still QUEUED is skipped by every rank.
    """

    def __init__(self, service_pid: int) -> None:
        self.entries: list[dict[str, Any]] = []
        self.group: dict[str, Any] = {"state": "starting", "generation": 0, "workers": {}}
        self.handles: dict[int, Any] = {}  # rank -> the worker's actor handle (for aborts)
        self.service_pid = service_pid

    # --- drivers -------------------------------------------------------------------------
    async def submit(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append a job; returns its index and how many jobs are ahead of it."""
        ahead = sum(e["state"] in ("QUEUED", "RUNNING") for e in self.entries if e["kind"] == "job")
        index = len(self.entries)
        self.entries.append(
            {
                **entry,
                "index": index,
                "kind": "job",
                "state": "QUEUED",
                "submitted_at": time.time(),
                "started_at": None,
                "ended_at": None,
                "error": None,
                "config_error": False,
                "abort": False,
                "failures": 0,
            }
        )
        return {"index": index, "ahead": ahead}

    async def wait(self, index: int, timeout_s: float) -> dict[str, Any]:
        """Entry `index` once it has ended, or as it is after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        entry = self.entries[index]
        while entry["state"] not in TERMINAL and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S * 5)
        return {**self._public(entry), "group": self._group_view()}

    async def cancel(self, index: int, reason: str) -> str:
        """A queued job is dropped (every rank skips it); a running one is aborted."""
        entry = self.entries[index]
        if entry["state"] == "QUEUED":
            self._end(entry, "KILLED", reason)
            return "cancelled"
        if entry["state"] == "RUNNING":
            entry["abort"], entry["error"] = True, reason
            return "aborting"
        return entry["state"]

    # --- workers -------------------------------------------------------------------------
    async def next_job(self, index: int, timeout_s: float) -> dict[str, Any] | None:
        """What every rank runs as its `index`-th item: a job, `skip` or `stop` (None: wait)."""
        deadline = time.monotonic() + timeout_s
        while index >= len(self.entries):
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(_POLL_S)
        entry = self.entries[index]
        if entry["kind"] == "stop":
            return {"kind": "stop"}
        if entry["started_at"] is None:  # no rank has read it yet: its fate is decided now
            if entry["state"] != "QUEUED":
                return {"kind": "skip"}
            entry["state"], entry["started_at"] = "RUNNING", time.time()
            entry["generation"] = self.group["generation"]
        return {"kind": "job", "payload": entry["payload"], "tracking_uri": entry["tracking_uri"]}

    async def worker_ready(self, generation: int, rank: int, info: dict, handle: Any) -> None:
        if generation != self.group["generation"]:
            return
        self.group["workers"][rank] = info
        self.handles[rank] = handle
        if len(self.group["workers"]) == self.group.get("num_workers") and (
            self.group["state"] == "starting"
        ):
            self.group["state"], self.group["warm_at"] = "warm", time.time()

    async def finish(self, index: int, state: str, error: str | None = None, **extra: Any) -> None:
        """The end of entry `index` (rank 0 for FINISHED; the service for failures)."""
        entry = self.entries[index]
        if entry["state"] not in TERMINAL:
            self._end(entry, state, error)
            entry.update(extra)

    async def retry(self, index: int, error: str) -> bool:
        """Queue a running job again after its workers failed, if its `max_failures` allows:
        the next group resumes it from its latest checkpoint. Returns whether it was queued."""
        entry = self.entries[index]
        if entry["state"] != "RUNNING" or entry["abort"]:
            return False
        if entry["failures"] >= entry.get("max_failures", 0):
            return False
        entry["failures"] += 1
        entry["state"], entry["started_at"], entry["error"] = "QUEUED", None, error
        return True

    # --- the service ---------------------------------------------------------------------
    async def new_group(self, generation: int, info: dict[str, Any]) -> int:
        """A new worker group starts: returns the index its ranks start reading at."""
        self.group = {
            **info,
            "state": "starting",
            "generation": generation,
            "workers": {},
            "started_at": time.time(),
        }
        self.handles = {}
        pending = [e["index"] for e in self.entries if e["state"] not in TERMINAL]
        return pending[0] if pending else len(self.entries)

    async def set_group_state(self, state: str, error: str | None = None) -> None:
        self.group["state"] = state
        if error:
            self.group["error"] = error

    async def running(self) -> dict[str, Any] | None:
        """The job the group is running (read by a rank, not ended), if any."""
        for entry in self.entries:
            if entry["kind"] == "job" and entry["state"] == "RUNNING":
                return self._public(entry)
        return None

    async def abort_requested(self) -> bool:
        return any(e["state"] == "RUNNING" and e["abort"] for e in self.entries)

    async def worker_handles(self) -> list[Any]:
        return list(self.handles.values())

    async def stop(self, reason: str) -> list[dict[str, Any]]:
        """No more jobs: queued ones end KILLED (returned, to close their runs), then `stop`."""
        killed = []
        for entry in self.entries:
            if entry["kind"] == "job" and entry["state"] == "QUEUED":
                self._end(entry, "KILLED", reason)
                killed.append(self._public(entry))
        if not any(e["kind"] == "stop" for e in self.entries):
            self.entries.append(
                {"index": len(self.entries), "kind": "stop", "state": "QUEUED", "abort": False}
            )
        return killed

    async def status(self) -> dict[str, Any]:
        jobs = [self._public(e) for e in self.entries if e["kind"] == "job"]
        return {
            "service_pid": self.service_pid,
            "group": self._group_view(),
            "running": [j for j in jobs if j["state"] == "RUNNING"],
            "queued": [j for j in jobs if j["state"] == "QUEUED"],
            "recent": [j for j in jobs if j["state"] in TERMINAL][-_RECENT:],
            "submitted": len(jobs),
        }

    # --- helpers -------------------------------------------------------------------------
    def _end(self, entry: dict[str, Any], state: str, error: str | None) -> None:
        entry["state"], entry["ended_at"] = state, time.time()
        if error:
            entry["error"] = error

    def _group_view(self) -> dict[str, Any]:
        return {**self.group, "workers": dict(sorted(self.group["workers"].items()))}

    @staticmethod
    def _public(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entry.items() if k != "payload"}


# --- the workers -----------------------------------------------------------------------------


def _prewarm(device: Any) -> None:
    """What every job's first step would otherwise pay for: imports and DDP's first wrap."""
    import torch
    import torch.distributed as dist
    from mlflow.entities import Metric, Param  # noqa: F401 - rank 0's logger
    from mlflow.tracking import MlflowClient  # noqa: F401
    from torch.nn.parallel import DistributedDataParallel

    import dist_trainer.loop  # noqa: F401 - the loop and everything it builds from

    with contextlib.suppress(ImportError):  # host metrics (tracking.system_metrics, default)
        import mlflow.system_metrics.system_metrics_monitor  # noqa: F401
    # One tiny DDP step: its first construction imports torch._dynamo and exercises the
    # process group (gloo/NCCL), both measurable seconds on a small machine.
    model = torch.nn.Linear(4, 1).to(device)
    ddp = DistributedDataParallel(model) if dist.is_initialized() else model
    ddp(torch.ones(2, 4, device=device)).sum().backward()
    del ddp, model
    gc.collect()


def _library_roots() -> tuple[str, ...]:
    """Where modules that a job may import but must not be forgotten live."""
    import dist_trainer

    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths |= {sys.prefix, sys.base_prefix, str(Path(dist_trainer.__file__).resolve().parent)}
    return tuple(str(Path(p).resolve()) for p in paths if p)


def forget_user_modules(before: set[str], roots: tuple[str, ...]) -> list[str]:
    """Drop the modules imported since `before` that live outside `roots` (the user's code), so
    the next job imports them afresh; returns their names."""
    dropped = []
    for name in set(sys.modules) - before:
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if not file:
            continue
        if not str(Path(file).resolve()).startswith(roots):
            del sys.modules[name]
            dropped.append(name)
    if dropped:
        importlib.invalidate_caches()
    return sorted(dropped)


def warm_train_fn(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry of the warm group: jobs from the queue until `stop`."""
    import ray
    import ray.train
    from ray.train.torch import get_device

    from dist_trainer import workers

    context = ray.train.get_context()
    rank = context.get_world_rank()
    queue = ray.get_actor(QUEUE_NAME, namespace=NAMESPACE)
    _prewarm(get_device())
    info = {
        "pid": os.getpid(),
        "node_ip": ray.util.get_node_ip_address(),
        "local_rank": context.get_local_rank(),
    }
    handle = ray.get_runtime_context().current_actor
    ray.get(queue.worker_ready.remote(config["generation"], rank, info, handle))
    roots = _library_roots()
    index = config["start_index"]
    while True:
        item = ray.get(queue.next_job.remote(index, 30.0))
        if item is None:  # nothing yet: ask again (no collective while idle)
            continue
        index += 1
        if item["kind"] == "stop":
            return
        if item["kind"] == "skip":
            continue
        before = set(sys.modules)
        workers.train_fn({"jobs": [item["payload"]], "tracking_uri": item["tracking_uri"]})
        if rank == 0:
            ray.get(queue.finish.remote(index - 1, "FINISHED"))
        forget_user_modules(before, roots)


# --- the service process ---------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [dist-trainer service] {message}", flush=True)


def _group_job(group: dict[str, Any]) -> Any:
    """The JobConfig whose `scaling` the warm group is started with (run_group reads it)."""
    from dist_trainer.config import load_config, resolve_config

    return resolve_config(
        load_config(
            [
                f"scaling.num_workers={group['num_workers']}",
                f"scaling.cpus_per_worker={group['cpus_per_worker']}",
                f"scaling.use_gpu={str(group['use_gpu']).lower()}",
                f"scaling.storage_path={group['storage_path']}",
                "scaling.max_failures=0",
            ]
        )
    )


def _close_run(entry: dict[str, Any], state: str, error: str | None) -> None:
    """End a job's MLflow run from the service (never raises: the store may be gone)."""
    from dist_trainer import tracking

    try:
        tracking.finish_job_run(entry["tracking_uri"], entry["run_id"], state, error)
    except Exception as exc:  # noqa: BLE001
        _log(f"could not mark run {entry.get('run_id')} {state}: {exc}")


def _record_attempt_end(entry: dict[str, Any], error: BaseException) -> None:
    """Why the job's attempt ended, in its run's attempt tags (never raises)."""
    from dist_trainer.attempts import describe_failure
    from dist_trainer.ray_callbacks import FailureRecorder

    failures = getattr(error, "worker_failures", None)
    reason = describe_failure(failures) if failures else f"worker group failed: {error!r}"
    FailureRecorder(entry["tracking_uri"], [entry["run_id"]]).record(reason)


def _kill_workers(queue: Any) -> None:
    import ray

    for handle in ray.get(queue.worker_handles.remote()):
        try:
            ray.kill(handle, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already gone
            _log(f"kill worker: {exc}")


def _describe_failure(exc: BaseException) -> tuple[str, bool]:
    """One line for the job's run, and whether it is the user's config error."""
    from dist_trainer import jobs

    user_error = jobs.config_error_in(exc)
    if user_error is not None:
        return str(user_error), True
    lines = jobs.error_text(exc).strip().splitlines()
    return (lines[-1] if lines else type(exc).__name__), False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_trainer.service")
    parser.add_argument("--state", required=True, help="the cluster state file (cluster.json)")
    args = parser.parse_args(argv)
    state = json.loads(Path(args.state).read_text())
    group = state["group"]

    import ray

    from dist_trainer import groups
    from dist_trainer.ray_cluster import RAY_DRIVER_ENV, RAY_TRAIN_ENV

    for key, value in {**RAY_DRIVER_ENV, "RAY_AUTH_MODE": state["auth_mode"]}.items():
        os.environ.setdefault(key, value)
    ray.init(
        address=state["address"],
        namespace=NAMESPACE,
        log_to_driver=True,
        runtime_env={"env_vars": {k: os.environ.get(k, v) for k, v in RAY_TRAIN_ENV.items()}},
    )
    # Owned by this process (not detached): when the service ends, so does its queue.
    queue = (
        ray.remote(num_cpus=0)(JobQueue)
        .options(name=QUEUE_NAME, namespace=NAMESPACE, max_concurrency=1000)
        .remote(os.getpid())
    )
    ray.get(queue.status.remote())
    if group["use_gpu"] == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) >= group["num_workers"]
    else:
        use_gpu = bool(group["use_gpu"])
    job = _group_job({**group, "use_gpu": use_gpu})
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _log(f"joined {state['address']}; warm group: {group['num_workers']} workers, GPU={use_gpu}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    generation, failures_before_warm = 0, 0
    while not stopping.is_set():
        generation += 1
        info = {
            "num_workers": group["num_workers"],
            "cpus_per_worker": group["cpus_per_worker"],
            "use_gpu": use_gpu,
            "service_pid": os.getpid(),
        }
        start = ray.get(queue.new_group.remote(generation, info))
        _log(f"starting worker group {generation} at queue index {start}")
        outcome: dict[str, BaseException | None] = {}

        def fit(start: int = start, generation: int = generation, outcome: dict = outcome) -> None:
            try:
                groups.run_group(
                    job,
                    warm_train_fn,
                    {"start_index": start, "generation": generation},
                    # One name for every group: a new group restores the latest checkpoint
                    # (a job queued again after a failure resumes from it).
                    f"dist_trainer-warm-{stamp}",
                    "",
                    use_gpu,
                )
                outcome["error"] = None
            except BaseException as exc:  # noqa: BLE001 - handled below
                outcome["error"] = exc

        # fit() runs in a thread (Ray Train supports it: Tune does) so that this thread stays
        # free for signals and for aborting a cancelled job.
        thread = threading.Thread(target=fit, name="warm-group", daemon=True)
        thread.start()
        stop_sent = aborted = False
        while thread.is_alive():
            thread.join(0.5)
            if stopping.is_set() and not stop_sent:
                stop_sent = True
                reason = "the service was stopped (dist-trainer cluster down)"
                for entry in ray.get(queue.stop.remote(reason)):
                    _close_run(entry, "KILLED", reason)
                running = ray.get(queue.running.remote())
                if running is not None:
                    ray.get(queue.finish.remote(running["index"], "KILLED", reason))
                    _close_run(running, "KILLED", reason)
                    aborted = True
                    _kill_workers(queue)
            if not aborted and ray.get(queue.abort_requested.remote()):
                aborted = True
                _log("a running job was cancelled: ending its worker group")
                ray.get(queue.set_group_state.remote("restarting"))
                _kill_workers(queue)
        error = outcome.get("error")
        if error is None:
            _log(f"worker group {generation} ended")
            break
        was_warm = bool(ray.get(queue.status.remote())["group"].get("warm_at"))
        running = ray.get(queue.running.remote())
        if running is not None:
            if running.get("abort"):
                state_, text, user = "KILLED", running.get("error") or "cancelled", False
            else:
                text, user = _describe_failure(error)
                state_ = "FAILED"
            _record_attempt_end(running, error)
            if (
                state_ == "FAILED"
                and not user
                and ray.get(queue.retry.remote(running["index"], text))
            ):
                _log(
                    f"job {running['index']} ({running.get('run_id')}): its workers failed "
                    f"({text}); failure {running['failures'] + 1} of scaling.max_failures="
                    f"{running.get('max_failures', 0)}: resuming it in a new group"
                )
            else:
                ray.get(queue.finish.remote(running["index"], state_, text, config_error=user))
                _close_run(running, state_, text)
                _log(f"job {running['index']} ({running.get('run_id')}) {state_}: {text}")
        elif not stopping.is_set():
            _log(f"worker group {generation} failed: {_describe_failure(error)[0]}")
        failures_before_warm = 0 if was_warm else failures_before_warm + 1
        if failures_before_warm >= 3:
            text = _describe_failure(error)[0]
            ray.get(queue.set_group_state.remote("failed", text))
            _log(f"the worker group failed to start 3 times; giving up: {text}")
            for entry in ray.get(queue.stop.remote(f"the warm worker group cannot start: {text}")):
                _close_run(entry, "FAILED", f"the warm worker group cannot start: {text}")
            return 1
        if not stopping.is_set():
            ray.get(queue.set_group_state.remote("restarting"))
            time.sleep(1.0 if was_warm else 5.0)
    ray.get(queue.set_group_state.remote("stopped"))
    _log("stopped")
    return 0


if __name__ == "__main__":
    # Run under its package name, so Ray pickles JobQueue and warm_train_fn by reference.
    from dist_trainer.service import main as _main

    sys.exit(_main())
