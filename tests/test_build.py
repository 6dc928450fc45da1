"""Building the user's model, data and loss from config, and the checks that run before launch."""

from __future__ import annotations

import logging

import pytest
import torch

from dist_trainer.batching import plan_batches
from dist_trainer.build import (
    build_collate,
    build_data,
    build_loss,
    build_model,
    build_optimizer,
    build_scheduler,
    resolve_call,
    scaled_lr,
)
from dist_trainer.config import ConfigError, OptimConfig, load_config, open_target_overrides
from dist_trainer.loop import Trainer, WorkerInfo
from dist_trainer.models import MLP
from dist_trainer.preflight import flops_per_sample, preflight
from dist_trainer.tasks import Loss
from tests.conftest import job_config

USER = ["model._target_=tests.user_code.TinyNet", "data._target_=tests.user_code.make_data"]
CPU = WorkerInfo(0, 1, 0, 0, torch.device("cpu"))


def test_readme_recipe_leaves_out_the_replaced_groups_keys():
    job = job_config(*USER)
    checks = preflight(job, plan_batches(64, 2))
    assert checks.notes == [
        "data._target_=tests.user_code.make_data: left out data.val_fraction, data.standardize, "
        "data.num_features (defaults of the built-in data group it replaces; set them on the "
        "command line to pass them)",
        "model._target_=tests.user_code.TinyNet: left out model.hidden_sizes, model.dropout, "
        "model.activation, model.output_activation (defaults of the built-in model group it "
        "replaces; set them on the command line to pass them)",
    ]
    model = build_model(job, build_data(job))
    assert type(model).__name__ == "TinyNet"


def test_own_defaults_win_over_the_replaced_groups_defaults():
    """WideNet takes num_classes and in_features from the data and keeps its own width."""
    job = job_config(
        "model._target_=tests.user_code.WideNet", "data._target_=tests.user_code.make_data"
    )
    model = build_model(job, build_data(job))
    assert model.body[0].out_features == 4  # its default, not a built-in's hidden_sizes
    job = job_config(
        "model._target_=tests.user_code.WideNet",
        "data._target_=tests.user_code.make_data",
        "model.width=7",  # no `+` needed: a new key under model/data/loss is an argument
    )
    assert build_model(job, build_data(job)).body[0].out_features == 7


def test_built_in_presets_keep_every_key():
    job = job_config("model=cnn", "data=digits")
    call = resolve_call("model", job.model, {"in_channels": 1, "image_size": 8, "num_classes": 10})
    assert call.dropped == [] and call.kwargs["channels"] == [16, 32]


def test_a_required_argument_nobody_gives_names_the_key():
    job = job_config("model._target_=torch.nn.Linear", "data._target_=tests.user_code.make_data")
    with pytest.raises(
        ConfigError,
        match=r"torch\.nn\.Linear needs argument 'out_features'.*"
        r"Fix: model\.out_features=<value>",
    ):
        build_model(job, build_data(job))


def test_open_target_overrides_adds_plus_only_for_new_keys():
    out = open_target_overrides(
        [
            "model=cnn",
            "model.channels=[4]",
            "model.width=3",
            "loss._target_=torch.nn.BCELoss",
            "loss.label_smoothing=0.1",
            "data.loader.num_workers=2",
            "trainer.max_steps=3",
        ]
    )
    assert out == [
        "model=cnn",
        "model.channels=[4]",
        "+model.width=3",
        "loss._target_=torch.nn.BCELoss",
        "+loss.label_smoothing=0.1",
        "+data.loader.num_workers=2",
        "trainer.max_steps=3",
    ]
    cfg = load_config(["loss._target_=torch.nn.CrossEntropyLoss", "loss.label_smoothing=0.1"])
    assert cfg.loss.label_smoothing == 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.loader.workers=2"], r"data\.loader\.workers is not a loader setting"),
        (["data.loader.num_workers=-1"], r"data\.loader\.num_workers"),
        (["loss.label_smoothing=0.1"], r"loss\.label_smoothing is set but loss\._target_ is not"),
        (["loss.outputs=maybe"], r"loss\.outputs must be auto, logits or probabilities"),
        (["loss._target_=no.such.loss"], r"loss\._target_='no\.such\.loss' cannot be imported"),
        (["loss.ignore_index=pad"], r"loss\.ignore_index must be an integer or null.*Fix"),
        (["loss.shift_labels=maybe"], r"loss\.shift_labels must be true or false"),
        (
            ["loss=model", "loss._target_=torch.nn.CrossEntropyLoss"],
            r"loss=model uses the model's own loss, but loss\._target_=.*Fix: drop loss\._target_",
        ),
        (["+data.target_key="], r"data\.target_key must be a non-empty string.*Fix"),
        (["+data.collate=5"], r"data\.collate must be null or a node with a _target_"),
        (["+data.collate._target_=no.such.fn"], r"data\.collate\._target_='no\.such\.fn'"),
    ],
)
def test_loss_and_loader_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_loss(job_config(*overrides))


