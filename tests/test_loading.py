"""BatchFeed: the same tensors from device-resident data and from a DataLoader, resume, workers."""

from __future__ import annotations

import os
import random

import numpy as np
import psutil
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from dist_trainer.batching import plan_batches
from dist_trainer.config import ConfigError
from dist_trainer.loading import BatchFeed, LoaderConfig
from dist_trainer.sampling import GlobalBatchSampler

CPU = torch.device("cpu")
PLAN = plan_batches(8, world_size=2, max_micro_batch_size=2)  # micro 2 x accumulation 2 x 2 ranks


class Plain(Dataset):
    """A map-style dataset (not a TensorDataset): numpy inputs, Python int targets."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i].numpy(), int(self.y[i])


class WhoLoads(Dataset):
    """Each target is the pid of the process that loaded the item."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int):
        return torch.zeros(2), torch.tensor(os.getpid())


class Augmented(Dataset):
    """Random noise from torch, NumPy and random on every item, like an augmentation."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int):
        noise = torch.rand(3) + float(np.random.rand()) + random.random()
        return noise + i, i


class Bare(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return torch.zeros(3)


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(n)), torch.arange(n) % 5


def _dataset(kind: str, x: torch.Tensor, y: torch.Tensor) -> Dataset:
    return Plain(x, y) if kind == "plain" else TensorDataset(x, y)


def _fed(feed: BatchFeed, sampler: GlobalBatchSampler, epoch: int, start: int = 0) -> list:
    return [(s.micro_batches, s.global_count) for s in feed.steps(sampler, epoch, start)]


def _assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (micro_got, count_got), (micro_want, count_want) in zip(got, want, strict=True):
        assert count_got == count_want
        assert len(micro_got) == len(micro_want) == PLAN.accumulation_steps
        for (xg, yg), (xw, yw) in zip(micro_got, micro_want, strict=True):
            assert xg.dtype == xw.dtype and yg.dtype == yw.dtype
            assert xg.shape == xw.shape and yg.shape == yw.shape
            assert torch.equal(xg, xw) and torch.equal(yg, yw)


@pytest.mark.parametrize("num_samples", [33, 37])
@pytest.mark.parametrize(
    ("kind", "in_memory", "num_workers"),
    [("tensor", "auto", 0), ("tensor", False, 0), ("tensor", False, 2), ("plain", "auto", 0),
     ("plain", "auto", 2)],
)  # fmt: skip
def test_feed_yields_the_sampler_batches(kind, in_memory, num_workers, num_samples):
    x, y = _data(num_samples)
    cfg = LoaderConfig(num_workers=num_workers, in_memory=in_memory)
    empties = 0
    for rank in range(PLAN.world_size):
        sampler = GlobalBatchSampler(num_samples, PLAN, rank, seed=3)
        feed = BatchFeed(_dataset(kind, x, y), CPU, torch.float32, cfg, seed=3)
        assert feed.in_memory == (kind == "tensor" and in_memory == "auto")
        assert len(feed) == num_samples
        for epoch in range(2):
            order = sampler.epoch_order(epoch)
            want = []
            for s in range(sampler.steps_per_epoch):
                batch = sampler.step(order, s)
                want.append(([(x[i], y[i]) for i in batch.micro_batches], batch.global_count))
                empties += sum(len(i) == 0 for i in batch.micro_batches)
            _assert_same(_fed(feed, sampler, epoch), want)
        feed.close()
    # 33 = 4 x 8 + 1: the last global batch leaves empty micro-batches (x of shape [0, 3]).
    assert (empties > 0) == (num_samples == 33)


@pytest.mark.parametrize(("kind", "num_workers"), [("tensor", 0), ("plain", 0), ("plain", 2)])
def test_resume_mid_epoch_yields_the_rest_of_the_epoch(kind, num_workers):
    x, y = _data(37)
    sampler = GlobalBatchSampler(37, PLAN, rank=1, seed=5)
    feed = BatchFeed(_dataset(kind, x, y), CPU, torch.float32, LoaderConfig(num_workers), 5)
    whole = _fed(feed, sampler, epoch=1)
    for start in (0, 2, sampler.steps_per_epoch - 1, sampler.steps_per_epoch):
        _assert_same(_fed(feed, sampler, 1, start), whole[start:])
    with pytest.raises(ValueError, match="start_step"):
        _fed(feed, sampler, 1, sampler.steps_per_epoch + 1)
    feed.close()


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_workers_persist_across_epochs_until_close(persistent):
    sampler = GlobalBatchSampler(24, PLAN, rank=0)
    cfg = LoaderConfig(num_workers=2, persistent_workers=persistent)
    feed = BatchFeed(WhoLoads(), CPU, torch.float32, cfg)
    pids = []
    for epoch in range(2):
        steps = feed.steps(sampler, epoch, 0)
        pids.append({int(p) for s in steps for _, y in s.micro_batches for p in y})
    assert all(len(p) == 2 and os.getpid() not in p for p in pids)
    assert (pids[0] == pids[1]) == persistent
    feed.close()
    assert not any(psutil.pid_exists(p) for p in pids[-1])


def test_augmentation_is_seeded_per_batch_not_per_worker():
    sampler = GlobalBatchSampler(20, PLAN, rank=1, seed=7)

    def epoch(num_workers: int, n: int, start: int = 0, seed: int = 7) -> list:
        feed = BatchFeed(Augmented(), CPU, torch.float32, LoaderConfig(num_workers), seed=seed)
        out = _fed(feed, sampler, n, start)
        feed.close()
        return out

    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first = epoch(0, 0)
    assert torch.equal(rng[0], torch.get_rng_state()), "the training thread's RNG was changed"
    assert np.array_equal(rng[1], np.random.get_state()[1]) and rng[2] == random.getstate()
    _assert_same(epoch(2, 0), first)
    _assert_same(epoch(2, 0, start=1), first[1:])
    for other in (epoch(0, 1), epoch(0, 0, seed=8)):  # another epoch, another seed: new noise
        assert not torch.equal(other[0][0][0][0], first[0][0][0][0])


@pytest.mark.parametrize(("kind", "num_workers"), [("tensor", 0), ("plain", 0), ("plain", 2)])
def test_validation_batches_are_consecutive_chunks(kind, num_workers):
    x, y = _data(23)
    feed = BatchFeed(_dataset(kind, x, y), CPU, torch.float32, LoaderConfig(num_workers))
    indices = torch.arange(3, 14)
    got = list(feed.batches(indices, 4))
    assert [len(b[0]) for b in got] == [4, 4, 3]
    for (xb, yb), chunk in zip(got, indices.split(4), strict=True):
        assert torch.equal(xb, x[chunk]) and torch.equal(yb, y[chunk])
    assert list(feed.batches(indices[:0], 4)) == []
    feed.close()


def test_float64_casts_inputs_and_keeps_integer_targets():
    x, y = _data(16)
    sampler = GlobalBatchSampler(16, PLAN, rank=0)
    for kind in ("tensor", "plain"):
        feed = BatchFeed(_dataset(kind, x, y), CPU, torch.float64, LoaderConfig())
        (xb, yb), *_ = next(feed.steps(sampler, 0, 0)).micro_batches
        assert xb.dtype == torch.float64 and yb.dtype == torch.int64
        (xv, yv), *_ = feed.batches(torch.arange(4), 2)
        assert xv.dtype == torch.float64 and yv.dtype == torch.int64


def test_empty_micro_batch_keeps_trailing_shape_and_dtype():
    x, y = _data(33)
    sampler = GlobalBatchSampler(33, PLAN, rank=1)  # the last step gives rank 1 nothing
    feed = BatchFeed(Plain(x, y), CPU, torch.float64, LoaderConfig())
    last = list(feed.steps(sampler, 0, sampler.steps_per_epoch - 1))[0].micro_batches
    for xe, ye in last:
        assert xe.shape == (0, 3) and xe.dtype == torch.float64
        assert ye.shape == (0,) and ye.dtype == torch.int64
    model = torch.nn.Linear(3, 5).double()
    loss = torch.nn.functional.cross_entropy(model(xe), ye, reduction="sum")
    loss.backward()  # a rank with no samples still gets (zero) gradients for the all-reduce
    assert loss.item() == 0.0 and model.weight.grad is not None


def test_starting_another_iteration_stops_the_running_one():
    x, y = _data(16)
    sampler = GlobalBatchSampler(16, PLAN, rank=0)
    feed = BatchFeed(Plain(x, y), CPU, torch.float32, LoaderConfig(num_workers=2))
    steps = feed.steps(sampler, 0, 0)
    next(steps)
    next(feed.batches(torch.arange(4), 2))
    with pytest.raises(RuntimeError, match="another iteration"):
        list(steps)
    feed.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_items_that_are_not_pairs_are_refused(num_workers):
    with pytest.raises(ValueError, match=r"\(input, target\) pairs.*Tensor") as error:
        BatchFeed(Bare(), CPU, torch.float32, LoaderConfig(num_workers))
    assert "data._target_" in str(error.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_workers", -1),
        ("num_workers", True),
        ("pin_memory", "yes"),
        ("pin_memory", 1),
        ("persistent_workers", "no"),
        ("prefetch_factor", 0),
        ("in_memory", "always"),
    ],
)
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"data\.loader\.{key} .*Fix: data\.loader\.{key}="):
        LoaderConfig(**{key: value})


def test_in_memory_true_requires_a_tensor_dataset():
    x, y = _data(8)
    with pytest.raises(ConfigError, match="data.loader.in_memory=true"):
        BatchFeed(Plain(x, y), CPU, torch.float32, LoaderConfig(in_memory=True))
    assert BatchFeed(
        TensorDataset(x, y), CPU, torch.float32, LoaderConfig(in_memory=True)
    ).in_memory


class Records(Dataset):
    """Dict items, as Hugging Face datasets give them: inputs under two keys, targets under 'y'."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"features": self.x[i], "scale": self.x[i, :1] * 2, "y": int(self.y[i])}


