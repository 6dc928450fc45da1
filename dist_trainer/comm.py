"""Communication you can trust: DDP all-reduce timing, bandwidth figures and an α-β model.

Two things live here, both usable without Ray (all-reduce sweeps and the α-β model are in
dist_trainer.sweep):

* :class:`CommMeter` wraps DDP's gradient all-reduce in a communication hook that does exactly
  what DDP does by default and records, per bucket, its size and when it was in flight. It adds
  no synchronization on the hot path; timings are turned into numbers only in :meth:`collect`.
* Pure helpers for the nccl-tests bandwidth conventions (:func:`algbw_gbps`, :func:`busbw_gbps`)
  and for the communication a step actually waits for (:func:`exposed_comm_s`).

Units: bytes, seconds, and GB/s with GB = 1e9 bytes (as nccl-tests reports).
"""

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "CommMeter",
    "ExposedCommProbe",
    "ExposedPair",
    "StepComm",
    "algbw_gbps",
    "busbw_gbps",
    "exposed_comm_s",
]

Collective = Literal["allreduce", "reduce_scatter", "all_gather", "broadcast"]


# --------------------------------------------------------------------------------------------
# Bandwidth conventions (nccl-tests doc/PERFORMANCE.md)
# --------------------------------------------------------------------------------------------


def algbw_gbps(nbytes: float, seconds: float) -> float:
    """Algorithm bandwidth in GB/s: ``nbytes / seconds / 1e9``.

    Args:
        nbytes: Size S of the buffer the collective operates on, in bytes.
        seconds: Time t the collective took.

    Returns:
        S / t in GB/s (1 GB = 1e9 bytes); ``0.0`` when ``seconds`` is not positive, so a step
        without communication never divides by zero.
    """
    if seconds <= 0:
        return 0.0
    return nbytes / seconds / 1e9


_BUS_FACTORS: dict[str, Any] = {
    # Each rank sends/receives 2(n-1)/n of the buffer in a ring all-reduce (reduce-scatter
    # followed by all-gather), so this makes busbw comparable to the link's peak bandwidth.
    "allreduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
}


