"""Communication you can trust: DDP all-reduce timing, bandwidth figures and an α-β model.

Three things live here, all usable without Ray:

* :class:`CommMeter` wraps DDP's gradient all-reduce in a communication hook that does exactly
  what DDP does by default and records, per bucket, its size and when it was in flight. It adds
  no synchronization on the hot path; timings are turned into numbers only in :meth:`collect`.
* Pure helpers for the nccl-tests bandwidth conventions (:func:`algbw_gbps`, :func:`busbw_gbps`)
  and for the communication a step actually waits for (:func:`exposed_comm_s`).
* :func:`allreduce_sweep` measures blocking all-reduce times over a range of sizes,
  :func:`fit_alpha_beta` fits the ring all-reduce α-β model to them and :func:`plot_sweep`
  draws both.

Units: bytes, seconds, and GB/s with GB = 1e9 bytes (as nccl-tests reports).
"""

import math
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "AlphaBetaFit",
    "CommMeter",
    "StepComm",
    "SweepPoint",
    "algbw_gbps",
    "allreduce_sweep",
    "busbw_gbps",
    "default_sweep_sizes",
    "exposed_comm_s",
    "fit_alpha_beta",
    "plot_sweep",
    "predict_time",
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
    """

    def __init__(
        self, process_group: dist.ProcessGroup | None = None, *, enabled: bool = True
    ) -> None:
        self._group = process_group
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
        # Divide first, as DDP's default does, so fp16/bf16 sums cannot overflow.
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


# --------------------------------------------------------------------------------------------
# Size sweep and α-β model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    """Blocking all-reduce time for one buffer size, identical on every rank.

    Attributes:
        size_bytes: Buffer size actually reduced (a whole number of elements).
        time_s: Max over ranks of each rank's median time of one all-reduce.
        algbw_gbps: ``size_bytes / time_s`` in GB/s.
        busbw_gbps: ``algbw_gbps × 2(n−1)/n`` (0 with one rank).
    """

    size_bytes: int
    time_s: float
    algbw_gbps: float
    busbw_gbps: float


def default_sweep_sizes(min_bytes: int = 1024, max_bytes: int = 256 * 2**20) -> list[int]:
    """Sizes from ``min_bytes`` doubling up to and including ``max_bytes`` (if reached).

    Raises:
        ValueError: If ``min_bytes`` is not positive or exceeds ``max_bytes``.
    """
    if min_bytes <= 0 or min_bytes > max_bytes:
        raise ValueError(
            f"need 0 < min_bytes <= max_bytes, got min_bytes={min_bytes}, max_bytes={max_bytes}"
        )
    sizes = []
    size = min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= 2
    return sizes


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU, where collectives block)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(device: torch.device, group: dist.ProcessGroup | None) -> None:
    """Line the ranks up with a one-element all-reduce on ``device``.

    Used instead of ``dist.barrier`` because NCCL's barrier has to guess the device.
    """
    token = torch.zeros(1, device=device)
    dist.all_reduce(token, group=group)
    _sync(device)


def allreduce_sweep(
    sizes_bytes: Sequence[int],
    *,
    warmup: int = 5,
    repeats: int = 20,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    group: dist.ProcessGroup | None = None,
) -> list[SweepPoint]:
    """Time blocking all-reduces of each size in an initialized process group.

    For each size: allocate a zero buffer (zeros stay finite however often they are summed),
    run ``warmup`` untimed all-reduces, then time ``repeats`` all-reduces one by one, each after
    a barrier so the ranks start together (and, on CUDA, with the device synchronized before
    and after the call). Each rank takes its median; the medians are then all-reduced with MAX,
    so every rank returns the same numbers, set by the slowest rank. Collective call: every rank
    of ``group`` must call it with the same arguments.

    Args:
        sizes_bytes: Buffer sizes; each is rounded down to whole elements (at least one).
        warmup: Untimed all-reduces per size.
        repeats: Timed all-reduces per size (the median is kept).
        device: Where the buffers live (``cpu`` for gloo, the rank's GPU for NCCL).
        dtype: Element type of the buffers.
        group: Process group; ``None`` for the default group.

    Raises:
        ValueError: If ``repeats`` is below 1 or ``warmup`` negative.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=}, {warmup=}")
    world_size = dist.get_world_size(group)
    elem = torch.empty((), dtype=dtype).element_size()
    sizes = [max(1, int(s) // elem) * elem for s in sizes_bytes]
    medians = []
    for size in sizes:
        buf = torch.zeros(size // elem, dtype=dtype, device=device)
        for _ in range(warmup):
            dist.all_reduce(buf, group=group)
        _sync(device)
        times = []
        for _ in range(repeats):
            _barrier(device, group)
            t0 = time.perf_counter()
            dist.all_reduce(buf, group=group)
            _sync(device)
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
        del buf
    # One collective for all sizes: the slowest rank's median is the honest figure.
    agreed = torch.tensor(medians, dtype=torch.float64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    return [
        SweepPoint(
            size_bytes=size,
            time_s=t,
            algbw_gbps=algbw_gbps(size, t),
            busbw_gbps=busbw_gbps(size, t, world_size, "allreduce"),
        )
        for size, t in zip(sizes, agreed.tolist(), strict=True)
    ]


@dataclass(frozen=True)
class AlphaBetaFit:
    """Ring all-reduce α-β model t(S) = α + S·f/β with f = 2(n−1)/n (f = 1 for one rank).

    Attributes:
        alpha_s: Fixed per-call latency α in seconds.
        beta_bytes_per_s: Bus bandwidth β in bytes/s (``math.inf`` if time does not grow with
            size in the data).
        r2: Coefficient of determination of the fit, in the weighting it was fitted with.
        world_size: The n the sizes were scaled for; the default for :func:`predict_time`.
    """

    alpha_s: float
    beta_bytes_per_s: float
    r2: float
    world_size: int = 1


def _bus_factor(world_size: int) -> float:
    """Bytes each rank moves per byte of buffer in a ring all-reduce; 1 for a single rank."""
    return 1.0 if world_size == 1 else 2 * (world_size - 1) / world_size


def fit_alpha_beta(
    sizes_bytes: Sequence[float],
    times_s: Sequence[float],
    world_size: int,
    *,
    relative: bool = True,
) -> AlphaBetaFit:
    """Least-squares fit of t = α + S·2(n−1)/n / β (t = α + S/β when ``world_size`` is 1).

    With ``relative=True`` (default) the residuals are relative, (t − t̂)/t, i.e. weights 1/t²:
    a sweep spans several decades of size, and plain least squares would let the largest sizes'
    milliseconds of noise decide α, which matters at the small sizes. Exact data are recovered
    exactly either way.

    Args:
        sizes_bytes: Buffer sizes S.
        times_s: Measured times t, same length, all positive when ``relative``.
        world_size: Ranks n.
        relative: Fit relative rather than absolute residuals.

    Raises:
        ValueError: With fewer than two distinct sizes, mismatched lengths or, when
            ``relative``, a non-positive time.
    """
    if len(sizes_bytes) != len(times_s):
        raise ValueError(f"{len(sizes_bytes)} sizes but {len(times_s)} times")
    if len(set(sizes_bytes)) < 2:
        raise ValueError("need at least two distinct sizes to fit α and β")
    if relative and any(t <= 0 for t in times_s):
        raise ValueError("relative fit needs positive times")
    factor = _bus_factor(world_size)
    xs = [float(s) * factor for s in sizes_bytes]
    ts = [float(t) for t in times_s]
    ws = [1.0 / t**2 if relative else 1.0 for t in ts]
    wsum = sum(ws)
    x_mean = sum(w * x for w, x in zip(ws, xs, strict=True)) / wsum
    t_mean = sum(w * t for w, t in zip(ws, ts, strict=True)) / wsum
    sxx = sum(w * (x - x_mean) ** 2 for w, x in zip(ws, xs, strict=True))
    sxt = sum(w * (x - x_mean) * (t - t_mean) for w, x, t in zip(ws, xs, ts, strict=True))
    slope = sxt / sxx
    alpha = t_mean - slope * x_mean
    ss_res = sum(w * (t - alpha - slope * x) ** 2 for w, x, t in zip(ws, xs, ts, strict=True))
    ss_tot = sum(w * (t - t_mean) ** 2 for w, t in zip(ws, ts, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    beta = 1.0 / slope if slope > 0 else math.inf
    return AlphaBetaFit(alpha_s=alpha, beta_bytes_per_s=beta, r2=r2, world_size=world_size)


def predict_time(fit: AlphaBetaFit, size_bytes: float, world_size: int | None = None) -> float:
    """Time the α-β model predicts for an all-reduce of ``size_bytes`` over ``world_size`` ranks.

    ``world_size`` defaults to the one the fit was made for.
    """
    n = fit.world_size if world_size is None else world_size
    return fit.alpha_s + size_bytes * _bus_factor(n) / fit.beta_bytes_per_s


def plot_sweep(
    points: Sequence[SweepPoint], fit: AlphaBetaFit | None, path: str | Path, title: str
) -> None:
    """Write a PNG: time vs size (log-log, with the fit) and bus bandwidth vs size.

    Args:
        points: Output of :func:`allreduce_sweep`.
        fit: α-β fit to draw as a line, or ``None``.
        path: PNG to write; parent folders are created.
        title: Figure title (say which machine, backend and world size).
    """
    # Imported here so importing this module (in every worker) does not pay for matplotlib.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [p.size_bytes for p in points]
    fig, (ax_t, ax_bw) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.loglog(sizes, [p.time_s for p in points], "o", label="measured (median, max over ranks)")
    if fit is not None and sizes:
        grid = [min(sizes) * (max(sizes) / min(sizes)) ** (i / 99) for i in range(100)]
        ax_t.loglog(
            grid,
            [predict_time(fit, s) for s in grid],
            "-",
            label=f"α={fit.alpha_s * 1e6:.1f} µs, β={fit.beta_bytes_per_s / 1e9:.2f} GB/s, "
            f"R²={fit.r2:.3f}",
        )
    ax_t.set_xlabel("buffer size (bytes)")
    ax_t.set_ylabel("all-reduce time (s)")
    ax_t.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_bw.semilogx(sizes, [p.busbw_gbps for p in points], "o-", label="busbw")
    ax_bw.semilogx(sizes, [p.algbw_gbps for p in points], "s--", label="algbw", alpha=0.6)
    ax_bw.set_xlabel("buffer size (bytes)")
    ax_bw.set_ylabel("bandwidth (GB/s)")
    ax_bw.grid(True, which="both", alpha=0.3)
    ax_bw.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
