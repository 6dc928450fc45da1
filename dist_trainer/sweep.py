"""All-reduce sweeps over message sizes and the ring all-reduce α-β model.

:func:`allreduce_sweep` measures blocking all-reduce times over a range of sizes in an initialized
process group, :func:`fit_alpha_beta` fits the α-β model of ring all-reduce,
t(S) = α + S·2(n−1)/n / β, to them and :func:`plot_sweep` draws both. `dist-trainer bench-comm`
(dist_trainer.bench_comm) runs them on the training workers.

Units: bytes, seconds, and GB/s with GB = 1e9 bytes (as nccl-tests reports).
"""

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dist_trainer.comm import algbw_gbps, busbw_gbps

__all__ = [
    "AlphaBetaFit",
    "SweepPoint",
    "allreduce_sweep",
    "default_sweep_sizes",
    "fit_alpha_beta",
    "plot_sweep",
    "predict_time",
]


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