def stack_reversed(items: list, offset: int = 0) -> dict:
    """A user's collate: the batch in reverse item order, targets shifted by `offset`."""
    items = items[::-1]
    return {
        "features": torch.stack([it["features"] for it in items]),
        "scale": torch.stack([it["scale"] for it in items]),
        "y": torch.tensor([it["y"] + offset for it in items]),
    }


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("collate", [None, "reversed"])
def test_dict_items_become_keyword_inputs_on_the_sampler_batches(num_workers, collate):
    x, y = _data(37)
    fn = (lambda items: stack_reversed(items, offset=10)) if collate else None
    cfg = LoaderConfig(num_workers=num_workers)
    sampler = GlobalBatchSampler(37, PLAN, rank=1, seed=3)
    feed = BatchFeed(Records(x, y), CPU, torch.float64, cfg, 3, target_key="y", collate=fn)
    assert not feed.in_memory
    order = sampler.epoch_order(0)
    steps = list(feed.steps(sampler, 0))
    assert len(steps) == sampler.steps_per_epoch
    for s, step in enumerate(steps):
        want = sampler.step(order, s)
        assert step.global_count == want.global_count
        for (xb, yb), idx in zip(step.micro_batches, want.micro_batches, strict=True):
            idx = idx.flip(0) if collate else idx
            assert set(xb) == {"features", "scale"} and xb["features"].dtype == torch.float64
            assert torch.equal(xb["features"], x[idx].double())
            assert torch.equal(xb["scale"], x[idx, :1].double() * 2)
            assert torch.equal(yb, y[idx] + (10 if collate else 0)) and yb.dtype == torch.int64
    feed.close()


