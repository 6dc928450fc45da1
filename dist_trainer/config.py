"""Structured configs behind conf/: every field documented where it is defined, checked on load.

The YAML groups in conf/ (model, data, optim, trainer, scaling, tracking, experiment) are merged
onto these dataclasses by Hydra. `model` and `data` stay open dictionaries with a `_target_`
(an import path) so users can plug in their own classes; everything else is typed, and
`resolve_config` turns a composed config into checked dataclasses, raising `ConfigError` that
names the key and the fix before anything starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dist_trainer.errors import ConfigError

__all__ = [
    "CommConfig",
    "ConfigError",
    "DataOptions",
    "JobConfig",
    "LossOptions",
    "OptimConfig",
    "Precision",
    "ScalingConfig",
    "TelemetryConfig",
    "TrackingConfig",
    "TrainerConfig",
    "flatten",
    "import_target",
    "load_config",
    "open_target_overrides",
    "register_configs",
    "resolve_config",
]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class Precision(str, Enum):
    """`trainer.precision`: how the step computes (Lightning's names)."""

    FP32 = "32"
    BF16_MIXED = "bf16-mixed"
    FP16_MIXED = "16-mixed"
    FP64 = "64"

    @property
    def param_dtype(self) -> Any:
        """The dtype parameters and floating inputs are kept in."""
        import torch

        return torch.float64 if self is Precision.FP64 else torch.float32

    @property
    def autocast_dtype(self) -> Any:
        """The autocast dtype, or None when the step runs without autocast."""
        import torch

        return {Precision.BF16_MIXED: torch.bfloat16, Precision.FP16_MIXED: torch.float16}.get(self)


@dataclass
class TrainerConfig:
    """How the training loop runs (`trainer.*`)."""

    global_batch_size: int = 64
    """Samples per optimizer step, summed over all workers. The plan splits it exactly."""
    max_micro_batch_size: Any = None
    """Largest micro-batch one worker holds at once: an int (a cap), null (no cap: one
    micro-step per optimizer step), or auto: each worker finds the largest micro-batch that
    fits its device (an out-of-memory search on CUDA, `micro_batch_memory_mb` on CPU), the
    workers agree on the smallest, and the plan re-solves the accumulation steps with it; the
    global batch stays as asked (dist_trainer.autobatch)."""
    micro_batch_memory_mb: float | None = None
    """Memory one worker may use for a micro-step, MiB; required for
    max_micro_batch_size=auto on CPU (parameters, gradients, the batch and the activations
    saved for backward are counted); on GPU an optional cap below the device's memory (peak
    allocated bytes of a probe step). Only used with auto (so a study can sweep
    max_micro_batch_size over ints and auto with one budget)."""
    max_epochs: int = 2
    """Passes over the training split."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run all epochs)."""
    seed: int = 0
    """Seeds the data split, shuffling and model init; every worker uses the same value."""
    drop_last: bool = False
    """Drop the short last global batch of an epoch instead of training on it (exactly scaled)."""
    log_every_n_steps: int = 10
    """Log training metrics to MLflow every N optimizer steps (and at the first and last)."""
    val_every_n_epochs: int = 1
    """Validate every N epochs (and always after the last)."""
    checkpoint_every_n_steps: int | None = None
    """Checkpoint every N optimizer steps; None: at the end of each epoch. Each costs a report."""
    precision: Any = "32"
    """Numerics of the step: 32 (float32), bf16-mixed (float32 weights, bfloat16 autocast),
    16-mixed (float16 autocast with a GradScaler; its scale and skipped steps are logged), or 64
    (float64 weights and loss, for exactness tests)."""
    compile: bool = False
    """torch.compile the model before wrapping it in DDP (DDP's optimizer splits the graph at
    bucket boundaries so communication still overlaps the backward pass)."""
    tf32: bool = True
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores (32 and *-mixed)."""
    peak_tflops_per_device: float | None = None
    """Peak dense TFLOP/s of one device at this precision, for perf/mfu. None: looked up for
    A100/H100/H200 (bf16/fp16 dense, or TF32/FP32); no perf/mfu on other devices."""
    grad_clip_norm: float | None = None
    """Clip the global gradient norm to this value before each optimizer step (None: off)."""
    preflight: bool = True
    """Before Ray starts, build the data and the model (on the meta device) in the driver and
    check them: arguments, parameters, output shape, data size. Set false when building the
    data in the driver is too costly; the workers then report the same mistakes."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.global_batch_size, int) and self.global_batch_size > 0,
            f"trainer.global_batch_size must be a positive integer, got {self.global_batch_size!r}"
            ". Fix: trainer.global_batch_size=64",
        )
        m = self.max_micro_batch_size
        _require(
            m is None or m == "auto" or (isinstance(m, int) and not isinstance(m, bool) and m > 0),
            f"trainer.max_micro_batch_size must be a positive integer, null (no cap) or auto "
            f"(find what fits), got {m!r}. Fix: trainer.max_micro_batch_size=null",
        )
        budget = self.micro_batch_memory_mb
        _require(
            budget is None
            or (isinstance(budget, int | float) and not isinstance(budget, bool) and budget > 0),
            f"trainer.micro_batch_memory_mb must be a positive number of MiB or null, got "
            f"{budget!r}. Fix: trainer.micro_batch_memory_mb=2048",
        )
        _require(self.max_epochs > 0, f"trainer.max_epochs must be > 0, got {self.max_epochs}")
        _require(
            self.max_steps is None or self.max_steps > 0,
            f"trainer.max_steps must be > 0 or null, got {self.max_steps}",
        )
        _require(
            self.log_every_n_steps > 0,
            f"trainer.log_every_n_steps must be > 0, got {self.log_every_n_steps}",
        )
        _require(
            self.val_every_n_epochs > 0,
            f"trainer.val_every_n_epochs must be > 0, got {self.val_every_n_epochs}",
        )
        _require(
            self.checkpoint_every_n_steps is None or self.checkpoint_every_n_steps > 0,
            "trainer.checkpoint_every_n_steps must be > 0 or null (each epoch end), got "
            f"{self.checkpoint_every_n_steps}",
        )
        choices = [p.value for p in Precision]
        _require(
            str(self.precision) in choices,
            f"trainer.precision must be one of {', '.join(choices)}, got {self.precision!r}. "
            "Fix: trainer.precision=bf16-mixed on recent GPUs, 32 on CPU",
        )
        # YAML and the command line give 32 and 64 as ints; the loop gets the enum.
        self.precision = Precision(str(self.precision))
        _require(
            self.peak_tflops_per_device is None or self.peak_tflops_per_device > 0,
            "trainer.peak_tflops_per_device must be > 0 or null (look it up), got "
            f"{self.peak_tflops_per_device}",
        )

    @property
    def auto_micro_batch(self) -> bool:
        """True when each worker finds its micro-batch (`max_micro_batch_size=auto`)."""
        return self.max_micro_batch_size == "auto"

    @property
    def micro_batch_cap(self) -> int | str | None:
        """The cap as `batching.plan_batches` takes it: an int, None (no cap) or "auto" (a
        provisional plan that each Trainer re-solves with the micro-batch the workers agree on,
        dist_trainer.autobatch)."""
        m = self.max_micro_batch_size
        return m if m is None or m == "auto" else int(m)


