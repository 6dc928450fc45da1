"""Ray Train callbacks the driver hands its worker groups (they run in Ray Train's controller).

`FailureRecorder` writes why an attempt at a job ended when Ray Train sees its workers fail: a
worker killed outright (`kill -9`, out of memory, a lost node) cannot say so itself
(dist_trainer.attempts has the tags).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train import UserCallback

from dist_trainer.attempts import ATTEMPTS_TAG, describe_failure, end_attempt, end_tag

__all__ = ["FailureRecorder"]

log = logging.getLogger(__name__)


class FailureRecorder(UserCallback):
    """Records why an attempt ended when Ray Train sees its workers fail (in the controller).

    The group runs `run_ids` one after another (one job, or a study's jobs); the one failing is
    the running job whose latest attempt has no end yet, or only rank 0's "failed" view.

    Args:
        tracking_uri: the store of the runs.
        run_ids: the runs of the jobs the worker group runs.
    """

    def __init__(self, tracking_uri: str, run_ids: list[str]) -> None:
        self.tracking_uri = tracking_uri
        self.run_ids = list(run_ids)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self.record(describe_failure(worker_exceptions))

    def record(self, reason: str) -> None:
        """Write `reason` as the end of the running job's latest attempt (never raises)."""
        try:
            self._record(reason)
        except Exception as exc:  # noqa: BLE001 - a record is not worth failing the controller
            log.warning("could not record the failed attempt in MLflow: %s", type(exc).__name__)

    def _record(self, reason: str) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        for run_id in self.run_ids:
            run = client.get_run(run_id)
            tags = run.data.tags
            attempt = int(tags.get(ATTEMPTS_TAG, "0"))
            if run.info.status != "RUNNING" or attempt == 0:
                continue
            ended = tags.get(end_tag(attempt), "")
            if not ended or ended.startswith("failed"):
                end_attempt(client, run_id, attempt, reason, overwrite=True)
                return
