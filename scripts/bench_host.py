"""Host overhead per optimizer step: a plain PyTorch loop vs dist_trainer's loop, same run.

The workload is the seed tutorial's (`experiment=seed_tutorial`): Linear(10,10)-ReLU-Linear(10,1)
-sigmoid, BCELoss, Adam lr 0.01, global batch 32, the 10 "mean" breast-cancer features, float32
on the CPU. The model's compute is tiny, so a step's time is almost all host work (Python, op
dispatch, bookkeeping): what makes a launch-bound GPU step wait for the host.

    python scripts/bench_host.py                 # one process, then 2 DDP ranks (gloo)
    python scripts/bench_host.py --steps 1000 --repeats 1 --only one    # a quick look

Sides, each timed over `--steps` optimizer steps after `--warmup` steps, alternated `--repeats`
times so that the machine's noise falls on every side alike (medians are printed):
- `plain`: randperm per epoch, slice, forward, loss, zero_grad, backward, step, on the same
  model module dist_trainer builds for the preset (loops are compared, not models); with 2
  ranks the same in DDP (the default bucket layout, which dist_trainer keeps), loss scaled by
  world/global so DDP's average is the global mean.
- `ours, measurement on`: `Trainer.fit()` as shipped (interval metrics every 10 steps, the comm
  meter and exposed-comm probe with 2 ranks, telemetry settings as shipped) logging into a real
  MLflow sqlite store through rank 0's logger process, as run_training does.
- `ours, measurement off`: the same with `comm.enabled=false`, `telemetry.enabled=false`, a log
  interval longer than the run and no logger.
Validation runs once, at the end, and is left out of both: `trainer.val_every_n_epochs` is set
beyond the run and the plain loop has none.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workload() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """The seed tutorial's training split and model, as dist_trainer builds them."""
    from dist_trainer.build import build_data, build_model
    from dist_trainer.config import load_config, resolve_config

    job = resolve_config(load_config(["experiment=seed_tutorial"]))
    data = build_data(job)
    torch.manual_seed(0)
    model = build_model(job, data)  # the same module both loops train: loops compared, not models
    train = data.train
    return train.tensors[0].float(), train.tensors[1].float(), model


def plain_seconds(steps: int, warmup: int, rank: int, world: int) -> float:
    """Seconds for `steps` optimizer steps of the plain loop (after `warmup` steps)."""
    x, y, model = _workload()
    net = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.BCELoss(reduction="sum")
    global_batch, n = 32, len(x)
    per_rank = global_batch // world
    done, started = 0, 0.0
    while True:
        order = torch.randperm(n)
        for first in range(0, n, global_batch):
            if done == warmup:
                started = time.perf_counter()
            if done == warmup + steps:
                return time.perf_counter() - started
            batch = order[first : first + global_batch]
            idx = batch[rank * per_rank : (rank + 1) * per_rank]
            loss = loss_fn(net(x[idx]), y[idx]) * (world / len(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1


def ours_seconds(steps: int, warmup: int, measure: bool, folder: str, info=None) -> float:
    """Seconds for `steps` optimizer steps of Trainer.fit() after `warmup` steps: from the start
    of step warmup+1 to the end of step warmup+steps, the log intervals between them included
    (fit's set-up and its end, the logger's start and last validation, are not per-step costs;
    timed inside one fit, their noise stays out)."""
    from dist_trainer.batching import plan_batches
    from dist_trainer.config import load_config, resolve_config
    from dist_trainer.logger_process import LoggerProcess
    from dist_trainer.loop import Trainer, WorkerInfo
    from dist_trainer.tracking import prepare_store, start_job_run

    info = info or WorkerInfo(0, 1, 0, 0, torch.device("cpu"))
    overrides = ["experiment=seed_tutorial", "trainer.max_epochs=100000"]
    overrides += ["trainer.val_every_n_epochs=100000", f"trainer.max_steps={warmup + steps}"]
    if not measure:
        overrides += ["comm.enabled=false", "telemetry.enabled=false"]
        overrides += ["trainer.log_every_n_steps=100000000"]
    job = resolve_config(load_config(overrides))
    logger = None
    if measure and info.rank == 0:
        uri = f"sqlite:///{folder}/mlflow.db"
        run_id = start_job_run(uri, prepare_store(uri, "bench_host"), "ours", {}, {})
        logger = LoggerProcess(uri, run_id)
    trainer = Trainer(job, plan_batches(32, info.world_size), info, logger=logger)
    marks: dict[str, float] = {}
    train_step = trainer.train_step

    def timed_step(fed) -> None:  # ~0.2 us per step of its own
        if trainer.step == warmup:
            marks["start"] = time.perf_counter()
        train_step(fed)
        if trainer.step == warmup + steps:
            marks["end"] = time.perf_counter()

    trainer.train_step = timed_step
    try:
        trainer.fit()
    finally:
        del trainer.train_step  # no cycle: the trainer (its DDP, its gloo state) is freed now
        if logger is not None:
            logger.close()
    return marks["end"] - marks["start"]


SIDES = ("plain", "ours, measurement on", "ours, measurement off")


def _side(name: str, steps: int, warmup: int, folder: str, rank: int, world: int) -> float:
    if name == "plain":
        return plain_seconds(steps, warmup, rank, world)
    from dist_trainer.loop import WorkerInfo

    info = WorkerInfo(rank, world, rank, 0, torch.device("cpu"))
    return ours_seconds(steps, warmup, name.endswith("on"), folder, info)


def _ranks(rank: int, world: int, port: int, args, folder: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    times: dict[str, list[float]] = {}
    try:
        for _ in range(args.repeats):
            for name in SIDES:
                seconds = _side(name, args.steps, args.warmup, folder, rank, world)
                times.setdefault(name, []).append(seconds)
        if rank == 0:
            out.update(times)
    finally:
        gc.collect()  # DDP modules freed before their group: gloo can abort at exit otherwise
        dist.destroy_process_group()


def _table(title: str, times: dict[str, list[float]], steps: int) -> None:
    plain = statistics.median(times["plain"])
    print(f"\n{title} ({steps} steps, medians of {len(times['plain'])})")
    print(f"{'side':<26}{'steps/s':>10}{'us/step':>10}{'vs plain':>10}")
    for name in SIDES:
        seconds = statistics.median(times[name])
        print(f"{name:<26}{steps / seconds:>10,.0f}{seconds / steps * 1e6:>10.0f}"
              f"{plain / seconds:>9.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("one", "ddp"), help="one process, or 2 DDP ranks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_host_") as folder:
        if args.only != "ddp":
            times: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for name in SIDES:
                    times.setdefault(name, []).append(
                        _side(name, args.steps, args.warmup, folder, 0, 1)
                    )
            _table("one process", times, args.steps)
        if args.only != "one":
            with mp.Manager() as manager:
                out = manager.dict()
                mp.spawn(_ranks, args=(2, _free_port(), args, folder, out), nprocs=2)
                times = dict(out)
            _table("2 DDP ranks (gloo), rank 0", times, args.steps)


if __name__ == "__main__":
    main()
