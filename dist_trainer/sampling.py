"""Which samples each rank sees: global batches, cut into per-rank micro-batches.

Why not `torch.utils.data.DistributedSampler`: it shards the *epoch* (pads the dataset with
repeated samples, or drops the tail) and leaves batching to each rank, so the global batch of an
optimizer step is only known up to those duplicates. We need every optimizer step to be the
exact global batch a single process would use, including a short last batch, so the update
matches the single-process large-batch update. The sampler therefore draws one permutation per
epoch (seeded by `seed + epoch`, DistributedSampler's convention, identical on every rank), cuts it
into global batches, and gives rank r its contiguous share, split into accumulation micro-batches.
Every rank knows every step's global sample count without communicating, which is what the loss
scaling needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dist_trainer.batching import BatchPlan

__all__ = ["GlobalBatchSampler", "StepBatch", "shard_for_rank"]


@dataclass(frozen=True, slots=True)
class StepBatch:
    """One optimizer step as seen by one rank.

    Args:
        micro_batches: index tensors, one per micro-step (always `accumulation_steps` of them;
            some may be empty when the last global batch is shorter than the world).
        global_count: samples in this step's global batch over all ranks.
    """

    micro_batches: list[torch.Tensor]
    global_count: int


class GlobalBatchSampler:
    """Deterministic global batches for one rank.

    Args:
        num_samples: size of the training split.
        plan: the batch plan (global batch, world size, micro-batch, accumulation).
        rank: this worker's rank in [0, world_size).
        seed: base seed; epoch e shuffles with `seed + e` on every rank.
        shuffle: shuffle each epoch (False keeps dataset order, for tests).
        drop_last: drop a short last global batch instead of training on it.
    """

    def __init__(
        self,
        num_samples: int,
        plan: BatchPlan,
        rank: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if num_samples < 1:
            raise ValueError("the training split is empty")
        if drop_last and num_samples < plan.global_batch_size:
            raise ValueError(
                f"trainer.drop_last=true with {num_samples} training samples and "
                f"trainer.global_batch_size={plan.global_batch_size} leaves no step to run. "
                "Fix: lower trainer.global_batch_size or set trainer.drop_last=false"
            )
        self.num_samples = num_samples
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (the last may be short unless drop_last)."""
        divide = math.floor if self.drop_last else math.ceil
        return int(divide(self.num_samples / self.plan.global_batch_size))

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order, identical on every rank."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def step(self, order: torch.Tensor, step_in_epoch: int) -> StepBatch:
        """This rank's micro-batches of global batch number `step_in_epoch` of `order`."""
        size = self.plan.global_batch_size
        global_batch = order[step_in_epoch * size : (step_in_epoch + 1) * size]
        # One rank, one micro-step: the slice itself (tensor_split would make the same views).
        world, accumulation = self.plan.world_size, self.plan.accumulation_steps
        share = shard_for_rank(global_batch, self.rank, world) if world > 1 else global_batch
        micro = list(torch.tensor_split(share, accumulation)) if accumulation > 1 else [share]
        return StepBatch(micro_batches=micro, global_count=len(global_batch))


def shard_for_rank(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank r's contiguous share of `indices`; shares differ in size by at most one."""
    return torch.tensor_split(indices, world_size)[rank]
