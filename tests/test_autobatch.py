"""trainer.max_micro_batch_size=auto: the search (table-tested, no torch), the CPU byte count,
a probe that leaves training unchanged, and 2 real gloo workers that agree on one plan."""

from __future__ import annotations

import datetime
import gc
import logging
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dist_trainer.autobatch import (
    MIB,
    MicroStepProbe,
    check_auto_config,
    divisors,
    reserve_bytes,
    search_micro_batch,
)
from dist_trainer.batching import BatchPlanError, plan_batches
from dist_trainer.config import ConfigError, TrainerConfig
from dist_trainer.loop import Trainer, WorkerInfo
from tests.conftest import free_port, job_config
from tests.test_loop import EQUIV, FLOAT64_TOLERANCE, _params, _single_process

CPU = torch.device("cpu")
# A wider MLP than tests/test_loop.py's: 512-wide activations make the micro-batch matter to the
# count (8 KiB per sample in float64, next to 4.3 MiB of parameters and gradients).
WIDE = [*EQUIV, "optim=adam", "model.hidden_sizes=[512,512]"]
AUTO = "trainer.max_micro_batch_size=auto"


def _trainer(*overrides: str, world: int = 1, rank: int = 0, device=CPU) -> Trainer:
    job = job_config(*overrides)
    plan = plan_batches(job.trainer.global_batch_size, world, job.trainer.micro_batch_cap)
    return Trainer(job, plan, WorkerInfo(rank, world, rank, 0, device))


def _probe(trainer: Trainer, memory_mb: float = 1.0) -> MicroStepProbe:
    """The probe a Trainer with auto builds (on CUDA with its optimizer-state placeholder)."""
    reserve = reserve_bytes(trainer.model, trainer.job.optim.optimizer, trainer.distributed)
    return MicroStepProbe(
        trainer.model,
        trainer._probe_batch,
        trainer._probe_step,
        trainer.device,
        memory_mb=memory_mb,
        reserve=reserve,
    )


def _between(low: int, high: int) -> float:
    """A budget in MiB halfway between two byte counts."""
    return (low + high) / 2 / MIB


# ---------------------------------------------------------------- the search, without torch
@pytest.mark.parametrize(
    ("per_worker", "capacity", "size", "offer", "tried"),
    [
        (32, 100, 32, 32, [(32, True)]),  # the whole per-worker batch fits: one micro-step
        (32, 20, 16, 16, [(32, False), (16, True)]),
        (32, 12, 8, 8, [(32, False), (16, False), (8, True)]),
        (32, 0, 0, 0, [(32, False), (16, False), (8, False), (4, False), (2, False), (1, False)]),
        # 96: halving to 24, then the only divisor between 24 and 48 is 32
        (96, 40, 32, 32, [(96, False), (48, False), (24, True), (32, True)]),
        # 100 = 4 x 25: 25 fits, 50 does not; nothing between 25 and 50 divides 100
        (100, 30, 25, 25, [(100, False), (50, False), (25, True)]),
        # 127 is prime: only 1 divides under 127, yet 100 fits -> offer 100 (the plan refuses)
        (127, 100, 1, 100, None),
        (127, 2, 1, 1, [(127, False), (1, True), (3, False)]),
        (1, 1, 1, 1, [(1, True)]),
    ],
)
def test_search_table(per_worker, capacity, size, offer, tried):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= capacity

    found = search_micro_batch(per_worker, fits)
    assert (found.size, found.offer) == (size, offer)
    assert len(calls) == len(set(calls)) == len(found.tried)  # each size probed once
    if tried is not None:
        assert list(found.tried) == tried


def test_search_against_a_memory_table():
    """fits() as a budget over a table of bytes per size: the largest size within it."""
    need = {n: 4_000_000 + 8_448 * n for n in range(1, 65)}  # like the wide MLP's count
    for budget, expected in [(4_300_000, 32), (4_200_000, 16), (4_100_000, 8), (3_000_000, 0)]:
        found = search_micro_batch(64, lambda n, b=budget: need[n] <= b)
        assert found.size == expected
        assert all(ok == (need[n] <= budget) for n, ok in found.tried)


