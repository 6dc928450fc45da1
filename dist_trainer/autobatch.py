"""Automatic micro-batch (`trainer.max_micro_batch_size=auto`): find, agree, re-solve.

Each worker FINDS the largest micro-batch that fits its device, the workers AGREE on the smallest
with one all-reduce (MIN), and each Trainer RE-SOLVES the batch plan with it as the cap
(`batching.plan_batches`). The global batch stays exactly what was asked; only its split into
micro-batch x accumulation steps changes, and the sampler, the feed, the loss scale and the
validation batches all follow the re-solved plan.

Find
----
The plan only ever uses micro-batches that divide the per-worker batch (it takes the fewest
accumulation steps whose micro-batch divides it and is at least half the cap), so those are the
sizes tried: first the whole per-worker batch (one micro-step), then halving (the largest divisor
at most half the last failure) until one fits, then a binary search among the divisors between
that fit and the first failure. That gives d, the largest divisor that fits. Only when a size
above 2d also fits (a per-worker batch with few divisors, e.g. a prime) is the largest fitting
size n searched exactly (binary search between 2d+1 and the first failing divisor): the plan then
refuses, since micro-batches under half of what fits are wasteful, and its message lists global
batch sizes that split well under n. The worker offers d, or n in that case. Memory is assumed to
grow with the micro-batch, so a search takes O(log(per-worker batch)) probes. `search_micro_batch`
is this logic alone, on a `fits(size)` predicate, without torch.

A probe is one real micro-step of `size` samples of the training split, through the training feed:
forward and backward of the bare model (built, on its device, not yet wrapped in DDP, so nothing
is all-reduced and no collective runs), under the job's autocast, summed loss as in training.

- CUDA: a real out-of-memory search. During the probe a placeholder allocation stands for what
  exists in training but not yet in the probe: optimizer state (per trainable parameter element:
  2 slots for Adam/AdamW, 3 with amsgrad, 1 for SGD with momentum, 0 without, 2 for any other
  optimizer) and, when distributed, DDP's gradient buckets (one more copy of the gradients).
  torch.cuda.OutOfMemoryError means "does not fit": the gradients are set to None, garbage is
  collected and torch.cuda.empty_cache() hands the cached blocks back before the next, smaller
  size. With `trainer.micro_batch_memory_mb` the probe's peak allocated bytes
  (torch.cuda.max_memory_allocated: parameters, gradients, placeholder, batch, activations and
  workspaces; not the CUDA context nor allocator fragmentation) must also stay under it.
- CPU (and any other device): there is no out-of-memory error to catch (allocation just swaps),
  so the probe counts bytes and compares them with `trainer.micro_batch_memory_mb` (required);
  more than the budget counts as out of memory. Counted, each storage once: the model's
  parameters and buffers, the gradients after backward, the input batch (x and y), and every
  tensor autograd saves for backward during the forward pass
  (torch.autograd.graph.saved_tensors_hooks) that is not one of those. That is what a micro-step
  holds when forward turns into backward, where its memory peaks; the saved activations grow
  linearly with the micro-batch, the rest is fixed. Not counted: temporaries freed within the
  forward pass and the backward pass's transient buffers (so the count is somewhat below the true
  peak), optimizer state and DDP's gradient buckets (they do not exist yet and do not grow with
  the micro-batch), allocator overhead, and the process itself (Python, torch, the dataset). The
  count is exact and deterministic for given shapes, so every run finds the same size.

The probe does not change training: it runs under torch.random.fork_rng (the CPU generator and
this CUDA device's), so init, dropout masks and anything drawn later are what they would be
without it; the model's buffers (BatchNorm running statistics and counters) are saved before and
copied back after; gradients are set to None and parameters are never stepped. The feed seeds and
restores the data RNGs itself. The probe runs the eager model, not torch.compile's (compiled steps
usually need less memory, not more).

Agree
-----
One all_reduce(MIN) of the offered size over the default process group. Every worker takes part
whatever happened in its probe: a worker where nothing fits offers 0, one whose probe raised
offers -1 (and raises its own error after the all-reduce), so all workers fail together instead
of some waiting forever in the next collective (Composer's auto micro-batching deadlocks when
only some ranks run out of memory).

Re-solve
--------
`plan_batches(global batch, world size, agreed)`: the micro-batch is the agreed size (it divides
the per-worker batch), or the plan refuses (a ConfigError with the batch plan's message, which
lists the nearest valid global batch sizes) when only wasteful splits exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dist_trainer.batching import BatchPlan, BatchPlanError, plan_batches
from dist_trainer.config import ConfigError, TrainerConfig
from dist_trainer.loading import tensors_of

__all__ = [
    "AutoMicroBatch",
    "MicroStepProbe",
    "Search",
    "agree",
    "check_auto_config",
    "divisors",
    "find_micro_batch",
    "optimizer_state_slots",
    "reserve_bytes",
    "search_micro_batch",
]

MIB = 2**20
_Batch = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------- the search (no torch)
def divisors(n: int) -> list[int]:
    """The divisors of `n`, ascending: the micro-batch sizes an exact plan can use."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