@dataclass
class OptimConfig:
    """The optimizer and its learning-rate schedule (`optim.*`)."""

    optimizer: Any = field(
        default_factory=lambda: {
            "_target_": "torch.optim.AdamW",
            "_partial_": True,
            "lr": 1e-3,
        }
    )
    """A torch optimizer by import path with `_partial_: true` (params are passed by the loop)."""
    lr_scaling: str = "none"
    """Scale optimizer.lr with the global batch: none | linear (Goyal et al.) | sqrt (Hoffer)."""
    base_batch_size: int | None = None
    """Global batch at which optimizer.lr was tuned; required when lr_scaling is not none."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to the (scaled) lr over this many optimizer steps."""
    schedule: str = "constant"
    """After warm-up: constant | cosine (decays to 0 at the last step)."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.optimizer, dict) and "_target_" in self.optimizer,
            "optim.optimizer must have a _target_ (e.g. torch.optim.SGD). Fix: optim=sgd",
        )
        _require(
            self.lr_scaling in ("none", "linear", "sqrt"),
            f"optim.lr_scaling must be none, linear or sqrt, got {self.lr_scaling!r}",
        )
        _require(
            self.lr_scaling == "none" or (self.base_batch_size or 0) > 0,
            f"optim.lr_scaling={self.lr_scaling} needs optim.base_batch_size (the global batch "
            "the lr was tuned at). Fix: optim.base_batch_size=256",
        )
        _require(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _require(
            self.schedule in ("constant", "cosine"),
            f"optim.schedule must be constant or cosine, got {self.schedule!r}",
        )


@dataclass
class ScalingConfig:
    """Where and on how many workers the job runs (`scaling.*`)."""

    num_workers: Any = 2
    """Data-parallel workers (ranks); one per GPU when GPUs are used. A range [min, max] makes
    the job elastic: Ray Train starts it with as many workers as fit (at least min), grows it
    when more fit, and shrinks it when a node is lost (with scaling.max_failures); each resize
    restarts the group from the latest checkpoint and re-solves the batch plan, so the global
    batch stays what was asked (the run logs plan/world_size and plan/accumulation_steps).
    Every count in the range must split trainer.global_batch_size exactly."""
    elastic_resize_interval_s: float = 60.0
    """Elastic jobs: how often a running job checks whether more workers fit. Ray Train's
    resource coordinator refreshes what the cluster has every ~20 s on top of this."""
    use_gpu: Any = "auto"
    """auto (GPUs if the cluster has them) | true (require GPUs) | false (CPU workers, gloo)."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each worker."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per worker, e.g. {memory: 4e9} or a custom label."""
    placement_strategy: str = "PACK"
    """Ray placement of workers: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD."""
    address: str | None = None
    """Ray cluster to join (e.g. 'auto' or 'ray://host:10001'); None starts a local cluster."""
    storage_path: str = ".ray_storage"
    """Where Ray Train keeps checkpoints: a local folder (project-local by default, not the
    home directory) or a URI Ray Train supports (s3://bucket/path, gs://...), passed as given.
    On a cluster of several machines it must be storage every node reaches."""
    max_failures: int = 0
    """Worker-group restarts Ray Train tries before failing the job (resumes from a checkpoint)."""
    bucket_cap_mb: float | None = None
    """DDP gradient bucket size in MiB; None keeps DDP's own default (25 MiB, with a small first
    bucket so communication starts early in the backward pass). Smaller buckets overlap more
    and cost more calls."""

    def __post_init__(self) -> None:
        count = self.num_workers
        if isinstance(count, list | tuple) and len(count) == 2 and count[0] == count[1]:
            count = count[0]  # [n, n] is n fixed workers
        is_int = isinstance(count, int) and not isinstance(count, bool)
        is_range = (
            isinstance(count, list | tuple)
            and len(count) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in count)
        )
        _require(
            (is_int and count > 0) or (is_range and 0 < count[0] < count[1]),
            "scaling.num_workers must be a positive integer or a range [min, max] with "
            f"0 < min < max (elastic), got {self.num_workers!r}. Fix: scaling.num_workers=2 "
            "or scaling.num_workers=[1,4]",
        )
        self.num_workers = count if is_int else [int(n) for n in count]
        _require(
            self.elastic_resize_interval_s > 0, "scaling.elastic_resize_interval_s must be > 0"
        )
        _require(
            self.use_gpu in ("auto", True, False),
            f"scaling.use_gpu must be auto, true or false, got {self.use_gpu!r}",
        )
        _require(self.cpus_per_worker > 0, "scaling.cpus_per_worker must be > 0")
        _require(
            self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
            f"scaling.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
            f"got {self.placement_strategy!r}",
        )
        _require(self.max_failures >= -1, "scaling.max_failures must be >= -1 (-1: no limit)")
        _require(
            self.bucket_cap_mb is None or self.bucket_cap_mb > 0,
            "scaling.bucket_cap_mb must be > 0 or null (DDP's default)",
        )

    @property
    def elastic(self) -> bool:
        """Whether num_workers is a range [min, max]."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    def describe_workers(self) -> str:
        """'2' or '1-4' (elastic), for names and messages."""
        return f"{self.min_workers}-{self.max_workers}" if self.elastic else str(self.num_workers)


