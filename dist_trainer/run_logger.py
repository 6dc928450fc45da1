"""What a worker uses to write into its job's run, from a background thread.

The driver creates the run (dist_trainer.tracking.start_job_run) and hands its id to the
workers; rank 0 logs training metrics into it through a `RunLogger`, whose background thread
batches writes so the training step never waits on the tracking store; the other ranks get a
`NullLogger`. `SystemMetrics` adds MLflow's own host metrics, per node. Each attempt at
the job is counted and described in the run's tags (dist_trainer.attempts), not its params.

A resumed job replays the steps between its checkpoint and the failure. What the run already
holds stands: a `RunLogger` only appends. Before its first write, and again at each
`start_attempt()`, it reads per metric key the last step the run has logged (`logged_steps`)
and from then on drops points at steps up to it, and params the run already has; so every step
appears at most once in every metric series, in increasing order. It reads the run whether or
not the attempt resumed from a checkpoint: a worker killed before the first checkpoint leaves
steps in the run that the next attempt, starting from step 0, replays. The rule
is per key, not the max over keys: a key whose last point never reached the store (the failure
came between two flushes, or the key is only logged at epoch ends, like val/*) is filled in by
the replay, and no key is cut short by another's later step. `system/*` keys are MLflow's own
(SystemMetrics, counted in samples, not steps); its monitor resumes after their last step itself.

A write the store refuses for good (not an outage: a param changing value, a run deleted) never
fails training: the logger isolates the refused param or metric key, drops only that, says so in
one warning line, and at close() names what it dropped in the run's `dist_trainer.refused_writes`
tag, which the driver's end-of-job summary prints.

An outage of the tracking server does not stop training nor lose metrics: `RunLogger` keeps
what it could not write and retries it, in order, with backoff; what is still unsent when it
closes goes to `outputs/unsent_metrics/<run_id>.jsonl`, which `dist-trainer import-metrics FILE`
(`import_unsent`) writes into the run later, skipping steps the run already holds.

Why not MLflow's own asynchronous logging (`log_batch(..., synchronous=False)`,
MLFLOW_ENABLE_ASYNC_LOGGING): it batches in the background too, but a batch that fails after
MLflow's HTTP retries is logged as an error and dropped (mlflow.utils.async_logging: the
exception goes to the batch's future, nothing retries it), and there is no fallback file. With
a real `mlflow server` killed and restarted mid-run, it lost 28 of 40 steps where RunLogger lost
none (tests/test_outage.py measures both and fails the day MLflow keeps them). MLflow's own
background work is used where losing a point is harmless: its system-metrics monitor
(`SystemMetrics`).

mlflow is imported lazily: in a worker the logger thread pays for the import while the first
steps already run.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dist_trainer import attempts
from dist_trainer.tracking import (
    MAX_PARAMS_PER_BATCH,
    REFUSED_TAG,
    URI_USERINFO,
    logged_steps_of,
    mlflow_client,
    normalize_tracking_uri,
    redact_params,
    redact_uri,
)

__all__ = [
    "NullLogger",
    "RunLogger",
    "SystemMetrics",
    "UNSENT_DIR",
    "import_metrics_main",
    "import_unsent",
]

log = logging.getLogger(__name__)

# MLflow's limit per log_batch call on metrics (mlflow/utils/validation.py); the params one is in
# tracking.
_MAX_METRICS_PER_BATCH = 1000


class SystemMetrics:
    """MLflow's own host metrics (CPU, memory, disk, network; GPU via NVML) for one node.

    Logged as `system/<node_id>/...` into the job's run. Started from a thread so the worker's
    first step does not wait for `import mlflow`.

    Args:
        uri: tracking URI.
        run_id: the job's run.
        node_id: the node's name in the metric keys (e.g. "node0").
        interval_s: seconds between samples.
    """

    def __init__(self, uri: str, run_id: str, node_id: str, interval_s: float = 10.0) -> None:
        self._monitor = None
        self._lock = threading.Lock()
        self._stopped = False
        args = (uri, run_id, node_id, interval_s)
        threading.Thread(target=self._start, args=args, name="mlflow-system", daemon=True).start()

    def _start(self, uri: str, run_id: str, node_id: str, interval_s: float) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                run_id,
                sampling_interval=interval_s,
                node_id=node_id,
                tracking_uri=uri,
                resume_logging=True,
            )
            with self._lock:
                if self._stopped:
                    return
                monitor.start()
                self._monitor = monitor
        except Exception as exc:  # noqa: BLE001 - host metrics are a nicety, never fatal
            log.info("MLflow system metrics are off: %s", exc)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._monitor is not None:
                self._monitor.finish()


class NullLogger:
    """What ranks other than 0 use: accepts everything, writes nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def resume(self) -> None:
        """The job resumed from a checkpoint into a run that may hold its steps already."""

    def start_attempt(self, from_step: int, details: dict[str, Any]) -> None:
        """An attempt at the job starts at `from_step` (see RunLogger.start_attempt)."""

    def end_attempt(self, outcome: str) -> None:
        """How the attempt ended (see RunLogger.end_attempt)."""

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until what was logged is in the store (see RunLogger.flush)."""
        return True

    def close(self) -> None:
        pass


# MLflow's client retries a failed HTTP request itself, 7 times with backoff over ~4 minutes,
# each try waiting up to 120 s. The logger retries on its own terms (backoff, backlog, fallback
# file), so its requests should fail fast. MLflow reads these from the environment at every
# request and has no per-client setting: they are process-wide defaults, set (setdefault, a
# user's own values win) by a RunLogger's thread before its first request to an HTTP store.
# Other MLflow clients in that process (SystemMetrics in a worker; the driver of bench-comm)
# then fail fast too.
_HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}

# Errors by which the store refuses the data itself: retrying cannot help.
_PERMANENT_ERROR_CODES = frozenset(
    {
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "INVALID_PARAMETER_VALUE",
        "INVALID_STATE",
        "BAD_REQUEST",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "ENDPOINT_NOT_FOUND",
        "NOT_IMPLEMENTED",
    }
)

UNSENT_DIR = Path("outputs") / "unsent_metrics"
"""Where a RunLogger writes what it could not deliver (relative to the working directory)."""


def _is_transient(exc: BaseException) -> bool:
    """An outage (unreachable, timed out, 5xx, locked) rather than the store refusing the data."""
    code = getattr(exc, "error_code", None)
    if isinstance(code, str):  # MlflowException and RestException
        return code not in _PERMANENT_ERROR_CODES
    return isinstance(exc, (OSError, TimeoutError, ConnectionError))


class _Batch:
    """Metric points and params already filtered by the resume rule, not yet written."""

    def __init__(
        self,
        metrics: list[tuple[str, float, int, int]] | None = None,
        params: list[tuple[str, str]] | None = None,
    ) -> None:
        self.metrics = metrics or []
        self.params = params or []

    def split(self) -> list[_Batch]:
        """Each param alone, and the metrics one key at a time: the parts to retry when the
        store refuses the whole, so that only what it refuses is dropped."""
        keys = dict.fromkeys(point[0] for point in self.metrics)
        by_key = [_Batch(metrics=[p for p in self.metrics if p[0] == k]) for k in keys]
        return [_Batch(params=[param]) for param in self.params] + by_key

    def describe(self) -> str:
        if len(self.params) == 1 and not self.metrics:
            return f"param {self.params[0][0]}"
        if self.metrics and not self.params and len({p[0] for p in self.metrics}) == 1:
            return f"metric {self.metrics[0][0]} ({len(self.metrics)} points)"
        return f"{len(self.params)} params and {len(self.metrics)} metric points"


class RunLogger(NullLogger):
    """Writes to one MLflow run from a background thread, in batches.

    Metrics carry the wall-clock time at which they were measured (not when they were written),
    so MLflow's timestamps tell when each step happened.

    It only appends (see the module docstring): per metric key, a point at a step the run
    already holds, or below it, is dropped (the first attempt's point stands), and so is a param
    the run already has. What the run holds is read before the first write and again at each
    `start_attempt()` / `resume()`. `dropped` counts the points dropped.

    Outages: when a write fails because the store is unreachable (or answers 5xx, times out,
    is locked), what failed stays in an in-memory backlog, in order, and the thread retries it
    with backoff (`retry_initial_s` doubling to `retry_max_s`) while training goes on; the
    calls above never wait on the store. Rewriting a batch is harmless (same points, same
    timestamps: MLflow keeps a point once). Past `max_backlog` pending points, the backlog is
    written to the fallback file instead of growing. `close()` keeps retrying for up to
    `flush_timeout_s`; what is still unsent then goes to `<fallback_dir>/<run_id>.jsonl`
    (default `outputs/unsent_metrics/` under the working directory at construction), and
    close() logs one warning naming it and the command that imports it:
    `dist-trainer import-metrics FILE`. An outage never makes close() raise.

    Errors by which the store refuses the data (the run does not exist, a param changes value,
    no permission) are not retried, and never fail training: the logger retries the refused
    batch one param and one metric key at a time, drops only the parts the store refuses
    (listed in `refused`), warns once, and close() records them in the run's REFUSED_TAG.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        flush_interval_s: float = 1.0,
        *,
        flush_timeout_s: float = 60.0,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 30.0,
        max_backlog: int = 200_000,
        fallback_dir: str | os.PathLike | None = None,
    ) -> None:
        self.uri = uri
        self.run_id = run_id
        self._flush_interval_s = flush_interval_s
        self._flush_timeout_s = flush_timeout_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._max_backlog = max_backlog
        self.fallback_path = Path(fallback_dir or UNSENT_DIR).resolve() / f"{run_id}.jsonl"
        self.unsent = 0
        """Points and params written to the fallback file instead of the run."""
        self.refused: list[str] = []
        """What the store refused, one line each (`param worker.x: <its error>`)."""
        self.attempt: int | None = None
        """This attempt's number (dist_trainer.attempts), once start_attempt() has run."""
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        # Only the logger thread touches what follows (until close() has joined it).
        self._backlog: collections.deque = collections.deque()
        self._stopping = False
        # Read from the store before the first write: the last step per key, the params held.
        self._last_step: dict[str, int] | None = None
        self._params_held: set[str] | None = None
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log_metrics(
        self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None
    ) -> None:
        """Queue the points of `step`, stamped `timestamp_ms` (default: now)."""
        now_ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        self._queue.put(("metrics", [(k, float(v), now_ms, step) for k, v in metrics.items()]))

    def log_params(self, params: dict[str, Any]) -> None:
        self._queue.put(("params", redact_params(params)))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._queue.put(("artifact", (local_path, artifact_path)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._queue.put(("text", (text, artifact_file)))

    def resume(self) -> None:
        """Read again what the run holds before writing what follows: points queued after this
        call are filtered against the store as the failure left it."""
        self._queue.put(("resume", None))

    def start_attempt(self, from_step: int, details: dict[str, Any]) -> None:
        """An attempt at the job starts at optimizer step `from_step` (0, or the checkpoint it
        resumed from): read what the run holds (as `resume()`), then count and describe the
        attempt in the run's tags (`details`: host, pid, ...; dist_trainer.attempts)."""
        self._queue.put(("resume", None))
        self._queue.put(("attempt", (from_step, details)))

    def end_attempt(self, outcome: str) -> None:
        """How this attempt ended (`finished at step 24`, `failed at step 13: ...`); an end
        Ray Train's controller recorded first stands."""
        self._queue.put(("attempt_end", outcome))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything logged so far is in the store (or `timeout_s` passed: the
        store is unreachable, and the backlog is retried as usual). Returns whether it is.

        Called before each checkpoint: a later attempt resumes from the checkpoint and replays
        only the steps after it, so the steps up to it must be in the run already, or a worker
        killed soon after would lose them for good."""
        if not self._thread.is_alive():
            return False
        done = threading.Event()
        self._queue.put(("flush", done))
        return done.wait(timeout_s)

    def close(self) -> None:
        """Flush everything queued (retrying for up to `flush_timeout_s`), then stop.

        What could not be delivered is in `fallback_path` (one warning says so); what the store
        refused is in `refused` and the run's REFUSED_TAG. Never raises."""
        self._queue.put(("stop", None))
        self._thread.join()
        if self.unsent:
            log.warning(
                "MLflow at %s was unreachable: %d metric points/params of run %s are in %s "
                "(host %s); import them with: dist-trainer import-metrics %s",
                redact_uri(self.uri),
                self.unsent,
                self.run_id,
                self.fallback_path,
                socket.gethostname(),
                self.fallback_path,
            )
        if self._error is not None:
            log.error("MLflow logging to %s failed: %s", redact_uri(self.uri), self._error)
        if self.refused:
            log.warning(
                "MLflow refused %d write(s) for run %s (dropped; training was not affected): %s",
                len(self.refused),
                self.run_id,
                "; ".join(self.refused)[:1000],
            )
        if self.dropped:
            log.info(
                "resumed run %s: %d metric points at steps it already held were not logged again",
                self.run_id,
                self.dropped,
            )

    def _new_points(self, payload: list[tuple[str, float, int, int]]) -> list:
        """The points past each key's last step in the run (and in this logger's writes)."""
        if self._last_step is None:
            return payload
        kept = []
        for point in payload:
            key, step = point[0], point[3]
            if step <= self._last_step.get(key, step - 1):
                self.dropped += 1
                continue
            self._last_step[key] = step
            kept.append(point)
        return kept

    def _new_params(self, payload: dict[str, str]) -> dict[str, str]:
        """The params the run does not hold yet: MLflow refuses to change a param, and a replay
        logs its params again; the first value stands."""
        if self._params_held is None:
            return payload
        new = {k: v for k, v in payload.items() if k not in self._params_held}
        self._params_held.update(new)
        return new

    def _start_resumed(self, client: Any) -> None:
        run = client.get_run(self.run_id)
        self._last_step = logged_steps_of(client, self.run_id, run)
        self._params_held = set(run.data.params)

    def _take(self, item: tuple[str, Any]) -> bool:
        """Put a queued item in the backlog; True if it asks to write now (flush, close)."""
        if item[0] == "stop":
            self._stopping = True
            return True
        self._backlog.append(item)
        return item[0] == "flush"

    def _gather(self, until: float | None) -> None:
        """Move queued work into the backlog: wait for the first item (when idle), then collect
        what arrives until `until` (or for one flush interval), or until close()."""
        if until is None:
            if self._take(self._queue.get()):
                return
            until = time.monotonic() + self._flush_interval_s
        while not self._stopping:
            try:
                if self._take(self._queue.get(timeout=max(0.0, until - time.monotonic()))):
                    return
            except queue.Empty:
                return

    def _drain(self, client: Any) -> None:
        """Write the backlog in order; on an error the failed item stays first (and raises)."""
        from mlflow.entities import Metric, Param

        backlog = self._backlog
        while backlog:
            kind, payload = backlog[0]
            if kind == "resume":
                self._start_resumed(client)
                backlog.popleft()
            elif kind == "flush":  # everything queued before it is in the store
                payload.set()
                backlog.popleft()
            elif kind == "attempt":
                self.attempt = attempts.begin_attempt(client, self.run_id, *payload)
                backlog.popleft()
            elif kind == "attempt_end":
                if self.attempt is not None:
                    attempts.end_attempt(client, self.run_id, self.attempt, payload, False)
                backlog.popleft()
            elif kind in ("metrics", "params"):
                if self._last_step is None:  # what an earlier attempt left in the run stands
                    self._start_resumed(client)
                # Filter once, into one batch: a retry must not filter against its own writes.
                batch = _Batch()
                while backlog and backlog[0][0] in ("metrics", "params"):
                    kind, payload = backlog.popleft()
                    if kind == "metrics":
                        batch.metrics.extend(self._new_points(payload))
                    else:
                        batch.params.extend(self._new_params(payload).items())
                backlog.appendleft(("batch", batch))
            elif kind == "batch":
                while payload.params:  # written chunks leave the batch: a retry resends the rest
                    chunk = payload.params[:MAX_PARAMS_PER_BATCH]
                    client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
                    del payload.params[: len(chunk)]
                while payload.metrics:
                    chunk = payload.metrics[:_MAX_METRICS_PER_BATCH]
                    client.log_batch(self.run_id, metrics=[Metric(*p) for p in chunk])
                    del payload.metrics[: len(chunk)]
                backlog.popleft()
            elif kind == "artifact":
                client.log_artifact(self.run_id, payload[0], payload[1])
                backlog.popleft()
            elif kind == "text":
                client.log_text(self.run_id, payload[0], payload[1])
                backlog.popleft()

    def _refuse(self, exc: BaseException) -> None:
        """The store refused the backlog's first item for good: retry a batch in parts, so that
        only the param or metric key it refuses is dropped; drop anything else."""
        kind, payload = self._backlog.popleft()
        if kind == "batch":
            parts = payload.split()
            if len(parts) > 1:
                self._backlog.extendleft(("batch", part) for part in reversed(parts))
                return
            what = payload.describe()
        elif kind == "metrics":
            what = (
                f"metrics {', '.join(dict.fromkeys(p[0] for p in payload))} at step {payload[0][3]}"
            )
        elif kind == "params":
            what = f"params {', '.join(payload)}"
        else:
            what = kind
        line = f"{what}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc!r}"
        if not self.refused:  # one line; close() sums them up
            log.warning("MLflow refused a write, dropped it (training goes on): %s", line)
        self.refused.append(line)

    def _record_refused(self, client: Any) -> None:
        """Name what was dropped in the run's tags, for the driver's end-of-job summary."""
        if not self.refused:
            return
        text = f"{len(self.refused)} write(s) refused and dropped: " + "; ".join(self.refused)
        try:
            client.set_tag(self.run_id, REFUSED_TAG, text[:5000])
        except Exception as exc:  # noqa: BLE001 - e.g. the run itself is gone
            log.info("could not tag run %s with what was refused: %s", self.run_id, exc)

    def _backlog_points(self) -> int:
        count = 0
        for kind, payload in self._backlog:
            if kind == "batch":
                count += len(payload.metrics) + len(payload.params)
            elif kind in ("metrics", "params"):
                count += len(payload)
        return count

    def _fall_back(self, everything: bool) -> None:
        """Append the backlog's points and params (and with `everything` its artifacts) to the
        fallback file and take them out of the backlog."""
        kept: collections.deque = collections.deque()
        lines = []
        head = {"run_id": self.run_id, "tracking_uri": URI_USERINFO.sub(r"\g<scheme>", self.uri)}
        for kind, payload in self._backlog:
            if kind in ("batch", "metrics", "params"):
                metrics = payload.metrics if kind == "batch" else []
                params = payload.params if kind == "batch" else []
                if kind == "metrics":
                    metrics = payload
                elif kind == "params":
                    params = list(payload.items())
                # Unfiltered points (queued behind a resume() that never read the store) are
                # deduplicated by the import, which skips steps the run holds.
                for key, value, timestamp, step in metrics:
                    lines.append({**head, "kind": "metric", "key": key, "value": value,
                                  "timestamp": timestamp, "step": step})  # fmt: skip
                for key, value in params:
                    lines.append({**head, "kind": "param", "key": key, "value": value})
                self.unsent += len(metrics) + len(params)
            elif everything and kind == "artifact":
                lines.append({**head, "kind": "artifact", "local_path": payload[0],
                              "artifact_path": payload[1]})  # fmt: skip
            elif everything and kind == "text":
                lines.append({**head, "kind": "text", "text": payload[0],
                              "artifact_file": payload[1]})  # fmt: skip
            elif not everything:
                kept.append((kind, payload))
        self._backlog = kept
        if not lines:
            return
        try:
            self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
            with self.fallback_path.open("a", encoding="utf-8") as out:
                for line in lines:
                    out.write(json.dumps(line) + "\n")
        except OSError as exc:
            log.error("could not write unsent MLflow data to %s: %s", self.fallback_path, exc)
            self._error = self._error or exc

    def _run(self) -> None:
        try:
            if self.uri.startswith(("http://", "https://")):
                for name, value in _HTTP_RETRY_DEFAULTS.items():
                    os.environ.setdefault(name, value)
            client = mlflow_client(self.uri)
        except BaseException as exc:  # noqa: BLE001 - reported from close()
            self._error = exc
            return
        failures = 0
        next_try = 0.0  # monotonic time of the next attempt while the store is unreachable
        closing_by: float | None = None  # after close(): retry until then, then fall back
        while True:
            if closing_by is None:
                if not self._backlog:
                    self._gather(None)
                else:
                    self._gather(next_try if failures else time.monotonic())
                if self._stopping:
                    closing_by = time.monotonic() + self._flush_timeout_s
                    next_try = 0.0  # training is over: try at once
            if not self._backlog:
                if closing_by is not None:
                    self._record_refused(client)
                    return
                continue
            now = time.monotonic()
            if closing_by is not None:
                if now >= closing_by:
                    self._fall_back(everything=True)
                    return
                if now < next_try:
                    time.sleep(min(next_try, closing_by) - now)
                    continue
            try:
                self._drain(client)
            except BaseException as exc:  # noqa: BLE001 - training goes on
                if not _is_transient(exc):
                    self._refuse(exc)
                    continue
                failures += 1
                delay = min(self._retry_initial_s * 2 ** (failures - 1), self._retry_max_s)
                next_try = time.monotonic() + delay
                pending = self._backlog_points()
                (log.warning if failures == 1 else log.info)(
                    "MLflow logging failed (%s); %d points/params kept, retrying in %.0f s",
                    str(exc).splitlines()[0][:300],
                    pending,
                    delay,
                )
                if pending > self._max_backlog:
                    self._fall_back(everything=False)
                    log.warning(
                        "MLflow unreachable: %d points/params moved to %s",
                        pending,
                        self.fallback_path,
                    )
                continue
            if failures:
                log.warning("MLflow reachable again after %d failed attempts", failures)
                failures, next_try = 0, 0.0


def import_unsent(path: str | os.PathLike, tracking_uri: str | None = None) -> dict[str, int]:
    """Write a RunLogger's fallback file (`<run_id>.jsonl`) into its run, then rename it to
    `<run_id>.jsonl.imported`; return how many points/params were written and skipped.

    Per metric key, a point at a step the run already holds is skipped (the first value
    stands, as after resume()), as is a param the run already has, so importing twice, or a
    file whose job later resumed and logged the same steps, writes every step once.
    `tracking_uri` overrides the file's (which has any credentials removed).
    """
    from mlflow.entities import Metric, Param

    path = Path(path)
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    counts = {"metrics": 0, "params": 0, "artifacts": 0, "skipped": 0}
    by_run: dict[tuple[str, str], list[dict]] = {}
    for entry in entries:
        uri = normalize_tracking_uri(tracking_uri or entry["tracking_uri"])
        by_run.setdefault((uri, entry["run_id"]), []).append(entry)
    for (uri, run_id), items in by_run.items():
        client = mlflow_client(uri)
        run = client.get_run(run_id)
        params_held = set(run.data.params)
        keys = {e["key"] for e in items if e["kind"] == "metric"}
        held = {k: {int(m.step) for m in client.get_metric_history(run_id, k)} for k in keys}
        metrics, params = [], []
        for e in items:
            if e["kind"] == "metric":
                if int(e["step"]) in held[e["key"]]:
                    counts["skipped"] += 1
                    continue
                held[e["key"]].add(int(e["step"]))
                metrics.append(Metric(e["key"], float(e["value"]), e["timestamp"], e["step"]))
            elif e["kind"] == "param":
                if e["key"] in params_held:
                    counts["skipped"] += 1
                    continue
                params_held.add(e["key"])
                params.append(Param(e["key"], e["value"]))
            elif e["kind"] == "artifact":
                if Path(e["local_path"]).exists():
                    client.log_artifact(run_id, e["local_path"], e["artifact_path"])
                    counts["artifacts"] += 1
                else:
                    log.warning("artifact %s no longer exists: not logged", e["local_path"])
            elif e["kind"] == "text":
                client.log_text(run_id, e["text"], e["artifact_file"])
                counts["artifacts"] += 1
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[i : i + MAX_PARAMS_PER_BATCH])
        for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _MAX_METRICS_PER_BATCH])
        counts["metrics"] += len(metrics)
        counts["params"] += len(params)
    path.rename(path.with_name(path.name + ".imported"))
    return counts


def import_metrics_main(argv: list[str]) -> int:
    """`dist-trainer import-metrics FILE [--tracking-uri URI]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="dist-trainer import-metrics",
        description="Write what a job could not send to MLflow (a file under "
        f"{UNSENT_DIR}/, named by close()'s warning) into its run.",
    )
    parser.add_argument("file", help="the <run_id>.jsonl file")
    parser.add_argument("--tracking-uri", help="the store (default: the one the file names)")
    args = parser.parse_args(argv)
    try:
        counts = import_unsent(args.file, args.tracking_uri)
    except Exception as exc:  # noqa: BLE001 - one line for the user, no traceback
        print(f"dist-trainer import-metrics: {exc}", file=sys.stderr)
        return 1
    print(
        f"imported {counts['metrics']} metric points, {counts['params']} params, "
        f"{counts['artifacts']} artifacts; skipped {counts['skipped']} the run already held; "
        f"renamed {args.file} to {args.file}.imported"
    )
    return 0
