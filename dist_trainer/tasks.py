"""Tasks: how a model's outputs and the targets become a loss and an accuracy.

``loss_sums`` returns *sums*, not means: the loop adds them over micro-steps and ranks and divides
by the global sample count itself, which is what makes gradient accumulation and DDP give exactly
the single-process large-batch gradient (also for a short last batch). That reduction is ours
for every loss, the task's default or the user's (``loss._target_``): a criterion is always asked
for one loss per element (``reduction="none"``). Everything stays on the outputs' device, with no
``.item()``, so nothing here forces a host sync.

| task       | model output | targets           | the criterion sees          | prediction      |
|------------|--------------|-------------------|-----------------------------|-----------------|
| binary     | [B] or [B,1] | 0/1, [B] or [B,1] | [B], float targets [B]      | out > 0 (*)     |
| multiclass | [B,C]        | int64 [B]         | [B,C], [B]                  | argmax          |
| lm         | [B,T,V]      | int64 [B,T]       | [B*T,V], [B*T]; mean over T | argmax          |

The default losses: binary cross-entropy with logits (binary), cross-entropy (multiclass, lm).
(*) out > 0.5 when the loss takes probabilities (`Loss.probabilities`, e.g. BCELoss).

For ``lm`` the accuracy counts tokens (B*T predictions) while the loss counts samples (B): each
sample's loss is the mean over its T tokens, so every sample weighs the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TASKS", "Loss", "OutputShapeError", "check_outputs", "loss_sums"]

TASKS = ("binary", "multiclass", "lm")
"""Names accepted by ``loss_sums`` (and by ``DataBundle.task``)."""


class OutputShapeError(ValueError):
    """The model's outputs (or a criterion's result) do not fit the task."""


@dataclass(frozen=True)
class Loss:
    """A per-element loss: the task's default (``fn=None``) or a user criterion.

    Args:
        fn: ``fn(outputs, targets) -> losses``, one loss per element (shapes in the module
            table), or None for the task's default.
        name: What to call it in messages (the import path).
        probabilities: Binary task: the model outputs probabilities (e.g. ends in a sigmoid,
            for ``BCELoss``), so predictions threshold at 0.5 instead of 0.
    """

    fn: Callable[[Tensor, Tensor], Tensor] | None = None
    name: str = "the task's default loss"
    probabilities: bool = False

    @property
    def takes_logits(self) -> bool:
        return not self.probabilities


DEFAULT_LOSS = Loss()


def check_outputs(task: str, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The outputs and targets as the criterion sees them; OutputShapeError if they don't fit.

    Works on meta tensors too, so the driver can check a model's output shape before launch.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are {TASKS}")
    if task == "binary":
        if outputs.dim() == 2 and outputs.shape[1] == 1:
            outputs = outputs.squeeze(1)
        if targets.dim() == 2 and targets.shape[1] == 1:
            targets = targets.squeeze(1)
        if outputs.dim() != 1 or targets.shape != outputs.shape:
            raise OutputShapeError(
                "the binary task expects outputs [B] or [B,1] and matching targets, "
                f"got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
            )
        return outputs, targets.to(outputs.dtype)
    if task == "multiclass":
        if outputs.dim() != 2 or targets.shape != outputs.shape[:1]:
            raise OutputShapeError(
                "the multiclass task expects outputs [B,C] and targets [B], "
                f"got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
            )
        return outputs, targets
    if outputs.dim() != 3 or targets.shape != outputs.shape[:2]:
        raise OutputShapeError(
            "the lm task expects outputs [B,T,V] and targets [B,T], "
            f"got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
        )
    if outputs.shape[1] == 0:
        raise OutputShapeError("the lm task needs at least one token per sample (T >= 1)")
    b, t, v = outputs.shape
    return outputs.reshape(b * t, v), targets.reshape(b * t)


def _per_element(task: str, loss: Loss, outputs: Tensor, targets: Tensor) -> Tensor:
    if loss.fn is None:
        if task == "binary":
            return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
        return F.cross_entropy(outputs, targets, reduction="none")
    losses = loss.fn(outputs, targets)
    if not isinstance(losses, Tensor) or losses.numel() != outputs.shape[0]:
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise OutputShapeError(
            f"loss._target_={loss.name} returned {got}, not one loss per element "
            f"({outputs.shape[0]}): it must not reduce (it is called with reduction='none' "
            "where it takes one; a function of yours must return per-sample losses)"
        )
    return losses.reshape(outputs.shape[0])


def loss_sums(
    task: str, outputs: Tensor, targets: Tensor, loss: Loss = DEFAULT_LOSS
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(loss_sum, correct, count)`` for one batch, as 0-dim tensors on outputs' device.

    ``loss_sum`` is the sum over samples of the per-sample loss (differentiable), in float64
    when the outputs are float64 and in float32 otherwise: a sum over a batch in bf16/fp16
    loses too much. ``correct`` and ``count`` are int64 and carry no graph. An empty batch
    (B == 0) gives zeros, and ``loss_sum.backward()`` still works and gives zero gradients, so
    a rank with no data can take part in the DDP all-reduce.

    Args:
        task: One of ``TASKS``.
        outputs: Model output; shape per task as in the module table.
        targets: Labels; shape and dtype per task as in the module table.
        loss: The criterion (default: the task's own).

    Raises:
        ValueError: Unknown task. OutputShapeError: shapes that do not fit the task, or a
            criterion that reduces.
    """
    if outputs.dtype in (torch.float16, torch.bfloat16):
        outputs = outputs.float()
    flat_out, flat_targets = check_outputs(task, outputs, targets)
    per_element = _per_element(task, loss, flat_out, flat_targets)
    if task == "lm":
        b, t = targets.shape
        loss_sum = per_element.reshape(b, t).mean(dim=1).sum()
    else:
        loss_sum = per_element.sum()
    with torch.no_grad():
        if task == "binary":
            threshold = 0.5 if loss.probabilities else 0.0
            correct = ((flat_out > threshold) == (flat_targets > 0.5)).sum()
        else:
            correct = (flat_out.argmax(dim=1) == flat_targets).sum()
    # new_full launches a fill on the device; torch.tensor(n, device=...) would copy from host.
    count = outputs.new_full((), flat_out.shape[0], dtype=torch.int64)
    return loss_sum, correct, count
