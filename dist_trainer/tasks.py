"""Tasks: how a model's outputs and the targets become a loss and an accuracy.

``loss_sums`` returns *sums*, not means: the loop adds them over micro-steps and ranks and divides
by the number of *counted targets* in the step's global batch itself (``TargetCount``), which is
what makes gradient accumulation and DDP give exactly the single-process large-batch gradient
(also for a short last batch, and for padded batches with ignored targets). That reduction is
ours for every loss, the task's default or the user's (``loss._target_``): a criterion is always
asked for one loss per element (``reduction="none"``). Everything stays on the outputs' device,
with no ``.item()``, so nothing here forces a host sync.

| task       | model output | targets           | the criterion sees    | counts      | prediction |
|------------|--------------|-------------------|-----------------------|-------------|------------|
| binary     | [B] or [B,1] | 0/1, [B] or [B,1] | [B], float targets [B]| samples     | out > 0 (*)|
| multiclass | [B,C]        | int64 [B]         | [B,C], [B]            | samples(**) | argmax     |
| lm         | [B,T,V]      | int64 [B,T]       | [B*T,V], [B*T]        | tokens (**) | argmax     |

The default losses: binary cross-entropy with logits (binary), cross-entropy (multiclass, lm).
(*) out > 0.5 when the loss takes probabilities (`Loss.probabilities`, e.g. BCELoss).
(**) unless its target is `Loss.ignore_index` (-100 by default, the value Hugging Face's
collators pad labels with): an ignored target is left out of the loss, of the accuracy and of
the count. The loss is thus the mean over the counted targets of the global batch, the same
value as torch's ``cross_entropy(..., ignore_index=-100)`` and Hugging Face's own loss on it.
For ``lm`` that makes every counted token weigh the same (a sample weighs its counted tokens).
``Loss.shift_labels`` (lm): the targets are the inputs themselves (Hugging Face's causal-LM
convention, ``labels = input_ids``), so the logits at position t are scored against target
t + 1 and the last position has none.

The model's output may be a tensor of logits, a dict / Hugging Face ``ModelOutput`` with a
``logits`` entry, or a tuple whose first item is the logits (``split_outputs``). With
``Loss.from_model`` (``loss=model``) the model computes its loss itself (``outputs.loss``, from
the targets passed to ``forward`` as ``labels=``): that is a mean over its micro-batch's counted
targets, so ``loss_sums`` re-weights it by that count, and the loop's division by the global
count makes it the global batch's mean, exactly as for our own criterion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TASKS",
    "Loss",
    "OutputShapeError",
    "OutputTypeError",
    "Predictions",
    "TargetCount",
    "check_outputs",
    "counted_targets",
    "forward_batch",
    "loss_sum_and_predictions",
    "loss_sums",
    "split_outputs",
]

TASKS = ("binary", "multiclass", "lm")
"""Names accepted by ``loss_sums`` (and by ``DataBundle.task``)."""

# Tasks whose integer targets may be ignored (a float 0/1 binary target has no "ignore" value).
_IGNORING_TASKS = ("multiclass", "lm")
# What cross_entropy ignores when ignoring is off: no target is this negative.
_NO_INDEX = -(2**62)

EXPECTED_OUTPUTS = (
    "a tensor of logits, a dict / ModelOutput with 'logits', or a tuple whose first item is the "
    "logits"
)


class OutputShapeError(ValueError):
    """The model's outputs (or a criterion's result) do not fit the task."""

    def fix(self, task: str) -> str:
        """What to change, for the one-line error the user sees."""
        return f"make the model's output fit the '{task}' task"


class OutputTypeError(OutputShapeError):
    """The model returned something that holds no logits (or no loss, with ``loss=model``)."""

    def fix(self, task: str) -> str:
        if "loss=model" in str(self):
            return "return the loss computed from the targets, or use loss=default"
        return "return the logits as one of those (or wrap the model to return them)"


@dataclass(frozen=True)
class Loss:
    """A per-element loss: the task's default (``fn=None``), a user criterion, or the model's.

    Args:
        fn: ``fn(outputs, targets) -> losses``, one loss per element (shapes in the module
            table), or None for the task's default.
        name: What to call it in messages (the import path).
        probabilities: Binary task: the model outputs probabilities (e.g. ends in a sigmoid,
            for ``BCELoss``), so predictions threshold at 0.5 instead of 0.
        ignore_index: multiclass and lm: targets equal to it are not counted (None: all are).
        shift_labels: lm: targets are the inputs; position t is scored against target t + 1.
        from_model: Use the loss the model returns (``outputs.loss``); ``fn`` is unused.
        target_key: With ``from_model``, the keyword the targets go to ``forward`` under.
        sum_fn: ``fn`` reducing by sum itself (built with ``reduction="sum"`` where the
            criterion takes it), for batches where every target counts: one op, forward and
            backward, instead of per-element losses and a sum. None: ``fn``'s are summed.
    """

    fn: Callable[[Tensor, Tensor], Tensor] | None = None
    name: str = "the task's default loss"
    probabilities: bool = False
    ignore_index: int | None = -100
    shift_labels: bool = False
    from_model: bool = False
    target_key: str = "labels"
    sum_fn: Callable[[Tensor, Tensor], Tensor] | None = None

    @property
    def takes_logits(self) -> bool:
        return not self.probabilities

    def ignores(self, task: str) -> bool:
        """Whether some targets of `task` may be left out (ignore_index applies to it)."""
        return self.ignore_index is not None and task in _IGNORING_TASKS


DEFAULT_LOSS = Loss()


def forward_batch(model: Callable[..., Any], inputs: Any, targets: Tensor, loss: Loss) -> Any:
    """Call the model on a batch's inputs: a dict as keyword arguments (``input_ids=...,
    attention_mask=...``), a tuple or list as positional arguments, anything else as the one
    argument. With ``loss.from_model`` the targets go along as ``loss.target_key``."""
    if isinstance(inputs, Tensor) and not loss.from_model:  # the common case, first
        return model(inputs)
    extra = {loss.target_key: targets} if loss.from_model else {}
    if isinstance(inputs, Mapping):
        return model(**inputs, **extra)
    if isinstance(inputs, tuple | list):
        return model(*inputs, **extra)
    return model(inputs, **extra)


def _describe(outputs: Any) -> str:
    if isinstance(outputs, Tensor):
        return f"a tensor {tuple(outputs.shape)}"
    if isinstance(outputs, Mapping):
        return f"a {type(outputs).__name__} with keys {list(outputs)}"
    if isinstance(outputs, tuple | list):
        first = _describe(outputs[0]) if outputs else "nothing"
        return f"a {type(outputs).__name__} of {len(outputs)} whose first item is {first}"
    return f"a {type(outputs).__name__}"


def split_outputs(outputs: Any, loss: Loss = DEFAULT_LOSS) -> tuple[Tensor, Tensor | None]:
    """``(logits, the model's loss or None)`` from what a model returned.

    Taken: a tensor (the logits); a dict or ``ModelOutput``: its ``logits`` (and ``loss``); a
    tuple or list: its first item, except with ``loss.from_model``, where Hugging Face's tuples
    (``return_dict=False`` with labels) are ``(loss, logits, ...)``. OutputTypeError otherwise.
    """
    logits = model_loss = None
    if isinstance(outputs, Tensor):
        logits = outputs
    elif isinstance(outputs, Mapping):
        logits, model_loss = outputs.get("logits"), outputs.get("loss")
    elif isinstance(outputs, tuple | list) and outputs:
        if loss.from_model and len(outputs) >= 2:
            model_loss, logits = outputs[0], outputs[1]
        else:
            logits = outputs[0]
    if not isinstance(logits, Tensor):
        raise OutputTypeError(
            f"the model returned {_describe(outputs)}; expected {EXPECTED_OUTPUTS}"
        )
    if loss.from_model and not (isinstance(model_loss, Tensor) and model_loss.dim() == 0):
        raise OutputTypeError(
            f"loss=model, but the model returned {_describe(outputs)} without a 0-dim 'loss' "
            f"(it is given the targets as {loss.target_key}=...); expected a dict / ModelOutput "
            "with 'loss' and 'logits', or a tuple (loss, logits, ...)"
        )
    return logits, model_loss


def check_outputs(
    task: str, outputs: Any, targets: Tensor, loss: Loss = DEFAULT_LOSS
) -> tuple[Tensor, Tensor]:
    """The logits and targets as the criterion sees them (flattened, shifted where asked);
    OutputTypeError / OutputShapeError if the outputs hold no logits or they don't fit.

    Works on meta tensors too, so the driver can check a model's output shape before launch.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are {TASKS}")
    return _flatten(task, split_outputs(outputs, loss)[0], targets, loss)


def _flatten(task: str, outputs: Tensor, targets: Tensor, loss: Loss) -> tuple[Tensor, Tensor]:
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
    if loss.shift_labels:
        if outputs.shape[1] < 2:
            raise OutputShapeError("loss.shift_labels=true needs at least 2 tokens per sample")
        outputs, targets = outputs[:, :-1], targets[:, 1:]
    if outputs.shape[1] == 0:
        raise OutputShapeError("the lm task needs at least one token per sample (T >= 1)")
    b, t, v = outputs.shape
    return outputs.reshape(b * t, v), targets.reshape(b * t)


def _counted_mask(task: str, flat_targets: Tensor, loss: Loss) -> Tensor | None:
    """True where a target counts; None when every one does."""
    return flat_targets != loss.ignore_index if loss.ignores(task) else None


def counted_targets(task: str, targets: Tensor, loss: Loss = DEFAULT_LOSS) -> Tensor:
    """The number of targets of a micro-batch that count, as an int64 0-dim device tensor."""
    if task == "lm" and loss.shift_labels:
        targets = targets[:, 1:]
    if loss.ignores(task):
        return (targets != loss.ignore_index).sum()
    samples = targets.shape[0] if task != "lm" else targets.shape[0] * targets.shape[1]
    return targets.new_full((), samples, dtype=torch.int64)


def _per_element(task: str, loss: Loss, outputs: Tensor, targets: Tensor) -> Tensor:
    if loss.fn is None:
        if task == "binary":
            return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
        return F.cross_entropy(outputs, targets, reduction="none", ignore_index=_NO_INDEX)
    losses = loss.fn(outputs, targets)
    if not isinstance(losses, Tensor) or losses.numel() != outputs.shape[0]:
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise OutputShapeError(
            f"loss._target_={loss.name} returned {got}, not one loss per element "
            f"({outputs.shape[0]}): it must not reduce (it is called with reduction='none' "
            "where it takes one; a function of yours must return per-sample losses)"
        )
    return losses.reshape(outputs.shape[0])


def _summed(task: str, loss: Loss, outputs: Tensor, targets: Tensor) -> Tensor:
    """The sum of the per-element losses, where every target counts."""
    if loss.fn is None:
        if task == "binary":
            return F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum")
        return F.cross_entropy(outputs, targets, reduction="sum", ignore_index=_NO_INDEX)
    if loss.sum_fn is not None:
        return loss.sum_fn(outputs, targets)
    return _per_element(task, loss, outputs, targets).sum()


def loss_sums(
    task: str,
    outputs: Any,
    targets: Tensor,
    loss: Loss = DEFAULT_LOSS,
    *,
    count_on_host: bool = False,
) -> tuple[Tensor, Tensor, Tensor | int]:
    """Return ``(loss_sum, correct, count)`` for one batch, as 0-dim tensors on outputs' device.

    ``loss_sum`` is the sum over the counted targets of their loss (differentiable), in float64
    when the outputs are float64 and in float32 otherwise: a sum over a batch in bf16/fp16
    loses too much. ``correct`` and ``count`` (the counted targets: samples, or tokens for
    ``lm``, less the ignored ones) are int64 and carry no graph. An empty batch (B == 0, or no
    counted target) gives zeros, and ``loss_sum.backward()`` still works and gives zero
    gradients, so a rank with no data can take part in the DDP all-reduce.

    Args:
        task: One of ``TASKS``.
        outputs: Model output: logits, or a dict / ModelOutput / tuple holding them
            (``split_outputs``); logits' shape per task as in the module table.
        targets: Labels; shape and dtype per task as in the module table.
        loss: The criterion (default: the task's own), and which targets it ignores.
        count_on_host: Return ``count`` as a Python int where every target counts (no device
            op: the training step's path); it stays a tensor where ignored targets are masked.

    Raises:
        ValueError: Unknown task. OutputShapeError: shapes that do not fit the task, or a
            criterion that reduces; OutputTypeError: outputs that hold no logits.
    """
    loss_sum, predictions, count = loss_sum_and_predictions(
        task, outputs, targets, loss, count_on_host=count_on_host
    )
    return loss_sum, predictions.correct(), count


@dataclass(frozen=True, slots=True)
class Predictions:
    """A batch's detached outputs and targets, flat as the criterion saw them: its correct
    predictions counted when asked (`correct`), or for many batches at once (`correct_of`).

    Counting costs a few small ops per batch (compare, compare, sum: each a kernel launch on a
    GPU, a few µs of dispatch on a CPU); the training step hands its batches' predictions to
    the log interval, which counts them together.

    Args:
        outputs: Logits (or probabilities), detached: [N] or [N, 1] (binary), or [N, C].
        targets: Binary: outputs' shape and dtype; else [N] int64 class indices.
        mask: [N] bool, True where a target counts; None when every one does.
        threshold: binary: predicted positive above it; None: argmax over classes.
    """

    outputs: Tensor
    targets: Tensor
    mask: Tensor | None
    threshold: float | None

    def correct(self) -> Tensor:
        """The number of counted targets predicted right, an int64 0-dim tensor."""
        if self.threshold is not None:
            hits = (self.outputs > self.threshold) == (self.targets > 0.5)
        else:
            hits = self.outputs.argmax(dim=1) == self.targets
        return (hits if self.mask is None else hits & self.mask).sum()

    @staticmethod
    def correct_of(batches: list[Predictions]) -> Tensor:
        """`sum(p.correct() for p in batches)`, counted in one go where the batches stack (one
        run's batches do: same task, loss and class count)."""
        if not batches:
            raise ValueError("correct_of needs at least one batch")
        first = batches[0]
        if len(batches) > 1 and len({(p.threshold, p.mask is None) for p in batches}) == 1:
            try:
                masks = None if first.mask is None else torch.cat([p.mask for p in batches])
                return Predictions(
                    torch.cat([p.outputs for p in batches]),
                    torch.cat([p.targets for p in batches]),
                    masks,
                    first.threshold,
                ).correct()
            except RuntimeError:  # shapes that do not stack: one at a time
                pass
        return torch.stack([p.correct() for p in batches]).sum()


def _same_shape_sum(task: str, loss: Loss, logits: Tensor, targets: Tensor) -> bool:
    # A summing criterion (built with reduction="sum": elementwise, e.g. BCELoss) on binary
    # [B,1] outputs against [B,1] float targets gives the flat tensors' sum: calling it on them
    # saves the squeeze views, forward and backward.
    return (
        task == "binary"
        and loss.sum_fn is not None
        and not loss.from_model
        and logits.dim() == 2
        and logits.shape[1] == 1
        and targets.shape == logits.shape
        and targets.dtype == logits.dtype
    )


def loss_sum_and_predictions(
    task: str,
    outputs: Any,
    targets: Tensor,
    loss: Loss = DEFAULT_LOSS,
    *,
    count_on_host: bool = False,
) -> tuple[Tensor, Predictions, Tensor | int]:
    """`loss_sums`, with the correct count left to the caller: ``(loss_sum, predictions,
    count)`` (the training step's path: its log interval counts many batches' hits at once)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are {TASKS}")
    logits, model_loss = split_outputs(outputs, loss)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    threshold = (0.5 if loss.probabilities else 0.0) if task == "binary" else None
    if _same_shape_sum(task, loss, logits, targets):
        # Binary [B,1] against [B,1] (every target counts): no flat views, and the hits compare
        # elementwise all the same.
        count = targets.shape[0]
        if not count_on_host:
            count = targets.new_full((), count, dtype=torch.int64)
        predictions = Predictions(logits.detach(), targets, None, threshold)
        return loss.sum_fn(logits, targets), predictions, count
    flat_out, flat_targets = _flatten(task, logits, targets, loss)
    mask = _counted_mask(task, flat_targets, loss)
    count: Tensor | int
    if mask is None:
        count = flat_out.shape[0]
        if not count_on_host:
            count = flat_out.new_full((), count, dtype=torch.int64)  # no H2D copy
    else:
        count = mask.sum()
    if loss.from_model:
        # The model's mean over its counted targets, re-weighted by their count; 0 when there
        # are none (its mean is then 0/0, and its backward gives zero gradients).
        total = model_loss.to(flat_out.dtype) * count
        if isinstance(count, int):
            loss_sum = total if count > 0 else torch.zeros_like(total)
        else:
            loss_sum = torch.where(count > 0, total, torch.zeros_like(total))
    elif mask is None:
        loss_sum = _summed(task, loss, flat_out, flat_targets)
    else:
        # An ignored target (-100) is no class index: give the criterion class 0, drop it after.
        safe_targets = torch.where(mask, flat_targets, torch.zeros_like(flat_targets))
        per_element = _per_element(task, loss, flat_out, safe_targets)
        loss_sum = (per_element * mask.to(per_element.dtype)).sum()
    # Detached: ops on a tensor that needs grad cost more host time each (no no_grad() either:
    # entering it costs as much as the detach).
    return loss_sum, Predictions(flat_out.detach(), flat_targets, mask, threshold), count


class TargetCount:
    """The denominator of a step's loss: the counted targets in its global batch.

    Where that count is known on the host it costs nothing: a sample per target (binary, or
    multiclass without ignoring), or a fixed number per sample when the training targets live
    on the device (`resident_targets`, the in-memory path) and none of them is ignored (checked
    once, here). Otherwise (ignored targets, or lengths set by a collate function) only the
    micro-batches themselves tell: each rank counts its step's targets on the device and ONE
    small all-reduce sums the counts over ranks, before the first backward of the step. It is
    an all-reduce rather than a division of the gradients after theirs: the loss of every
    micro-step is then scaled as without ignoring, GradScaler and gradient clipping see the
    true gradients, and there is no second pass over the gradients. The count stays a device
    tensor (no host sync).

    Args:
        task: One of ``TASKS``.
        loss: Which targets count (``ignore_index``, ``shift_labels``).
        distributed: Whether a process group is up (the count is then summed over ranks).
        resident_targets: The whole training split's targets, when they are one tensor.
    """

    def __init__(
        self, task: str, loss: Loss, distributed: bool, resident_targets: Tensor | None = None
    ) -> None:
        self.task, self.loss, self.distributed = task, loss, distributed
        self.per_sample = self._fixed_per_sample(resident_targets)

    def _fixed_per_sample(self, targets: Tensor | None) -> int | None:
        if not self.loss.ignores(self.task) and self.task != "lm":
            return 1  # binary, or multiclass without ignoring: a target per sample
        if targets is None:
            return None
        if self.task == "lm" and self.loss.shift_labels:
            targets = targets[:, 1:]
        if self.loss.ignores(self.task) and bool((targets == self.loss.ignore_index).any()):
            return None
        return 1 if self.task == "multiclass" else int(targets.shape[1])

    @property
    def needs_all_reduce(self) -> bool:
        """True when each step counts its targets and all-reduces the count."""
        return self.per_sample is None

    def of_step(self, targets: list[Tensor], global_count: int) -> int | Tensor:
        """The step's global count of counted targets (an int, or a 0-dim int64 tensor).

        Every rank must call it for every step (it may be a collective)."""
        if self.per_sample is not None:
            return global_count * self.per_sample
        local = torch.stack([counted_targets(self.task, y, self.loss) for y in targets]).sum()
        if self.distributed:
            dist.all_reduce(local)
        return local
