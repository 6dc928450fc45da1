"""Checks on the user's model, data and loss that run before any worker starts.

A mistake found inside the Ray workers costs 25-35 s of start-up and arrives as a screen of
tracebacks; found here it costs about a second and is one line naming the key. The driver builds
the data (on the CPU) and the model *on the meta device* (shapes only: no memory, no compute,
so a model of any size is checked at once), then runs one micro-batch through the model and the
loss on meta tensors:

* every `model.*`, `data.*` and `loss.*` key is one its target accepts (dist_trainer.build);
* the model has trainable parameters (DDP's own error for this does not say "model");
* the training split holds at least one global batch when `trainer.drop_last=true`;
* lm: `loss.shift_labels=true` is not given targets that are already the next tokens, and with
  `loss=model` the model's loss counts the targets as `loss.shift_labels` says (checked on the
  CPU with 2 samples against cross-entropy of its logits);
* the batch's inputs suit the model's forward (a dict's keys are keyword arguments);
* the model's output holds logits (a tensor, a dict / ModelOutput with `logits`, a tuple whose
  first item is the logits), their shape fits the data's task, and the loss returns one value
  per sample; each failure is one line whose Fix names the part that failed (input, output
  type, output shape or loss).

Some models cannot run on meta tensors (data-dependent control flow, `.item()`, e.g. Hugging Face
models given an attention mask); up to CPU_CHECK_MAX_PARAMETERS they are checked on the CPU with
2 samples instead, and larger ones by the first micro-step in the workers, which raises the
same one-line error for their outputs.
The same meta model gives the FLOPs per sample behind `perf/tflops` and `perf/mfu`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from dist_trainer.batching import BatchPlan
from dist_trainer.build import build_collate, build_data, build_loss, build_model, resolve_call
from dist_trainer.config import ConfigError, JobConfig
from dist_trainer.data import DataBundle
from dist_trainer.loading import collate_items, map_tensors
from dist_trainer.perf import count_flops
from dist_trainer.tasks import (
    Loss,
    OutputShapeError,
    check_outputs,
    forward_batch,
    loss_sums,
    split_outputs,
)

__all__ = ["Preflight", "flops_per_sample", "preflight", "sample_batch"]

log = logging.getLogger(__name__)


@dataclass
class Preflight:
    """What the checks found: notes for the user, and figures worth logging."""

    notes: list[str] = field(default_factory=list)
    train_samples: int = 0
    flops_per_sample: float | None = None


def sample_batch(
    dataset: Dataset,
    n: int,
    collate: Callable[[list[Any]], Any] | None = None,
    target_key: str = "labels",
) -> tuple[Any, torch.Tensor]:
    """The first `n` samples of a map-style dataset as one (input, target) batch on the CPU,
    collated as the feed collates them (dist_trainer.loading): the input may be a dict."""
    tensors = getattr(dataset, "tensors", None)
    n = max(1, min(n, len(dataset)))
    if tensors is not None and len(tensors) == 2 and collate is None:
        return tensors[0][:n], tensors[1][:n]
    items = [dataset[i] for i in range(n)]
    try:
        return collate_items(items, collate, target_key)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's collate function, or default_collate
        message = str(exc).splitlines()[0] if str(exc) else ""
        where = "data.collate._target_" if collate is not None else "default_collate"
        raise ConfigError(
            f"data: {where} fails on items of data._target_ ({type(items[0]).__name__}): "
            f"{type(exc).__name__}: {message}. Fix: return (x, y) or a dict of tensors of one "
            "shape per key from the dataset, or pad them in data.collate"
        ) from None


def _describe_batch(x: Any) -> str:
    """The shapes of a batch's inputs, for messages."""
    if isinstance(x, torch.Tensor):
        return str(tuple(x.shape))
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_describe_batch(v)}" for k, v in x.items()) + "}"
    if isinstance(x, tuple | list):
        return "(" + ", ".join(_describe_batch(v) for v in x) + ")"
    return type(x).__name__


CPU_CHECK_MAX_PARAMETERS = 100_000_000
"""A model meta tensors cannot run (an attention mask read with `.item()`, as Hugging Face
models do) is checked on the CPU instead, with real weights and 2 samples, up to this size (0.4
GB in float32); a larger one is left to the first micro-step in the workers."""


