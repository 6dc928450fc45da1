"""bench-comm on real Ray workers (gloo), and the training summary that compares against it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dist_trainer import driver, report
from dist_trainer.bench_comm import run_bench_comm
from dist_trainer.config import load_config
from dist_trainer.tracking import BENCH_TAG
from tests.conftest import job_overrides

pytestmark = pytest.mark.ray


def test_bench_comm_logs_curve_fit_and_plot_then_training_compares(ray_cluster, tmp_path):
    overrides = job_overrides(
        tmp_path, "comm.sweep_max_bytes=65536", "comm.sweep_repeats=5", "comm.sweep_warmup=2"
    )
    bench_id = run_bench_comm(load_config(overrides))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    bench = client.get_run(bench_id)
    assert bench.info.status == "FINISHED" and bench.data.tags[BENCH_TAG] == "bench-comm"
    curve = client.get_metric_history(bench_id, "bench_comm/time_s")
    assert sorted(m.step for m in curve) == [1024 * 2**k for k in range(7)]
    assert all(m.value > 0 for m in curve)
    busbw = {m.step: m.value for m in client.get_metric_history(bench_id, "bench_comm/busbw_gbps")}
    times = {m.step: m.value for m in curve}
    for size, value in busbw.items():  # busbw = S/t x 2(n-1)/n, n = 2
        assert value == pytest.approx(size / times[size] / 1e9, rel=1e-6)
    assert bench.data.metrics["bench_comm/alpha_s"] > 0
    assert {"allreduce_sweep.csv", "allreduce_sweep.png"} <= {
        a.path for a in client.list_artifacts(bench_id)
    }

    result = driver.train(
        load_config(job_overrides(tmp_path, "trainer.max_epochs=2")), show_progress=False
    )
    summary = report.comm_summary(result.tracking_uri, result.run_id, 2, "gloo")
    assert summary is not None and summary.reference_run_id == bench_id
    assert summary.bytes_per_step == result.metrics["comm/bytes"]
    assert 0 <= summary.exposed_fraction <= 1 and not math.isnan(summary.exposed_s)
    assert summary.reference_busbw_gbps > 0
    text = client.download_artifacts(result.run_id, "comm_summary.md", str(tmp_path))
    assert "bench-comm at the same bucket size" in Path(text).read_text()
