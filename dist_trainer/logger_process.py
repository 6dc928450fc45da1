"""Rank 0's MLflow writer in a process of its own: the training step never shares the GIL with it.

Writing a metric point into MLflow's sqlite store costs ~100 µs of CPU (SQLAlchemy's ORM, and
the latest-metrics table it updates per key). In a thread of the training process that time is
taken under the GIL, so it comes off the training step: at 1,200 steps/s with 10 keys logged
every 10 steps, about 120 µs per step (scripts/bench_host.py). In a child process it runs on
another core, and the training process only pickles the log calls onto a socket, a batch at a
time (below). The child also keeps `import mlflow` (seconds of CPU) out of the worker.

`LoggerProcess` has RunLogger's interface and runs a RunLogger in the child, so the rules are
RunLogger's (dist_trainer.run_logger): append-only, outages retried with a fallback file,
refused writes dropped alone. Metrics keep the time they were logged at, not the time the
child writes them.

Metric points go out in batches: a log call within `_SEND_EVERY_S` of the last send waits in a
list that a timer thread sends when that time is up (any other call, and flush() and close(),
send it first, so the order holds). A send wakes the child, and at thousands of steps/s with a
log call every 10 steps that costs ~40 µs of the training process's time per call.

A worker killed outright takes its logger with it, as a thread would be: the child sees the
socket close (the kernel closes it with the parent) and exits at once, writing nothing more. A
child that wrote on after its parent died could race the next attempt's logger, which reads
what the run holds before its first write. Should the child die on its own, the worker logs one
warning and goes on with a RunLogger thread in its own process (what the child had not written
yet is lost, and the warning says so).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from dist_trainer.run_logger import UNSENT_DIR, NullLogger, RunLogger

__all__ = ["LoggerProcess"]

log = logging.getLogger(__name__)

# How long close() waits for the child beyond RunLogger's own flush timeout before killing it.
_CLOSE_GRACE_S = 30.0
# A log call this soon after the last send waits for the next one (at most this long).
_SEND_EVERY_S = 0.25
# Asked of the kernel per socket end (it caps it at net.core.wmem_max / rmem_max): a log call is
# ~0.5 kB, and the child needs a second or two to start reading.
_SOCKET_BUFFER_BYTES = 4 << 20


class LoggerProcess(NullLogger):
    """A RunLogger in a child process (see the module docstring); same arguments and methods.

    After `close()`, `unsent`, `refused`, `dropped` and `attempt` hold the child's figures.
    """

    def __init__(self, uri: str, run_id: str, **options: Any) -> None:
        self.uri, self.run_id = uri, run_id
        # Resolved here: the child may not share the worker's idea of the working directory.
        options.setdefault("fallback_dir", str(Path(UNSENT_DIR).resolve()))
        self._options = options
        self.fallback_path = Path(options["fallback_dir"]) / f"{run_id}.jsonl"
        self.unsent, self.dropped = 0, 0
        self.refused: list[str] = []
        self.attempt: int | None = None
        self._thread_logger: RunLogger | None = None  # after the child died
        mine, theirs = socket.socketpair()
        for end in (mine, theirs):  # room for the calls queued while the child imports mlflow
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
        self._conn = Connection(mine.detach())
        # log_metrics calls not sent yet, and the thread that sends them when they are due.
        self._lock = threading.Lock()  # the list, and the socket's sending end
        self._pending: list[tuple[dict[str, float], int, int]] = []
        self._last_send = 0.0
        self._due = threading.Event()
        self._closed = False
        self._sender = threading.Thread(target=self._send_when_due, daemon=True)
        self._sender.start()
        env = dict(os.environ)
        # The child imports dist_trainer from wherever this process did.
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        fd = theirs.fileno()
        self._child = subprocess.Popen(
            [sys.executable, "-m", "dist_trainer.logger_process", str(fd)],
            pass_fds=[fd],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._send(("init", (uri, run_id, options)))

    # ---------------------------------------------------------------- RunLogger's interface
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        if self._thread_logger is not None:
            self._call_thread_logger(("log_metrics", (metrics, step, now_ms)))
            return
        with self._lock:
            self._pending.append((metrics, step, now_ms))
            due = time.monotonic() - self._last_send >= _SEND_EVERY_S
        if due:
            self._send(("metrics", ()))
        else:
            self._due.set()

    def log_params(self, params: dict[str, Any]) -> None:
        self._send(("log_params", (params,)))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._send(("log_artifact", (local_path, artifact_path)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send(("log_text", (text, artifact_file)))

    def resume(self) -> None:
        self._send(("resume", ()))

    def start_attempt(self, from_step: int, details: dict[str, Any]) -> None:
        self._send(("start_attempt", (from_step, details)))

    def end_attempt(self, outcome: str) -> None:
        self._send(("end_attempt", (outcome,)))

    def flush(self, timeout_s: float = 30.0) -> bool:
        if self._thread_logger is not None:
            return self._thread_logger.flush(timeout_s)
        if not self._send(("flush", (timeout_s,))):
            return self._thread_logger.flush(timeout_s) if self._thread_logger else False
        reply = self._reply(timeout_s + _CLOSE_GRACE_S)
        return bool(reply) if reply is not None else False

    def close(self) -> None:
        """Flush and stop the child (RunLogger.close runs there and logs what it has to say);
        never raises."""
        if self._thread_logger is not None:
            self._stop_sender()
            self._send(("metrics", ()))  # what the timer had not sent yet
            self._close_thread_logger()
            return
        timeout = self._options.get("flush_timeout_s", 60.0) + _CLOSE_GRACE_S
        self._stop_sender()
        if self._send(("close", ())):
            figures = self._reply(timeout)
            if isinstance(figures, dict):
                self.unsent, self.dropped = figures["unsent"], figures["dropped"]
                self.refused, self.attempt = figures["refused"], figures["attempt"]
        self._conn.close()
        try:
            self._child.wait(timeout=_CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
        if self._thread_logger is not None:  # the child died during close: the rest is here
            self._close_thread_logger()

    def _stop_sender(self) -> None:
        self._closed = True
        self._due.set()
        self._sender.join()

    # ---------------------------------------------------------------- the socket
    def _send(self, message: tuple[str, tuple]) -> bool:
        """Hand the pending points and then a call to the child (("metrics", ()) sends only the
        points); False (and calls go to a thread from then on) if it died."""
        with self._lock:
            pending, self._pending = self._pending, []
            self._last_send = time.monotonic()
            if self._thread_logger is None:
                try:
                    if pending:
                        self._conn.send(("log_batch", (pending,)))
                    if message[0] != "metrics":
                        self._conn.send(message)
                    return True
                except OSError as exc:
                    self._child_died(exc)
        for points in pending:
            self._call_thread_logger(("log_metrics", points))
        self._call_thread_logger(message)
        return False

    def _send_when_due(self) -> None:
        """The timer thread: pending points go out at most `_SEND_EVERY_S` after they came."""
        while True:
            self._due.wait()
            if self._closed:
                return
            self._due.clear()
            wait = self._last_send + _SEND_EVERY_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with self._lock:
                idle = not self._pending or self._closed
            if not idle:
                self._send(("metrics", ()))

    def _reply(self, timeout_s: float) -> Any:
        try:
            if self._conn.poll(timeout_s):
                return self._conn.recv()
            log.warning("the MLflow logger process did not answer within %.0f s", timeout_s)
        except (OSError, EOFError) as exc:
            self._child_died(exc)
        return None

    def _child_died(self, exc: BaseException) -> None:
        code = self._child.poll()
        log.warning(
            "the MLflow logger process of run %s stopped (%s, exit code %s): logging goes on "
            "from this process; what it had not written yet is lost",
            self.run_id,
            type(exc).__name__,
            code,
        )
        self._thread_logger = RunLogger(self.uri, self.run_id, **self._options)

    def _call_thread_logger(self, message: tuple[str, tuple]) -> None:
        name, args = message
        if name == "metrics":
            return
        if name == "log_metrics":
            metrics, step, now_ms = args
            self._thread_logger.log_metrics(metrics, step, timestamp_ms=now_ms)
        elif name not in ("init", "flush", "close"):
            getattr(self._thread_logger, name)(*args)

    def _close_thread_logger(self) -> None:
        logger = self._thread_logger
        logger.close()
        self.unsent, self.dropped = logger.unsent, logger.dropped
        self.refused, self.attempt = logger.refused, logger.attempt


def _serve(conn: Connection) -> None:
    """The child: run the calls on a RunLogger until close() (or exit when the parent dies)."""
    name, (uri, run_id, options) = conn.recv()
    assert name == "init", name
    logger = RunLogger(uri, run_id, **options)
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):
            # The worker died without close(): stop now, as its thread would have (see the
            # module docstring). os._exit: the logger thread must not flush on the way out.
            os._exit(0)
        if name == "log_batch":
            for metrics, step, now_ms in args[0]:
                logger.log_metrics(metrics, step, timestamp_ms=now_ms)
        elif name == "flush":
            conn.send(logger.flush(*args))
        elif name == "close":
            logger.close()
            conn.send(
                {
                    "unsent": logger.unsent,
                    "dropped": logger.dropped,
                    "refused": logger.refused,
                    "attempt": logger.attempt,
                }
            )
            return
        else:
            getattr(logger, name)(*args)


if __name__ == "__main__":
    # A terminal's Ctrl-C reaches the whole foreground process group: the worker handles it and
    # then closes this child, which must live on to write what was queued before it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _serve(Connection(int(sys.argv[1])))
