"""Run by tests/test_multinode.py in its own process: a simulated cluster of two Ray nodes on
this machine (ray.cluster_utils.Cluster: a head and one more node, one CPU each), one job with
scaling.placement_strategy=SPREAD, and its final metrics printed as one JSON line."""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

from dist_trainer import driver
from dist_trainer.config import load_config


def main(tmp: str, overrides: list[str]) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        cfg = load_config(
            [
                f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                f"scaling.storage_path={tmp}/ray_storage",
                "scaling.placement_strategy=SPREAD",
                *overrides,
            ]
        )
        result = driver.train(cfg, show_progress=False)
        print("RESULT " + json.dumps({"nodes": len(nodes), "metrics": result.metrics}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
