"""Build the job's objects from config: data, model, loss, optimizer, learning-rate schedule.

`model`, `data` and `loss` are Hydra `_target_` nodes, so a user's own class or function plugs
in by import path. Their arguments are checked against the target's signature before anything
is called, so a mistake is one line naming the key, in the driver, before Ray starts:

* Dimensions the data knows (input features, classes, vocabulary) are offered to the model when
  its signature takes them and the config does not set them; `trainer.seed` is offered to the
  data factory as `seed`.
* When `_target_` names your own class or function (not a built-in), the keys it inherits from
  the built-in group it replaced (e.g. `hidden_sizes`, `dropout` of `model: mlp`) are left out,
  and the driver says which. A key you set that the target does not accept is refused, with the
  parameters the target does accept. "Inherited" means: the key holds the value a shipped preset
  (conf/<group>/*.yaml, or an experiment preset) gives it.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dist_trainer.config import CONF_DIR, ConfigError, JobConfig, OptimConfig, import_target
from dist_trainer.data import DataBundle
from dist_trainer.tasks import TASKS, Loss

__all__ = [
    "RESERVED_KEYS",
    "LearningRateSchedule",
    "TargetCall",
    "build_collate",
    "build_data",
    "build_loss",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "resolve_call",
    "scaled_lr",
]

RESERVED_KEYS = {
    "data": ("loader", "target_key", "collate"),
    "loss": ("outputs", "ignore_index", "shift_labels", "from_model"),
    "model": (),
}
"""Keys of a `_target_` node that configure dist_trainer, not the target (never passed to it)."""

# Criteria whose input is a probability, not a logit: the binary task thresholds at 0.5.
_PROBABILITY_LOSSES = {"torch.nn.BCELoss", "torch.nn.functional.binary_cross_entropy"}


@dataclass
class TargetCall:
    """How a `_target_` node will be called: checked, with what the config left out."""

    group: str
    path: str
    target: Any
    kwargs: dict[str, Any]
    dropped: list[str] = field(default_factory=list)

    def note(self) -> str | None:
        """One line naming the inherited keys that were left out, if any."""
        if not self.dropped:
            return None
        keys = ", ".join(f"{self.group}.{k}" for k in self.dropped)
        return (
            f"{self.group}._target_={self.path}: left out {keys} (defaults of the built-in "
            f"{self.group} group it replaces; set them on the command line to pass them)"
        )


@functools.cache
def _shipped_presets(group: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """(target, node) of every shipped preset of `group`: conf/<group>/*.yaml and experiments."""
    nodes = [OmegaConf.to_container(OmegaConf.load(p)) for p in (CONF_DIR / group).glob("*.yaml")]
    for path in (CONF_DIR / "experiment").glob("*.yaml"):
        overlay = OmegaConf.to_container(OmegaConf.load(path))
        if isinstance(overlay.get(group), dict):
            nodes.append(overlay[group])
    return tuple((str(n.get("_target_")), n) for n in nodes if isinstance(n, dict))


def _signature(target: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """Keyword parameters of `target` (a class: its __init__) and whether it takes **kwargs."""
    try:
        params = dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # some builtins have no signature: accept anything
        return {}, True
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {
        k: p
        for k, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return named, takes_any


def resolve_call(
    group: str, node: dict[str, Any], offered: dict[str, Any], skip_inputs: int = 0
) -> TargetCall:
    """Check `node`'s keys against its `_target_` and add the `offered` ones it accepts.

    Args:
        group: The config group (`model`, `data`, `loss`): how errors name keys.
        node: The `_target_` node from the config.
        offered: Arguments the launcher offers (data dimensions, seed), passed only where the
            target accepts them and the config does not set them.
        skip_inputs: Leading positional parameters the caller passes at call time (a loss
            function's outputs and targets): not required from the config.

    Raises:
        ConfigError: A key the target does not accept, or a required argument nobody gives.
    """
    path = str(node["_target_"])
    target = import_target(path, key=f"{group}._target_")
    params, takes_any = _signature(target)
    own = {k: v for k, v in node.items() if k != "_target_" and k not in RESERVED_KEYS[group]}
    own.pop("_partial_", None)
    dropped: list[str] = []
    presets = _shipped_presets(group)
    if path not in {t for t, _ in presets}:
        for key in list(own):
            if any(t != path and key in n and n[key] == own[key] for t, n in presets):
                dropped.append(key)
                del own[key]
    accepted = ", ".join(list(params)[skip_inputs:]) or "no arguments"
    for key, value in own.items():
        if not takes_any and key not in params:
            raise ConfigError(
                f"{group}.{key}={value!r}: {path} does not accept '{key}' (it takes: "
                f"{accepted}). Fix: remove {group}.{key} or rename it to one of those"
            )
    kwargs = dict(own)
    for key, value in offered.items():
        if key not in kwargs and (takes_any or key in params):
            kwargs[key] = value
    for key, param in list(params.items())[skip_inputs:]:
        if param.default is inspect.Parameter.empty and key not in kwargs:
            offers = f" (the data offers: {', '.join(offered)})" if offered else ""
            raise ConfigError(
                f"{group}._target_={path} needs argument '{key}', which the config does not "
                f"set{offers}. Fix: {group}.{key}=<value>"
            )
    return TargetCall(group, path, target, kwargs, dropped)


def _call(call: TargetCall) -> Any:
    """Instantiate through Hydra, so nested `_target_` values in the arguments work too."""
    try:
        return instantiate({"_target_": call.path, **call.kwargs})
    except ConfigError:
        raise
    except Exception as exc:
        cause = exc.__cause__ or exc  # Hydra wraps the target's own error
        if isinstance(cause, ConfigError):  # a factory of ours that names its key and fix
            raise cause from None
        raise ConfigError(
            f"{call.group}._target_={call.path} raised {type(cause).__name__}: {cause}. Fix: "
            f"check the {call.group}.* arguments"
        ) from exc


def build_data(job: JobConfig) -> DataBundle:
    """Instantiate `data._target_`, passing `trainer.seed` as `seed` when the factory takes it."""
    bundle = _call(resolve_call("data", job.data, {"seed": job.trainer.seed}))
    if not isinstance(bundle, DataBundle):
        raise ConfigError(
            f"data._target_={job.data['_target_']!r} returned {type(bundle).__name__}; it must "
            "return dist_trainer.data.DataBundle(train=..., val=..., task=..., model_kwargs=...)"
        )
    if bundle.task not in TASKS:
        raise ConfigError(f"data: task {bundle.task!r} is not one of {TASKS}")
    if len(bundle.train) == 0 or len(bundle.val) == 0:
        raise ConfigError(
            f"data._target_={job.data['_target_']}: the train ({len(bundle.train)}) and val "
            f"({len(bundle.val)}) splits must both hold samples"
        )
    return bundle


def build_model(job: JobConfig, bundle: DataBundle) -> torch.nn.Module:
    """Instantiate `model._target_` with the data's dimensions filled in where accepted."""
    model = _call(resolve_call("model", job.model, dict(bundle.model_kwargs)))
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model._target_={job.model['_target_']!r} returned {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            f"model._target_={job.model['_target_']} has no trainable parameters, so there is "
            "nothing to train or all-reduce. Fix: give the model parameters (nn.Linear, ...) or "
            "check that they are registered (an nn.ModuleList, not a Python list)"
        )
    return model


def _loss_settings(job: JobConfig) -> dict[str, Any]:
    """What the LossOptions (and data.target_key) say, as Loss fields."""
    options = job.loss_options
    return {
        "ignore_index": options.ignore_index,
        "shift_labels": options.shift_labels,
        "from_model": options.from_model,
        "target_key": job.data_options.target_key,
    }


def build_loss(job: JobConfig) -> Loss:
    """The criterion of `loss._target_` asked for per-element losses, the task's default, or
    the model's own (`loss=model`); with which targets count (`loss.ignore_index`, ...)."""
    node = {k: v for k, v in (job.loss or {}).items() if k not in RESERVED_KEYS["loss"]}
    outputs = job.loss_options.outputs
    settings = _loss_settings(job)
    if not node.get("_target_"):
        extra = [k for k in node if k != "_target_"]
        if extra:
            raise ConfigError(
                f"loss.{extra[0]} is set but loss._target_ is not. Fix: name the criterion, "
                "e.g. loss._target_=torch.nn.CrossEntropyLoss"
            )
        if outputs == "probabilities":
            raise ConfigError(
                "loss.outputs=probabilities needs a loss that takes probabilities. Fix: "
                "loss._target_=torch.nn.BCELoss"
            )
        if settings["from_model"]:
            return Loss(name="the model's own loss (loss=model)", **settings)
        return Loss(**settings)
    path = str(node["_target_"])
    if "reduction" in node:
        raise ConfigError(
            f"loss.reduction={node['reduction']!r}: the reduction is dist_trainer's (per-sample "
            "losses summed, divided by the global batch), which keeps accumulation and DDP "
            "exact. Fix: remove loss.reduction"
        )
    target = import_target(path, key="loss._target_")
    is_class = inspect.isclass(target)
    call = resolve_call("loss", node, {"reduction": "none"}, skip_inputs=0 if is_class else 2)
    # A class is built once (its arguments go to __init__); a function gets them at each call.
    fn = _call(call) if is_class else functools.partial(target, **call.kwargs)
    if not callable(fn):
        raise ConfigError(f"loss._target_={path} built a {type(fn).__name__}, not a callable")
    sum_fn = None
    if call.kwargs.get("reduction") == "none":  # it takes reduction: let it sum itself too
        summing = {**call.kwargs, "reduction": "sum"}
        summed = TargetCall(call.group, call.path, call.target, summing)
        sum_fn = _call(summed) if is_class else functools.partial(target, **summing)
    probabilities = outputs == "probabilities" or (
        outputs == "auto" and path in _PROBABILITY_LOSSES
    )
    return Loss(fn=fn, name=path, probabilities=probabilities, sum_fn=sum_fn, **settings)


def build_collate(job: JobConfig) -> Callable[[list[Any]], Any] | None:
    """The user's collate function (`data.collate._target_`), or None for default_collate."""
    node = job.data_options.collate
    if node is None:
        return None
    path = str(node["_target_"])
    target = import_target(path, key="data.collate._target_")
    own = {k: v for k, v in node.items() if k != "_target_"}
    if inspect.isclass(target):
        fn = _call(TargetCall("data.collate", path, target, own))
    else:
        params, takes_any = _signature(target)
        for key in own:
            if not takes_any and key not in params:
                raise ConfigError(
                    f"data.collate.{key}: {path} does not accept '{key}' (it takes: "
                    f"{', '.join(params) or 'no arguments'}). Fix: remove data.collate.{key}"
                )
        fn = functools.partial(target, **own) if own else target
    if not callable(fn):
        raise ConfigError(
            f"data.collate._target_={path} built a {type(fn).__name__}, not a callable"
        )
    return fn


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


class LearningRateSchedule:
    """Sets each optimizer step's learning rate: the base lr of each group times `factor(s)`.

    Used like torch's LambdaLR (`step()` after `optimizer.step()`, `state_dict()`,
    `load_state_dict()`, the same factor semantics, and a state dict with LambdaLR's
    `last_epoch` and `base_lrs`), but it writes a group's lr only when the factor changes, and it
    does not wrap `optimizer.step`. LambdaLR does both every step: ~20 µs of host time per step
    on this project's CPU benchmark (scripts/bench_host.py), for a constant lr too.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        factor: Callable[[int], float],
        constant_from: int | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.factor = factor
        # The step from which the factor no longer changes (None: it may change at any step):
        # from there on `step()` only counts.
        self.constant_from = constant_from
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = 0  # optimizer steps taken (LambdaLR's name)
        self._applied: float | None = None
        self._apply()

    def _apply(self) -> None:
        factor = self.factor(self.last_epoch)
        if factor != self._applied:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * factor
            self._applied = factor

    def step(self) -> None:
        """After an optimizer step: set the lr the next step trains with."""
        self.last_epoch += 1
        if self.constant_from is None or self.last_epoch <= self.constant_from:
            self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = state["last_epoch"]
        self.base_lrs = list(state["base_lrs"])
        self._applied = None
        self._apply()


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int
) -> LearningRateSchedule:
    """Linear warm-up from 0 over `optim.warmup_steps`, then constant or cosine to 0 at the end.

    The optimizer step s (0-based) trains with lr x factor(s): s / warmup during the warm-up (so
    the first step, s = 0, runs at 0, as in Goyal et al. and transformers' linear warm-up), the
    peak lr from s = warmup on, and with `cosine` 0.5 (1 + cos(pi p)), p the share of the
    post-warm-up steps taken, which reaches 0 after the last step.
    """
    warmup = optim.warmup_steps

    def factor(step: int) -> float:
        # Called with the number of steps taken; step s trains with factor(s).
        if step < warmup:
            return step / warmup
        if optim.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    constant_from = warmup if optim.schedule != "cosine" else None
    return LearningRateSchedule(optimizer, factor, constant_from)
