"""Hugging Face models as people bring them: a real `transformers` GPT-2 built from a config.

Raw ModelOutputs, dict batches with an attention mask and padding, -100 labels against HF's own
loss, `loss=model`, save_pretrained / from_pretrained, and float64 2 DDP workers x accumulation 2
equal to one process on padded sequences of unequal length (torch.multiprocessing + gloo).
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: pip install .[hf]"
)

from dist_trainer import hf  # noqa: E402
from dist_trainer.batching import plan_batches  # noqa: E402
from dist_trainer.config import ConfigError  # noqa: E402
from dist_trainer.loop import Trainer, WorkerInfo  # noqa: E402
from dist_trainer.preflight import preflight  # noqa: E402
from dist_trainer.run_logger import NullLogger  # noqa: E402
from dist_trainer.tasks import Loss, loss_sums  # noqa: E402
from tests.conftest import free_port, job_config  # noqa: E402

CPU = torch.device("cpu")
# Dict items {input_ids, labels} of 3..16 tokens, padded per micro-batch by pad_collate (labels
# with -100), labels = input_ids as HF's causal LMs take them (loss.shift_labels=true). 96
# samples in global batches of 20: steps of 20, 20, 20, 20 and a short 16.
PADDED = [
    "model=tiny_gpt2",
    "model.n_embd=32",
    "data._target_=tests.hf_user_code.padded_text",
    "data.collate._target_=dist_trainer.hf.pad_collate",
    "loss.shift_labels=true",
    "trainer.precision=64",
    "trainer.global_batch_size=20",
    "trainer.max_epochs=1",
    "optim.optimizer.lr=0.01",
]
CLASSIFIER = [
    "model._target_=tests.hf_user_code.gpt2_classifier",
    "data._target_=tests.hf_user_code.labelled_text",
]
RUNS = {
    "criterion": PADDED,
    "model_loss": [*PADDED, "loss=model", "loss.shift_labels=true", "data.loader.num_workers=1"],
    # Sequence classification (multiclass) with HF's own loss, a fifth of the labels -100.
    "classifier_model_loss": [
        *CLASSIFIER,
        "loss=model",
        "trainer.precision=64",
        "trainer.global_batch_size=20",
        "trainer.max_epochs=1",
        "optim.optimizer.lr=0.01",
    ],
    # ((input_ids, attention_mask), labels) pairs of one length, the tail masked and -100.
    "tuple_inputs": [
        "model._target_=tests.hf_user_code.TupleGPT2",
        "data._target_=tests.hf_user_code.padded_text",
        "data.pairs=true",
        *PADDED[4:],
    ],
}
# The preset on its own aligned targets (tiny_text: y is x one character ahead), kept small.
TINY_TEXT = ("experiment=tiny_gpt2", "data.seq_len=16", "data.max_chars=4000")
FLOAT64_TOLERANCE = 1e-12
# HF computes its own loss in float32 whatever the model's dtype (ForCausalLMLoss casts the
# logits), so with loss=model only float32's precision is there to compare.
TOLERANCE = {"model_loss": 1e-7}


def _params(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in trainer.model.parameters()])


def _trainer(*overrides: str, world: int = 1, rank: int = 0, logger=None) -> Trainer:
    job = job_config(*overrides)
    plan = plan_batches(job.trainer.global_batch_size, world, job.trainer.micro_batch_cap)
    return Trainer(job, plan, WorkerInfo(rank, world, rank, 0, CPU), logger=logger)


class _Recorder(NullLogger):
    """What rank 0 would log, in memory."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def log_metrics(self, metrics, step):
        self.rows.append(dict(metrics))


# ------------------------------------------------------------------ losses against HF's own


