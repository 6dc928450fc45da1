"""Build the job's objects from config: data, model, optimizer, learning-rate schedule.

`model` and `data` are Hydra `_target_` nodes, so a user's own class plugs in by import path.
Dimensions the data knows (input features, classes, vocabulary) are offered to the model
factory when its signature takes them and the config does not set them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch
from hydra.utils import instantiate

from dist_trainer.config import ConfigError, JobConfig, OptimConfig, import_target
from dist_trainer.data import DataBundle
from dist_trainer.tasks import TASKS

__all__ = ["build_data", "build_model", "build_optimizer", "build_scheduler", "scaled_lr"]


def _accepted(target: Any, offered: dict[str, Any], already: Iterable[str]) -> dict[str, Any]:
    """The subset of `offered` kwargs that `target` accepts and the config does not set."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in offered.items() if k not in already and (takes_any or k in params)}


def build_data(job: JobConfig) -> DataBundle:
    """Instantiate `data._target_`, passing `trainer.seed` as `seed` when the factory takes it."""
    target = import_target(job.data["_target_"], key="data._target_")
    extra = _accepted(target, {"seed": job.trainer.seed}, job.data)
    bundle = instantiate(job.data, **extra)
    if not isinstance(bundle, DataBundle):
        raise ConfigError(
            f"data._target_={job.data['_target_']!r} returned {type(bundle).__name__}; it must "
            "return dist_trainer.data.DataBundle(train=..., val=..., task=..., model_kwargs=...)"
        )
    if bundle.task not in TASKS:
        raise ConfigError(f"data: task {bundle.task!r} is not one of {TASKS}")
    return bundle


def build_model(job: JobConfig, bundle: DataBundle) -> torch.nn.Module:
    """Instantiate `model._target_` with the data's dimensions filled in where accepted."""
    target = import_target(job.model["_target_"], key="model._target_")
    extra = _accepted(target, dict(bundle.model_kwargs), job.model)
    model = instantiate(job.model, **extra)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model._target_={job.model['_target_']!r} returned {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    return model


def scaled_lr(optim: OptimConfig, global_batch_size: int) -> float:
    """`optimizer.lr` scaled for the global batch: linear (Goyal et al. 2017) or sqrt (Hoffer)."""
    base_lr = float(optim.optimizer.get("lr", 1e-3))
    if optim.lr_scaling == "none":
        return base_lr
    ratio = global_batch_size / optim.base_batch_size  # checked > 0 in OptimConfig
    return base_lr * (ratio if optim.lr_scaling == "linear" else math.sqrt(ratio))


def build_optimizer(
    optim: OptimConfig, params: Iterable[torch.nn.Parameter], global_batch_size: int
) -> torch.optim.Optimizer:
    """Instantiate the partial optimizer on `params` with the scaled learning rate."""
    node = dict(optim.optimizer)
    node["_partial_"] = True
    node["lr"] = scaled_lr(optim, global_batch_size)
    try:
        factory = instantiate(node)
        return factory(params)
    except Exception as exc:
        raise ConfigError(
            f"optim.optimizer ({node['_target_']}) could not be built: {exc}. Fix: check its "
            "keyword arguments against the optimizer's signature"
        ) from None


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `optim.warmup_steps`, then constant or cosine to 0 at the last step."""
    warmup = optim.warmup_steps

    def factor(step: int) -> float:
        # LambdaLR calls this with the number of steps taken; step s trains with factor(s).
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
