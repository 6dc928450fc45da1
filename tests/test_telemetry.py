"""Tests for dist_trainer.telemetry on the machine's real NVML situation (no mocks of NVML).

Here (CPU only) NVML's library is missing, so the sampler must go inert, say so once, and let
training continue; on a GPU machine the NVML tests below run instead.
"""

import logging
import time
from pathlib import Path

import psutil
import pytest
import torch

from dist_trainer.telemetry import GpuSampler, peak_device_memory, process_memory

LOGGER = "dist_trainer.telemetry"


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


NVML = _nvml_works()


def _telemetry_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


@pytest.mark.skipif(NVML, reason="NVML works on this machine; this covers the no-NVML path")
def test_sampler_without_nvml_is_inert_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    sampler = GpuSampler(0, interval_s=0.01)
    sampler.start()
    sampler.start()  # idempotent: no second log line
    assert not sampler.available
    time.sleep(0.05)
    assert sampler.snapshot() == {}
    sampler.stop()
    sampler.stop()
    records = _telemetry_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.INFO
    message = records[0].getMessage()
    assert "GPU telemetry off" in message and "NVML" in message

    # Training-like code keeps going after the sampler went inert.
    model = torch.nn.Linear(4, 1)
    model(torch.randn(8, 4)).sum().backward()
    assert model.weight.grad is not None


def test_sampler_for_missing_device_is_inert(caplog: pytest.LogCaptureFixture) -> None:
    """Index 10000 exists nowhere: inert and one INFO line, with or without NVML."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with GpuSampler(10_000, interval_s=0.01) as sampler:
        assert not sampler.available
        assert sampler.snapshot() == {}
    records = _telemetry_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "GPU telemetry off" in records[0].getMessage()


def test_stop_without_start_and_bad_interval() -> None:
    GpuSampler(0).stop()
    with pytest.raises(ValueError, match="interval_s"):
        GpuSampler(0, interval_s=0)


def test_snapshot_mean_max_and_reset() -> None:
    """Aggregation, fed directly: this machine has no GPU to produce samples."""
    sampler = GpuSampler(0)
    sampler._record({"gpu_util": 10.0, "power_w": 100.0, "temp_c": 50.0})
    sampler._record({"gpu_util": 30.0, "power_w": 300.0})  # temperature query failed: skipped
    snap = sampler.snapshot()
    assert snap == {
        "gpu_util_mean": 20.0,
        "gpu_util_max": 30.0,
        "power_w_mean": 200.0,
        "power_w_max": 300.0,
        "temp_c_mean": 50.0,
        "temp_c_max": 50.0,
    }
    assert sampler.snapshot() == {}  # each snapshot covers the interval since the previous one


def test_for_device_on_cpu() -> None:
    sampler = GpuSampler.for_device(torch.device("cpu"), interval_s=0.5)
    assert sampler.uuid is None and sampler.device_index == 0 and sampler.interval_s == 0.5


@pytest.mark.skipif(not (NVML and torch.cuda.is_available()), reason="needs NVML and a GPU")
def test_sampler_on_gpu() -> None:
    with GpuSampler.for_device(torch.device("cuda", 0), interval_s=0.05) as sampler:
        assert sampler.available
        time.sleep(0.3)
        snap = sampler.snapshot()
    for key in ("gpu_util_mean", "gpu_util_max", "gpu_mem_used_bytes_max", "temp_c_max"):
        assert key in snap, snap
    assert snap["gpu_mem_used_bytes_max"] > 0


def _vmrss_bytes() -> int:
    """VmRSS from /proc/self/status: the kernel's figure, read without psutil."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            assert unit == "kB"
            return int(value) * 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_process_memory_matches_kernel_vmrss() -> None:
    held = torch.ones(16 * 2**20 // 4)  # 16 MB touched, so RSS is clearly above baseline
    before = _vmrss_bytes()
    rss = process_memory()["rss_bytes"]
    after = _vmrss_bytes()
    assert rss == pytest.approx(before, rel=0.03) or rss == pytest.approx(after, rel=0.03)
    assert rss == pytest.approx(psutil.Process().memory_info().rss, rel=0.03)
    assert rss > held.numel() * 4
    assert set(process_memory()) == {"rss_bytes"}


def test_peak_device_memory() -> None:
    assert peak_device_memory(torch.device("cpu")) == {}
    if torch.cuda.is_available():
        x = torch.ones(2**20, device="cuda")
        peak = peak_device_memory(torch.device("cuda", 0))
        assert peak["peak_allocated_bytes"] >= x.numel() * 4
        assert peak["peak_reserved_bytes"] >= peak["peak_allocated_bytes"]
