"""Feeding a rank its micro-batches: device-resident tensors, or one DataLoader with workers.

Which samples a rank sees is decided by `sampling.GlobalBatchSampler` alone (exact global batches,
the short last one included), which is why `torch.utils.data.DistributedSampler` is not used here
either (see sampling.py). This module only turns those indices into (x, y) on the device.

An item is an `(input, target)` pair or a dict (what Hugging Face datasets give): a dict's
`data.target_key` entry (default `labels`) is the target and the other entries are the input, a
dict the model gets as keyword arguments (dist_trainer.tasks.forward_batch); an input that is a
tuple (e.g. `(input_ids, attention_mask)`) is passed positionally. Items are collated by torch's
default_collate or by the user's `data.collate` (padding to the longest sequence, ...), in the
loader's workers; the batch is then split into (x, y) there too.

- in memory: a TensorDataset of (x, y) (and no `data.collate`) moves to the device once, and so
  does each epoch's sample order; a micro-batch is then an index gather on the device, with no
  host-to-device copy per step.
- DataLoader: any other map-style dataset (or `data.loader.in_memory=false`) goes through ONE
  DataLoader per feed whose batch sampler yields the rank's non-empty micro-batches in order;
  re-iterating it each epoch keeps persistent workers alive. Batches are pinned on CUDA and
  copied with `non_blocking=True`. Empty micro-batches (a short last global batch) are never
  asked of the loader: they are a slice `[:0]` of one item collated when the feed is built.

Randomness inside a dataset (augmentation): before each micro-batch is loaded, the loading process
reseeds Python's `random`, NumPy's global RNG and torch's CPU generator with a seed derived from
(seed, rank, epoch, step, micro-step), or (seed, first index) for validation chunks. The draws
thus depend neither on `num_workers`, nor on which worker loads a batch, nor on resuming mid-epoch.
On the training thread (num_workers=0) the previous RNG states are restored afterwards, so the
model's own randomness (dropout, ...) is untouched. One iteration (steps or batches) at a time per
feed: starting another makes a still-running one raise instead of reading the other's batches.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from dist_trainer.errors import ConfigError
from dist_trainer.sampling import GlobalBatchSampler

__all__ = ["BatchFeed", "FedStep", "LoaderConfig", "collate_items", "map_tensors", "tensors_of"]

_MASK64 = 2**64 - 1
_Batch = tuple[Any, torch.Tensor]  # (input: a tensor, a tuple or a dict of them; target)


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """`obj` with `fn` applied to every tensor in it (through dicts, tuples and lists)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """Every tensor in `obj` (through dicts, tuples and lists)."""
    found: list[torch.Tensor] = []
    map_tensors(found.append, obj)
    return found


def _describe_item(item: Any) -> str:
    if isinstance(item, Mapping):
        return f"a dict with keys {list(item)}"
    if isinstance(item, tuple | list):
        return f"a {type(item).__name__} of length {len(item)}"
    return f"a {type(item).__name__}"


def _split(batch: Any, target_key: str, source: str) -> _Batch:
    """(input, target) from a collated batch: a pair, or a dict holding `target_key`."""
    if isinstance(batch, Mapping) and target_key in batch:
        inputs = {k: v for k, v in batch.items() if k != target_key}
        return inputs, torch.as_tensor(batch[target_key])
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], torch.as_tensor(batch[1])
    hint = (
        f"a dict must hold the targets under data.target_key={target_key}. Fix: set "
        "data.target_key to the targets' key"
        if isinstance(batch, Mapping)
        else "Fix: return (x, y) or a dict with the targets under data.target_key"
    )
    raise ValueError(
        f"{source} must give (input, target) pairs or dicts; it gives {_describe_item(batch)}: "
        f"{hint}"
    )


class _Collate:
    """Collate items (default_collate or the user's `data.collate`), then split into (x, y)."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None, target_key: str) -> None:
        self.collate, self.target_key = collate, target_key
        self.source = "data.collate" if collate is not None else "the dataset (data._target_)"

    def __call__(self, items: list[Any]) -> _Batch:
        batch = (self.collate or default_collate)(items)
        return _split(batch, self.target_key, self.source)


def collate_items(
    items: list[Any], collate: Callable[[list[Any]], Any] | None = None, target_key: str = "labels"
) -> _Batch:
    """(input, target) of a list of dataset items, as a feed's loader collates them."""
    return _Collate(collate, target_key)(items)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _auto_or_bool(value: Any) -> bool:
    return value == "auto" or isinstance(value, bool)