def test_tuple_inputs_keep_their_structure_and_empty_micro_batches_their_keys():
    x, y = _data(33)
    pairs = [((x[i], x[i] * 0), int(y[i])) for i in range(33)]
    sampler = GlobalBatchSampler(33, PLAN, rank=1)  # the last step gives rank 1 nothing
    feed = BatchFeed(pairs, CPU, torch.float32, LoaderConfig())
    (first, _), *_ = next(feed.steps(sampler, 0)).micro_batches
    assert isinstance(first, list) and len(first) == 2  # default_collate's own list
    empty = BatchFeed(Records(x, y), CPU, torch.float32, LoaderConfig(), target_key="y")
    last = list(empty.steps(sampler, 0, sampler.steps_per_epoch - 1))[0].micro_batches
    for xe, ye in last:
        assert xe["features"].shape == (0, 3) and xe["scale"].shape == (0, 1)
        assert ye.shape == (0,)


def test_dicts_without_the_target_key_and_in_memory_with_collate_are_refused():
    x, y = _data(8)
    with pytest.raises(ValueError, match=r"no 'labels' \(the targets\).*data\.target_key="):
        BatchFeed(Records(x, y), CPU, torch.float32, LoaderConfig())
    with pytest.raises(ConfigError, match=r"in_memory=true .*got a data\.collate function"):
        BatchFeed(TensorDataset(x, y), CPU, torch.float32, LoaderConfig(in_memory=True), 0,
                  collate=lambda items: items)  # fmt: skip