@dataclass
class TrackingConfig:
    """Where runs are logged (`tracking.*`)."""

    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI: sqlite:///file.db (relative to the working dir), http://host:5000.
    conf/tracking/default.yaml takes $MLFLOW_TRACKING_URI when it is set."""
    experiment: str = "dist_trainer"
    """MLflow experiment that groups comparable runs."""
    run_name: str | None = None
    """Run name in the MLflow UI; None derives one from model, data and batch size."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra tags on the run."""
    log_model: bool = True
    """Log the final weights as an artifact."""
    system_metrics: bool = True
    """Log MLflow's own host metrics (CPU, memory, disk, network) per node as system/node<i>/..."""

    def __post_init__(self) -> None:
        _require(
            bool(self.uri), "tracking.uri must not be empty. Fix: tracking.uri=sqlite:///mlflow.db"
        )
        _require(bool(self.experiment), "tracking.experiment must not be empty")


@dataclass
class CommConfig:
    """Communication measurement in the loop (`comm.*`)."""

    enabled: bool = True
    """Time every gradient all-reduce via a DDP communication hook (no extra synchronization)."""
    probe_every_n_steps: int = 100
    """Without accumulation, time one extra compute-only micro-step at step 1 and every N steps
    for comm/exposed_s (costs ~1/N of compute; with accumulation the reference is free)."""
    sweep_min_bytes: int = 1024
    """bench-comm: smallest all-reduce message (bytes); sizes double up to sweep_max_bytes."""
    sweep_max_bytes: int = 256 * 2**20
    """bench-comm: largest all-reduce message (bytes)."""
    sweep_warmup: int = 5
    """bench-comm: untimed all-reduces per size before timing."""
    sweep_repeats: int = 20
    """bench-comm: timed all-reduces per size; the median is reported."""

    def __post_init__(self) -> None:
        _require(self.probe_every_n_steps > 0, "comm.probe_every_n_steps must be > 0")
        _require(
            0 < self.sweep_min_bytes <= self.sweep_max_bytes,
            f"comm.sweep_min_bytes ({self.sweep_min_bytes}) must be > 0 and <= "
            f"comm.sweep_max_bytes ({self.sweep_max_bytes})",
        )
        _require(self.sweep_warmup >= 0, "comm.sweep_warmup must be >= 0")
        _require(self.sweep_repeats > 0, "comm.sweep_repeats must be > 0")