def test_ignored_labels_give_hfs_own_loss():
    torch.manual_seed(0)
    model = hf.tiny_gpt2(vocab_size=11, seq_len=8, n_embd=16)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2] = -100  # a prompt token left out too
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    loss_sum, correct, count = loss_sums("lm", out, labels, Loss(shift_labels=True))
    counted = labels[:, 1:] != -100
    assert count.item() == counted.sum().item() == 7
    # HF computes its loss in float32 (ForCausalLMLoss casts the logits): float32's precision.
    assert loss_sum.item() / count.item() == pytest.approx(out.loss.item(), rel=1e-6)
    # In float64, against torch's cross_entropy(ignore_index=-100) on the shifted logits.
    logits64 = out.logits.detach().double()
    sum64, _, _ = loss_sums("lm", logits64, labels, Loss(shift_labels=True))
    ref = F.cross_entropy(logits64[:, :-1].reshape(-1, 11), labels[:, 1:].flatten())
    assert abs(sum64.item() / 7 - ref.item()) < 1e-15
    hits = (out.logits[:, :-1].argmax(-1) == labels[:, 1:]) & counted
    assert correct.item() == hits.sum().item()
    # loss=model: the model's mean re-weighted by the micro-batch's counted targets.
    own, _, _ = loss_sums("lm", out, labels, Loss(shift_labels=True, from_model=True))
    assert own.item() == pytest.approx(out.loss.item() * 7, rel=1e-7)
    assert own.item() == pytest.approx(loss_sum.item(), rel=1e-6)


def test_the_issues_example_two_of_four_tokens_ignored():
    """Uniform logits over 10 tokens: every counted token costs ln 10 (2.303), not 1.151."""
    logits = torch.zeros(1, 4, 10, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, -100, 3, -100]])
    loss_sum, correct, count = loss_sums("lm", logits, targets)
    torch_mean = F.cross_entropy(logits.reshape(4, 10), targets.flatten(), ignore_index=-100)
    assert count.item() == 2
    assert loss_sum.item() / count.item() == pytest.approx(math.log(10), abs=1e-15)
    assert abs(loss_sum.item() / 2 - torch_mean.item()) < 1e-15
    assert correct.item() == 0  # argmax of uniform logits is 0; ignored positions never count
    loss_sum.backward()
    assert not logits.grad[0, 1].any() and not logits.grad[0, 3].any()


def test_multiclass_ignored_targets_are_left_out_and_none_counts_all():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 4), torch.tensor([0, -100, 2, 3, -100, 1])
    loss_sum, correct, count = loss_sums("multiclass", logits, targets)
    ref = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss_sum, ref)
    kept = targets != -100
    assert count.item() == 4
    assert correct.item() == ((logits.argmax(1) == targets) & kept).sum().item()
    with pytest.raises((IndexError, RuntimeError)):  # ignoring off: -100 is no class
        loss_sums("multiclass", logits, targets, Loss(ignore_index=None))


def test_sequence_classification_with_ignored_labels_gives_hfs_own_loss():
    """multiclass: GPT2ForSequenceClassification's loss on dict batches with -100 labels is
    ours, and loss=model trains to our criterion's weights (float64: HF's loss is computed in
    the model's dtype here)."""
    trainer = _trainer(*RUNS["classifier_model_loss"])
    assert trainer.loss.from_model and trainer.targets.needs_all_reduce
    x, y = next(iter(trainer.val_feed.batches(torch.arange(10), 10)))
    assert (y == -100).sum() == 2
    out = trainer.model(**x, labels=y)
    ours, _, count = loss_sums("multiclass", out.logits, y)
    assert count.item() == 8
    assert abs(ours.item() / 8 - out.loss.item()) < 1e-15
    trainer.fit()
    criterion = _trainer(*[o for o in RUNS["classifier_model_loss"] if o != "loss=model"])
    criterion.fit()
    expected = _params(criterion)
    rel_error = ((_params(trainer) - expected).norm() / expected.norm()).item()
    print(f"classifier loss=model vs criterion: relative weight error {rel_error:.3g}")
    assert rel_error < FLOAT64_TOLERANCE  # often 0: mean x count and our sum round alike