def _sample(
    job: JobConfig, bundle: DataBundle, dtype: torch.dtype, n: int, device: str
) -> tuple[Any, torch.Tensor]:
    x, y = sample_batch(bundle.train, n, build_collate(job), job.data_options.target_key)

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype=dtype if t.is_floating_point() else None)

    return map_tensors(move, x), move(torch.as_tensor(y))


def _meta_step(
    job: JobConfig, bundle: DataBundle, loss: Loss, dtype: torch.dtype, n: int
) -> tuple[torch.nn.Module, float | None]:
    """Build the model on meta, run forward + loss + backward on `n` samples: (model, FLOPs);
    where meta tensors cannot run it, on the CPU (CPU_CHECK_MAX_PARAMETERS)."""
    return _check_step(job, bundle, loss, dtype, n, "meta")


def _on_cpu_instead(
    job: JobConfig, bundle: DataBundle, loss: Loss, dtype: torch.dtype, n: int, meta_model, why
) -> tuple[torch.nn.Module, float | None]:
    parameters = sum(p.numel() for p in meta_model.parameters())
    if parameters > CPU_CHECK_MAX_PARAMETERS:
        log.debug("meta-device forward not possible (%s); the workers check it", why)
        return meta_model, None
    log.debug("meta-device forward not possible (%s); checked on the CPU", why)
    with torch.random.fork_rng(devices=[]):  # the real init must not move the caller's RNG
        return _check_step(job, bundle, loss, dtype, min(n, 2), "cpu")


def _check_step(
    job: JobConfig, bundle: DataBundle, loss: Loss, dtype: torch.dtype, n: int, device: str
) -> tuple[torch.nn.Module, float | None]:
    with torch.device(device):
        model = build_model(job, bundle)
    model = model.to(dtype)
    x, y = _sample(job, bundle, dtype, n, device)
    shape_error: OutputShapeError | None = None
    phase = "forward"

    def step() -> None:
        nonlocal shape_error, phase
        outputs = forward_batch(model, x, y, loss)
        phase = "loss"
        try:
            check_outputs(bundle.task, outputs, y, loss)
            loss_sum, _, _ = loss_sums(bundle.task, outputs, y, loss)
        except OutputShapeError as exc:
            shape_error = exc
            return
        phase = "backward"
        loss_sum.backward()

    try:
        flops = count_flops(step)
    except Exception as exc:  # noqa: BLE001 - a model meta tensors cannot run: checked later
        message = str(exc)
        meta = isinstance(exc, NotImplementedError) or "meta" in message.lower()
        if device == "meta" and meta:
            return _on_cpu_instead(job, bundle, loss, dtype, n, model, message)
        raise ConfigError(_failure(job, bundle, loss, phase, x, exc)) from None
    if shape_error is not None:
        raise ConfigError(
            f"model._target_={job.model['_target_']} on data._target_={job.data['_target_']}: "
            f"{shape_error}. Fix: {shape_error.fix(bundle.task)}"
        )
    return model, flops / len(y) if flops else None


