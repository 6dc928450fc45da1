"""Tasks: how a model's logits and the targets become a loss and an accuracy.

``loss_sums`` returns *sums*, not means: the loop adds them over micro-steps and ranks and divides
by the global sample count itself, which is what makes gradient accumulation and DDP give exactly
the single-process large-batch gradient (also for a short last batch). Everything stays on the
logits' device, with no ``.item()``, so nothing here forces a host sync.

| task       | logits       | targets                 | per-sample loss           | prediction |
|------------|--------------|-------------------------|---------------------------|------------|
| binary     | [B] or [B,1] | float 0/1, [B] or [B,1] | BCE with logits           | logit > 0  |
| multiclass | [B,C]        | int64 [B]               | cross-entropy             | argmax     |
| lm         | [B,T,V]      | int64 [B,T]             | mean CE over the T tokens | argmax     |

For ``lm`` the accuracy counts tokens (B*T predictions) while the loss counts samples (B).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TASKS", "loss_sums"]

TASKS = ("binary", "multiclass", "lm")
"""Names accepted by ``loss_sums`` (and by ``DataBundle.task``)."""


def loss_sums(task: str, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(loss_sum, correct, count)`` for one batch, as 0-dim tensors on logits' device.

    ``loss_sum`` is the sum over samples of the per-sample loss (float32, differentiable).
    ``correct`` and ``count`` are int64 (exact at any count; cast before dividing if needed) and
    carry no graph. An empty batch (B == 0) gives zeros, and ``loss_sum.backward()`` still works
    and gives zero gradients, so a rank with no data can take part in the DDP all-reduce.

    Args:
        task: One of ``TASKS``.
        logits: Model output; shape per task as in the module table.
        targets: Labels; shape and dtype per task as in the module table.

    Raises:
        ValueError: Unknown task, or shapes that do not fit the task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are {TASKS}")
    # Sums over a batch lose precision in bf16/fp16; float32 costs little here.
    logits = logits.float()
    if task == "binary":
        if logits.dim() == 2 and logits.shape[1] == 1:
            logits = logits.squeeze(1)
        if targets.dim() == 2 and targets.shape[1] == 1:
            targets = targets.squeeze(1)
        if logits.dim() != 1 or targets.shape != logits.shape:
            raise ValueError(
                f"binary task expects logits [B] or [B,1] and matching targets, "
                f"got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}"
            )
        targets = targets.to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        with torch.no_grad():
            correct = ((logits > 0) == (targets > 0.5)).sum()
        n = logits.shape[0]
    elif task == "multiclass":
        if logits.dim() != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(
                f"multiclass task expects logits [B,C] and targets [B], "
                f"got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}"
            )
        loss = F.cross_entropy(logits, targets, reduction="sum")
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == targets).sum()
        n = logits.shape[0]
    else:  # lm
        if logits.dim() != 3 or targets.shape != logits.shape[:2]:
            raise ValueError(
                f"lm task expects logits [B,T,V] and targets [B,T], "
                f"got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}"
            )
        b, t, v = logits.shape
        if t == 0:
            raise ValueError("lm task needs at least one token per sample (T >= 1), got T = 0")
        per_token = F.cross_entropy(
            logits.reshape(b * t, v), targets.reshape(b * t), reduction="none"
        )
        # Mean over each sample's tokens, then sum over samples: every sample weighs the same.
        loss = per_token.reshape(b, t).mean(dim=1).sum()
        with torch.no_grad():
            correct = (logits.argmax(dim=2) == targets).sum()
        n = b * t
    # new_full launches a fill on the device; torch.tensor(n, device=...) would copy from host.
    count = logits.new_full((), n, dtype=torch.int64)
    return loss, correct, count