# ------------------------------------------------------------------ the loop, one process


def test_raw_gpt2_trains_on_tiny_text():
    recorder = _Recorder()
    trainer = _trainer(
        "experiment=tiny_gpt2",
        "data.seq_len=32",
        "data.max_chars=40000",
        "trainer.max_steps=40",
        "trainer.log_every_n_steps=5",
        logger=recorder,
    )
    metrics = trainer.fit()
    losses = [r["train/loss"] for r in recorder.rows if "train/loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    assert metrics["val/loss"] < math.log(trainer.data.model_kwargs["vocab_size"])
    assert trainer.flops_per_sample and trainer.flops_per_sample > 0
    assert not trainer.targets.needs_all_reduce  # in memory, no -100 in the data: no collective


def test_padded_dict_batches_need_the_count_and_train():
    recorder = _Recorder()
    trainer = _trainer(*PADDED, "trainer.log_every_n_steps=1", logger=recorder)
    assert trainer.targets.needs_all_reduce
    trainer.fit()
    assert trainer.step == 5
    rows = [r for r in recorder.rows if "train/loss" in r]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert 0 < rows[-1]["train/accuracy"] < 1


def test_save_pretrained_folder_loads_with_from_pretrained(tmp_path):
    from mlflow.tracking import MlflowClient

    from dist_trainer.run_logger import RunLogger
    from dist_trainer.tracking import normalize_tracking_uri, prepare_store, start_job_run

    uri = normalize_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = start_job_run(uri, prepare_store(uri, "hf"), "gpt2", {}, {}, {})
    logger = RunLogger(uri, run_id, flush_interval_s=0.05)
    trainer = _trainer(*PADDED, "trainer.max_steps=2", logger=logger)
    trainer.fit()
    trainer.log_final_weights()
    logger.close()
    client = MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(run_id, "model")}
    assert names == {"model/state_dict.pt", "model/pretrained"}
    folder = client.download_artifacts(run_id, "model/pretrained", str(tmp_path / "dl"))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(folder)
    trained = trainer.model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, trained[key]), key


# ------------------------------------------------------------------ one line, before launch


def _preflight(*overrides: str):
    job = job_config(*overrides)
    return preflight(job, plan_batches(job.trainer.global_batch_size, 2, 4))


@pytest.mark.parametrize(
    "overrides",
    [
        PADDED,
        [*PADDED, "loss=model", "loss.shift_labels=true"],
        RUNS["tuple_inputs"],
        [*RUNS["tuple_inputs"], "loss=model", "loss.shift_labels=true"],
        TINY_TEXT,
    ],
    ids=[
        "dict_padded",
        "dict_model_loss",
        "tuple_inputs_tuple_outputs",
        "tuple_model_loss",
        "tiny_gpt2_preset",
    ],
)
def test_hf_batches_and_outputs_pass_preflight(overrides):
    assert _preflight(*overrides).flops_per_sample > 0


