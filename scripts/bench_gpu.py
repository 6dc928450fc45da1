"""dist-trainer's loop against a plain PyTorch DDP loop on one GPU, and its DataLoader path.

    python scripts/bench_gpu.py --out bench_out/gpu.json          # on a GPU (the real run)
    python scripts/bench_gpu.py --device cpu --quick --out /tmp/gpu_smoke.json   # smoke, CPU
    python scripts/bench_gpu.py --parts throughput --repeats 5    # only part 1, more repeats

Needs torch, hydra-core, omegaconf, numpy and pillow (JPEG, part 2); mlflow is optional. On a
GPU box without this project's dependencies, see tests/test_gpu.py for the wheels to carry.
The real run should take 3-5 minutes on an H200 (estimated); --quick takes ~1 on 2 CPUs.

Part 1, throughput. One process, a process group of one (NCCL; gloo with --device cpu), the
benchmark workload of `experiment=bench_mlp`: MLP 784-1024-1024-10, SGD (lr 0.01, momentum
0.9), synthetic data (65536 samples, the training split on the device). For each global batch
(256, 8192) and precision (32, bf16-mixed):

    plain   DDP by hand: indices drawn on the device (torch.randint), x[idx], cross-entropy
            (mean), backward, SGD step; bf16 under torch.autocast(dtype=torch.bfloat16).
    dt      dist_trainer.loop.Trainer as a user runs it: trainer.precision=32 or bf16-mixed,
            comm.enabled and telemetry.enabled (their defaults: the comm hook, the exposed-comm
            probe every 100 steps, NVML sampling), log every 10 steps (an all-gather and a host
            sync each); MLflow logging into a tmp sqlite store too when mlflow imports
            (--mlflow auto). Validation and checkpoints are pushed past the last step.

Both use the same TF32 setting (trainer.tf32, default on: the plain loop sets the same flags).
Steady samples/s: time from the end of the warm-up (max(50, 10% of the steps), a multiple of
the log interval) to the last step, both after a device sync (plain: synchronize; dt: the
timestamps of its log calls, which sync first). Each repeat runs every cell plain-then-dt or
dt-then-plain, alternating, over the cells in alternating order; the table shows the medians
over repeats and dt/plain per cell, with the targets (>= 0.95 at batch 256, >= 0.98 at 8192).

Part 2, loading. A map-style dataset whose items cost ~1 ms of CPU each: every record is a
stored JPEG (the 28x28 input upsampled to a side calibrated here so one decode takes
--decode-ms), decoded, turned grey and resized back to 784 floats per item
(`data._target_=scripts.bench_gpu.slow_data`). dist-trainer's samples/s with
`data.loader.num_workers` = 0, 2, 8, against the in-memory path (the same decoded data as a
TensorDataset, `+data.decoded=true`), at global batch 256, precision 32. "decode-bound" is
max(1, workers) x 1000 / decode_ms: what the decoding alone allows.

Prints markdown tables and writes everything (each run, medians, ratios) as JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
# `scripts.bench_gpu.slow_data` is imported by path (data._target_), also by DataLoader workers
# if they are spawned rather than forked: the repository root must be importable everywhere.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)

from dist_trainer.data import DataBundle, synthetic  # noqa: E402  (after the path set-up)
from dist_trainer.run_logger import NullLogger  # noqa: E402

LOG_EVERY = 10  # bench_mlp's trainer.log_every_n_steps: dt's timestamps fall on its multiples
TARGETS = {256: 0.95, 8192: 0.98}
FAR = 10**9  # "never" for per-epoch validation and checkpoints


# ------------------------------------------------------------------ part 2: the slow dataset


def _encode(x: torch.Tensor, side: int) -> bytes:
    """A 784-float input as a side x side RGB JPEG (quality 90)."""
    from PIL import Image

    width = int(math.isqrt(x.numel()))
    grey = np.clip(x.reshape(width, width).numpy() * 40 + 128, 0, 255).astype(np.uint8)
    image = Image.fromarray(grey).resize((side, side), Image.BILINEAR).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _decode(record: bytes, width: int) -> torch.Tensor:
    """The CPU work per item: JPEG decode, to grey, resize to width x width, to floats."""
    from PIL import Image

    image = Image.open(io.BytesIO(record)).convert("L").resize((width, width), Image.BILINEAR)
    return torch.from_numpy((np.asarray(image, dtype=np.float32) - 128) / 40).reshape(-1)


@functools.cache
def _records(
    unique: int, side: int, in_features: int, num_classes: int, noise: float, seed: int
) -> tuple[tuple[bytes, ...], torch.Tensor]:
    """`unique` distinct records and their labels (a linear teacher's, as data.synthetic)."""
    bundle = synthetic(2 * unique, in_features, num_classes, 0.5, seed, noise)
    x, y = bundle.train.tensors
    return tuple(_encode(row, side) for row in x[:unique]), y[:unique].clone()


@functools.cache
def _decoded(
    unique: int, side: int, in_features: int, num_classes: int, noise: float, seed: int
) -> torch.Tensor:
    records, _ = _records(unique, side, in_features, num_classes, noise, seed)
    width = int(math.isqrt(in_features))
    return torch.stack([_decode(r, width) for r in records])


class JpegRecords(Dataset):
    """`length` items cycling over stored JPEG records; each __getitem__ decodes one."""

    def __init__(self, records: tuple[bytes, ...], labels: torch.Tensor, length: int, width: int):
        self.records, self.labels, self.length, self.width = records, labels, length, width

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = i % len(self.records)
        return _decode(self.records[j], self.width), self.labels[j]


def slow_data(
    num_samples: int = 32768,
    in_features: int = 784,
    num_classes: int = 10,
    val_fraction: float = 0.01,
    noise: float = 0.1,
    seed: int = 0,
    side: int = 256,
    unique: int = 2048,
    decoded: bool = False,
) -> DataBundle:
    """A dist_trainer data factory: items that each cost one JPEG decode (see the docstring).

    The train split has `num_samples` items cycling over `unique` stored records (encoding is
    the slow part of building it, so records repeat; every item is still decoded when loaded).
    `decoded=true` gives the same items already decoded, as TensorDatasets (the in-memory path).
    """
    width = int(math.isqrt(in_features))
    if width * width != in_features:
        raise ValueError(f"in_features must be a square (an image), got {in_features}")
    records, labels = _records(unique, side, in_features, num_classes, noise, seed)
    n_val = max(1, round(num_samples * val_fraction))
    if decoded:
        x = _decoded(unique, side, in_features, num_classes, noise, seed)
        cycle = torch.arange(num_samples + n_val) % unique
        xs, ys = x[cycle], labels[cycle]
        train = TensorDataset(xs[:num_samples], ys[:num_samples])
        val = TensorDataset(xs[num_samples:], ys[num_samples:])
    else:
        train = JpegRecords(records, labels, num_samples, width)
        val = JpegRecords(records, labels, n_val, width)
    kwargs = {"in_features": in_features, "num_classes": num_classes}
    return DataBundle(train, val, "multiclass", kwargs, "jpeg_records")


def calibrate_side(target_ms: float, in_features: int = 784) -> tuple[int, float]:
    """The JPEG side whose decode takes ~target_ms here, and the measured ms per decode.

    Bisection on the side (a multiple of 8), each point the median of 5 timed chunks, so a
    burst of other load on the machine moves it little.
    """
    x = synthetic(4, in_features, 10, 0.5).train.tensors[0][0]
    width = int(math.isqrt(in_features))

    def cost(side: int) -> float:
        record = _encode(x, side)
        for _ in range(3):
            _decode(record, width)
        chunks = []
        for _ in range(5):
            n, start = 0, time.perf_counter()
            while n < 5 or time.perf_counter() - start < 0.05:
                _decode(record, width)
                n += 1
            chunks.append((time.perf_counter() - start) / n * 1e3)
        return statistics.median(chunks)

    lo, hi = 1, 256  # in units of 8 pixels: sides 8 .. 2048
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(8 * mid) < target_ms else (lo, mid)
    return 8 * hi, cost(8 * hi)


# ------------------------------------------------------------------ the two loops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _set_tf32(device: torch.device, on: bool) -> None:
    # The flags dist_trainer.loop sets for trainer.tf32, so both sides compute alike.
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


@functools.cache
def _bench_data(num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split of `experiment=bench_mlp`'s data, as dist-trainer builds it."""
    return synthetic(num_samples, 784, 10, 0.1, 0, 0.1).train.tensors


def run_plain(
    device: torch.device, batch: int, precision: str, steps: int, warmup: int, args
) -> dict[str, Any]:
    x, y = (t.to(device) for t in _bench_data(args.num_samples))
    _set_tf32(device, args.tf32)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    ).to(device)
    cuda = device.type == "cuda"
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    n = len(x)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (batch,), device=device)
        with autocast:
            loss = F.cross_entropy(ddp(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
    _sync(device)
    elapsed = time.perf_counter() - t0
    final = float(loss)
    del ddp, model, opt, x, y
    return {"samples_per_s": (steps - warmup) * batch / elapsed, "final_loss": final}


class StepTimes(NullLogger):
    """dt's logger: notes when each training log happens (after its device sync), and passes
    everything on to MLflow's RunLogger when there is one."""

    def __init__(self, inner: NullLogger | None = None) -> None:
        self.inner = inner or NullLogger()
        self.times: dict[int, float] = {}
        self.last: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "train/loss" in metrics:
            self.times[step] = time.perf_counter()
            self.last = dict(metrics)
        self.inner.log_metrics(metrics, step)

    def log_params(self, params: dict[str, Any]) -> None:
        self.inner.log_params(params)

    def close(self) -> None:
        self.inner.close()


def run_dt(info, overrides: list[str], batch: int, steps: int, warmup: int, args) -> dict[str, Any]:
    from dist_trainer import run_logger, tracking
    from dist_trainer.batching import plan_batches
    from dist_trainer.checkpoint import LocalCheckpointSink
    from dist_trainer.config import load_config, resolve_config
    from dist_trainer.loop import Trainer

    job = resolve_config(load_config(overrides))
    plan = plan_batches(job.trainer.global_batch_size, 1, job.trainer.micro_batch_cap)
    inner, host, run_id, uri = None, None, None, None
    if args.use_mlflow:  # as run_training does it: RunLogger, MLflow's host metrics
        uri = f"sqlite:///{args.work}/mlflow.db"
        experiment = tracking.prepare_store(uri, "bench_gpu")
        run_id = tracking.start_job_run(uri, experiment, "bench_gpu", {}, {})
        inner = run_logger.RunLogger(uri, run_id)
        if job.tracking.system_metrics:
            host = run_logger.SystemMetrics(uri, run_id, "node0", job.telemetry.interval_s * 5)
    logger = StepTimes(inner)
    try:
        trainer = Trainer(job, plan, info, logger=logger, sink=LocalCheckpointSink(None))
        trainer.fit()
        in_memory = getattr(getattr(trainer, "train_feed", None), "in_memory", None)
        del trainer
        gc.collect()
    finally:
        if host is not None:
            host.stop()
        logger.close()
        if run_id:
            tracking.finish_job_run(uri, run_id, "FINISHED")
    if warmup not in logger.times or steps not in logger.times:
        raise RuntimeError(f"dt logged steps {sorted(logger.times)[:5]}..., not {warmup}/{steps}")
    elapsed = logger.times[steps] - logger.times[warmup]
    return {
        "samples_per_s": (steps - warmup) * batch / elapsed,
        "final_loss": logger.last.get("train/loss", math.nan),
        "reported_samples_per_s": logger.last.get("perf/samples_per_s", math.nan),
        "in_memory": in_memory,
    }


def dt_overrides(
    args, batch: int, precision: str, steps: int, num_samples: int, *extra: str
) -> list[str]:
    return [
        "experiment=bench_mlp",
        "tracking.uri=none",  # the loop is driven here; --mlflow adds a RunLogger itself
        f"scaling.use_gpu={str(args.device == 'cuda').lower()}",
        f"scaling.storage_path={args.work}/storage",
        f"data.num_samples={num_samples}",
        f"trainer.global_batch_size={batch}",
        f"trainer.precision={precision}",
        f"trainer.tf32={str(args.tf32).lower()}",
        f"trainer.max_steps={steps}",
        f"trainer.max_epochs={FAR}",
        f"trainer.log_every_n_steps={LOG_EVERY}",
        "trainer.drop_last=true",
        f"trainer.val_every_n_epochs={FAR}",
        f"trainer.checkpoint_every_n_steps={FAR}",
        *extra,
    ]


def _round_up(n: float, k: int = LOG_EVERY) -> int:
    return int(math.ceil(n / k) * k)


def steps_for(batch: int, quick: bool) -> tuple[int, int]:
    """(steps, warm-up steps) for a throughput cell: ~3 s on an H200 (~0.3 ms + 0.2 us/sample
    per step); --quick: 20 and 10."""
    if quick:
        return 20, 10
    steps = _round_up(min(10000, max(300, 3.0 / (3e-4 + 2e-7 * batch))))
    return steps, _round_up(max(50, steps / 10))


# ------------------------------------------------------------------ orchestration


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def part_throughput(args, info, runs: list[dict]) -> list[dict]:
    cells = [(b, p) for b in args.batch_sizes for p in args.precisions]
    for rep in range(args.repeats):
        for batch, precision in cells if rep % 2 == 0 else cells[::-1]:
            steps, warmup = steps_for(batch, args.quick)
            for side in ("plain", "dt") if rep % 2 == 0 else ("dt", "plain"):
                if side == "plain":
                    result = run_plain(info.device, batch, precision, steps, warmup, args)
                else:
                    over = dt_overrides(args, batch, precision, steps, args.num_samples)
                    result = run_dt(info, over, batch, steps, warmup, args)
                result.update(
                    part="throughput", side=side, batch=batch, precision=precision,
                    repeat=rep, steps=steps, warmup=warmup,
                )  # fmt: skip
                runs.append(result)
                print(
                    f"  [{rep}] batch {batch:5d} {precision:10s} {side:5s} "
                    f"{result['samples_per_s']:12.0f} samples/s  loss {result['final_loss']:.4f}",
                    flush=True,
                )
                gc.collect()
                if info.device.type == "cuda":
                    torch.cuda.empty_cache()
    summary = []
    for batch, precision in cells:
        mine = [r for r in runs if r["batch"] == batch and r["precision"] == precision]
        plain = _median([r["samples_per_s"] for r in mine if r["side"] == "plain"])
        dt = _median([r["samples_per_s"] for r in mine if r["side"] == "dt"])
        target = TARGETS.get(batch)
        ratio = dt / plain
        summary.append(
            {
                "batch": batch,
                "precision": precision,
                "plain_samples_per_s": plain,
                "dt_samples_per_s": dt,
                "ratio": ratio,
                "target": target,
                "met": None if target is None else ratio >= target,
                "dt_reported_samples_per_s": _median(
                    [r["reported_samples_per_s"] for r in mine if r["side"] == "dt"]
                ),
                "losses_finite": all(math.isfinite(r["final_loss"]) for r in mine),
            }
        )
    return summary


def loader_steps(workers: int | None, decode_ms: float, quick: bool) -> tuple[int, int]:
    """(steps, warm-up) for a loading variant: ~4 s at the decode-bound rate; the warm-up also
    drains what the workers prefetched (2 batches each) before the clock starts."""
    if quick:
        return 20, 10
    if workers is None:  # in memory
        return 1000, 100
    rate = max(1, workers) * 1000 / decode_ms
    warmup = _round_up(10 + 2 * 2 * workers)
    return warmup + _round_up(max(30, 4.0 * rate / 256)), warmup


def part_loader(args, info, runs: list[dict]) -> list[dict]:
    variants: list[int | None] = [None, *args.loader_workers]  # None: in memory
    batch = 256
    for rep in range(args.repeats):
        for workers in variants if rep % 2 == 0 else variants[::-1]:
            steps, warmup = loader_steps(workers, args.decode_ms_measured, args.quick)
            data = [
                "data._target_=scripts.bench_gpu.slow_data",
                f"++data.side={args.side}",
                f"++data.decoded={str(workers is None).lower()}",
            ]
            if workers is not None:
                data.append(f"++data.loader.num_workers={workers}")
            over = dt_overrides(args, batch, "32", steps, args.loader_samples, *data)
            result = run_dt(info, over, batch, steps, warmup, args)
            name = "in memory" if workers is None else f"num_workers={workers}"
            expect_in_memory = workers is None
            if result["in_memory"] not in (None, expect_in_memory):  # None: not reported
                raise RuntimeError(f"{name}: the loop's in_memory is {result['in_memory']}")
            result.update(
                part="loader", workers=workers, variant=name, batch=batch,
                repeat=rep, steps=steps, warmup=warmup,
            )  # fmt: skip
            runs.append(result)
            print(
                f"  [{rep}] {name:15s} {result['samples_per_s']:12.0f} samples/s  "
                f"loss {result['final_loss']:.4f}",
                flush=True,
            )
            gc.collect()
    mine = [r for r in runs if r["part"] == "loader"]
    base = _median([r["samples_per_s"] for r in mine if r["workers"] is None])
    summary = []
    for workers in variants:
        rate = _median([r["samples_per_s"] for r in mine if r["workers"] == workers])
        bound = math.inf if workers is None else max(1, workers) * 1000 / args.decode_ms_measured
        summary.append(
            {
                "variant": "in memory" if workers is None else f"num_workers={workers}",
                "workers": workers,
                "samples_per_s": rate,
                "vs_in_memory": rate / base,
                "decode_bound_samples_per_s": bound,
                "of_decode_bound": rate / bound,
            }
        )
    return summary


def print_tables(args, throughput: list[dict], loader: list[dict]) -> None:
    if throughput:
        print(
            f"\n## dist-trainer vs plain PyTorch DDP ({args.device_name}, world size 1, "
            f"medians of {args.repeats} repeat(s), tf32={args.tf32}, "
            f"mlflow={'on' if args.use_mlflow else 'off'})\n"
        )
        print("| global batch | precision | plain samples/s | dist-trainer samples/s | "
              "dt / plain | target | met |")  # fmt: skip
        print("|---:|---|---:|---:|---:|---:|---|")
        for c in throughput:
            target = f">= {c['target']}" if c["target"] else "-"
            met = {True: "yes", False: "**no**", None: "-"}[c["met"]]
            print(
                f"| {c['batch']} | {c['precision']} | {c['plain_samples_per_s']:,.0f} | "
                f"{c['dt_samples_per_s']:,.0f} | {c['ratio']:.3f} | {target} | {met} |"
            )
        if not all(c["losses_finite"] for c in throughput):
            print("\nWARNING: a run ended with a non-finite loss (see the JSON)")
    if loader:
        print(
            f"\n## dist-trainer loading: {args.decode_ms_measured:.2f} ms of CPU per item "
            f"(JPEG side {args.side}), global batch 256, precision 32\n"
        )
        print("| data | samples/s | vs in memory | decode-bound samples/s | of decode-bound |")
        print("|---|---:|---:|---:|---:|")
        for v in loader:
            bound = v["decode_bound_samples_per_s"]
            shown = "-" if math.isinf(bound) else f"{bound:,.0f}"
            share = "-" if math.isinf(bound) else f"{v['of_decode_bound']:.2f}"
            print(
                f"| {v['variant']} | {v['samples_per_s']:,.0f} | {v['vs_in_memory']:.3f} | "
                f"{shown} | {share} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--parts", default="throughput,loader", help="default: %(default)s")
    parser.add_argument("--batch-sizes", default="256,8192", help="default: %(default)s")
    parser.add_argument("--precisions", default="32,bf16-mixed", help="default: %(default)s")
    parser.add_argument(
        "--num-samples", type=int, default=None,
        help="data.num_samples of part 1 (default 65536; --quick 9216)",
    )  # fmt: skip
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="trainer.tf32=false")
    parser.add_argument(
        "--mlflow",
        choices=("auto", "on", "off"),
        default="auto",
        help="dt also logs into MLflow (a tmp sqlite store); auto: when mlflow imports",
    )
    parser.add_argument("--decode-ms", type=float, default=1.0, help="CPU ms per item, part 2")
    parser.add_argument("--loader-workers", default="0,2,8", help="default: %(default)s")
    parser.add_argument(
        "--loader-samples", type=int, default=32768, help="items in part 2's train split"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.num_samples = args.num_samples or (9216 if args.quick else 65536)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.loader_workers = [int(w) for w in args.loader_workers.split(",") if w]
    if set(args.precisions) - {"32", "bf16-mixed"}:  # the plain loop knows these two
        parser.error(f"--precisions: 32 and/or bf16-mixed, got {args.precisions}")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts - {"throughput", "loader"}:
        parser.error(f"--parts: unknown {sorted(parts - {'throughput', 'loader'})}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device (use --device cpu --quick)")
    if args.num_samples * 0.9 < max(args.batch_sizes):
        parser.error("--num-samples must hold a full global batch of the largest size")
    if args.mlflow == "auto":
        try:
            import mlflow  # noqa: F401

            args.use_mlflow = True
        except ImportError:
            args.use_mlflow = False
    else:
        args.use_mlflow = args.mlflow == "on"

    from dist_trainer.loop import WorkerInfo

    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    info = WorkerInfo(0, 1, 0, 0, device)
    runs: list[dict] = []
    throughput: list[dict] = []
    loader: list[dict] = []
    args.side, args.decode_ms_measured = 0, math.nan
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_gpu_") as work:
            args.work = work
            print(
                f"{args.device_name}: torch {torch.__version__}, {backend}, "
                f"{os.cpu_count()} CPUs, mlflow {'on' if args.use_mlflow else 'off'}",
                flush=True,
            )
            if "throughput" in parts:
                print("part 1: throughput", flush=True)
                throughput = part_throughput(args, info, runs)
            if "loader" in parts:
                args.side, args.decode_ms_measured = calibrate_side(args.decode_ms)
                print(
                    f"part 2: loading (JPEG side {args.side}: "
                    f"{args.decode_ms_measured:.2f} ms per decode)",
                    flush=True,
                )
                loader = part_loader(args, info, runs)
    finally:
        dist.destroy_process_group()
    print_tables(args, throughput, loader)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "work") and not callable(v)}
    config["parts"] = sorted(parts)
    report = {
        "config": config,
        "device": args.device_name,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "seconds": time.perf_counter() - started,
        "throughput": throughput,
        "loader": loader,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_json_safe(report), indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