@dataclass
class LoaderConfig:
    """How a map-style dataset is fed to each rank (`data.loader.*`)."""

    num_workers: int = 0
    """DataLoader worker processes per rank (0: load on the training thread)."""
    pin_memory: Any = "auto"
    """auto (pin when the device is CUDA) | true | false."""
    persistent_workers: bool = True
    """Keep loader workers alive across epochs (only with num_workers > 0)."""
    prefetch_factor: int | None = None
    """Batches each loader worker prepares ahead (None: DataLoader's default, 2; ignored when
    num_workers is 0)."""
    in_memory: Any = "auto"
    """auto: a TensorDataset of (x, y) is moved to the device once and indexed there, any other
    dataset goes through the DataLoader | false: always the DataLoader | true: require a
    TensorDataset of (x, y)."""

    def __post_init__(self) -> None:
        n, p = self.num_workers, self.prefetch_factor
        checks = {  # key: (valid, what it must be, the fix)
            "num_workers": (_is_int(n) and n >= 0, "an integer >= 0", "0"),
            "pin_memory": (_auto_or_bool(self.pin_memory), "auto, true or false", "auto"),
            "persistent_workers": (isinstance(self.persistent_workers, bool), "a bool", "true"),
            "prefetch_factor": (p is None or (_is_int(p) and p > 0), "> 0 or null", "null"),
            "in_memory": (_auto_or_bool(self.in_memory), "auto, true or false", "auto"),
        }
        for key, (ok, what, fix) in checks.items():
            if not ok:
                raise ConfigError(
                    f"data.loader.{key} must be {what}, got {getattr(self, key)!r}. "
                    f"Fix: data.loader.{key}={fix}"
                )


@dataclass(frozen=True, slots=True)
class FedStep:
    """One optimizer step of one rank, on the device.

    Args:
        micro_batches: (x, y) per micro-step (always `accumulation_steps` of them; some may be
            empty, with the right trailing shape and dtype, when the last global batch is short).
        global_count: samples in this step's global batch over all ranks.
    """

    micro_batches: list[_Batch]
    global_count: int


def _seed_of(*key: int) -> int:
    """A well-mixed 64-bit seed for a tuple of integers."""
    sequence = np.random.SeedSequence([k & _MASK64 for k in key])
    return int(sequence.generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed random, NumPy and torch's CPU RNG; on the training thread, restore them after."""
    main = get_worker_info() is None
    if main:
        saved = (random.getstate(), np.random.get_state(), torch.default_generator.get_state())
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: leave CUDA RNGs alone
    try:
        yield
    finally:
        if main:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


class _Items(Dataset):
    """Loads a `(seed, indices)` key under its seed and checks every item is a pair or a dict."""

    def __init__(self, dataset: Any, target_key: str) -> None:
        self.dataset, self.target_key = dataset, target_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, key: tuple[int, list[int]]) -> list[Any]:
        seed, indices = key
        with _seeded(seed):
            many = getattr(self.dataset, "__getitems__", None)
            items = many(indices) if many else [self.dataset[i] for i in indices]
        for item in items:
            pair = isinstance(item, (tuple, list)) and len(item) == 2
            if not (pair or isinstance(item, Mapping)):
                raise ValueError(
                    f"the dataset {type(self.dataset).__name__} (data._target_) must return "
                    f"(input, target) pairs or dicts; an item is {_describe_item(item)}. Fix: "
                    "return (x, y) or {..., data.target_key: y} from its __getitem__"
                )
            if isinstance(item, Mapping) and self.target_key not in item:
                raise ValueError(
                    f"an item of the dataset {type(self.dataset).__name__} (data._target_) is "
                    f"a dict with keys {list(item)} but no '{self.target_key}' (the targets). "
                    "Fix: data.target_key=<the targets' key>"
                )
        return items