def test_search_returns_the_largest_fitting_usable_size_exhaustively():
    """Every per-worker batch up to 96 and every capacity: the largest fitting divisor, the
    per-worker batch probed first, O(log) probes, and an offer that the plan treats exactly as
    it would treat the true capacity."""
    for per_worker in range(1, 97):
        for capacity in range(per_worker + 2):
            found = search_micro_batch(per_worker, lambda n, c=capacity: n <= c)
            usable = [d for d in divisors(per_worker) if d <= capacity]
            assert found.size == (max(usable) if usable else 0)
            assert found.tried[0][0] == per_worker
            assert len(found.tried) <= 2 * math.ceil(math.log2(per_worker + 1)) + 2
            if capacity == 0:
                assert found.offer == 0
                continue
            assert _outcome(per_worker, found.offer) == _outcome(per_worker, capacity)


def _outcome(per_worker: int, cap: int) -> tuple[int, int] | None:
    """The plan's (micro-batch, accumulation) for this cap, None when it refuses."""
    try:
        plan = plan_batches(per_worker * 2, 2, cap)
    except BatchPlanError:
        return None
    return plan.micro_batch_size, plan.accumulation_steps


def test_the_minimum_of_the_offers_plans_as_the_minimum_of_the_capacities():
    """Two workers with different room: MIN over what they offer gives the plan that the
    smaller room alone gives (so one all-reduce of one integer is enough)."""
    for per_worker in (12, 17, 32, 36, 60):
        for a in range(1, per_worker + 1):
            for b in range(1, per_worker + 1):
                offers = [
                    search_micro_batch(per_worker, lambda n, c=c: n <= c).offer for c in (a, b)
                ]
                assert _outcome(per_worker, min(offers)) == _outcome(per_worker, min(a, b))


# ---------------------------------------------------------------- what a CPU probe counts
def test_cpu_count_is_parameters_gradients_batch_and_saved_activations():
    """The wide MLP in float64, counted by hand: parameters + gradients, and per sample the
    input (30) and target (1), the two ReLU outputs autograd saves (512 + 512), the logit (1)."""
    trainer = _trainer(*WIDE)
    params = sum(p.numel() for p in trainer.model.parameters())
    probe = _probe(trainer)
    for n in (1, 7, 32, 64):
        assert probe.measure(n) == 8 * (2 * params + n * (30 + 1 + 512 + 512 + 1))
    assert probe.fits(1) is False  # 4.3 MiB > the 1 MiB budget
    assert all(p.grad is None for p in trainer.model.parameters())


@pytest.mark.parametrize(
    "overrides",
    [
        WIDE,
        ["experiment=digits_cnn"],
        ["experiment=tiny_text_lm"],
        ["model._target_=tests.test_autobatch.NormDropNet", "trainer.precision=64"],
    ],
    ids=["mlp", "cnn", "transformer", "batchnorm_dropout"],
)
def test_cpu_count_grows_with_the_micro_batch(overrides):
    probe = _probe(_trainer(*overrides))
    counts = [probe.measure(n) for n in (2, 3, 4, 8, 16, 32)]  # BatchNorm needs 2
    assert all(a < b for a, b in zip(counts, counts[1:], strict=False)), counts


