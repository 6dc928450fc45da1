"""The batch plan: split a global batch exactly into micro-batch x accumulation x world size.

Glossary (used everywhere in dist_trainer):
- global batch: samples that make one optimizer step, summed over all workers.
- per-worker batch: the share of one worker (one rank) in an optimizer step.
- micro-batch: what one worker pushes through forward/backward at once (bounded by memory).
- accumulation steps: micro-steps per optimizer step on each worker.
- optimizer step vs micro-step: gradients are synchronized and applied once per optimizer step.

    global_batch_size == micro_batch_size * accumulation_steps * world_size   (always, exactly)

DeepSpeed asserts this triad and leaves the user to find numbers that fit; Determined silently drops
the remainder. Here the user states the global batch and a memory cap on the micro-batch; the plan
solves the rest, or refuses with the nearest global batch sizes that do split well.

The cap is an int, None (no cap: one micro-step), or "auto": then the plan made before the workers
start is provisional (one micro-step, `auto=True`, micro-batch and accumulation not yet known);
each worker finds the largest micro-batch that fits its device, the workers agree on the smallest
and every Trainer re-solves the plan with it as the cap (dist_trainer.autobatch). The global batch
stays exactly what was asked.

Pure Python: no torch, no Ray, so it is cheap to import and table-tested.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = [
    "BatchPlan",
    "BatchPlanError",
    "plan_batches",
    "plan_elastic",
    "describe_elastic",
    "elastic_params",
    "nearest_valid_global_batch_sizes",
]


class BatchPlanError(ValueError):
    """The global batch cannot be split well for this world size and micro-batch cap."""


@dataclass(frozen=True)
class BatchPlan:
    """An exact split of the global batch.

    Args:
        global_batch_size: samples per optimizer step over all workers.
        world_size: number of workers (ranks) taking part in data parallelism.
        micro_batch_size: samples per forward/backward on one worker.
        accumulation_steps: micro-steps per optimizer step on each worker.
        auto: `trainer.max_micro_batch_size=auto`: the workers find the micro-batch.
        auto_micro_batch_size: with auto, the micro-batch size every worker fits, agreed by the
            workers, that this plan was solved with as the cap; None while the plan is still
            provisional (before the workers have probed: one micro-step).
    """

    global_batch_size: int
    world_size: int
    micro_batch_size: int
    accumulation_steps: int
    auto: bool = False
    auto_micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.auto_micro_batch_size is not None and not self.auto:
            raise BatchPlanError("auto_micro_batch_size is only set on an auto plan")
        product = self.micro_batch_size * self.accumulation_steps * self.world_size
        if product != self.global_batch_size:
            raise BatchPlanError(
                f"global batch {self.global_batch_size} != micro-batch {self.micro_batch_size} x "
                f"accumulation {self.accumulation_steps} x world size {self.world_size} = {product}"
            )

    @property
    def per_worker_batch_size(self) -> int:
        """Samples one worker contributes to each optimizer step."""
        return self.micro_batch_size * self.accumulation_steps

    @property
    def provisional(self) -> bool:
        """An auto plan whose micro-batch the workers have not found yet."""
        return self.auto and self.auto_micro_batch_size is None

    def as_params(self) -> dict[str, int]:
        """The plan as flat MLflow params (`plan.*`).

        A provisional auto plan leaves out micro-batch and accumulation steps: the workers log
        them once they have agreed (MLflow params cannot change once logged).
        """
        params = {
            "plan.global_batch_size": self.global_batch_size,
            "plan.world_size": self.world_size,
            "plan.micro_batch_size": self.micro_batch_size,
            "plan.accumulation_steps": self.accumulation_steps,
            "plan.per_worker_batch_size": self.per_worker_batch_size,
        }
        if self.provisional:
            del params["plan.micro_batch_size"], params["plan.accumulation_steps"]
        elif self.auto:
            params["plan.auto_micro_batch_size"] = self.auto_micro_batch_size  # type: ignore[assignment]
        return params

    def describe(self) -> str:
        """One line a user reads at start: what a step really is."""
        if self.provisional:
            return (
                f"global batch {self.global_batch_size} = {self.per_worker_batch_size} per "
                f"worker x {self.world_size} worker(s); micro-batch and accumulation steps: "
                "each worker finds the largest micro-batch that fits, all use the smallest "
                "(trainer.max_micro_batch_size=auto)"
            )
        line = (
            f"global batch {self.global_batch_size} = micro-batch {self.micro_batch_size} x "
            f"{self.accumulation_steps} accumulation step(s) x {self.world_size} worker(s)"
        )
        if self.auto:
            fits = self.auto_micro_batch_size
            line += f" (max_micro_batch_size=auto: micro-batches of {fits} fit every worker)"
        return line


def _solve(global_batch_size: int, world_size: int, max_micro: int | None) -> BatchPlan | None:
    """The plan with the fewest accumulation steps, or None if no efficient split exists.

    Efficient means the micro-batch is at least half the cap: a prime per-worker batch would
    otherwise "split" into micro-batches of 1 and run tens of times slower without a word.
    """
    if global_batch_size % world_size:
        return None
    per_worker = global_batch_size // world_size
    if max_micro is None or max_micro >= per_worker:
        return BatchPlan(global_batch_size, world_size, per_worker, 1)
    fewest_steps = math.ceil(per_worker / max_micro)
    for steps in range(fewest_steps, per_worker + 1):
        if per_worker % steps == 0:
            micro = per_worker // steps
            if 2 * micro < max_micro:
                return None
            return BatchPlan(global_batch_size, world_size, micro, steps)
    return None  # pragma: no cover - steps == per_worker always divides


def nearest_valid_global_batch_sizes(
    global_batch_size: int, world_size: int, max_micro_batch_size: int | None, count: int = 4
) -> list[int]:
    """Up to `count` global batch sizes closest to the request that split efficiently."""
    found: list[int] = []
    for distance in range(1, 64 * world_size * max(1, max_micro_batch_size or 1)):
        for candidate in (global_batch_size - distance, global_batch_size + distance):
            if candidate >= world_size and _solve(candidate, world_size, max_micro_batch_size):
                found.append(candidate)
        if len(found) >= count:
            break
    return sorted(found[:count])


def plan_batches(
    global_batch_size: int, world_size: int, max_micro_batch_size: int | str | None = None
) -> BatchPlan:
    """Solve micro-batch x accumulation x world size == global batch, exactly.

    Args:
        global_batch_size: samples per optimizer step, all workers (`trainer.global_batch_size`).
        world_size: number of workers (`scaling.num_workers`).
        max_micro_batch_size: the largest micro-batch one worker can hold
            (`trainer.max_micro_batch_size`); None means no cap (one micro-step per step);
            "auto" gives the provisional plan (one micro-step, `auto=True`) that each worker
            re-solves with the micro-batch the workers agree on (dist_trainer.autobatch).

    Returns:
        The plan with the fewest accumulation steps whose micro-batch fits under the cap.

    Raises:
        BatchPlanError: the sizes are not positive, the global batch does not divide by the world
            size, or only a wasteful split exists; the message lists the nearest sizes that work.
    """
    for key, value in (
        ("trainer.global_batch_size", global_batch_size),
        ("scaling.num_workers", world_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise BatchPlanError(f"{key} must be a positive integer, got {value!r}")
    if max_micro_batch_size == "auto":
        provisional = plan_batches(global_batch_size, world_size, None)
        return dataclasses.replace(provisional, auto=True)
    if max_micro_batch_size is not None and (
        not isinstance(max_micro_batch_size, int)
        or isinstance(max_micro_batch_size, bool)
        or max_micro_batch_size < 1
    ):
        raise BatchPlanError(
            "trainer.max_micro_batch_size must be a positive integer, null (no cap) or auto, "
            f"got {max_micro_batch_size!r}"
        )
    plan = _solve(global_batch_size, world_size, max_micro_batch_size)
    if plan is not None:
        return plan
    nearest = nearest_valid_global_batch_sizes(global_batch_size, world_size, max_micro_batch_size)
    options = ", ".join(
        f"{g} ({_solve(g, world_size, max_micro_batch_size).describe()})"  # type: ignore[union-attr]
        for g in nearest
    )
    if global_batch_size % world_size:
        why = f"it does not divide by {world_size} workers"
    else:
        per_worker = global_batch_size // world_size
        why = (
            f"the per-worker batch {per_worker} has no divisor between "
            f"{math.ceil(max_micro_batch_size / 2)} and trainer.max_micro_batch_size="  # type: ignore[operator]
            f"{max_micro_batch_size}, so micro-batches would be tiny"
        )
    raise BatchPlanError(
        f"trainer.global_batch_size={global_batch_size} cannot be split exactly: {why}. "
        f"Nearest valid global batch sizes: {options}. "
        "Set trainer.global_batch_size to one of them (or change scaling.num_workers / "
        "trainer.max_micro_batch_size)."
    )


def plan_elastic(
    global_batch_size: int,
    min_workers: int,
    max_workers: int,
    max_micro_batch_size: int | str | None = None,
) -> dict[int, BatchPlan]:
    """The plan for every worker count an elastic job may run with (`scaling.num_workers=
    [min, max]`): after a resize the workers train on the plan for their new count, so the
    global batch stays exactly the same and only the accumulation changes.

    Raises:
        BatchPlanError: a count in the range cannot split the global batch well; the message
            names the counts and the nearest global batch sizes that split over all of them.
    """
    if not (isinstance(min_workers, int) and 0 < min_workers <= max_workers):
        raise BatchPlanError(
            f"scaling.num_workers=[{min_workers}, {max_workers}] must have 0 < min <= max"
        )
    plans: dict[int, BatchPlan] = {}
    failing: list[int] = []
    for world_size in range(min_workers, max_workers + 1):
        try:
            plans[world_size] = plan_batches(global_batch_size, world_size, max_micro_batch_size)
        except BatchPlanError:
            if not (isinstance(global_batch_size, int) and global_batch_size > 0):
                raise
            failing.append(world_size)
    if not failing:
        return plans
    cap = None if max_micro_batch_size == "auto" else max_micro_batch_size
    counts = range(min_workers, max_workers + 1)
    nearest: list[int] = []
    distance = 0
    while len(nearest) < 4 and distance < 64 * global_batch_size:
        distance += 1
        for candidate in (global_batch_size - distance, global_batch_size + distance):
            if candidate >= max_workers and all(_solve(candidate, n, cap) for n in counts):
                nearest.append(candidate)
    options = ", ".join(str(g) for g in sorted(nearest[:4]))
    raise BatchPlanError(
        f"trainer.global_batch_size={global_batch_size} cannot be split exactly over "
        f"{', '.join(map(str, failing))} worker(s), and an elastic job "
        f"(scaling.num_workers=[{min_workers}, {max_workers}]) may run with any count in its "
        f"range. Nearest global batch sizes that split over every count: {options}. Set "
        "trainer.global_batch_size to one of them, or narrow scaling.num_workers."
    )


def describe_elastic(plans: dict[int, BatchPlan]) -> str:
    """What an elastic job's step is at each worker count (from `plan_elastic`)."""
    counts = sorted(plans)
    lines = [
        f"elastic on {counts[0]}-{counts[-1]} workers: the global batch stays "
        f"{plans[counts[0]].global_batch_size}; the workers re-solve the split at each resize"
    ]
    lines += [f"  {n} worker(s): {plans[n].describe()}" for n in counts]
    return "\n".join(lines)


def elastic_params(plans: dict[int, BatchPlan]) -> dict[str, int | str]:
    """An elastic job's `plan.*` MLflow params: what stays fixed. The split that changes with
    the worker count is logged as metrics (plan/world_size, plan/accumulation_steps,
    plan/micro_batch_size) at each (re)start, since a param cannot change once logged."""
    counts = sorted(plans)
    return {
        "plan.global_batch_size": plans[counts[0]].global_batch_size,
        "plan.world_size": f"{counts[0]}-{counts[-1]}",
    }
