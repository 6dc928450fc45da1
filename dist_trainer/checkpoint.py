"""Where checkpoints go: the interface the loop uses, a local-folder implementation, and the
random generator states a checkpoint carries.

The Ray implementation (checkpoints through `ray.train.report`) is in dist_trainer.workers, so
the loop never imports Ray.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["CheckpointSink", "LocalCheckpointSink", "rng_state", "set_rng_state"]


class CheckpointSink(Protocol):
    """Where checkpoints go. Every rank calls `save` (it may be a barrier); rank 0 gives state.
    `persists` is False for a sink that keeps nothing: the loop then skips checkpoints."""

    persists: bool

    def latest(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any] | None, metrics: dict[str, float], step: int) -> None: ...


class LocalCheckpointSink:
    """Checkpoints in a local folder (torchrun / one process); keeps the latest only."""

    def __init__(self, folder: str | os.PathLike | None) -> None:
        self.folder = Path(folder) if folder else None
        self.persists = self.folder is not None

    def latest(self) -> dict[str, Any] | None:
        path = self.folder / "latest.pt" if self.folder else None
        return (
            torch.load(path, map_location="cpu", weights_only=False)
            if path and path.exists()
            else None
        )

    def save(self, state: dict[str, Any] | None, metrics: dict[str, float], step: int) -> None:
        if state is None or self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "latest.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.folder / "latest.pt")  # atomic: a crash never leaves half a checkpoint


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators: torch's (CPU, and the device's on CUDA), Python's, and
    NumPy's when it is loaded."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    numpy = sys.modules.get("numpy")
    if "numpy" in state and numpy is not None:
        numpy.random.set_state(state["numpy"])
