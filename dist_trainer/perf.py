"""Model FLOPs and utilization: `perf/tflops` and `perf/mfu`.

FLOPs are counted once, before training, with `torch.utils.flop_counter.FlopCounterMode` on a
copy of the model built on the meta device (no memory, no compute): one forward and backward of
a micro-batch, divided by its size. That counts matmuls, convolutions and attention (what "model
FLOPs" means in MFU, as in PaLM's appendix B and torchtitan), not elementwise work. For a
bias-free stack of linear layers it is exactly 6 x (weights) per sample: 2 for the forward
multiply-add, 4 for the two backward matmuls.

    perf/tflops = flops_per_sample x samples per step / step time / 1e12   (the whole job)
    perf/mfu    = perf/tflops / (peak TFLOP/s per device x devices)

Peak dense TFLOP/s per device, from NVIDIA's data sheets (the SXM parts; sparsity not counted):

| device | bf16 / fp16 | TF32 | FP32 | FP64 (tensor core) |
|--------|-------------|------|------|--------------------|
| A100   | 312         | 156  | 19.5 | 19.5               |
| H100   | 989         | 495  | 67   | 67                 |
| H200   | 989         | 495  | 67   | 67                 |

`trainer.peak_tflops_per_device` overrides the table (other devices, PCIe parts, clocks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_trainer.config import Precision

__all__ = ["PEAK_TFLOPS", "count_flops", "peak_tflops"]

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"half": 312.0, "tf32": 156.0, "fp32": 19.5, "fp64": 19.5},
    "H100": {"half": 989.0, "tf32": 495.0, "fp32": 67.0, "fp64": 67.0},
    "H200": {"half": 989.0, "tf32": 495.0, "fp32": 67.0, "fp64": 67.0},
}
"""Dense peak TFLOP/s per device by the math the step uses (see the module table)."""


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs that `step()` runs (forward and backward), counted without timing anything."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def peak_tflops(
    device: torch.device, precision: Precision, tf32: bool, override: float | None = None
) -> float | None:
    """The device's dense peak for this precision, `override` if given, None if unknown."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "PCIe" in name or "NVL" in name:  # other clocks and power: the SXM figures don't apply
        return None
    model = next((key for key in PEAK_TFLOPS if key in name), None)
    if model is None:
        return None
    if precision.autocast_dtype is not None:
        math = "half"
    elif precision is Precision.FP64:
        math = "fp64"
    else:
        math = "tf32" if tf32 else "fp32"
    return PEAK_TFLOPS[model][math]