BAD = (
    "data._target_=tests.hf_user_code.padded_text",
    "data.collate._target_=dist_trainer.hf.pad_collate",
)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model._target_=tests.hf_user_code.NoLogits", *BAD],
            r"returned a dict with keys \['scores'\]; expected a tensor of logits, a dict / "
            r"ModelOutput with 'logits', or a tuple.*Fix: return the logits",
        ),
        (
            ["model._target_=tests.hf_user_code.Describes", *BAD],
            r"returned a str; expected a tensor of logits.*Fix: return the logits",
        ),
        (
            ["model._target_=tests.hf_user_code.PositionalOnly", *BAD],
            r"fails on a batch .* \(inputs \{input_ids: \(\d+, \d+\), attention_mask: "
            r"\(\d+, \d+\)\}\): TypeError: .*Fix: match the model's forward and input size",
        ),
        (
            ["model._target_=tests.hf_user_code.LogitsOnly", *BAD, "loss=model"],
            r"loss=model, but the model returned .* without a 0-dim 'loss'.*Fix: return the "
            r"loss computed from the targets, or use loss=default",
        ),
        (
            ["model=tiny_gpt2", "data=digits", "+model.vocab_size=17"],
            r"fails on a batch .* \(inputs \(4, 1, 8, 8\)\): .*Fix: match the model's forward",
        ),
        (
            ["model=tiny_gpt2", "data._target_=tests.hf_user_code.padded_text", "data.pairs=true"],
            r"\(inputs \(\(\d+, 16\), \(\d+, 16\)\)\): AttributeError: .*Fix: .*a tuple as "
            r"positional arguments, a dict as keyword arguments",
        ),
        (
            ["model=tiny_gpt2", *BAD, "data.target_key=targets"],
            r"no 'targets' \(the targets\)|data\.target_key=targets",
        ),
        (
            [*TINY_TEXT, "loss=model"],
            r"loss=model: the loss of model\._target_=dist_trainer\.hf\.tiny_gpt2 is the cross-"
            r"entropy .* shifted one ahead: .* already aligned .*Fix: loss=default",
        ),
        (
            [*TINY_TEXT, "loss.shift_labels=true"],
            r"loss\.shift_labels=true, but data\._target_=dist_trainer\.data\.tiny_text gives "
            r"targets that are already the inputs one token ahead.*Fix: loss\.shift_labels=false",
        ),
        (
            ["model=tiny_gpt2", *BAD, "loss=model"],
            r"shifted one ahead \(it shifts the labels itself\), but loss\.shift_labels=false "
            r".*Fix: loss\.shift_labels=true$",
        ),
        (
            [
                "model._target_=tests.hf_user_code.OwnLossLM",
                *BAD,
                "loss=model",
                "loss.shift_labels=true",
            ],
            r"as they are \(it does not shift them\), but loss\.shift_labels=true .*Fix: "
            r"loss\.shift_labels=false$",
        ),  # fmt: skip
    ],
    ids=[
        "no_logits",
        "a_string",
        "dict_into_positional",
        "no_loss",
        "images_into_gpt2",
        "tuple_into_gpt2s_positions",
        "target_key",
        "model_loss_on_aligned_targets",
        "shift_of_aligned_targets",
        "model_shifts_but_shift_labels_false",
        "model_does_not_shift_but_shift_labels_true",
    ],
)
def test_bad_outputs_and_inputs_are_one_line_naming_the_cause(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        _preflight(*overrides)
    assert "\n" not in str(caught.value)


def test_without_preflight_the_first_micro_step_is_one_line_too():
    trainer = _trainer("model._target_=tests.hf_user_code.NoLogits", *BAD, "trainer.max_steps=1")
    with pytest.raises(ConfigError, match=r"returned a dict.*Fix: return the logits") as caught:
        trainer.fit()
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------ exactness, 2 x 2 vs 1


def _ddp_worker(rank: int, world: int, port: int, runs: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    trainer = None
    try:
        results = {}
        for name, overrides in runs.items():
            trainer = _trainer(*overrides, world=world, rank=rank)
            trainer.fit()
            results[name] = {"params": _params(trainer), "plan": trainer.plan, "step": trainer.step}
        if rank == 0:
            torch.save(results, out)
    finally:
        del trainer
        gc.collect()  # DDP models alive at exit can make gloo abort (pytorch#179291)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp_hf") / "results.pt")
    runs = {name: [*o, "trainer.max_micro_batch_size=5"] for name, o in RUNS.items()}
    mp.spawn(_ddp_worker, args=(2, free_port(), runs, out), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.slow  # ~25 s: spawns 2 gloo workers that train three jobs
@pytest.mark.parametrize("run", sorted(RUNS))
def test_ddp_with_accumulation_equals_one_process_on_padded_sequences(run, ddp_results):
    result = ddp_results[run]
    assert (result["plan"].world_size, result["plan"].accumulation_steps) == (2, 2)
    reference = _trainer(*RUNS[run])
    reference.fit()
    assert result["step"] == reference.step == 5
    expected = _params(reference)
    rel_error = ((result["params"] - expected).norm() / expected.norm()).item()
    print(f"{run}: relative weight error {rel_error:.3g}")
    assert rel_error < TOLERANCE.get(run, FLOAT64_TOLERANCE), f"relative error {rel_error:.3g}"
    untrained = _params(_trainer(*RUNS[run]))
    assert ((untrained - expected).norm() / expected.norm()).item() > 1e-2


def test_model_loss_trains_like_our_criterion():
    """loss=model (HF's outputs.loss, re-weighted by counted targets) and our own criterion on
    the same padded batches: the same weights, to HF's float32 loss precision."""
    own = _trainer(*RUNS["criterion"])
    own.fit()
    model_loss = _trainer(*RUNS["model_loss"])
    model_loss.fit()
    expected = _params(own)
    rel_error = ((_params(model_loss) - expected).norm() / expected.norm()).item()
    print(f"loss=model vs criterion: relative weight error {rel_error:.3g}")
    assert rel_error < 1e-5


# ------------------------------------------------------------------ through Ray, 2 workers


@pytest.mark.ray
def test_a_bad_output_is_one_line_before_ray_workers_start(ray_cluster, tmp_path):
    from dist_trainer import driver
    from dist_trainer.config import load_config
    from tests.conftest import job_overrides

    overrides = ["model._target_=tests.hf_user_code.NoLogits", *BAD]
    cfg = load_config(job_overrides(tmp_path, *overrides))
    with pytest.raises(ConfigError, match=r"returned a dict.*Fix: return the logits") as caught:
        driver.train(cfg, show_progress=False)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "ray_storage").exists(), "a Ray Train run was started"
    assert not (tmp_path / "mlflow.db").exists() or not _mlflow_runs(tmp_path)


def _mlflow_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.ray
@pytest.mark.slow  # ~40 s: a Ray Train job of 2 workers, then the one-process reference
def test_ray_job_on_padded_dicts_with_the_models_loss_equals_one_process(ray_cluster, tmp_path):
    """loss=model on padded dict batches (pad_collate in a DataLoader worker), 2 Ray workers x
    accumulation 2 in float64: one FINISHED run whose weights equal one process's, and a
    model/pretrained folder that from_pretrained loads to those weights."""
    from mlflow.tracking import MlflowClient

    from dist_trainer import driver
    from dist_trainer.config import load_config
    from tests.conftest import assert_logged_weights_equal, job_overrides

    overrides = [*RUNS["model_loss"], "trainer.max_micro_batch_size=5"]
    result = driver.train(load_config(job_overrides(tmp_path, *overrides)), show_progress=False)
    runs = _mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    assert (params["plan.world_size"], params["plan.accumulation_steps"]) == ("2", "2")
    reference = _trainer(*RUNS["model_loss"])
    reference.fit()
    trained = {k: v.detach().clone() for k, v in reference.model.state_dict().items()}
    assert_logged_weights_equal(
        result.tracking_uri, result.run_id, trained, tmp_path / "sd", TOLERANCE["model_loss"]
    )
    client = MlflowClient(result.tracking_uri)
    folder = client.download_artifacts(result.run_id, "model/pretrained", str(tmp_path / "hf"))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(folder, torch_dtype=torch.float64)
    weights = torch.load(
        client.download_artifacts(result.run_id, "model/state_dict.pt", str(tmp_path / "sd2")),
        weights_only=True,
    )
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, weights[key]), key
    n_params = sum(p.numel() for p in reference.model.parameters())
    assert runs[0].data.metrics["comm/bytes"] == 8 * n_params  # float64 gradients, once a step