@dataclass
class TelemetryConfig:
    """Hardware telemetry per worker (`telemetry.*`)."""

    enabled: bool = True
    """Sample GPU utilization, memory, power, temperature and clocks via NVML (off without NVML)."""
    interval_s: float = 1.0
    """Seconds between NVML samples in the background thread (MLflow host metrics: 5x this)."""

    def __post_init__(self) -> None:
        _require(self.interval_s > 0, "telemetry.interval_s must be > 0")


@dataclass
class LossOptions:
    """The keys of the `loss` node that configure dist_trainer, not the criterion (`loss.*`).

    They are never passed to `loss._target_`; conf/loss/default.yaml and conf/loss/model.yaml
    (`loss=model`) set them."""

    outputs: str = "auto"
    """auto | logits | probabilities: whether a binary model's outputs are probabilities (auto:
    yes for BCELoss), so predictions threshold at 0.5 instead of 0."""
    ignore_index: int | None = -100
    """multiclass and lm: targets equal to this value are left out of the loss, the accuracy and
    the count the loss is divided by (-100: what Hugging Face's collators pad labels with).
    null: every target counts. The binary task does not use it."""
    shift_labels: bool = False
    """lm: the targets are the inputs themselves (Hugging Face's causal-LM convention, labels =
    input_ids), so the logits at position t are scored against target t + 1. false: the data
    gives targets already aligned with the outputs (dist_trainer.data.tiny_text)."""
    from_model: bool = False
    """Use the loss the model returns (`loss=model`; Hugging Face's outputs.loss): the targets
    go to forward as data.target_key=..., and the model's mean over its micro-batch is weighted
    by the micro-batch's counted targets so accumulation and DDP stay exact. Set
    shift_labels and ignore_index as the model counts them (a causal LM: shift_labels=true)."""

    def __post_init__(self) -> None:
        _require(
            self.outputs in ("auto", "logits", "probabilities"),
            f"loss.outputs must be auto, logits or probabilities, got {self.outputs!r}. Fix: "
            "loss.outputs=probabilities for a model that ends in a sigmoid",
        )
        ii = self.ignore_index
        _require(
            ii is None or (isinstance(ii, int) and not isinstance(ii, bool)),
            f"loss.ignore_index must be an integer or null, got {ii!r}. Fix: "
            "loss.ignore_index=-100",
        )
        for key in ("shift_labels", "from_model"):
            value = getattr(self, key)
            _require(
                isinstance(value, bool),
                f"loss.{key} must be true or false, got {value!r}. Fix: loss.{key}=false",
            )