def busbw_gbps(
    nbytes: float, seconds: float, world_size: int, op: Collective = "allreduce"
) -> float:
    """Bus bandwidth in GB/s, with the nccl-tests correction factors.

    busbw = algbw × factor, where the factor is 2(n−1)/n for all-reduce, (n−1)/n for
    reduce-scatter and all-gather, and 1 for broadcast (n = ``world_size``). Bus bandwidth is
    the figure to compare with the hardware's link bandwidth, whatever the number of ranks.

    With ``world_size == 1`` the all-reduce, reduce-scatter and all-gather factors are 0: nothing
    crosses a link, so the bus bandwidth is reported as 0 rather than as a made-up number.

    Args:
        nbytes: Buffer size S in bytes.
        seconds: Time t of one collective.
        world_size: Number of ranks n taking part.
        op: Which collective the time belongs to.

    Raises:
        ValueError: On an unknown ``op`` or a ``world_size`` below 1.
    """
    if op not in _BUS_FACTORS:
        raise ValueError(f"op must be one of {sorted(_BUS_FACTORS)}, got {op!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    return algbw_gbps(nbytes, seconds) * _BUS_FACTORS[op](world_size)


def exposed_comm_s(sync_step_s: float, compute_only_s: float) -> float:
    """Communication time a step actually waits for: ``max(0, sync_step_s - compute_only_s)``.

    Definition: the loop times a micro-step that synchronizes gradients (forward + backward,
    including waiting for DDP's all-reduce to finish) and a micro-step of the same size run
    under ``no_sync()`` (forward + backward only, no communication). The difference is the part
    of the all-reduce that was *not* hidden behind backward compute. The all-reduce's total time
    (:attr:`StepComm.allreduce_s`) can be much larger when DDP overlaps it with backward; this is
    the part that costs wall-clock time. Clamped at 0 because timing noise can make the
    synchronizing micro-step look faster.

    Args:
        sync_step_s: Wall time of a synchronizing micro-step.
        compute_only_s: Wall time of an equal micro-step under ``no_sync()``.
    """
    return max(0.0, sync_step_s - compute_only_s)


# --------------------------------------------------------------------------------------------
# Per-step all-reduce measurement through a DDP communication hook
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepComm:
    """Gradient all-reduce figures of one optimizer step (all buckets since the previous step).

    Attributes:
        step: 0-based index of the optimizer step: how many times ``end_step()`` had been
            called before this step was closed. Steps without any all-reduce are not recorded,
            so this is the number to align with the loop's step counter.
        allreduce_s: Wall time during which at least one bucket all-reduce of the step was in
            flight: the length of the union of the buckets' [start, end] intervals. The sum of
            per-bucket times would double-count, because buckets launched while an earlier one
            is still running are queued behind it (their intervals overlap), and the link is busy
            only once. This is total all-reduce time, overlapped with backward or not; see
            :func:`exposed_comm_s` for the part the step waits for.
        allreduce_sum_s: Plain sum of the per-bucket durations, for reference.
        bytes: Sum of the bucket sizes in bytes (gradient bytes reduced this step).
        buckets: Number of buckets reduced.
        bucket_bytes: Size of each bucket in bytes, in launch order.
        world_size: Number of ranks in the process group, for the bus-bandwidth factor.
    """

    step: int
    allreduce_s: float
    allreduce_sum_s: float
    bytes: int
    buckets: int
    bucket_bytes: list[int] = field(default_factory=list)
    world_size: int = 1

    @property
    def algbw_gbps(self) -> float:
        """Bytes of the step over the union all-reduce time, in GB/s."""
        return algbw_gbps(self.bytes, self.allreduce_s)

    @property
    def busbw_gbps(self) -> float:
        """Algorithm bandwidth × 2(n−1)/n, in GB/s (0 for a single rank)."""
        return busbw_gbps(self.bytes, self.allreduce_s, self.world_size, "allreduce")


class _BucketRecord:
    """One bucket's all-reduce: filled in by the hook (start) and its callback (end)."""

    __slots__ = ("nbytes", "start", "end")

    def __init__(self, nbytes: int, start: Any) -> None:
        self.nbytes = nbytes
        # float from perf_counter on CPU, torch.cuda.Event on CUDA; end stays None until the
        # all-reduce's callback has run.
        self.start = start
        self.end: Any = None


def _union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by a set of possibly overlapping [start, end] intervals."""
    total = 0.0
    cur_start = cur_end = None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


class CommMeter:
    """Measures DDP's gradient all-reduce per optimizer step without syncing on the hot path.

    Usage::

        meter = CommMeter()
        meter.attach(ddp_model)          # once, before the first backward
        ...
        loss.backward(); optimizer.step()
        meter.end_step()                 # closes this optimizer step's record (no sync)
        ...
        for s in meter.collect():        # when results are logged anyway
            log(s.allreduce_s, s.bytes)

    The hook DDP calls per bucket does what DDP's built-in all-reduce does (divide by the world
    size, ``all_reduce`` asynchronously, hand back the averaged buffer) and notes the bucket's
    size, the time it launched the collective and, in a ``Future.then`` callback, the time the
    collective completed. DDP skips the hook under ``no_sync()``, so a step covers the buckets
    of the synchronizing micro-step(s) since the previous :meth:`end_step`.

    Timing: on CPU (gloo) both ends use ``time.perf_counter()``; the callback fires in gloo's
    thread when its work completes. On CUDA (NCCL) the host clock in the callback says nothing
    about the GPU, so a ``torch.cuda.Event`` is recorded on the current stream before the
    all-reduce and another inside the callback (which runs on a stream ordered after the
    collective); elapsed times are read in :meth:`collect`, synchronizing there only on events
    that have not completed yet.

    Args:
        process_group: Group DDP reduces over; ``None`` for the default group.
        enabled: ``False`` makes :meth:`attach` do nothing (DDP keeps its built-in all-reduce)
            and :meth:`collect` return ``[]``: the switch for measuring the meter's overhead.
        divide: ``False`` makes the hook only sum: the caller scales its loss by
            1/world_size instead. DDP's built-in all-reduce fuses the division into its copy
            into the bucket; a Python hook cannot, so dividing costs one more pass over every
            gradient bucket per step (~0.5 ms of a ~26 ms step for the 7.5 MB benchmark MLP).
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        enabled: bool = True,
        divide: bool = True,
    ) -> None:
        self._group = process_group
        self._divide = divide
        self._enabled = enabled
        self._attached = False
        self._lock = threading.Lock()
        self._current: list[_BucketRecord] = []
        self._finished: list[tuple[int, list[_BucketRecord]]] = []
        self._steps_ended = 0
        self._world_size = 1

    @property
    def enabled(self) -> bool:
        """Whether the meter measures anything (set at construction)."""
        return self._enabled

    @property
    def attached(self) -> bool:
        """Whether the hook is registered on a DDP model."""
        return self._attached

    def attach(self, ddp_model: DistributedDataParallel) -> None:
        """Register the measuring all-reduce hook on ``ddp_model`` (no-op when disabled).

        DDP accepts one communication hook per model and it cannot be removed, hence no
        ``detach``: build the meter with ``enabled=False`` to run without it.

        Raises:
            RuntimeError: If this meter is already attached to a model.
        """
        if not self._enabled:
            return
        if self._attached:
            raise RuntimeError("CommMeter is already attached to a DDP model")
        self._world_size = dist.get_world_size(self._group)
        ddp_model.register_comm_hook(self._group, self._hook)
        self._attached = True

    def _hook(
        self, state: dist.ProcessGroup | None, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        """DDP communication hook: allreduce_hook from default_hooks.py plus timestamps."""
        group = state if state is not None else dist.group.WORLD
        buffer = bucket.buffer()
        if self._divide:  # first, as DDP's default does, so fp16/bf16 sums cannot overflow
            buffer.div_(group.size())
        nbytes = buffer.numel() * buffer.element_size()
        if buffer.is_cuda:
            start: Any = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(buffer.device))
        else:
            start = time.perf_counter()
        record = _BucketRecord(nbytes, start)
        with self._lock:
            self._current.append(record)
        work = dist.all_reduce(buffer, group=group, async_op=True)

        def _done(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            if buffer.is_cuda:
                # Runs with a current stream that waits on the collective, so this event
                # completes when the all-reduce has finished on the GPU.
                end = torch.cuda.Event(enable_timing=True)
                end.record(torch.cuda.current_stream(buffer.device))
                record.end = end
            else:
                record.end = time.perf_counter()
            return fut.value()[0]

        return work.get_future().then(_done)

    def end_step(self) -> None:
        """Close the current optimizer step's record; call once after ``optimizer.step()``.

        Cheap and sync-free: it only moves the buckets seen since the previous call into the
        finished list. A step in which no bucket was reduced is counted but not recorded.
        """
        if not self._enabled:
            return
        with self._lock:
            buckets, self._current = self._current, []
            if buckets:
                self._finished.append((self._steps_ended, buckets))
            self._steps_ended += 1

    def collect(self) -> list[StepComm]:
        """Return and forget the finished steps' figures, oldest first.

        This is where timings become numbers (and, on CUDA, where waiting on an unfinished
        event may happen), so call it when the loop logs, not every micro-step.
        """
        with self._lock:
            # DDP waits for every bucket before backward returns, so all callbacks have run by
            # end_step(); a step still missing one (hook used outside DDP) waits for a later call.
            ready = 0
            while ready < len(self._finished) and all(
                rec.end is not None for rec in self._finished[ready][1]
            ):
                ready += 1
            finished, self._finished = self._finished[:ready], self._finished[ready:]
        return [self._summarize(step, buckets, self._world_size) for step, buckets in finished]

    @staticmethod
    def _summarize(step: int, buckets: list[_BucketRecord], world_size: int) -> StepComm:
        """Turn one step's bucket records into a :class:`StepComm`."""
        if isinstance(buckets[0].start, float):
            intervals = [(rec.start, rec.end) for rec in buckets]
        else:
            # CUDA events only give differences: measure every event from the step's first
            # start event, which precedes all others on the same stream.
            ref = buckets[0].start
            intervals = []
            for rec in buckets:
                if not rec.end.query():
                    rec.end.synchronize()
                intervals.append(
                    (ref.elapsed_time(rec.start) / 1e3, ref.elapsed_time(rec.end) / 1e3)
                )
        sizes = [rec.nbytes for rec in buckets]
        return StepComm(
            step=step,
            allreduce_s=_union_length(intervals),
            allreduce_sum_s=sum(end - start for start, end in intervals),
            bytes=sum(sizes),
            buckets=len(sizes),
            bucket_bytes=sizes,
            world_size=world_size,
        )


# DDP checks the hook's annotations at runtime, so this module keeps them unpostponed (no
# `from __future__ import annotations`) and quotes its forward references.

# --------------------------------------------------------------------------------------------
# Exposed communication: which micro-steps the loop times, and the pairs it gets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExposedPair:
    """One step's timing for comm/exposed_s, as clock stamps (resolved at log time).

    Attributes:
        compute: (start, end) of a micro-step under ``no_sync()`` (compute only).
        sync: (start, end) of the synchronizing micro-step of the same size.
        extra: The compute-only micro-step was an extra one (its time is not step time).
        step: (start, end) of the whole step, extra micro-step excluded.
    """

    compute: tuple[Any, Any]
    sync: tuple[Any, Any]
    extra: bool
    step: tuple[Any, Any]


class ExposedCommProbe:
    """Decides which micro-steps to time for ``comm/exposed_s`` and keeps the pairs.

    With accumulation, the last ``no_sync()`` micro-step of every step is the compute-only
    reference for free. Without it, the loop runs one extra compute-only micro-step (its
    gradients thrown away) at step 1 (not 0: DDP's first iteration builds its buckets) and
    every ``every_n_steps`` steps, about 1/N of compute. Pairs count only when the two
    micro-steps have the same size.

    Usage, per optimizer step::

        timing = probe.begin(step, sizes)      # sizes of the step's micro-batches
        if timing.extra:
            with timing.time("extra"): compute-only micro-step
        timing.start()
        for i, batch in enumerate(micro):
            with timing.time(i): micro-step i
        timing.end()

    Args:
        stamp: The clock's ``stamp()`` (host time on CPU, CUDA events on GPU).
        enabled: Time anything at all (off: every call is a no-op).
        every_n_steps: How often to run the extra micro-step without accumulation.
    """

    def __init__(self, stamp: Any, enabled: bool, every_n_steps: int) -> None:
        self._stamp = stamp
        self.enabled = enabled
        self.every_n_steps = every_n_steps
        self.pairs: list[ExposedPair] = []

    def begin(self, step: int, sizes: list[int]) -> "_StepTiming":
        if not self.enabled:
            return _UNTIMED
        n = len(sizes)
        extra = n == 1 and (step == 1 or (step > 0 and step % self.every_n_steps == 0))
        if not ((extra or n >= 2) and len(set(sizes)) == 1):
            return _UNTIMED  # one shared do-nothing timing: no objects made per step
        return _StepTiming(self, True, extra, "extra" if extra else n - 2, n - 1)

    def take(self) -> list[ExposedPair]:
        """The pairs since the last call (the loop resolves them when it logs)."""
        pairs, self.pairs = self.pairs, []
        return pairs


class _StepTiming:
    """Stamps of one optimizer step (see ExposedCommProbe)."""

    __slots__ = ("_probe", "_timed", "extra", "_reference", "_sync", "_spans", "_start")

    def __init__(
        self, probe: ExposedCommProbe | None, timed: bool, extra: bool, reference: Any, sync: int
    ) -> None:
        self._probe, self._timed, self.extra = probe, timed, extra
        self._reference, self._sync = reference, sync
        self._spans: dict[Any, tuple[Any, Any]] = {}
        self._start: Any = None

    def start(self) -> None:
        if self._timed:
            self._start = self._probe._stamp()

    def time(self, which: Any) -> "_Span":
        if not (self._timed and (which == self._reference or which == self._sync)):
            return _NO_SPAN
        return _Span(self, which)

    def end(self) -> None:
        if not self._timed or len(self._spans) != 2:
            return
        self._probe.pairs.append(
            ExposedPair(
                compute=self._spans[self._reference],
                sync=self._spans[self._sync],
                extra=self.extra,
                step=(self._start, self._probe._stamp()),
            )
        )


class _Span:
    """Context manager stamping one micro-step, or nothing when it is not timed."""

    __slots__ = ("_timing", "_key", "_t0")

    def __init__(self, timing: _StepTiming | None, key: Any) -> None:
        self._timing, self._key = timing, key

    def __enter__(self) -> None:
        if self._key is not None:
            self._t0 = self._timing._probe._stamp()

    def __exit__(self, *exc: object) -> None:
        if self._key is not None:
            self._timing._spans[self._key] = (self._t0, self._timing._probe._stamp())


# What an untimed step gets: nothing is stamped, and nothing is allocated per step.
_UNTIMED = _StepTiming(None, False, False, None, -1)
_NO_SPAN = _Span(None, None)
