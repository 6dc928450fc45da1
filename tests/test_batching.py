"""The batch plan: exact splits, table-tested, and refusals that list what would work."""

import dataclasses

import pytest

from dist_trainer.batching import (
    BatchPlan,
    BatchPlanError,
    nearest_valid_global_batch_sizes,
    plan_batches,
)


@pytest.mark.parametrize(
    ("global_batch", "world", "cap", "micro", "accum"),
    [
        (256, 2, None, 128, 1),  # no cap: one micro-step
        (256, 2, 128, 128, 1),
        (256, 2, 64, 64, 2),
        (256, 2, 32, 32, 4),
        (256, 4, 100, 64, 1),  # cap above the per-worker batch
        (96, 4, 8, 8, 3),  # DeepSpeed's example family: 96 = 8 x 3 x 4
        (100, 4, 8, 5, 5),  # 25 per worker: 8 does not divide, 5 x 5 does
        (100, 2, 32, 25, 2),  # fewest accumulation steps that divide 50
        (12, 3, 1, 1, 4),
        (7, 7, 1, 1, 1),
        (1, 1, None, 1, 1),
        (6, 1, 4, 3, 2),
    ],
)
def test_plan_table(global_batch, world, cap, micro, accum):
    plan = plan_batches(global_batch, world, cap)
    assert (plan.micro_batch_size, plan.accumulation_steps) == (micro, accum)
    assert plan.micro_batch_size * plan.accumulation_steps * plan.world_size == global_batch
    assert cap is None or plan.micro_batch_size <= cap


def test_plan_is_exact_for_every_small_case():
    """Exhaustive: every accepted plan multiplies out, respects the cap, and is efficient."""
    for world in range(1, 9):
        for global_batch in range(1, 130):
            for cap in (None, 1, 3, 8, 16, 64):
                try:
                    plan = plan_batches(global_batch, world, cap)
                except BatchPlanError:
                    assert global_batch % world or cap is not None
                    continue
                assert plan.global_batch_size == global_batch
                per_worker = global_batch // world
                assert plan.per_worker_batch_size == per_worker
                if cap is not None:
                    assert plan.micro_batch_size <= cap
                    assert 2 * plan.micro_batch_size >= min(cap, per_worker)


def test_indivisible_global_batch_lists_nearest_valid_sizes():
    with pytest.raises(BatchPlanError, match="trainer.global_batch_size=255") as err:
        plan_batches(255, 2, None)
    message = str(err.value)
    assert "does not divide by 2 workers" in message
    assert "254" in message and "256" in message


def test_wasteful_split_is_refused_with_alternatives():
    # 127 per worker is prime: with a cap of 64 only micro-batches of 1 would divide it.
    with pytest.raises(BatchPlanError, match="trainer.max_micro_batch_size=64") as err:
        plan_batches(254, 2, 64)
    assert "256" in str(err.value)
    for size in nearest_valid_global_batch_sizes(254, 2, 64):
        plan_batches(size, 2, 64)  # every suggestion is itself valid


@pytest.mark.parametrize(
    ("global_batch", "world", "cap", "key"),
    [
        (0, 2, None, "trainer.global_batch_size"),
        (-8, 2, None, "trainer.global_batch_size"),
        (8, 0, None, "scaling.num_workers"),
        (8, 2, 0, "trainer.max_micro_batch_size"),
        (8, 2, -1, "trainer.max_micro_batch_size"),
    ],
)
def test_non_positive_sizes_name_the_key(global_batch, world, cap, key):
    with pytest.raises(BatchPlanError, match=key):
        plan_batches(global_batch, world, cap)


def test_plan_rejects_an_inconsistent_triad():
    with pytest.raises(
        BatchPlanError, match="100 != micro-batch 8 x accumulation 3 x world size 4"
    ):
        BatchPlan(100, 4, 8, 3)


def test_plan_params_and_description():
    plan = plan_batches(256, 2, 64)
    assert plan.as_params()["plan.accumulation_steps"] == 2
    assert (
        plan.describe()
        == "global batch 256 = micro-batch 64 x 2 accumulation step(s) x 2 worker(s)"
    )


def test_auto_plan_is_provisional_until_the_workers_agree():
    """max_micro_batch_size=auto: one micro-step until the workers have found what fits."""
    provisional = plan_batches(64, 2, "auto")
    assert provisional.auto and provisional.provisional
    assert (provisional.micro_batch_size, provisional.accumulation_steps) == (32, 1)
    params = provisional.as_params()
    assert "plan.micro_batch_size" not in params and "plan.accumulation_steps" not in params
    assert params["plan.per_worker_batch_size"] == 32
    assert "trainer.max_micro_batch_size=auto" in provisional.describe()
    with pytest.raises(BatchPlanError, match="does not divide by 2 workers"):
        plan_batches(255, 2, "auto")


def test_auto_plan_after_agreement_says_what_fits():
    solved = dataclasses.replace(plan_batches(64, 2, 8), auto=True, auto_micro_batch_size=8)
    assert not solved.provisional
    assert solved.as_params()["plan.auto_micro_batch_size"] == 8
    assert solved.as_params()["plan.accumulation_steps"] == 4
    assert solved.describe() == (
        "global batch 64 = micro-batch 8 x 4 accumulation step(s) x 2 worker(s) "
        "(max_micro_batch_size=auto: micro-batches of 8 fit every worker)"
    )
    with pytest.raises(BatchPlanError, match="only set on an auto plan"):
        BatchPlan(64, 2, 8, 4, auto_micro_batch_size=8)


@pytest.mark.parametrize("cap", [True, "16", 2.5])
def test_a_cap_that_is_not_an_integer_is_refused(cap):
    with pytest.raises(BatchPlanError, match="trainer.max_micro_batch_size must be"):
        plan_batches(64, 2, cap)