@dataclass(frozen=True)
class Search:
    """What one worker found.

    Args:
        size: the largest micro-batch that fits and divides the per-worker batch (0: none fits).
        offer: what the worker offers to the all-reduce: `size`, or, when a size above twice
            `size` also fits, the largest fitting size exactly (the plan then refuses).
        tried: every (size, fits) probed, in order.
    """

    size: int
    offer: int
    tried: tuple[tuple[int, bool], ...]


def search_micro_batch(per_worker_batch: int, fits: Callable[[int], bool]) -> Search:
    """Find the largest micro-batch the plan can use for which `fits(size)` holds.

    Tries the per-worker batch first, halves (over its divisors) until a size fits, then
    binary-searches the divisors between that fit and the first failure. `fits` must be
    monotone (true for a size, true for every smaller one); each size is probed at most once.
    """
    sizes = divisors(per_worker_batch)
    tried: dict[int, bool] = {}

    def probe(size: int) -> bool:
        if size not in tried:
            tried[size] = bool(fits(size))
        return tried[size]

    fail: int | None = None  # index in sizes of the smallest divisor known not to fit
    i = len(sizes) - 1
    while not probe(sizes[i]):
        fail = i
        if i == 0:
            return Search(0, 0, tuple(tried.items()))
        i = max(j for j in range(i) if sizes[j] <= sizes[i] / 2)  # sizes[0] == 1 always is
    fit = i
    while fail is not None and fail - fit > 1:
        mid = (fit + fail) // 2
        if probe(sizes[mid]):
            fit = mid
        else:
            fail = mid
    size = offer = sizes[fit]
    if fail is not None and 2 * size + 1 < sizes[fail] and probe(2 * size + 1):
        # No divisor between size and sizes[fail], yet more than twice size fits: find exactly
        # how much, so the plan's refusal suggests global batches that use it.
        lo, hi = 2 * size + 1, sizes[fail]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe(mid):
                lo = mid
            else:
                hi = mid
        offer = lo
    return Search(size, offer, tuple(tried.items()))


# ---------------------------------------------------------------- the probe (torch)
def check_auto_config(trainer: TrainerConfig, device: torch.device | str) -> None:
    """Raise ConfigError when auto has nothing to search with: CPU without a memory budget."""
    kind = torch.device(device).type
    if trainer.auto_micro_batch and kind != "cuda" and trainer.micro_batch_memory_mb is None:
        raise ConfigError(
            f"trainer.max_micro_batch_size=auto on {kind} needs trainer.micro_batch_memory_mb, "
            "the memory (MiB) one worker may use for a micro-step: there is no out-of-memory "
            "error to search with off CUDA. Fix: trainer.micro_batch_memory_mb=2048 (or "
            "trainer.max_micro_batch_size=<int>)"
        )


def optimizer_state_slots(optimizer: dict[str, Any]) -> int:
    """Tensors of a parameter's size the optimizer keeps per parameter (an estimate by name)."""
    name = str(optimizer.get("_target_", "")).rsplit(".", 1)[-1]
    if name == "SGD":
        return 1 if optimizer.get("momentum") else 0
    if name in ("Adam", "AdamW"):
        return 3 if optimizer.get("amsgrad") else 2
    return 2


