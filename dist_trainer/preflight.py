"""Checks on the user's model, data and loss that run before any worker starts.

A mistake found inside the Ray workers costs 25-35 s of start-up and arrives as a screen of
tracebacks; found here it costs about a second and is one line naming the key. The driver builds
the data (on the CPU) and the model *on the meta device* (shapes only: no memory, no compute,
so a model of any size is checked at once), then runs one micro-batch through the model and the
loss on meta tensors:

* every `model.*`, `data.*` and `loss.*` key is one its target accepts (dist_trainer.build);
* the model has trainable parameters (DDP's own error for this does not say "model");
* the training split holds at least one global batch when `trainer.drop_last=true`;
* the model's output shape fits the data's task, and the loss returns one value per sample.

Some models cannot run on meta tensors (data-dependent control flow, `.item()`); their forward
is then checked by the first micro-step in the workers, which raises the same one-line error.
The same meta model gives the FLOPs per sample behind `perf/tflops` and `perf/mfu`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, default_collate

from dist_trainer.batching import BatchPlan
from dist_trainer.build import build_data, build_loss, build_model, resolve_call
from dist_trainer.config import ConfigError, JobConfig
from dist_trainer.data import DataBundle
from dist_trainer.perf import count_flops
from dist_trainer.tasks import Loss, OutputShapeError, check_outputs, loss_sums

__all__ = ["Preflight", "flops_per_sample", "preflight", "sample_batch"]

log = logging.getLogger(__name__)


@dataclass
class Preflight:
    """What the checks found: notes for the user, and figures worth logging."""

    notes: list[str] = field(default_factory=list)
    train_samples: int = 0
    flops_per_sample: float | None = None


def sample_batch(dataset: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` samples of a map-style dataset as one (x, y) batch on the CPU."""
    tensors = getattr(dataset, "tensors", None)
    n = max(1, min(n, len(dataset)))
    if tensors is not None and len(tensors) == 2:
        return tensors[0][:n], tensors[1][:n]
    batch = default_collate([dataset[i] for i in range(n)])
    if not isinstance(batch, list | tuple) or len(batch) != 2:
        raise ConfigError(
            "data: a dataset item must be an (input, target) pair. Fix: return (x, y) from "
            "your dataset's __getitem__"
        )
    return torch.as_tensor(batch[0]), torch.as_tensor(batch[1])


def _meta_step(
    job: JobConfig, bundle: DataBundle, loss: Loss, dtype: torch.dtype, n: int
) -> tuple[torch.nn.Module, float | None]:
    """Build the model on meta, run forward + loss + backward on `n` samples: (model, FLOPs)."""
    with torch.device("meta"):
        model = build_model(job, bundle)
    model = model.to(dtype)
    x, y = sample_batch(bundle.train, n)
    x = x.to("meta", dtype=dtype if x.is_floating_point() else None)
    y = y.to("meta", dtype=dtype if y.is_floating_point() else None)
    shape_error: OutputShapeError | None = None

    def step() -> None:
        nonlocal shape_error
        outputs = model(x)
        try:
            check_outputs(bundle.task, outputs, y)
            loss_sum, _, _ = loss_sums(bundle.task, outputs, y, loss)
        except OutputShapeError as exc:
            shape_error = exc
            return
        loss_sum.backward()

    try:
        flops = count_flops(step)
    except Exception as exc:  # noqa: BLE001 - a model meta tensors cannot run: checked later
        message = str(exc)
        if isinstance(exc, NotImplementedError) or "meta" in message.lower():
            log.debug("meta-device forward not possible (%s); the workers check it", message)
            return model, None
        raise ConfigError(
            f"model._target_={job.model['_target_']} fails on a batch of data._target_="
            f"{job.data['_target_']} (inputs {tuple(x.shape)}): {type(exc).__name__}: "
            f"{message.splitlines()[0] if message else ''}. Fix: match the model's input "
            "size to the data (the data offers: "
            f"{', '.join(f'{k}={v}' for k, v in bundle.model_kwargs.items()) or 'nothing'})"
        ) from None
    if shape_error is not None:
        raise ConfigError(
            f"model._target_={job.model['_target_']} on data._target_={job.data['_target_']}: "
            f"{shape_error}. Fix: make the model's output fit the '{bundle.task}' task"
        )
    return model, flops / n if flops else None


def flops_per_sample(
    job: JobConfig, bundle: DataBundle, loss: Loss, dtype: torch.dtype, n: int
) -> float | None:
    """Model FLOPs (forward + backward) per sample, or None where meta tensors cannot tell."""
    try:
        return _meta_step(job, bundle, loss, dtype, n)[1]
    except ConfigError:
        return None  # the first micro-step reports it, naming the key


def preflight(job: JobConfig, plan: BatchPlan) -> Preflight:
    """Run every check above; ConfigError on the first problem."""
    result = Preflight()
    bundle = build_data(job)
    for group, node, offered in (
        ("data", job.data, {"seed": job.trainer.seed}),
        ("model", job.model, dict(bundle.model_kwargs)),
    ):
        note = resolve_call(group, node, offered).note()
        if note:
            result.notes.append(note)
    loss = build_loss(job)
    result.train_samples = len(bundle.train)
    if job.trainer.drop_last and len(bundle.train) < plan.global_batch_size:
        raise ConfigError(
            f"trainer.drop_last=true with {len(bundle.train)} training samples and "
            f"trainer.global_batch_size={plan.global_batch_size} leaves no step to run. "
            "Fix: lower trainer.global_batch_size or set trainer.drop_last=false"
        )
    model, result.flops_per_sample = _meta_step(
        job, bundle, loss, job.trainer.precision.param_dtype, plan.micro_batch_size
    )
    if not any(p.requires_grad for p in model.parameters()):  # build_model checks it too
        raise ConfigError(f"model._target_={job.model['_target_']} has no trainable parameters")
    return result