class _Keys:
    """The DataLoader's batch sampler: the `(seed, indices)` keys set before each iteration."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, list[int]]] = []

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class BatchFeed:
    """Turns a rank's indices (from `sampling.GlobalBatchSampler`) into (x, y) on the device.

    Args:
        dataset: map-style dataset whose items are (input, target) pairs or dicts.
        device: where batches go.
        float_dtype: floating inputs and targets are cast to it; integer ones are kept.
        cfg: `data.loader.*`.
        seed: seeds the per-batch RNG of the dataset (with rank, epoch, step, micro-step).
        target_key: the targets' key in dict items (`data.target_key`).
        collate: the user's collate function (`data.collate`), or None for default_collate.
    """

    def __init__(
        self,
        dataset: Any,
        device: torch.device,
        float_dtype: torch.dtype,
        cfg: LoaderConfig,
        seed: int = 0,
        target_key: str = "labels",
        collate: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.dataset, self.device, self.float_dtype = dataset, torch.device(device), float_dtype
        self.cfg, self.seed = cfg, seed
        self._generation = 0  # bumped by every new iteration and by close()
        tensors = getattr(dataset, "tensors", None)
        pair = (
            isinstance(tensors, (tuple, list))
            and len(tensors) == 2
            and all(isinstance(t, torch.Tensor) for t in tensors)
        )
        if cfg.in_memory is True and (not pair or collate is not None):
            why = "a data.collate function" if pair else type(dataset).__name__
            raise ConfigError(
                "data.loader.in_memory=true needs a TensorDataset of (input, target) tensors "
                f"and no data.collate, got {why}. Fix: data.loader.in_memory=auto"
            )
        self._in_memory = pair and collate is None and cfg.in_memory is not False
        self._loader: DataLoader | None = None
        if self._in_memory:
            self._x, self._y = (self._cast(t.to(self.device)) for t in tensors)
            return
        items = _Items(dataset, target_key)
        self._collate = _Collate(collate, target_key)
        workers = cfg.num_workers
        self._keys = _Keys()
        self._loader = DataLoader(
            items,
            batch_sampler=self._keys,
            num_workers=workers,
            pin_memory=self.device.type == "cuda" if cfg.pin_memory == "auto" else cfg.pin_memory,
            persistent_workers=cfg.persistent_workers and workers > 0,
            prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
            collate_fn=self._collate,
            generator=torch.Generator().manual_seed(seed & _MASK64),  # spares the global RNG
        )
        # One item, collated and sliced: the template of an empty micro-batch (and an early check
        # that items are pairs, before any worker starts).
        self._live: Any = None  # the DataLoader iterator in use (workers to shut down)
        x, y = torch.empty(0), torch.empty(0)
        if len(items):
            x, y = self._collate(items.__getitems__((_seed_of(seed, 2), [0])))
        self._empty = self._to_device(map_tensors(lambda t: t[:0], x), y[:0])

    @property
    def in_memory(self) -> bool:
        """True when the dataset's tensors live on the device and batches are index gathers."""
        return self._in_memory

    @property
    def resident_targets(self) -> torch.Tensor | None:
        """The whole split's targets on the device (the in-memory path), else None."""
        return self._y if self._in_memory else None

    def __len__(self) -> int:
        return len(self.dataset)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.float_dtype) if t.is_floating_point() else t

    def _to_device(self, x: Any, y: torch.Tensor) -> _Batch:
        # Copy first, cast on the device: a pinned source makes the copy asynchronous.
        def move(t: torch.Tensor) -> torch.Tensor:
            return self._cast(t.to(self.device, non_blocking=True))

        return map_tensors(move, x), move(y)

    def steps(
        self, sampler: GlobalBatchSampler, epoch: int, start_step: int = 0
    ) -> Iterator[FedStep]:
        """Every step of `epoch` from `start_step` (a resumed epoch) to its end, in order."""
        if not 0 <= start_step <= sampler.steps_per_epoch:
            raise ValueError(f"start_step={start_step} is outside [0, {sampler.steps_per_epoch}]")
        generation = self._begin()
        if self._in_memory:
            order = sampler.epoch_order(epoch).to(self.device)  # the epoch's only H2D copy
            for s in range(start_step, sampler.steps_per_epoch):
                batch = sampler.step(order, s)  # slices of a device tensor: no copy, no sync
                micro = [(self._x[i], self._y[i]) for i in batch.micro_batches]
                yield FedStep(micro, batch.global_count)
            return
        order = sampler.epoch_order(epoch)
        plan = [sampler.step(order, s) for s in range(start_step, sampler.steps_per_epoch)]
        keys = [
            (_seed_of(self.seed, 0, sampler.rank, epoch, start_step + n, m), idx.tolist())
            for n, batch in enumerate(plan)
            for m, idx in enumerate(batch.micro_batches)
            if len(idx)
        ]
        loaded = self._load(keys, generation)
        for batch in plan:
            micro = [next(loaded) if len(i) else self._empty for i in batch.micro_batches]
            yield FedStep(micro, batch.global_count)

    def batches(self, indices: torch.Tensor, batch_size: int) -> Iterator[_Batch]:
        """(x, y) for consecutive chunks of `indices` of at most `batch_size` (validation)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        generation = self._begin()
        if self._in_memory:
            for chunk in indices.to(self.device).split(batch_size):
                if len(chunk):  # split() of an empty tensor gives one empty chunk
                    yield self._x[chunk], self._y[chunk]
            return
        chunks = [c for c in indices.split(batch_size) if len(c)]
        keys = [(_seed_of(self.seed, 1, int(c[0])), c.tolist()) for c in chunks]
        yield from self._load(keys, generation)

    def close(self) -> None:
        """Shut loader workers down (a later iteration starts new ones)."""
        self._generation += 1
        if self._loader is None:
            return
        self._loader._iterator = None  # persistent workers: that iterator is self._live too
        iterator, self._live = self._live, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _begin(self) -> int:
        self._generation += 1
        return self._generation

    def _load(self, keys: list[tuple[int, list[int]]], generation: int) -> Iterator[_Batch]:
        assert self._loader is not None
        self._keys.keys = keys
        # The pin-memory thread pins for the *current* CUDA device: make it this rank's.
        cuda = self.device.type == "cuda"
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            iterator = self._live = iter(self._loader)  # persistent workers: same one, reset
        while True:
            if generation != self._generation:
                raise RuntimeError(
                    "another iteration of this BatchFeed started (or it was closed) while this "
                    "one was running; use one feed per concurrent iteration"
                )
            try:
                x, y = next(iterator)
            except StopIteration:
                return
            yield self._to_device(x, y)
