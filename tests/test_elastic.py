"""Elastic workers (`scaling.num_workers=[min, max]`): a job that changes its worker count keeps
its global batch (the plan re-solves accumulation), logs each split as plan/* metrics, every
step once, and ends with the weights of a run that never resized (float64)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from dist_trainer import driver
from dist_trainer.batching import plan_batches
from dist_trainer.checkpoint import LocalCheckpointSink
from dist_trainer.config import ConfigError, load_config
from dist_trainer.loop import Trainer, WorkerInfo
from dist_trainer.run_logger import RunLogger
from dist_trainer.tracking import normalize_tracking_uri, prepare_store, start_job_run
from tests.conftest import (
    assert_logged_weights_equal,
    free_port,
    job_config,
    job_overrides,
    metric_histories,
    run_cluster_job,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = WorkerInfo(0, 1, 0, 0, torch.device("cpu"))
FLOAT64_TOLERANCE = 1e-12
# breast_cancer: 8 steps of 64 per epoch (the 8th short). Micro-batches of at most 16: one
# worker runs 4 accumulation steps, two workers run 2 each.
JOB = [
    "trainer.precision=64",
    "trainer.global_batch_size=64",
    "trainer.max_micro_batch_size=16",
    "trainer.max_epochs=2",
    "trainer.checkpoint_every_n_steps=5",
    "model.hidden_sizes=[16]",
    "optim=adam",
]


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _reference(overrides: list[str]) -> Trainer:
    trainer = Trainer(job_config(*overrides), plan_batches(64, 1), CPU)
    trainer.fit()
    return trainer


def _two_workers(rank: int, port: int, overrides: list, folder: str, uri: str, run_id: str):
    """The resized attempt: 2 DDP ranks resume the one-worker job's checkpoint."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    job = job_config(*overrides)
    logger = RunLogger(uri, run_id, flush_interval_s=0.05) if rank == 0 else None
    trainer = None
    try:
        plan = plan_batches(64, 2, job.trainer.micro_batch_cap)
        info = WorkerInfo(rank, 2, rank, 0, torch.device("cpu"))
        trainer = Trainer(job, plan, info, logger=logger, sink=LocalCheckpointSink(folder))
        trainer.fit()
        if rank == 0:
            torch.save({"params": _params(trainer.model), "step": trainer.step}, f"{folder}/out")
    finally:
        if logger is not None:
            logger.close()
        del trainer
        gc.collect()  # DDP models alive at exit can make gloo abort (pytorch#179291)
        dist.destroy_process_group()


def test_resize_from_one_to_two_workers_keeps_the_global_batch_and_the_weights(tmp_path):
    """One worker (16 x 4 accumulation) fails in step 11 or 12, after the checkpoint at 10;
    two workers (16 x 2 each) resume it: same run, plan/* says when the split changed, every
    step once, and the weights of one process that trained on every global batch."""
    uri = normalize_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = start_job_run(uri, prepare_store(uri, "elastic"), "resized", {}, {})
    marker = tmp_path / "crashed"
    # Training forwards: 4 per step on one worker, then validation: call 45 is in step 11/12.
    overrides = [*JOB, "model._target_=tests.crashing.CrashOnceMLP", f"+model.marker={marker}"]
    overrides.append("+model.crash_at_call=45")
    folder = tmp_path / "ckpt"
    logger = RunLogger(uri, run_id, flush_interval_s=0.05)
    sink = LocalCheckpointSink(folder)
    alone = Trainer(job_config(*overrides), plan_batches(64, 1, 16), CPU, logger=logger, sink=sink)
    with pytest.raises(RuntimeError, match="injected failure"):
        alone.fit()
    logger.close()
    assert alone.plan.accumulation_steps == 4 and alone.step in (10, 11)

    mp.spawn(_two_workers, args=(free_port(), overrides, str(folder), uri, run_id), nprocs=2)
    resized = torch.load(folder / "out", weights_only=False)

    reference = _reference([*overrides[:-1], "+model.crash_at_call=1"])  # marker exists
    assert resized["step"] == reference.step == 16
    expected = _params(reference.model)
    rel_error = ((resized["params"] - expected).norm() / expected.norm()).item()
    assert rel_error < FLOAT64_TOLERANCE, f"relative error {rel_error:.3g}"

    got = metric_histories(uri, run_id)
    for key, points in got.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"{key}: steps {steps}"
    assert got["plan/world_size"] == [(0, 1.0), (10, 2.0)]
    assert got["plan/accumulation_steps"] == [(0, 4.0), (10, 2.0)]
    assert got["plan/micro_batch_size"] == [(0, 16.0), (10, 16.0)]
    assert [s for s, _ in got["checkpoint/load_s"]] == [10]


def test_a_range_that_cannot_split_the_global_batch_is_refused_before_ray():
    cfg = load_config(["scaling.num_workers=[1,3]", "trainer.global_batch_size=64"])
    with pytest.raises(ConfigError) as info:
        driver.prepare(cfg, check_store=False)
    message = str(info.value)
    assert "over 3 worker(s)" in message and "scaling.num_workers=[1, 3]" in message
    assert "60" in message  # 60 splits over 1, 2 and 3 workers


def test_an_elastic_job_logs_what_stays_fixed_as_params(tmp_path):
    overrides = job_overrides(
        tmp_path, "scaling.num_workers=[1,2]", "trainer.max_micro_batch_size=16"
    )
    prepared = driver.prepare(load_config(overrides))
    assert prepared.plan.world_size == 2
    assert prepared.plan_params() == {"plan.global_batch_size": 64, "plan.world_size": "1-2"}
    text = prepared.describe_plan()
    assert "1 worker(s): global batch 64 = micro-batch 16 x 4" in text
    assert "2 worker(s): global batch 64 = micro-batch 16 x 2" in text


@pytest.mark.slow
def test_an_elastic_job_grows_when_a_node_joins(tmp_path):
    """Ray Train, a simulated cluster of one 1-CPU node: the job starts on one worker; a second
    node joins; Ray Train resizes the group to 2 workers, which resume from the latest
    checkpoint in the same MLflow run and train to the one-process weights."""
    overrides = [
        *JOB,
        "trainer.max_epochs=12",  # 96 steps: ~1 s each alone, enough for Ray to see the node
        "trainer.checkpoint_every_n_steps=4",
        "model._target_=tests.crashing.SlowAloneMLP",
        "+model.delay_s=0.25",
    ]
    result = run_cluster_job("tests.elastic_job", tmp_path, overrides, timeout_s=500)
    assert "error" not in result, result["error"]
    uri, run_id = result["tracking_uri"], result["run_id"]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["plan.world_size"] == "1-2"

    got = metric_histories(uri, run_id)
    for key, points in got.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"{key}: steps {steps}"
    sizes = got["plan/world_size"]
    assert sizes[0] == (0, 1.0) and sizes[-1][1] == 2.0, sizes
    resized_at = sizes[-1][0]
    assert resized_at > 0 and resized_at % 4 == 0, sizes
    assert got["plan/accumulation_steps"] == [(0, 4.0), (resized_at, 2.0)]
    assert resized_at in [s for s, _ in got["checkpoint/load_s"]]
    assert max(s for s, _ in got["train/loss"]) == 96

    reference = _reference([*overrides[:-1], "+model.delay_s=0"])
    assert_logged_weights_equal(
        uri, run_id, reference.model.state_dict(), tmp_path, FLOAT64_TOLERANCE
    )
