"""Several nodes: a simulated two-node Ray cluster on this machine (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_trainer.batching import plan_batches
from dist_trainer.loop import Trainer, WorkerInfo
from tests.conftest import job_config

ROOT = Path(__file__).resolve().parents[1]
JOB = ["trainer.max_epochs=2", "trainer.precision=64", "model.hidden_sizes=[16]"]


@pytest.mark.slow
def test_spread_puts_workers_on_distinct_nodes_and_trains_as_one_node(tmp_path):
    """SPREAD over two one-CPU nodes: one worker per node, telemetry keys per node, and the
    job trains to what one process computes on the whole global batch (float64)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.multinode_job", str(tmp_path), *JOB],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
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
