"""Plain PyTorch DDP baseline for scripts/bench_launch.py (no dist_trainer code at all).

The workload of `experiment=bench_mlp`: an MLP 784-1024-1024-10 (ReLU) on gaussian inputs
labelled by a random linear teacher, global batch 256 split over the ranks, SGD (lr 0.01,
momentum 0.9), float32, gloo. torch.multiprocessing spawns the ranks; each builds the data in
memory and indexes it directly with its share of a per-epoch permutation (no DataLoader), as
dist_trainer's loop does. The loss is the sum of per-sample cross-entropies times
world / global_count, so DDP's average over ranks gives the mean over the global batch.

Rank 0 records `time.time()` at the end of every optimizer step and writes them as JSON:

    python scripts/plain_ddp.py --steps 308 --threads 1 --out /tmp/plain.json

`--threads` sets torch's intra-op threads in every rank; bench_launch.py passes what Ray gives a
1-CPU worker (OMP_NUM_THREADS=1), so both sides compute with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(num_train: int, num_val: int, features: int, classes: int, seed: int):
    """Gaussian x, labels from a random linear teacher (as dist_trainer.data.synthetic)."""
    gen = torch.Generator().manual_seed(seed)
    n = num_train + num_val
    teacher = torch.randn(features, classes, generator=gen) / math.sqrt(features)
    x = torch.randn(n, features, generator=gen)
    y = (x @ teacher + 0.1 * torch.randn(n, classes, generator=gen)).argmax(dim=1)
    return x[:num_train], y[:num_train]


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    world = args.world_size
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y = _data(args.num_train, args.num_val, 784, 10, args.seed)
    torch.manual_seed(args.seed)
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    gb = args.global_batch_size
    steps_per_epoch = args.num_train // gb  # drop_last: every step is a full global batch
    step_ends: list[float] = []
    samples: list[int] = []
    step = epoch = 0
    while step < args.steps:
        order = torch.randperm(args.num_train, generator=torch.Generator().manual_seed(epoch))
        for s in range(steps_per_epoch):
            if step >= args.steps:
                break
            batch = order[s * gb : (s + 1) * gb]
            idx = torch.tensor_split(batch, world)[rank]
            xb, yb = x[idx], y[idx]
            loss = F.cross_entropy(ddp(xb), yb, reduction="sum") * (world / len(batch))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if rank == 0:
                step_ends.append(time.time())
                samples.append(len(batch))
        epoch += 1
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "step_end_times": step_ends,
                    "samples_per_step": samples,
                    "torch_num_threads": torch.get_num_threads(),
                    "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
                    "world_size": world,
                    "final_loss": float(loss.detach()) * len(batch) / world / len(idx),
                },
                f,
            )
        print(f"[plain_ddp] rank 0: torch.get_num_threads()={torch.get_num_threads()}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=308, help="optimizer steps to run")
    parser.add_argument("--num-train", type=int, default=7373, help="training samples in memory")
    parser.add_argument("--num-val", type=int, default=819, help="held-out samples (built only)")
    parser.add_argument("--global-batch-size", type=int, default=256)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads per rank (0: leave as is)"
    )
    parser.add_argument("--out", required=True, help="JSON file for rank 0's step end times")
    args = parser.parse_args()
    if args.num_train < args.global_batch_size:
        parser.error("--num-train must hold at least one global batch")
    mp.spawn(_worker, args=(args, _free_port()), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