def reserve_bytes(model: torch.nn.Module, optimizer: dict[str, Any], distributed: bool) -> int:
    """Bytes the CUDA probe holds for optimizer state and DDP's buckets (absent at probe time)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return trainable * (optimizer_state_slots(optimizer) + int(distributed))


def _storage(t: torch.Tensor) -> tuple[Any, int, Any]:
    """(key, bytes, what keeps it alive) of the memory under `t`, once per storage."""
    try:
        storage = t.untyped_storage()
        return ("storage", storage.data_ptr()), storage.nbytes(), storage
    except (RuntimeError, NotImplementedError, TypeError):  # e.g. sparse: no plain storage
        return ("tensor", id(t)), t.numel() * t.element_size(), t


class MicroStepProbe:
    """Runs micro-steps of a candidate size on the bare model and says whether they fit.

    Args:
        model: the bare model (not the DDP wrapper), on `device`.
        load: size -> (x, y), a batch of that many training samples on `device`.
        step: (x, y) -> None, forward and backward of the model as in training.
        device: where the model lives; CUDA searches by out-of-memory, others count bytes.
        memory_mb: the budget (`trainer.micro_batch_memory_mb`); required off CUDA.
        reserve: bytes the CUDA probe holds for memory training has and the probe not yet.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        load: Callable[[int], _Batch],
        step: Callable[[torch.Tensor, torch.Tensor], None],
        device: torch.device,
        memory_mb: float | None = None,
        reserve: int = 0,
    ) -> None:
        self.model, self.load, self.step = model, load, step
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if not self.cuda and memory_mb is None:
            raise ConfigError("trainer.micro_batch_memory_mb is required off CUDA")
        self.budget = None if memory_mb is None else int(memory_mb * MIB)
        self.reserve = reserve if self.cuda else 0
        self.measured: dict[int, int | None] = {}  # bytes per probed size; None: out of memory

    def measure(self, size: int) -> int:
        """Bytes a micro-step of `size` takes (CUDA: peak allocated; else counted, see module)."""
        return self._peak_cuda(size) if self.cuda else self._count(size)

    def fits(self, size: int) -> bool:
        """One probe: does a micro-step of `size` fit (no out-of-memory, within the budget)?"""
        used: int | None = None
        oom = False
        try:
            used = self.measure(size)
        except torch.cuda.OutOfMemoryError:
            oom = True
        finally:
            self._free(collect=self.cuda or oom)
        self.measured[size] = used
        return used is not None and (self.budget is None or used <= self.budget)

    @contextlib.contextmanager
    def preserved(self) -> Iterator[None]:
        """Leave no trace: RNG states, buffers and gradients are as before when it exits."""
        saved = [(b, b.detach().clone()) for b in self.model.buffers()]
        index = self.device.index
        devices = [torch.cuda.current_device() if index is None else index] if self.cuda else []
        with torch.random.fork_rng(devices=devices):
            try:
                yield
            finally:
                with torch.no_grad():
                    for buffer, value in saved:
                        buffer.copy_(value)
                self._free(collect=self.cuda)

    def _free(self, collect: bool) -> None:
        self.model.zero_grad(set_to_none=True)
        if collect:
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()

    def _count(self, size: int) -> int:
        held: dict[Any, tuple[int, Any]] = {}  # storages kept alive, so no address is reused

        def add(t: torch.Tensor) -> torch.Tensor:
            key, nbytes, alive = _storage(t)
            if nbytes:
                held.setdefault(key, (nbytes, alive))
            return t

        for t in (*self.model.parameters(), *self.model.buffers()):
            add(t)
        x, y = self.load(size)
        for t in tensors_of((x, y)):  # the input may be a dict or a tuple of tensors
            add(t)
        with torch.autograd.graph.saved_tensors_hooks(add, lambda t: t):
            self.step(x, y)
        for p in self.model.parameters():
            if p.grad is not None:
                add(p.grad)
        return sum(nbytes for nbytes, _ in held.values())

    def _peak_cuda(self, size: int) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        placeholder = torch.empty(self.reserve, dtype=torch.uint8, device=self.device)
        x, y = self.load(size)
        self.step(x, y)
        torch.cuda.synchronize(self.device)
        del placeholder, x, y
        return int(torch.cuda.max_memory_allocated(self.device))


