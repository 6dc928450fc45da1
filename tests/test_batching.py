"""The batch plan: exact splits, table-tested, and refusals that list what would work."""

import dataclasses

import pytest

from dist_trainer.batching import (
    BatchPlan,
    BatchPlanError,
    describe_elastic,
    elastic_params,
    nearest_valid_global_batch_sizes,
    plan_batches,
    plan_elastic,
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


@pytest.mark.parametrize(
    ("global_batch", "low", "high", "cap", "accum_by_count"),
    [
        (64, 1, 2, 16, {1: 4, 2: 2}),
        (64, 1, 4, 16, None),  # 3 workers cannot split 64
        (60, 1, 4, 16, {1: 4, 2: 2, 3: 2, 4: 1}),
        (64, 2, 4, 32, None),
        (48, 2, 4, None, {2: 1, 3: 1, 4: 1}),
        (128, 4, 8, 8, None),  # 5, 6, 7 cannot split 128
        (840, 1, 8, 64, {1: 14, 2: 7, 3: 5, 4: 5, 5: 3, 6: 4, 7: 2, 8: 3}),
    ],
)
def test_elastic_plan_table(global_batch, low, high, cap, accum_by_count):
    """A plan for every count of the range with the same global batch, or a refusal whose
    proposed global batches split over every count."""
    if accum_by_count is None:
        with pytest.raises(BatchPlanError) as info:
            plan_elastic(global_batch, low, high, cap)
        message = str(info.value)
        failing = [n for n in range(low, high + 1) if global_batch % n]
        assert f"over {', '.join(map(str, failing))} worker(s)" in message
        proposed = [int(g) for g in message.split("every count: ")[1].split(".")[0].split(", ")]
        assert len(proposed) == 4
        for candidate in proposed:
            plan_elastic(candidate, low, high, cap)  # each proposal works
        return
    plans = plan_elastic(global_batch, low, high, cap)
    assert sorted(plans) == list(range(low, high + 1))
    for count, plan in plans.items():
        assert plan.world_size == count and plan.global_batch_size == global_batch
        assert plan.micro_batch_size * plan.accumulation_steps * count == global_batch
        assert plan.accumulation_steps == accum_by_count[count]


def test_elastic_plan_description_and_params():
    plans = plan_elastic(64, 1, 2, 16)
    text = describe_elastic(plans)
    assert text.splitlines()[0].startswith("elastic on 1-2 workers: the global batch stays 64")
    assert "micro-batch 16 x 4 accumulation step(s) x 1 worker(s)" in text
    assert elastic_params(plans) == {"plan.global_batch_size": 64, "plan.world_size": "1-2"}
    auto = plan_elastic(64, 1, 2, "auto")
    assert all(p.provisional for p in auto.values())