# ---------------------------------------------------------------- the probe changes nothing
class NormDropNet(nn.Module):
    """BatchNorm (running statistics) and dropout (RNG): what a probe could disturb."""

    def __init__(self, in_features: int, num_classes: int, hidden_sizes=(64,)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden_sizes:
            layers += [nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU()]
            layers.append(nn.Dropout(0.3))
            in_features = width
        self.body = nn.Sequential(*layers, nn.Linear(in_features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


class OomAbove(nn.Module):
    """Raises CUDA's out-of-memory error for training batches over `limit`, as a full GPU
    would (validation, without autograd's saved activations, takes twice the micro-batch)."""

    def __init__(self, in_features: int, num_classes: int, limit: int = 20) -> None:
        super().__init__()
        self.limit = limit
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"tried a batch of {len(x)} (limit {self.limit})")
        return self.linear(x).squeeze(-1)


@pytest.mark.parametrize(
    "model",
    [
        ["model.dropout=0.3"],  # the wide MLP with dropout after each hidden layer
        # drop_last: the short last batch would leave BatchNorm a micro-batch of 1 sample
        [
            "model._target_=tests.test_autobatch.NormDropNet",
            "model.hidden_sizes=[128]",
            "trainer.drop_last=true",
        ],
    ],
    ids=["mlp_dropout", "batchnorm_dropout"],
)
def test_auto_trains_exactly_as_the_fixed_micro_batch_it_lands_on(model):
    """Probing runs dropout and BatchNorm in training mode; with the RNG forked and the buffers
    restored, the run equals the one configured with that micro-batch (float64, 2 epochs)."""
    base = [*WIDE, *model]
    budget = _between(*(_probe(_trainer(*base)).measure(n) for n in (16, 32)))
    auto = _trainer(*base, AUTO, f"trainer.micro_batch_memory_mb={budget}")
    assert auto.auto_batch is not None and auto.auto_batch.agreed == 16
    assert (auto.plan.micro_batch_size, auto.plan.accumulation_steps) == (16, 4)
    assert [size for size, _ in auto.auto_batch.search.tried] == [64, 32, 16]
    auto.fit()
    fixed = _trainer(*base, "trainer.max_micro_batch_size=16")
    fixed.fit()
    assert auto.step == fixed.step >= 14
    rel_error = (_params(auto) - _params(fixed)).norm() / _params(fixed).norm()
    assert rel_error < FLOAT64_TOLERANCE, f"relative error {rel_error:.3g}"
    for name, buffer in fixed.model.named_buffers():  # BatchNorm statistics: same updates
        assert torch.equal(buffer, dict(auto.model.named_buffers())[name]), name
    # The check can fail: one extra random draw (as a probe without fork_rng would make)
    # changes the dropout masks and the weights well beyond float64 noise.
    drifted = _trainer(*base, "trainer.max_micro_batch_size=16")
    torch.rand(1)
    drifted.fit()
    gap = (_params(drifted) - _params(fixed)).norm() / _params(fixed).norm()
    assert gap > 1e3 * FLOAT64_TOLERANCE, gap


def test_out_of_memory_errors_are_caught_and_the_search_goes_smaller():
    """The CUDA path's contract on CPU: an OutOfMemoryError means 'does not fit'; the largest
    divisor of the per-worker batch under the limit is found and training then runs."""
    trainer = _trainer(
        "model._target_=tests.test_autobatch.OomAbove",
        "model.limit=20",
        "trainer.global_batch_size=64",
        "trainer.max_steps=3",
        AUTO,
        "trainer.micro_batch_memory_mb=1000",
    )
    found = trainer.auto_batch
    assert found is not None
    assert list(found.search.tried) == [(64, False), (32, False), (16, True)]
    assert found.measured[64] is None and found.measured[16] > 0
    assert (trainer.plan.micro_batch_size, trainer.plan.accumulation_steps) == (16, 4)
    assert all(p.grad is None for p in trainer.model.parameters())
    trainer.fit()
    assert trainer.step == 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_dataloader_feed_probes_what_the_in_memory_feed_probes(num_workers):
    """A map-style dataset through the DataLoader: same counts, same plan, same training."""
    budget = _between(*(_probe(_trainer(*WIDE)).measure(n) for n in (16, 32)))
    auto = [*WIDE, AUTO, f"trainer.micro_batch_memory_mb={budget}", "trainer.max_steps=4"]
    memory = _trainer(*auto)
    loaded = _trainer(
        *auto, "data.loader.in_memory=false", f"data.loader.num_workers={num_workers}"
    )
    assert not loaded.train_feed.in_memory
    assert loaded.auto_batch.measured == memory.auto_batch.measured
    assert loaded.plan == memory.plan and memory.plan.micro_batch_size == 16
    memory.fit()
    loaded.fit()
    rel_error = (_params(loaded) - _params(memory)).norm() / _params(memory).norm()
    assert rel_error < FLOAT64_TOLERANCE


# ---------------------------------------------------------------- config and refusals
def test_auto_on_cpu_without_a_budget_names_the_key_and_the_fix():
    job = job_config(AUTO)
    with pytest.raises(ConfigError, match=r"trainer\.micro_batch_memory_mb") as err:
        Trainer(job, plan_batches(64, 1, "auto"), WorkerInfo(0, 1, 0, 0, CPU))
    assert "Fix: trainer.micro_batch_memory_mb=" in str(err.value)
    check_auto_config(job.trainer, "cuda")  # on CUDA the out-of-memory search needs none


@pytest.mark.parametrize("budget", ["-1", "0", "-0.5"])
def test_a_budget_that_is_not_a_positive_number_is_refused(budget):
    with pytest.raises(ConfigError, match=r"trainer\.micro_batch_memory_mb"):
        job_config(AUTO, f"trainer.micro_batch_memory_mb={budget}")


def test_a_budget_without_auto_is_ignored():
    """A study may sweep max_micro_batch_size over ints and auto with one budget."""
    job = job_config("trainer.max_micro_batch_size=16", "trainer.micro_batch_memory_mb=100")
    assert plan_batches(64, 2, job.trainer.micro_batch_cap).micro_batch_size == 16


def test_default_is_no_cap_and_auto_starts_from_a_provisional_plan():
    default = job_config()
    assert default.trainer.max_micro_batch_size is None
    assert plan_batches(64, 2, default.trainer.micro_batch_cap).accumulation_steps == 1
    job = job_config(AUTO, "trainer.micro_batch_memory_mb=64")
    assert job.trainer.auto_micro_batch and job.trainer.micro_batch_cap == "auto"
    provisional = plan_batches(64, 2, job.trainer.micro_batch_cap)
    assert provisional.provisional and provisional.per_worker_batch_size == 32
    assert "plan.micro_batch_size" not in provisional.as_params()  # the workers log it
    assert "trainer.max_micro_batch_size=auto" in provisional.describe()
    assert TrainerConfig(max_micro_batch_size=None).micro_batch_cap is None


def test_nothing_fits_says_how_much_one_sample_needs():
    with pytest.raises(ConfigError, match=r"a micro-step of 1 sample needs 4\.\d\d MiB"):
        _trainer(*WIDE, AUTO, "trainer.micro_batch_memory_mb=2")


def test_only_a_wasteful_split_fitting_is_refused_with_valid_global_batches():
    """Global batch 127 on one worker is prime: if ~100 fits, only micro-batches of 1 divide
    it. The plan refuses, listing global batch sizes that split well under what fits."""
    probe = _probe(_trainer(*WIDE))
    budget = _between(probe.measure(100), probe.measure(101))
    with pytest.raises(ConfigError, match="micro-batches of up to 100 samples fit") as err:
        _trainer(
            *WIDE, "trainer.global_batch_size=127", AUTO, f"trainer.micro_batch_memory_mb={budget}"
        )
    message = str(err.value)
    assert "Nearest valid global batch sizes" in message and "128" in message


def test_run_params_and_log_carry_the_outcome(caplog):
    budget = _between(*(_probe(_trainer(*WIDE)).measure(n) for n in (8, 16)))
    with caplog.at_level(logging.INFO, logger="dist_trainer.loop"):
        trainer = _trainer(*WIDE, AUTO, f"trainer.micro_batch_memory_mb={budget}")
    line = next(r.getMessage() for r in caplog.records if "auto micro-batch" in r.getMessage())
    assert line.startswith("auto micro-batch: tried 64 (4.77 MiB, too much), 32 (")
    assert "8 (4.32 MiB); this worker fits 8, the 1 worker(s) agree on 8" in line
    assert line.endswith("micro-batch 8 x 8 accumulation step(s)")
    params = trainer._run_params()
    assert params["plan.auto_micro_batch_size"] == 8
    assert params["plan.micro_batch_size"] == 8 and params["plan.accumulation_steps"] == 8
    assert "plan.auto_probe_s" not in params  # a time: it differs per attempt
    assert float(trainer._attempt_details()["auto_probe_s"]) >= 0
    assert "auto" in trainer.plan.describe() and "micro-batch 8 x 8" in trainer.plan.describe()
    assert "plan.auto_micro_batch_size" not in _trainer(*WIDE)._run_params()


# ---------------------------------------------------------------- 2 workers, gloo
def _auto_worker(rank: int, world: int, port: int, runs: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A timeout, so a deadlock in the agreement fails the test instead of hanging it.
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    trainer = None
    try:
        results = {}
        for name, (overrides, per_rank, fit) in runs.items():
            try:
                trainer = _trainer(*overrides, *per_rank[rank], world=world, rank=rank)
            except (ConfigError, RuntimeError) as exc:
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            if fit:
                trainer.fit()
            results[name] = {"plan": trainer.plan, "params": _params(trainer), "fit": fit}
        torch.save(results, f"{out}.{rank}")
    finally:
        del trainer
        gc.collect()  # DDP models alive at exit can make gloo abort (pytorch#179291)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """One 2-worker gloo group (torch.multiprocessing, no Ray) runs every case in turn."""
    probe = _probe(_trainer(*WIDE))
    need = {n: probe.measure(n) for n in (8, 16, 32)}
    fits_8, fits_16 = _between(need[8], need[16]), _between(need[16], need[32])
    budget = "trainer.micro_batch_memory_mb="
    runs = {
        # per-worker batch 32: 8 fits -> 4 accumulation steps on each of 2 workers
        "auto": ([*WIDE, AUTO], [[f"{budget}{fits_8}"]] * 2, True),
        "different": ([*WIDE, AUTO], [[f"{budget}{fits_16}"], [f"{budget}{fits_8}"]], False),
        "smaller_on_both": ([*WIDE, AUTO], [[f"{budget}{fits_8}"]] * 2, False),
        "no_room_on_rank_1": ([*WIDE, AUTO], [[f"{budget}{fits_16}"], [f"{budget}1"]], False),
    }
    out = str(tmp_path_factory.mktemp("auto") / "results.pt")
    mp.spawn(_auto_worker, args=(2, free_port(), runs, out), nprocs=2, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]


def test_two_workers_with_a_cpu_budget_accumulate_and_equal_one_process(two_workers):
    """auto with a budget that forces accumulation: 2 workers x 4 micro-steps of 8 train to
    the weights of one process on the whole global batch of 64 (float64)."""
    plans = [rank["auto"]["plan"] for rank in two_workers]
    assert plans[0] == plans[1]
    assert (plans[0].micro_batch_size, plans[0].accumulation_steps) == (8, 4)
    assert plans[0].auto_micro_batch_size == 8 and plans[0].global_batch_size == 64
    reference, steps = _single_process(WIDE)
    assert steps == 16
    for rank in two_workers:
        rel_error = (rank["auto"]["params"] - reference).norm() / reference.norm()
        assert rel_error < FLOAT64_TOLERANCE, f"relative error {rel_error:.3g}"


def test_workers_with_different_budgets_agree_on_the_smaller(two_workers):
    plans = [rank["different"]["plan"] for rank in two_workers]
    assert plans[0] == plans[1] == two_workers[0]["smaller_on_both"]["plan"]
    assert (plans[0].micro_batch_size, plans[0].accumulation_steps) == (8, 4)


def test_a_worker_without_room_fails_every_worker_instead_of_deadlocking(two_workers):
    rank0, rank1 = (rank["no_room_on_rank_1"]["error"] for rank in two_workers)
    assert rank0.startswith("ConfigError") and "another worker" in rank0
    assert rank1.startswith("ConfigError") and "a micro-step of 1 sample needs" in rank1


# ---------------------------------------------------------------- on a GPU (pytest -m gpu)
class Inflate(nn.Module):
    """Autograd keeps about `per_sample_bytes` per sample (a tanh over a [k, features] copy of
    each input), so a few dozen samples fill a GPU."""

    def __init__(self, in_features: int, num_classes: int, per_sample_bytes: int = 2**20) -> None:
        super().__init__()
        k = max(1, per_sample_bytes // (4 * in_features))
        self.scale = nn.Parameter(torch.full((k, in_features), 1e-3))
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spread = torch.tanh(x.unsqueeze(1) * self.scale).mean(dim=(1, 2))
        return (self.head(x) + spread.unsqueeze(-1)).squeeze(-1)


def _gpu_total() -> int:
    return torch.cuda.get_device_properties(0).total_memory


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
def test_cuda_out_of_memory_search_goes_below_the_per_worker_batch():
    """A real out-of-memory search: 64 samples need about twice the GPU, 16 about half."""
    trainer = _trainer(
        "model._target_=tests.test_autobatch.Inflate",
        f"model.per_sample_bytes={_gpu_total() // 100}",
        "trainer.global_batch_size=64",
        AUTO,
        device=torch.device("cuda:0"),
    )
    found = trainer.auto_batch
    assert found is not None and found.search.tried[0] == (64, False)
    assert found.measured[64] is None  # out of memory, caught
    assert found.agreed in (8, 16, 32)
    assert trainer.plan.accumulation_steps == 64 // found.agreed
    assert all(p.grad is None for p in trainer.model.parameters())
    baseline = torch.cuda.memory_allocated(0)
    trainer.train_step(next(trainer.train_feed.steps(trainer.sampler, 0)))  # it fits now
    assert torch.cuda.max_memory_allocated(0) < _gpu_total()
    assert torch.cuda.memory_allocated(0) >= baseline


@pytest.mark.gpu
@needs_gpu
def test_cuda_budget_lands_on_a_size_that_trains_like_the_fixed_size():
    """On CUDA a budget caps the probe's peak allocated bytes; the run then equals the one
    configured with the micro-batch it landed on (float64)."""
    base = [
        "model._target_=tests.test_autobatch.Inflate",
        f"model.per_sample_bytes={64 * MIB}",
        "trainer.precision=64",
        "trainer.global_batch_size=64",
        "trainer.max_steps=4",
        "optim=adam",
    ]
    cuda = torch.device("cuda:0")
    probe = _probe(_trainer(*base, device=cuda), memory_mb=1e9)
    assert probe.fits(16) and probe.fits(32)  # each probe frees what it allocated
    budget = _between(probe.measured[16], probe.measured[32])
    auto = _trainer(*base, AUTO, f"trainer.micro_batch_memory_mb={budget}", device=cuda)
    assert auto.plan.micro_batch_size == 16 and auto.plan.accumulation_steps == 4
    auto.fit()
    fixed = _trainer(*base, "trainer.max_micro_batch_size=16", device=cuda)
    fixed.fit()
    rel_error = (_params(auto) - _params(fixed)).norm() / _params(fixed).norm()
    assert rel_error < FLOAT64_TOLERANCE, f"relative error {rel_error:.3g}"