@dataclass
class DataOptions:
    """How a batch is assembled from dataset items (`data.target_key`, `data.collate`): keys of
    the `data` node that are not passed to `data._target_`."""

    target_key: str = "labels"
    """For dict items (what Hugging Face datasets give): the key of the targets; every other
    key goes to the model's forward as a keyword argument (input_ids=..., attention_mask=...).
    With loss=model the targets go to forward under this key too."""
    collate: Any = None
    """A collate function of yours: `_target_` of a function `fn(items, **kwargs) -> batch`
    (kwargs: the node's other keys) or of a class whose instances are one; the batch is an
    (input, target) pair or a dict with data.target_key. E.g. padding to the longest sequence.
    null: torch's default_collate. Setting it feeds the data through the DataLoader."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.target_key, str) and bool(self.target_key),
            f"data.target_key must be a non-empty string, got {self.target_key!r}. Fix: "
            "data.target_key=labels",
        )
        c = self.collate
        _require(
            c is None or (isinstance(c, dict) and bool(c.get("_target_"))),
            f"data.collate must be null or a node with a _target_, got {c!r}. Fix: "
            "data.collate._target_=your_package.pad_collate",
        )
        if c is not None:
            import_target(c["_target_"], key="data.collate._target_")


@dataclass
class JobConfig:
    """The whole job. `model` and `data` are `_target_` dictionaries (see conf/model, conf/data)."""

    model: Any = None
    """The network: `_target_` import path of an nn.Module class or factory, plus its kwargs."""
    data: Any = None
    """The data: `_target_` of a factory returning dist_trainer.data.DataBundle, plus kwargs.
    `data.loader.*` (dist_trainer.loading.LoaderConfig) says how it is fed, `data.target_key`
    and `data.collate` (DataOptions) how items become a batch; those are not passed."""
    loss: Any = field(default_factory=lambda: {"_target_": None})
    """The criterion: `_target_` of a torch loss class or a function `fn(outputs, targets)`,
    plus its kwargs (e.g. loss.label_smoothing=0.1); null: the task's default. It is always
    asked for per-element losses. `loss.outputs`, `loss.ignore_index`, `loss.shift_labels` and
    `loss.from_model` (LossOptions) configure dist_trainer and are not passed; `loss=model`
    uses the model's own loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def __post_init__(self) -> None:
        for key in ("model", "data"):
            node = getattr(self, key)
            _require(
                isinstance(node, dict) and node.get("_target_"),
                f"{key} has no _target_. Fix: choose a built-in ({key}=<name>, see conf/{key}/) "
                f"or set {key}._target_=your_package.YourClass",
            )
            import_target(node["_target_"], key=f"{key}._target_")
        _require(
            self.loss is None or isinstance(self.loss, dict),
            "loss must be a node with a _target_ (e.g. loss._target_=torch.nn.BCELoss) or null",
        )
        if self.loss and self.loss.get("_target_"):
            import_target(self.loss["_target_"], key="loss._target_")
        loss = self.loss or {}
        self.loss_options = LossOptions(
            **{k: loss[k] for k in LossOptions.__dataclass_fields__ if k in loss}
        )
        _require(
            not (self.loss_options.from_model and loss.get("_target_")),
            f"loss=model uses the model's own loss, but loss._target_={loss.get('_target_')} is "
            "set too. Fix: drop loss._target_, or use loss=default with it",
        )
        self.data_options = DataOptions(
            **{k: self.data[k] for k in DataOptions.__dataclass_fields__ if k in self.data}
        )
        from dist_trainer.loading import LoaderConfig  # lazily: it imports torch

        loader = self.data.get("loader") or {}
        _require(
            isinstance(loader, dict),
            f"data.loader must be a node of DataLoader settings, got {loader!r}",
        )
        unknown = sorted(set(loader) - set(LoaderConfig.__dataclass_fields__))
        _require(
            not unknown,
            f"data.loader.{unknown[0] if unknown else ''} is not a loader setting. Fix: use one "
            f"of {', '.join(LoaderConfig.__dataclass_fields__)}",
        )
        self.loader = LoaderConfig(**loader)


