"""GPU path check: the training loop under torchrun with NCCL on a real GPU, no Ray.

    torchrun --nproc_per_node=1 scripts/gpu_check.py            # or: bash scripts/gpu_check.sh

Runs the benchmark MLP for a few dozen steps with `scaling.use_gpu=true` (NCCL, CUDA tensors),
the communication hook and the NVML sampler on, tracking off (a GPU box may have no mlflow), and
checks what a user relies on: the loop ran on CUDA, loss is finite and falls, the all-reduce was
timed with the exact gradient byte count, and NVML reported non-zero utilization and memory.
Prints one JSON line with the figures; exits non-zero if a check fails.
"""

from __future__ import annotations

import json
import math
import sys

import torch

from dist_trainer.torchrun import main as torchrun_main

OVERRIDES = [
    "experiment=bench_mlp",
    "scaling.use_gpu=true",
    "tracking.uri=none",
    "trainer.max_epochs=1",
    "trainer.max_steps=60",
    "trainer.log_every_n_steps=5",
    "telemetry.interval_s=0.05",
    "scaling.storage_path=/tmp/dist_trainer_gpu_check",
]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    metrics = torchrun_main(OVERRIDES + sys.argv[1:])
    gpu = {k: v for k, v in metrics.items() if "/gpu_" in k}
    params = 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    checks = {
        "loss finite": math.isfinite(metrics.get("train/loss", math.nan)),
        "comm bytes == 4 x params": metrics.get("comm/bytes") == 4 * params,
        "allreduce timed": metrics.get("comm/allreduce_s", 0) > 0,
        "cuda peak memory": metrics.get("mem/peak_allocated_bytes_max", 0) > 0,
        "nvml utilization > 0": any(v > 0 for k, v in gpu.items() if "gpu_util" in k),
        "nvml memory > 0": any(v > 0 for k, v in gpu.items() if "mem_used" in k),
    }
    print(
        json.dumps(
            {"device": torch.cuda.get_device_name(0), "checks": checks, "metrics": metrics},
            default=float,
        )
    )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
