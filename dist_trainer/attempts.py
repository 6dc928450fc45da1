"""Attempts at a job: what each start of its worker group was, and why each ended.

A job with `scaling.max_failures=N` may take several attempts: a worker dies, Ray Train (or the
warm service) starts the group again and the job resumes from its latest checkpoint, in the same
MLflow run. What differs per attempt (host, pid, the step it resumed from, when it started) is
not a param, which MLflow refuses to change: each attempt is a tag, so a restart has nothing to
collide with and the run's page lists them.

- `dist_trainer.attempts`: how many attempts the job took (1 without a failure);
- `dist_trainer.attempt.<n>`: `from_step=S; host=H; rank0_pid=P; ...; started=ISO time`;
- `dist_trainer.attempt.<n>.end`: `finished at step S`, `failed at step S: <error>` (rank 0's
  view) or `worker group failed: rank R: <error>` (Ray Train's, which names the rank that died).

Rank 0's logger writes the first two when the attempt starts and the end when it stops
(dist_trainer.run_logger.RunLogger.start_attempt / end_attempt). A worker killed outright
(`kill -9`, out of memory, a lost node) writes nothing: a Ray Train callback in its controller
(dist_trainer.ray_callbacks.FailureRecorder) records Ray's reason instead. An attempt that a
later one finds without an end (its driver died too) is marked as replaced.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = [
    "ATTEMPTS_TAG",
    "attempt_history",
    "describe_failure",
    "begin_attempt",
    "end_attempt",
    "end_tag",
    "record_fields",
    "record_tag",
]

log = logging.getLogger(__name__)

ATTEMPTS_TAG = "dist_trainer.attempts"
"""How many attempts the job's run has seen."""
_LINE_CHARS = 400  # one error line in a tag: enough for the type and the message's start


def record_tag(attempt: int) -> str:
    """The tag that describes attempt `attempt` (from 1)."""
    return f"dist_trainer.attempt.{attempt}"


def end_tag(attempt: int) -> str:
    """The tag that says how attempt `attempt` ended."""
    return f"{record_tag(attempt)}.end"


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return (lines[0] if lines else "")[:_LINE_CHARS]


def begin_attempt(client: Any, run_id: str, from_step: int, details: dict[str, Any]) -> int:
    """Count a new attempt in the run's tags and describe it; returns its number (from 1)."""
    tags = client.get_run(run_id).data.tags
    attempt = int(tags.get(ATTEMPTS_TAG, "0")) + 1
    if attempt > 1 and end_tag(attempt - 1) not in tags:
        client.set_tag(
            run_id,
            end_tag(attempt - 1),
            f"replaced by attempt {attempt} before it recorded an end (its workers were stopped)",
        )
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fields = {"from_step": from_step, **details, "started": started}
    client.set_tag(run_id, ATTEMPTS_TAG, str(attempt))
    client.set_tag(run_id, record_tag(attempt), "; ".join(f"{k}={v}" for k, v in fields.items()))
    return attempt


def end_attempt(client: Any, run_id: str, attempt: int, outcome: str, overwrite: bool) -> None:
    """Say how `attempt` ended; without `overwrite`, an end already recorded stands (Ray
    Train's reason for a failure names the rank that died, rank 0's own view may not)."""
    if not overwrite and end_tag(attempt) in client.get_run(run_id).data.tags:
        return
    client.set_tag(run_id, end_tag(attempt), _one_line(outcome))


def attempt_history(tags: dict[str, str]) -> list[tuple[str, str]]:
    """(record, end) of each attempt, in order, from a run's tags."""
    count = int(tags.get(ATTEMPTS_TAG, "0"))
    return [(tags.get(record_tag(n), ""), tags.get(end_tag(n), "")) for n in range(1, count + 1)]


def record_fields(record: str) -> dict[str, str]:
    """An attempt's record tag as its fields (`from_step`, `host`, `rank0_pid`, ...)."""
    pairs = (item.partition("=") for item in record.split("; ") if item)
    return {key: value for key, _, value in pairs}


def describe_failure(worker_exceptions: dict[int, BaseException]) -> str:
    """Ray Train's view of a failed attempt, one line: which ranks failed and how."""
    parts = [
        f"rank {rank}: {type(exc).__name__}: {_one_line(exc)}"
        for rank, exc in sorted(worker_exceptions.items())
    ]
    return "worker group failed: " + "; ".join(parts)
