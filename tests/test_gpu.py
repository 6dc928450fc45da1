"""On a real GPU: NCCL, CUDA memory, NVML telemetry, every precision, torch.compile, Ray.

    pytest -m gpu            # on a machine with a CUDA GPU; elsewhere every test is skipped

A GPU box with CUDA torch but not this project's dependencies takes the missing ones as wheels
first, without their dependencies so torch stays the box's own: hydra-core, omegaconf and
antlr4-python3-runtime 4.9.* (numpy, psutil, rich, nvidia-ml-py and pillow are common in CUDA
images); mlflow and ray only for the Ray test, which skips without them.

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 -m pytest -m gpu -p no:cacheprovider

The benchmark MLP (784-1024-1024-10, `experiment=bench_mlp`) under NCCL in a world of one. The
telemetry check runs a few seconds of real GPU work: NVML's utilization counter is the share of
its last sample period (1/6 s to 1 s) a kernel ran, so a run of ~70 ms reads 0. Tracking is off
(`tracking.uri=none`) except in the Ray test, so a GPU box needs no mlflow for the rest.
"""

from __future__ import annotations

import gc
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_trainer.batching import plan_batches
from dist_trainer.checkpoint import LocalCheckpointSink
from dist_trainer.loop import Trainer, WorkerInfo
from dist_trainer.run_logger import NullLogger
from tests.conftest import job_config, job_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())"
    ),
]

ROOT = Path(__file__).resolve().parents[1]
# Gradient bytes all-reduced per step: every parameter of 784-1024-1024-10, float32.
BENCH_PARAMS = 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
BENCH = ["experiment=bench_mlp", "scaling.use_gpu=true", "tracking.uri=none"]


def test_loop_on_cuda_under_nccl_with_telemetry(tmp_path):
    from dist_trainer.torchrun import main

    # ~2000 steps of global batch 8192 (~2 ms each on an H200): seconds of work, so NVML's
    # utilization has had full sample periods of kernels. The last log interval is 500 steps.
    metrics = main(
        [
            *BENCH,
            "data.num_samples=65536",  # 58982 train: 7 full global batches per epoch
            "trainer.global_batch_size=8192",
            "trainer.drop_last=true",
            "trainer.max_steps=2000",
            "trainer.max_epochs=1000",
            "trainer.log_every_n_steps=500",
            "trainer.val_every_n_epochs=1000",  # validate and checkpoint once, at the end
            "trainer.checkpoint_every_n_steps=100000",
            "telemetry.interval_s=0.1",
            f"scaling.storage_path={tmp_path}",
        ]
    )
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    # A fresh 10-class MLP starts at ~ln(10) (near-zero logits); it must have learned.
    assert metrics["train/loss"] < 0.9 * math.log(10)
    assert metrics["comm/bytes"] == 4 * BENCH_PARAMS
    assert metrics["comm/allreduce_s"] > 0
    assert metrics["mem/peak_allocated_bytes_max"] > 0  # the CUDA allocator was used
    util = {k: v for k, v in metrics.items() if k.startswith("system/") and "gpu_util" in k}
    used = {k: v for k, v in metrics.items() if k.startswith("system/") and "gpu_mem_used" in k}
    assert util and max(util.values()) > 0, util
    assert used and max(used.values()) > 0, used


class _Recorder(NullLogger):
    """Keeps every logged metric (no MLflow needed on the GPU box)."""

    def __init__(self) -> None:
        self.history: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.history.append((step, dict(metrics)))


@pytest.fixture
def cuda_world_of_one():
    """An NCCL process group of one on GPU 0 (in-memory store), so DDP and its hook run."""
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    yield WorkerInfo(0, 1, 0, 0, torch.device("cuda", 0))
    gc.collect()  # the DDP model before its group
    dist.destroy_process_group()


def _train_losses(
    info: WorkerInfo, tmp_path: Path, *extra: str, output_dtype: torch.dtype | None = None
) -> list[float]:
    """40 steps of the benchmark MLP; every train/loss. `output_dtype`: what the model's
    forward must return (autocast really on, or really off)."""
    job = job_config(
        *BENCH,
        "trainer.max_steps=40",
        "trainer.log_every_n_steps=1",
        f"scaling.storage_path={tmp_path}",
        *extra,
    )
    plan = plan_batches(job.trainer.global_batch_size, 1, job.trainer.micro_batch_cap)
    recorder = _Recorder()
    trainer = Trainer(job, plan, info, logger=recorder, sink=LocalCheckpointSink(None))
    dtypes: set[torch.dtype] = set()
    if output_dtype is not None:
        trainer.model.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    trainer.fit()
    if output_dtype is not None:
        assert dtypes == {output_dtype}
    logged = [m for _, m in recorder.history if "train/loss" in m]
    assert [m["comm/bytes"] for m in logged[1:]] == [4 * BENCH_PARAMS] * (len(logged) - 1)
    del trainer
    return [m["train/loss"] for m in logged]


def _assert_learns(losses: list[float]) -> None:
    assert len(losses) == 40, "one train/loss per step"
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses  # falls, noise of single steps aside


@pytest.mark.parametrize(
    ("precision", "output_dtype"),
    [("32", torch.float32), ("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)],
)
def test_precision_trains_on_gpu(cuda_world_of_one, tmp_path, precision, output_dtype):
    losses = _train_losses(
        cuda_world_of_one, tmp_path, f"trainer.precision={precision}", output_dtype=output_dtype
    )
    _assert_learns(losses)


def test_compiled_model_trains_on_gpu(cuda_world_of_one, tmp_path):
    # bf16 with compile: what a user on an H100/H200 runs; each part alone is tested above.
    losses = _train_losses(
        cuda_world_of_one, tmp_path, "trainer.compile=true", "trainer.precision=bf16-mixed"
    )
    _assert_learns(losses)


def test_more_processes_than_gpus_is_one_line(tmp_path):
    # torchrun itself adds its own failure report; ours is the one `dist-trainer:` line, and no
    # process reaches CUDA's "invalid device ordinal".
    gpus = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus + 1}"]
    cmd += ["-m", "dist_trainer.torchrun", *BENCH, f"scaling.storage_path={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("dist-trainer:")]
    assert proc.returncode != 0
    assert ours == [
        f"dist-trainer: torchrun started {gpus + 1} processes on this node but it has {gpus} "
        f"visible GPU(s). Fix: torchrun --nproc_per_node={gpus}, or scaling.use_gpu=false for "
        "CPU processes"
    ], proc.stderr[-3000:]
    assert "invalid device ordinal" not in proc.stderr
    assert "exitcode  : 2" in proc.stderr  # torchrun's report of our exit code


@pytest.mark.ray
def test_ray_path_on_gpu(request, tmp_path):
    pytest.importorskip("ray", reason="the Ray path needs ray installed")
    pytest.importorskip("mlflow", reason="the Ray path logs one MLflow run")
    request.getfixturevalue("ray_cluster")  # only once ray is known to import
    from mlflow.tracking import MlflowClient

    from dist_trainer.config import load_config
    from dist_trainer.driver import train

    overrides = job_overrides(
        tmp_path,
        "experiment=bench_mlp",
        "scaling.use_gpu=true",
        "scaling.num_workers=1",
        "trainer.max_steps=300",
        "trainer.log_every_n_steps=100",
        "telemetry.interval_s=0.1",
    )
    result = train(load_config(overrides), show_progress=False)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.resolved_use_gpu"] == "True"
    util = [k for k in run.data.metrics if k.startswith("system/") and k.endswith("gpu_util_mean")]
    assert util, sorted(run.data.metrics)
