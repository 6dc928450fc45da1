"""Hardware telemetry per worker: GPU counters from NVML, process RSS, peak device memory.

Everything here degrades instead of failing: a worker without a GPU, without the NVML library or
without permission to query a counter keeps training and simply reports fewer numbers.

Units: bytes, watts, degrees Celsius, MHz, percent.
"""

import contextlib
import logging
import threading
from typing import Any

import psutil
import torch

__all__ = ["GpuSampler", "peak_device_memory", "process_memory"]

logger = logging.getLogger(__name__)

# metric name -> keys reported by snapshot(): the mean for rates, the max for levels whose peak
# matters, both for all so a dashboard can pick.
_METRICS = ("gpu_util", "gpu_mem_used_bytes", "power_w", "temp_c", "sm_clock_mhz")


class GpuSampler:
    """Samples one GPU's counters from NVML in a daemon thread and summarizes them on demand.

    Counters: utilization.gpu (%), memory used (bytes), power (W), temperature (°C) and SM clock
    (MHz). :meth:`snapshot` returns the mean and max of each since the previous snapshot, so
    calling it once per logging interval gives that interval's figures.

    If NVML cannot be used (``pynvml`` missing, ``nvmlInit`` failing, no device at that index),
    :meth:`start` logs once at INFO why GPU telemetry is off and the sampler stays inert:
    :attr:`available` is ``False`` and :meth:`snapshot` returns ``{}``. A single counter that a
    device does not support (power on some boards) is skipped; the others are still sampled.

    Args:
        device_index: NVML index of the GPU. NVML ignores ``CUDA_VISIBLE_DEVICES`` (which Ray sets
            per worker), so this is the physical index; pass ``uuid`` or use :meth:`for_device`
            to sample the GPU torch actually uses.
        interval_s: Seconds between samples. One sample costs five NVML calls (well under a
            millisecond), so the default 1 s keeps the thread's cost negligible.
        uuid: NVML UUID (``"GPU-…"``) of the GPU; takes precedence over ``device_index``.
    """

    def __init__(self, device_index: int, interval_s: float = 1.0, *, uuid: str | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be greater than 0, got {interval_s}")
        self.device_index = device_index
        self.interval_s = interval_s
        self.uuid = uuid
        self._pynvml: Any = None
        self._handle: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._reset_stats()

    @classmethod
    def for_device(cls, device: torch.device, interval_s: float = 1.0) -> "GpuSampler":
        """Sampler for the GPU behind a torch CUDA device, matched by UUID.

        Falls back to the device's index when torch cannot tell the UUID (old torch, no CUDA),
        in which case :meth:`start` decides whether telemetry is available.
        """
        uuid = None
        if device.type == "cuda" and torch.cuda.is_available():
            index = device.index if device.index is not None else torch.cuda.current_device()
            try:
                raw = str(torch.cuda.get_device_properties(index).uuid)
                uuid = raw if raw.startswith(("GPU-", "MIG-")) else f"GPU-{raw}"
            except (AttributeError, RuntimeError):
                uuid = None
        else:
            index = device.index or 0
        return cls(index, interval_s, uuid=uuid)

    @property
    def available(self) -> bool:
        """True once :meth:`start` found the GPU in NVML (and until :meth:`stop`)."""
        return self._handle is not None

    def start(self) -> None:
        """Initialize NVML and start sampling; never raises. Calling it twice does nothing."""
        if self._started:
            return
        self._started = True
        try:
            import pynvml
        except ImportError as exc:
            logger.info("GPU telemetry off: nvidia-ml-py (pynvml) is not importable (%s)", exc)
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # any NVMLError (no library, no driver) or worse: stay inert
            logger.info("GPU telemetry off: NVML initialization failed (%s)", _describe(exc))
            return
        try:
            if self.uuid is not None:
                handle = pynvml.nvmlDeviceGetHandleByUUID(self.uuid)
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception as exc:
            which = f"uuid {self.uuid}" if self.uuid is not None else f"index {self.device_index}"
            logger.info("GPU telemetry off: no GPU with NVML %s (%s)", which, _describe(exc))
            _shutdown(pynvml)
            return
        self._pynvml, self._handle = pynvml, handle
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and shut NVML down; safe to call more than once or if never started."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
            self._thread = None
        if self._handle is not None:
            self._handle = None
            _shutdown(self._pynvml)

    def snapshot(self) -> dict[str, float]:
        """Mean and max of each counter since the previous snapshot; ``{}`` if nothing sampled.

        Keys are ``<metric>_mean`` and ``<metric>_max`` for metric in ``gpu_util``,
        ``gpu_mem_used_bytes``, ``power_w``, ``temp_c``, ``sm_clock_mhz``; a counter the device
        never reported is absent. Thread-safe.
        """
        with self._lock:
            stats, self._stats = self._stats, {}
        out: dict[str, float] = {}
        for name, (total, count, peak) in stats.items():
            out[f"{name}_mean"] = total / count
            out[f"{name}_max"] = peak
        return out

    def __enter__(self) -> "GpuSampler":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- sampling thread ----------------------------------------------------------------------

    def _reset_stats(self) -> None:
        # name -> (sum, count, max): constant memory however long the interval is.
        self._stats: dict[str, tuple[float, int, float]] = {}

    def _run(self) -> None:
        """Thread body: sample now, then every ``interval_s`` until stopped."""
        while True:
            self._record(self._read())
            if self._stop.wait(self.interval_s):
                return

    def _read(self) -> dict[str, float]:
        """One sample; a counter whose query fails is left out rather than failing the rest."""
        nv, handle = self._pynvml, self._handle
        queries = {
            "gpu_util": lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu,
            "gpu_mem_used_bytes": lambda: nv.nvmlDeviceGetMemoryInfo(handle).used,
            "power_w": lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # from milliwatts
            "temp_c": lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU),
            "sm_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM),
        }
        sample: dict[str, float] = {}
        for name, query in queries.items():
            try:
                sample[name] = float(query())
            except Exception:  # NVMLError_NotSupported and friends: skip this counter only
                continue
        return sample

    def _record(self, sample: dict[str, float]) -> None:
        """Fold one sample into the running sums and maxima."""
        with self._lock:
            for name, value in sample.items():
                total, count, peak = self._stats.get(name, (0.0, 0, value))
                self._stats[name] = (total + value, count + 1, max(peak, value))


def _describe(exc: BaseException) -> str:
    """Exception type and message, e.g. ``NVMLError_LibraryNotFound: NVML Shared Library …``."""
    return f"{type(exc).__name__}: {exc}"


def _shutdown(pynvml: Any) -> None:
    """nvmlShutdown that cannot raise (telemetry must never take training down)."""
    with contextlib.suppress(Exception):
        pynvml.nvmlShutdown()


def process_memory() -> dict[str, float]:
    """Resident set size of this process: ``{"rss_bytes": …}`` (from psutil)."""
    return {"rss_bytes": float(psutil.Process().memory_info().rss)}


def peak_device_memory(device: torch.device) -> dict[str, float]:
    """Peak memory torch's caching allocator saw on ``device`` since start (or last reset).

    Returns ``peak_allocated_bytes`` (tensors) and ``peak_reserved_bytes`` (held by the
    allocator, what other processes cannot use) on CUDA, and ``{}`` on other devices, where
    torch does not track it; use :func:`process_memory` there.
    """
    if device.type != "cuda":
        return {}
    return {
        "peak_allocated_bytes": float(torch.cuda.max_memory_allocated(device)),
        "peak_reserved_bytes": float(torch.cuda.max_memory_reserved(device)),
    }