def _failure(
    job: JobConfig, bundle: DataBundle, loss: Loss, phase: str, x: Any, exc: Exception
) -> str:
    """One line for an exception of the meta step, its Fix naming the phase that raised."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    raised = f"{type(exc).__name__}: {message}"
    if phase == "forward":
        offers = ", ".join(f"{k}={v}" for k, v in bundle.model_kwargs.items()) or "nothing"
        return (
            f"model._target_={job.model['_target_']} fails on a batch of data._target_="
            f"{job.data['_target_']} (inputs {_describe_batch(x)}): {raised}. Fix: match the "
            "model's forward and input size to the batch: a tensor is passed as the argument, "
            "a tuple as positional arguments, a dict as keyword arguments (the data offers: "
            f"{offers})"
        )
    return (
        f"{loss.name} fails on the outputs of model._target_={job.model['_target_']} "
        f"({phase}): {raised}. Fix: make the loss fit the '{bundle.task}' task's outputs and "
        "targets (dist_trainer.tasks)"
    )


def _input_ids(x: Any) -> torch.Tensor | None:
    if isinstance(x, dict):
        return x.get("input_ids")
    if isinstance(x, tuple | list):
        return x[0] if x and isinstance(x[0], torch.Tensor) else None
    return x if isinstance(x, torch.Tensor) else None


def _alignment(x: Any, y: torch.Tensor, loss: Loss) -> str | None:
    """lm: whether the targets are the inputs ("inputs", ignored ones aside), the inputs one
    token ahead ("next", as dist_trainer.data.tiny_text gives them), or neither (None)."""
    ids = _input_ids(x)
    if ids is None or ids.shape != y.shape or y.dim() != 2:
        return None
    kept = y != loss.ignore_index if loss.ignore_index is not None else torch.ones_like(y).bool()
    if bool(((y == ids) | ~kept).all()):
        return "inputs"
    if y.shape[1] >= 2 and bool(((y[:, :-1] == ids[:, 1:]) | ~kept[:, :-1]).all()):
        return "next"
    return None


def _check_shift(job: JobConfig, bundle: DataBundle, loss: Loss) -> None:
    """loss.shift_labels=true on targets that are already the next tokens shifts them twice."""
    if bundle.task != "lm" or not loss.shift_labels:
        return
    x, y = sample_batch(bundle.train, 8, build_collate(job), job.data_options.target_key)
    if _alignment(x, torch.as_tensor(y), loss) == "next":
        raise ConfigError(
            f"loss.shift_labels=true, but data._target_={job.data['_target_']} gives targets "
            "that are already the inputs one token ahead, so position t would be scored "
            "against the token after next. Fix: loss.shift_labels=false (and loss=default "
            "with a model that shifts its labels itself, as Hugging Face's causal LMs do)"
        )


def _check_model_loss(job: JobConfig, bundle: DataBundle, loss: Loss, dtype: torch.dtype) -> None:
    """loss=model on an lm task: the model's loss must count the targets the way
    loss.shift_labels says, or its micro-batches are weighted by the wrong counts (and a model
    that shifts labels given already-shifted targets learns the token after next). Checked on
    the CPU with 2 samples against our cross-entropy of the model's logits, shifted and not; a
    model loss that is neither (label smoothing, auxiliary terms) is taken as it is."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        model = build_model(job, bundle).to(dtype)
        x, y = _sample(job, bundle, dtype, 2, "cpu")
        with torch.no_grad():
            outputs = forward_batch(model, x, y, loss)
    logits, model_loss_tensor = split_outputs(outputs, loss)
    model_loss = float(model_loss_tensor)
    matches = {}
    for shift in (False, True):
        ours = dataclasses.replace(loss, from_model=False, shift_labels=shift)
        total, _, count = loss_sums(bundle.task, logits, y, ours)
        matches[shift] = abs(float(total) / max(1, int(count)) - model_loss) <= 1e-4 * max(
            1.0, abs(model_loss)
        )
    if matches[loss.shift_labels] or not matches[not loss.shift_labels]:
        return
    head = (
        f"loss=model: the loss of model._target_={job.model['_target_']} is the cross-entropy "
        "of its logits against the targets"
    )
    if loss.shift_labels:
        raise ConfigError(
            f"{head} as they are (it does not shift them), but loss.shift_labels=true counts "
            "them shifted. Fix: loss.shift_labels=false"
        )
    if _alignment(x, y, loss) == "inputs":
        raise ConfigError(
            f"{head} shifted one ahead (it shifts the labels itself), but loss.shift_labels=false "
            "counts them unshifted. Fix: loss.shift_labels=true"
        )
    raise ConfigError(
        f"{head} shifted one ahead: it shifts the labels itself, but data._target_="
        f"{job.data['_target_']} gives targets already aligned with the inputs (the next "
        "tokens), so it would learn the token after next. Fix: loss=default (our criterion on "
        "the aligned targets), or give labels = input_ids with loss.shift_labels=true"
    )


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
    _check_shift(job, bundle, loss)
    if loss.from_model and bundle.task == "lm":
        parameters = sum(p.numel() for p in model.parameters())
        if parameters <= CPU_CHECK_MAX_PARAMETERS:
            _check_model_loss(job, bundle, loss, job.trainer.precision.param_dtype)
    return result
