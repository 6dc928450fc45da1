"""The training loop without Ray: exact large-batch equivalence, plain torch.multiprocessing
with gloo, resume from a checkpoint, and one step of every experiment preset."""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_trainer.batching import plan_batches
from dist_trainer.checkpoint import LocalCheckpointSink
from dist_trainer.config import CONF_DIR
from dist_trainer.loop import Trainer, WorkerInfo
from dist_trainer.run_logger import NullLogger
from tests.conftest import free_port, job_config

# breast_cancer has 455 training samples: with global batch 64 the 8th step of each epoch has
# only 7 samples, so 16 steps cover two short last batches (split 4/3 over ranks, 2/2 and 2/1
# over micro-steps).
EQUIV = [
    "trainer.precision=64",
    "trainer.global_batch_size=64",
    "trainer.max_epochs=2",
    "model.hidden_sizes=[16]",
    "comm.enabled=true",
]
# The user's own model, data (240 training samples: steps of 64, 64, 64, 48) and criterion.
USER = [
    "trainer.precision=64",
    "trainer.global_batch_size=64",
    "trainer.max_epochs=4",
    "model._target_=tests.user_code.TinyNet",
    "data._target_=tests.user_code.make_data",
]
RUNS = {
    "sgd": [*EQUIV, "optim=sgd", "optim.lr_scaling=none", "optim.warmup_steps=3"],
    "adam": [*EQUIV, "optim=adam"],
    # DDP's built-in averaging hook: the loss scale then carries the world size.
    "adam_comm_off": [*EQUIV, "optim=adam", "comm.enabled=false"],
    # A map-style dataset through the DataLoader (the reference keeps the in-memory path).
    "adam_dataloader": [*EQUIV, "optim=adam", "data.loader.in_memory=false"],
    "user_function_loss": [*USER, "loss._target_=tests.user_code.focal_loss", "loss.gamma=1.5"],
    "user_torch_criterion": [
        *USER,
        "loss._target_=torch.nn.CrossEntropyLoss",
        "loss.label_smoothing=0.1",
    ],
}
# What each run is compared with: the same job in one process, without the DDP-only switches.
REFERENCE = {
    "adam_comm_off": RUNS["adam"],
    "adam_dataloader": RUNS["adam"],
}
# float64 all the way (parameters, loss and its sums): only summation order differs.
FLOAT64_TOLERANCE = 1e-12


def _params(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in trainer.model.parameters()])


def _single_process(overrides: list[str]) -> tuple[torch.Tensor, int]:
    job = job_config(*overrides)
    plan = plan_batches(job.trainer.global_batch_size, 1, None)
    trainer = Trainer(job, plan, WorkerInfo(0, 1, 0, 0, torch.device("cpu")))
    trainer.fit()
    return _params(trainer), trainer.step