# ---------------------------------------------------------------- agree and re-solve
def agree(offer: int, device: torch.device, distributed: bool) -> int:
    """The smallest offer over all workers: one all_reduce(MIN) (or the offer, alone)."""
    if not distributed:
        return offer
    value = torch.tensor([offer], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


@dataclass(frozen=True)
class AutoMicroBatch:
    """The outcome of `find_micro_batch` on one worker.

    Args:
        plan: the re-solved plan (`auto=True`, `auto_micro_batch_size=agreed`).
        search: what this worker found.
        agreed: the smallest offer over all workers: the cap the plan was solved with.
        seconds: wall time of the probe and the agreement (which waits for the slowest worker).
        measured: bytes per probed size on this worker (None: out of memory).
    """

    plan: BatchPlan
    search: Search
    agreed: int
    seconds: float
    measured: dict[int, int | None]

    def as_params(self) -> dict[str, int | float]:
        """MLflow params of the outcome (`plan.*`)."""
        return {
            "plan.auto_micro_batch_size": self.agreed,
            "plan.micro_batch_size": self.plan.micro_batch_size,
            "plan.accumulation_steps": self.plan.accumulation_steps,
        }

    def describe(self) -> str:
        """One line for the log: what was tried, found and agreed, and the resulting plan."""
        tried = ", ".join(
            f"{size} ({_mib(self.measured.get(size))}{'' if ok else ', too much'})"
            for size, ok in self.search.tried
        )
        return (
            f"auto micro-batch: tried {tried}; this worker fits {self.search.size}, the "
            f"{self.plan.world_size} worker(s) agree on {self.agreed} ({self.seconds:.2f} s): "
            f"micro-batch {self.plan.micro_batch_size} x {self.plan.accumulation_steps} "
            "accumulation step(s)"
        )


def _mib(nbytes: int | None) -> str:
    return "out of memory" if nbytes is None else f"{nbytes / MIB:.2f} MiB"


def find_micro_batch(
    plan: BatchPlan, probe: MicroStepProbe, *, distributed: bool
) -> AutoMicroBatch:
    """Find this worker's micro-batch, agree with the others, re-solve `plan` with it.

    Every worker must call it (it runs one collective when distributed), whatever its probe
    does: errors are raised only after the all-reduce, on every worker.

    Raises:
        ConfigError: nothing fits on some worker, or only wasteful splits of the global batch
            fit (the message lists global batch sizes that split well).
        Exception: this worker's own probe failed (e.g. the model's forward raised).
        RuntimeError: another worker's probe failed.
    """
    started = time.perf_counter()
    error: BaseException | None = None
    search = Search(0, 0, ())
    try:
        with probe.preserved():
            search = search_micro_batch(plan.per_worker_batch_size, probe.fits)
        offer = search.offer
    except Exception as exc:  # raised after the all-reduce, so no worker waits forever
        error, offer = exc, -1
    agreed = agree(offer, probe.device, distributed)
    seconds = time.perf_counter() - started
    if error is not None:
        raise error
    if agreed < 0:
        raise RuntimeError(
            "another worker failed while probing its micro-batch "
            "(trainer.max_micro_batch_size=auto); its own error is in its log"
        )
    if agreed == 0:
        raise ConfigError(_nothing_fits(probe, search))
    try:
        solved = plan_batches(plan.global_batch_size, plan.world_size, agreed)
    except BatchPlanError as exc:
        raise ConfigError(
            f"trainer.max_micro_batch_size=auto: micro-batches of up to {agreed} samples fit "
            f"every worker, but {exc}"
        ) from None
    solved = dataclasses.replace(solved, auto=True, auto_micro_batch_size=agreed)
    return AutoMicroBatch(solved, search, agreed, seconds, dict(probe.measured))


def _nothing_fits(probe: MicroStepProbe, search: Search) -> str:
    fix = (
        "Fix: a larger trainer.micro_batch_memory_mb, a smaller model, more device memory, or "
        "trainer.max_micro_batch_size=<int>"
    )
    if search.size:
        return (
            "trainer.max_micro_batch_size=auto: not even a micro-batch of 1 sample fits on "
            f"another worker (its log says why). {fix}"
        )
    used = probe.measured.get(1)
    why = "runs out of device memory" if used is None else f"needs {used / MIB:.2f} MiB"
    if probe.budget is not None:
        why += f", trainer.micro_batch_memory_mb allows {probe.budget / MIB:.2f}"
    return (
        f"trainer.max_micro_batch_size=auto: a micro-step of 1 sample {why} on "
        f"{probe.device}. {fix}"
    )