def test_build_collate_takes_a_function_or_a_class_with_its_arguments():
    assert build_collate(job_config()) is None
    pad = build_collate(job_config("+data.collate._target_=dist_trainer.hf.pad_collate",
                                   "+data.collate.pad_id=7"))  # fmt: skip
    batch = pad([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    cls = build_collate(job_config("+data.collate._target_=tests.user_code.Stacker",
                                   "+data.collate.scale=3"))  # fmt: skip
    x, y = cls([(torch.ones(2), 1), (torch.zeros(2), 0)])
    assert torch.equal(x, torch.tensor([[3.0, 3.0], [0.0, 0.0]])) and y.tolist() == [1, 0]
    with pytest.raises(ConfigError, match=r"data\.collate\.width: .*pad_collate does not accept"):
        build_collate(job_config("+data.collate._target_=dist_trainer.hf.pad_collate",
                                 "+data.collate.width=2"))  # fmt: skip


def test_build_loss_forms():
    assert build_loss(job_config()) == Loss()  # the task's default
    bce = build_loss(job_config("loss._target_=torch.nn.BCELoss"))
    assert bce.probabilities and bce.fn.reduction == "none"
    function = build_loss(job_config("loss._target_=tests.user_code.focal_loss", "loss.gamma=0.5"))
    assert not function.probabilities and function.fn.keywords == {"gamma": 0.5}
    functional = build_loss(
        job_config("loss._target_=torch.nn.functional.cross_entropy", "loss.label_smoothing=0.1")
    )
    assert functional.fn.keywords == {"label_smoothing": 0.1, "reduction": "none"}


def test_sigmoid_outputs_under_a_logits_loss_warn_once(caplog):
    job = job_config("model.output_activation=sigmoid", "trainer.max_steps=3")
    trainer = Trainer(job, plan_batches(64, 1), CPU)
    with caplog.at_level(logging.WARNING, logger="dist_trainer.loop"):
        trainer.fit()
    warnings = [r for r in caplog.records if "lies in [0, 1]" in r.getMessage()]
    assert len(warnings) == 1
    assert "loss._target_=torch.nn.BCELoss" in warnings[0].getMessage()
    caplog.clear()
    fixed = Trainer(
        job_config("experiment=seed_tutorial", "trainer.max_steps=3"), plan_batches(32, 1), CPU
    )
    with caplog.at_level(logging.WARNING, logger="dist_trainer.loop"):
        fixed.fit()
    assert not [r for r in caplog.records if "lies in [0, 1]" in r.getMessage()]


def test_flops_per_sample_match_the_matmul_count():
    """FlopCounterMode on the meta model against the count by hand: 2 FLOPs per weight in the
    forward pass, 4 in the backward (input and weight gradients) except the first layer,
    whose input needs no gradient (2)."""
    job = job_config("model.hidden_sizes=[64,32]")
    bundle = build_data(job)
    weights = [30 * 64, 64 * 32, 32 * 1]
    expected = 2 * sum(weights) + 4 * sum(weights) - 2 * weights[0]
    assert flops_per_sample(job, bundle, Loss(), torch.float32, 16) == expected
    model = MLP(30, 1, (64, 32))
    assert sum(p.numel() for n, p in model.named_parameters() if "weight" in n) == sum(weights)


def test_perf_tflops_is_the_flop_rate():
    job = job_config("trainer.max_steps=12", "trainer.log_every_n_steps=6")
    trainer = Trainer(job, plan_batches(64, 1), CPU)
    metrics = trainer.fit()
    rate = trainer.flops_per_sample * metrics["perf/samples_per_s"] / 1e12
    assert metrics["perf/tflops"] == pytest.approx(rate)
    assert "perf/mfu" not in metrics  # no known peak for a CPU
    job = job_config("trainer.max_steps=12", "trainer.peak_tflops_per_device=0.5")
    metrics = Trainer(job, plan_batches(64, 1), CPU).fit()
    assert metrics["perf/mfu"] == pytest.approx(metrics["perf/tflops"] / 0.5)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed", "64"])
def test_every_precision_trains_the_digits_preset(precision):
    """bf16 and fp16 autocast run on CPU too; the digits CNN reaches its usual accuracy."""
    job = job_config(
        "experiment=digits_cnn", f"trainer.precision={precision}", "trainer.max_epochs=6"
    )
    trainer = Trainer(job, plan_batches(128, 1), CPU)
    metrics = trainer.fit()
    assert next(trainer.model.parameters()).dtype == trainer.dtype
    assert metrics["val/accuracy"] > 0.93, metrics["val/accuracy"]
    if precision == "16-mixed":
        assert metrics["amp/grad_scale"] > 0 and metrics["amp/skipped_steps"] >= 0
    else:
        assert "amp/grad_scale" not in metrics


def test_bf16_autocast_really_computes_in_bf16():
    job = job_config("trainer.precision=bf16-mixed", "trainer.max_steps=1")
    trainer = Trainer(job, plan_batches(64, 1), CPU)
    x, _ = next(iter(trainer.train_feed.steps(trainer.sampler, 0))).micro_batches[0]
    with trainer.autocast:
        assert trainer.model(x).dtype == torch.bfloat16


@pytest.mark.slow
def test_compile_trains_like_eager():
    """torch.compile (inductor, CPU here) gives the eager loss curve to float32 noise."""
    overrides = ["trainer.max_steps=6", "trainer.log_every_n_steps=3"]
    eager = Trainer(job_config(*overrides), plan_batches(64, 1), CPU).fit()
    compiled = Trainer(
        job_config(*overrides, "trainer.compile=true"), plan_batches(64, 1), CPU
    ).fit()
    assert compiled["train/loss"] == pytest.approx(eager["train/loss"], rel=1e-4)
    assert compiled["val/loss"] == pytest.approx(eager["val/loss"], rel=1e-4)


@pytest.mark.parametrize(
    ("scaling", "base_batch", "global_batch", "peak"),
    [
        ("none", None, 256, 0.1),
        ("linear", 64, 256, 0.4),  # Goyal et al.: lr x global / base
        ("linear", 256, 64, 0.025),
        ("sqrt", 64, 256, 0.2),  # Hoffer et al.: lr x sqrt(global / base)
        ("sqrt", 256, 64, 0.05),
        ("linear", 64, 64, 0.1),
    ],
)
def test_lr_scaling_table(scaling, base_batch, global_batch, peak):
    optim = OptimConfig(
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.1},
        lr_scaling=scaling,
        base_batch_size=base_batch,
    )
    assert scaled_lr(optim, global_batch) == pytest.approx(peak)
    optimizer = build_optimizer(optim, [torch.nn.Parameter(torch.zeros(1))], global_batch)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(peak)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # warm-up from 0 over 4 steps, then the peak
        ("constant", [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]),
        # then cosine over the last 4 steps: 0.5 (1 + cos(pi k / 4)), k = 0..3
        ("cosine", [0.0, 0.25, 0.5, 0.75, 1.0, 0.853553, 0.5, 0.146447]),
    ],
)
def test_warm_up_starts_at_zero(schedule, expected):
    optim = OptimConfig(
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.2}, warmup_steps=4, schedule=schedule
    )
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer(optim, [param], 64)
    scheduler = build_scheduler(optimizer, optim, total_steps=8)
    seen = []
    for _ in range(8):  # the lr each optimizer step trains with
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.2 * f for f in expected], abs=1e-6)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2 if schedule == "constant" else 0)


def test_a_constant_lr_resumes_at_its_value_though_steps_only_count():
    # From the end of the warm-up the factor is constant: step() only counts, and a resumed
    # schedule (state dict) sets the lr a fresh one would have at that step.
    optim = OptimConfig(optimizer={"_target_": "torch.optim.SGD", "lr": 0.2}, warmup_steps=2)
    optimizer = build_optimizer(optim, [torch.nn.Parameter(torch.zeros(1))], 64)
    scheduler = build_scheduler(optimizer, optim, total_steps=10)
    for _ in range(5):
        scheduler.step()
    state = scheduler.state_dict()
    again = build_optimizer(optim, [torch.nn.Parameter(torch.zeros(1))], 64)
    resumed = build_scheduler(again, optim, total_steps=10)
    assert again.param_groups[0]["lr"] == 0.0  # a fresh schedule starts its warm-up at 0
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 5
    assert again.param_groups[0]["lr"] == pytest.approx(0.2) == optimizer.param_groups[0]["lr"]