def _ddp_worker(rank: int, world: int, port: int, runs: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    trainer = None
    try:
        results = {}
        for name, overrides in runs.items():
            job = job_config(*overrides)
            plan = plan_batches(job.trainer.global_batch_size, world, job.trainer.micro_batch_cap)
            trainer = Trainer(job, plan, WorkerInfo(rank, world, rank, 0, torch.device("cpu")))
            trainer.fit()
            results[name] = {"params": _params(trainer), "plan": plan, "steps": trainer.step}
        if rank == 0:
            torch.save(results, out)
    finally:
        del trainer
        gc.collect()  # DDP models alive at exit can make gloo abort (pytorch#179291)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """2 DDP workers (torch.multiprocessing + gloo, no Ray), accumulation 2, every run."""
    out = str(tmp_path_factory.mktemp("ddp") / "results.pt")
    runs = {
        name: [*overrides, "trainer.max_micro_batch_size=16"] for name, overrides in RUNS.items()
    }
    mp.spawn(_ddp_worker, args=(2, free_port(), runs, out), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_ddp_with_accumulation_equals_one_process_on_the_global_batch(run, ddp_results):
    result = ddp_results[run]
    assert (result["plan"].world_size, result["plan"].accumulation_steps) == (2, 2)
    reference, steps = _single_process(REFERENCE.get(run, RUNS[run]))
    assert result["steps"] == steps == 16
    rel_error = (result["params"] - reference).norm() / reference.norm()
    assert rel_error < FLOAT64_TOLERANCE, f"relative error {rel_error:.3g}"
    # Not trivially equal: training moved the weights well beyond the tolerance.
    job = job_config(*RUNS[run])
    untrained = Trainer(job, plan_batches(64, 1), WorkerInfo(0, 1, 0, 0, torch.device("cpu")))
    assert (_params(untrained) - reference).norm() / reference.norm() > 1e-2


def test_user_loss_is_not_the_default_loss():
    """The user criterion really is used: it trains to other weights than cross-entropy."""
    default, _ = _single_process(USER)
    focal, _ = _single_process([*USER, "loss._target_=tests.user_code.focal_loss"])
    assert (default - focal).norm() / default.norm() > 1e-3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_path_equals_in_memory_path(num_workers):
    """A map-style dataset through DataLoader workers trains to the in-memory result."""
    memory, _ = _single_process([*USER, "trainer.max_micro_batch_size=16"])
    loaded, _ = _single_process(
        [
            *USER,
            "trainer.max_micro_batch_size=16",
            "data.as_tensors=false",
            f"data.loader.num_workers={num_workers}",
        ]
    )
    rel_error = (loaded - memory).norm() / memory.norm()
    assert rel_error < FLOAT64_TOLERANCE, f"relative error {rel_error:.3g}"


def test_wrong_scaling_would_be_caught():
    """The equivalence check can fail: averaging per micro-batch instead is measurably off."""
    job = job_config(*RUNS["sgd"])
    plan = plan_batches(64, 1, 16)  # 4 micro-steps in one process
    trainer = Trainer(job, plan, WorkerInfo(0, 1, 0, 0, torch.device("cpu")))
    trainer.fit()
    reference, _ = _single_process(RUNS["sgd"])
    rel_error = (_params(trainer) - reference).norm() / reference.norm()
    assert rel_error < FLOAT64_TOLERANCE  # accumulation exact
    naive = Trainer(job, plan, WorkerInfo(0, 1, 0, 0, torch.device("cpu")))
    for step, fed in enumerate(naive.train_feed.steps(naive.sampler, 0, 0)):
        if step == 8:
            break
        for x, y in fed.micro_batches:  # per-micro-batch mean losses, the common mistake
            loss = torch.nn.functional.binary_cross_entropy_with_logits(naive.model(x), y)
            (loss / len(fed.micro_batches)).backward()
        naive.optimizer.step()
        naive.scheduler.step()
        naive.optimizer.zero_grad()
    honest = Trainer(job, plan, WorkerInfo(0, 1, 0, 0, torch.device("cpu")))
    honest.total_steps = 8
    honest.fit()
    gap = (_params(naive) - _params(honest)).norm() / _params(honest).norm()
    # The short last batch makes per-micro-batch averaging differ by far more than float64 noise.
    assert gap > 1e3 * FLOAT64_TOLERANCE, gap


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    overrides = [*RUNS["adam"], "trainer.max_micro_batch_size=32"]
    info = WorkerInfo(0, 1, 0, 0, torch.device("cpu"))
    job = job_config(*overrides)
    plan = plan_batches(64, 1, 32)
    straight = Trainer(job, plan, info)
    straight.fit()

    sink = LocalCheckpointSink(tmp_path / "ckpt")
    first = Trainer(job_config(*overrides, "trainer.max_steps=11"), plan, info, sink=sink)
    first.fit()  # stops mid-epoch 2 and checkpoints there
    assert first.step == 11 and (tmp_path / "ckpt" / "latest.pt").exists()
    second = Trainer(job, plan, info, sink=sink)
    second.fit()
    assert second.step == 16
    assert torch.allclose(_params(second), _params(straight), rtol=0, atol=1e-12)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_preset_runs_one_step(preset):
    if preset == "tiny_gpt2":  # a Hugging Face model: the optional extra
        pytest.importorskip(
            "transformers", reason="transformers is not installed: pip install .[hf]"
        )
    job = job_config(f"experiment={preset}", "trainer.max_steps=1")
    plan = plan_batches(job.trainer.global_batch_size, 1, job.trainer.micro_batch_cap)
    trainer = Trainer(job, plan, WorkerInfo(0, 1, 0, 0, torch.device("cpu")))
    metrics = trainer.fit()
    assert trainer.step == 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "val/loss" in metrics


class _Recorder(NullLogger):
    """Keeps what rank 0 would log (the loop's logger interface, in memory)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def log_metrics(self, metrics, step):
        self.rows.append(dict(metrics))


def _exposed_worker(rank: int, world: int, port: int, caps: list[float], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one core per rank, as Ray gives a 1-CPU worker
    dist.init_process_group("gloo", rank=rank, world_size=world)
    trainer = None
    try:
        exposed = {}
        for cap in caps:
            job = job_config(
                "experiment=bench_mlp",
                "data.num_samples=2048",
                "trainer.global_batch_size=64",
                "trainer.max_micro_batch_size=16",
                "trainer.max_steps=24",
                "trainer.log_every_n_steps=4",
                f"scaling.bucket_cap_mb={cap}",
                # Many small layers: DDP never splits a parameter, so small buckets need them.
                "model.hidden_sizes=[64,64,64,64,64,64,64,64,64,64,64,64,64,64,64,64,64,64,64,64]",
            )
            plan = plan_batches(64, world, 16)
            recorder = _Recorder()
            trainer = Trainer(
                job, plan, WorkerInfo(rank, world, rank, 0, torch.device("cpu")), logger=recorder
            )
            trainer.fit()
            rows = [r for r in recorder.rows if "comm/exposed_s" in r][1:]  # skip warm-up
            exposed[cap] = {
                "exposed_s": sorted(r["comm/exposed_s"] for r in rows)[len(rows) // 2],
                "buckets": rows[-1]["comm/buckets"],
                "bytes": rows[-1]["comm/bytes"],
            }
        if rank == 0:
            torch.save(exposed, out)
    finally:
        del trainer
        gc.collect()  # DDP models alive at exit can make gloo abort (pytorch#179291)
        dist.destroy_process_group()


@pytest.mark.slow
def test_exposed_communication_responds_to_dearer_communication(tmp_path):
    """Same model, batch and compute; tiny DDP buckets make communication dearer (hundreds of
    all-reduce calls, each paying gloo's latency): comm/exposed_s must rise."""
    out = str(tmp_path / "exposed.pt")
    cheap, dear = 25.0, 0.001
    mp.spawn(_exposed_worker, args=(2, free_port(), [cheap, dear], out), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)
    print(result)
    assert result[dear]["buckets"] >= 20 * result[cheap]["buckets"]
    assert result[dear]["bytes"] == result[cheap]["bytes"]  # same gradient, more pieces
    assert result[dear]["exposed_s"] > 2 * result[cheap]["exposed_s"] + 1e-3, result
