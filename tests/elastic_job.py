"""Run by tests/test_elastic.py in its own process: a simulated Ray cluster that starts with one
node of one CPU, an elastic job (scaling.num_workers=[1,2]) that starts on one worker, and a
second node added once that worker trains; the job's run id is printed as one JSON line."""

from __future__ import annotations

import json
import sys
import threading
import time

import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from dist_trainer import driver
from dist_trainer.config import load_config
from dist_trainer.tracking import normalize_tracking_uri


def _first_step_logged(uri: str, timeout_s: float = 180.0) -> None:
    """Wait until the one-worker group has logged a training step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            client = MlflowClient(uri)
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(experiments) if experiments else []
            if runs and "train/loss" in runs[0].data.metrics:
                return
        except Exception:  # noqa: BLE001 - the store may not exist yet
            pass
        time.sleep(0.5)
    raise TimeoutError("the elastic job never logged a step")


def main(tmp: str, overrides: list[str]) -> None:
    uri = normalize_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray.init(address=cluster.address)
    outcome: dict = {}

    def train() -> None:
        try:
            cfg = load_config(
                [
                    f"tracking.uri={uri}",
                    f"scaling.storage_path={tmp}/ray_storage",
                    "scaling.num_workers=[1,2]",
                    "scaling.elastic_resize_interval_s=1",
                    *overrides,
                ]
            )
            outcome["run_id"] = driver.train(cfg, show_progress=False).run_id
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = repr(exc)

    try:
        thread = threading.Thread(target=train)
        thread.start()
        _first_step_logged(uri)
        # Ray's cluster_utils starts node processes from the main thread only.
        cluster.add_node(num_cpus=1)
        thread.join()
        print("RESULT " + json.dumps({**outcome, "tracking_uri": uri}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
