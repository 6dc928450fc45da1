"""Where checkpoints go: the interface the loop uses, and a local-folder implementation.

The Ray implementation (checkpoints through `ray.train.report`) is in dist_trainer.workers, so
the loop never imports Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["CheckpointSink", "LocalCheckpointSink"]


class CheckpointSink(Protocol):
    """Where checkpoints go. Every rank calls `save` (it may be a barrier); rank 0 gives state."""

    def latest(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any] | None, metrics: dict[str, float], step: int) -> None: ...


class LocalCheckpointSink:
    """Checkpoints in a local folder (torchrun / one process); keeps the latest only."""

    def __init__(self, folder: str | os.PathLike | None) -> None:
        self.folder = Path(folder) if folder else None

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
