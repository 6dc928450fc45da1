"""Several nodes: a simulated two-node Ray cluster on this machine (ray.cluster_utils.Cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_trainer.batching import plan_batches
from dist_trainer.loop import Trainer, WorkerInfo
from tests.conftest import job_config, run_cluster_job

ROOT = Path(__file__).resolve().parents[1]
JOB = ["trainer.max_epochs=2", "trainer.precision=64", "model.hidden_sizes=[16]"]


@pytest.mark.slow
def test_spread_puts_workers_on_distinct_nodes_and_trains_as_one_node(tmp_path):
    """SPREAD over two one-CPU nodes: one worker per node, telemetry keys per node, and the
    job trains to what one process computes on the whole global batch (float64)."""
    result = run_cluster_job("tests.multinode_job", tmp_path, JOB, timeout_s=400)
    assert result["nodes"] == 2
    metrics = result["metrics"]
    workers = sorted(
        k.split("/")[1] + "/" + k.split("/")[2] for k in metrics if k.endswith("/peak_rss_bytes")
    )
    assert workers == ["node0/rank0", "node1/rank0"], workers
    job = job_config(*JOB)
    reference = Trainer(job, plan_batches(64, 1), WorkerInfo(0, 1, 0, 0, torch.device("cpu")))
    expected = reference.fit()
    assert metrics["val/loss"] == pytest.approx(expected["val/loss"], rel=1e-9)
    assert metrics["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-9)