def import_target(path: str, key: str) -> Any:
    """Import `pkg.mod.Name`; a failure names the config key instead of a bare ImportError."""
    module_name, _, attr = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"{key}={path!r} cannot be imported ({exc}). Fix: give an importable "
            f"'package.module.Name' that is installed where the workers run"
        ) from None


def register_configs() -> None:
    """Register the schemas so conf/config.yaml can name them in its defaults list."""
    store = ConfigStore.instance()
    store.store(name="job_schema", node=JobConfig)


def _find_conf_dir() -> Path:
    """The Hydra configs: the package data dist_trainer/conf/ of an installed wheel (pyproject
    maps the repository's conf/ there), else conf/ beside the package (a source checkout or an
    editable install, where conf/ at the repository root is what users edit)."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    if (installed / "config.yaml").is_file():
        return installed
    return package.parent / "conf"


CONF_DIR = _find_conf_dir()
"""Folder of conf/config.yaml and its groups, as a real path (Hydra reads it as files)."""


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides, as `dist-trainer train` would."""
    from hydra import compose, initialize_config_dir

    register_configs()
    overrides = open_target_overrides(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


# The `_target_` nodes take whatever arguments their target does, so a new key there is an
# argument, not a typo in a launcher setting: it needs no `+` (Hydra's "append" prefix).
_OPEN_NODES = ("model.", "data.", "loss.")


def open_target_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Prefix `+` to overrides that add a key under model/data/loss, so Hydra accepts them.

    Which keys exist depends on the group choices (model=cnn has other keys than model=mlp),
    so the choices among `overrides` are composed first, without the dotted keys.
    """
    from hydra import compose, initialize_config_dir

    dotted = [
        o
        for o in overrides
        if o.startswith(_OPEN_NODES) and "=" in o and "@" not in o.split("=", 1)[0]
    ]
    if not dotted:
        return list(overrides)
    choices = [
        o
        for o in overrides
        if "=" in o
        and "." not in o.split("=", 1)[0]
        and not o.startswith(("+", "~", "hydra", "-"))
        and "," not in o.split("=", 1)[1]  # a sweep (-m model=mlp,cnn): defaults decide
    ]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        base = compose(config_name="config", overrides=choices)
    out = []
    for override in overrides:
        if override in dotted:
            *parents, leaf = override.split("=", 1)[0].split(".")
            node = OmegaConf.select(base, ".".join(parents), default=None)
            exists = isinstance(node, DictConfig) and leaf in node
            if not exists:
                override = "+" + override
        out.append(override)
    return out


def resolve_config(cfg: DictConfig | dict) -> JobConfig:
    """Check a composed config and return it as dataclasses; ConfigError names a bad key."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.merge(OmegaConf.structured(JobConfig), cfg)
    try:
        return OmegaConf.to_object(cfg)  # runs every __post_init__ check
    except ConfigError:
        raise
    except Exception as exc:  # OmegaConf type errors name the full key already
        raise ConfigError(f"invalid config: {exc}") from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists as `a.b.c` keys: how MLflow params are named."""
    flat: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            flat.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list | tuple) and any(isinstance(v, dict | list) for v in tree):
        for i, v in enumerate(tree):
            flat.update(flatten(v, f"{prefix}{i}."))
    else:
        flat[prefix[:-1]] = tree
    return flat
