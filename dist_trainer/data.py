"""Built-in datasets that need no download, each returned as a `DataBundle`.

Every factory is a plain function that Hydra instantiates from ``conf/data/<name>.yaml``
(``_target_: dist_trainer.data.<name>``); the launcher passes ``seed=trainer.seed``. The splits
and any randomness depend only on the arguments, so every rank builds the identical bundle
without communicating.

The train/val sets are ``TensorDataset`` so the loop can index the underlying tensors directly
(one gather per micro-batch instead of a Python call per sample).

- ``breast_cancer``: scikit-learn's Wisconsin breast cancer table (569 x 30, binary).
- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).
- ``tiny_text``: character-level language modelling on CPython's ``pydoc_data.topics``.
- ``synthetic``: gaussian inputs labelled by a random linear teacher (benchmarks).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from dist_trainer.tasks import TASKS

__all__ = ["DataBundle", "breast_cancer", "digits", "synthetic", "tiny_text"]


@dataclass(frozen=True)
class DataBundle:
    """A train/val pair plus what the loop and the model factory need to know about it."""

    train: Dataset
    """Map-style training set; each item is ``(x, y)``."""
    val: Dataset
    """Map-style validation set; each item is ``(x, y)``."""
    task: str
    """How logits and targets become a loss: one of ``tasks.TASKS``."""
    model_kwargs: dict[str, int]
    """Dimensions offered to the model constructor (only those it accepts are passed)."""
    name: str
    """Short human-readable name, for logs and run names."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"DataBundle.task must be one of {TASKS}, got {self.task!r}")


# ---------------------------------------------------------------------------------------------
# Helpers


def _check_fraction(val_fraction: float, n: int) -> int:
    """Validate ``val_fraction`` and return the number of validation items out of ``n``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_val = round(n * val_fraction)
    # Both sides must be non-empty: an empty val set would make val/loss a 0/0.
    if n_val < 1 or n_val > n - 1:
        raise ValueError(
            f"val_fraction={val_fraction} leaves {n_val} of {n} items for validation; "
            "both train and val need at least one"
        )
    return n_val


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(train_idx, val_idx)``: a seeded random permutation of ``range(n)``, cut in two."""
    n_val = _check_fraction(val_fraction, n)
    # A private generator: never touches (or depends on) the global torch RNG state.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def _sklearn_data_dir() -> Path:
    """Locate ``sklearn/datasets/data`` without importing scikit-learn.

    ``import sklearn`` costs ~2 s per worker, and workers start in parallel on few cores; the
    CSV files it ships are all we need. ``find_spec`` on a top-level package runs no code.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The breast_cancer and digits datasets read the CSV files shipped inside "
            "scikit-learn, which is not installed: pip install scikit-learn"
        )
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def _read_breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x float64 [569, 30], y int64 [569])`` exactly as ``load_breast_cancer`` does."""
    path = _sklearn_data_dir() / "breast_cancer.csv"
    with path.open(encoding="utf-8") as f:
        # Header, as in sklearn's load_csv_data: n_samples, n_features, then the class names.
        header = f.readline().split(",")
        n_samples, n_features = int(header[0]), int(header[1])
        table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape != (n_samples, n_features + 1):
        raise ValueError(
            f"{path}: header says {n_samples} x {n_features} (+1 target column), "
            f"found {table.shape}"
        )
    return table[:, :-1], table[:, -1].astype(np.int64)


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x float64 [1797, 64], y int64 [1797])`` exactly as ``load_digits`` does."""
    path = _sklearn_data_dir() / "digits.csv.gz"
    # No header here: 64 pixel columns (0..16) then the label, as sklearn's loader reads it.
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    return table[:, :-1], table[:, -1].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Factories


def breast_cancer(
    val_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
    num_features: int | None = None,
) -> DataBundle:
    """Wisconsin breast cancer (569 x 30 features, binary), from scikit-learn's bundled CSV.

    Args:
        val_fraction: Share of samples held out for validation, in (0, 1).
        seed: Seeds the random train/val split.
        standardize: Scale each feature to zero mean, unit variance using train-split statistics
            only (so nothing about the val set leaks into training).
        num_features: Keep only the first N of the 30 columns (None: all). The first 10 are the
            "mean" measurements (radius, texture, ...), as in the seed tutorial's example.

    Returns:
        A bundle with float32 x ``[N, 30]``, float32 y ``[N]`` in {0, 1}, task ``"binary"``.
    """
    x_np, y_np = _read_breast_cancer()
    if num_features is not None:
        if not 1 <= num_features <= x_np.shape[1]:
            raise ValueError(f"num_features must be in 1..{x_np.shape[1]}, got {num_features!r}")
        x_np = x_np[:, :num_features]
    x = torch.from_numpy(x_np)  # float64 while computing statistics; cast at the end
    y = torch.from_numpy(y_np).to(torch.float32)
    train_idx, val_idx = _split(len(x), val_fraction, seed)
    x_train, x_val = x[train_idx], x[val_idx]
    if standardize:
        mean = x_train.mean(dim=0)
        # Population std (as sklearn's StandardScaler); a constant feature is left unscaled.
        std = x_train.std(dim=0, correction=0).clamp_min(1e-12)
        x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    return DataBundle(
        train=TensorDataset(x_train.to(torch.float32), y[train_idx]),
        val=TensorDataset(x_val.to(torch.float32), y[val_idx]),
        task="binary",
        model_kwargs={"in_features": x.shape[1], "num_classes": 1},
        name="breast_cancer",
    )


def digits(val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """Handwritten digits (1,797 8x8 grey images, 10 classes), from scikit-learn's bundled CSV.

    Args:
        val_fraction: Share of images held out for validation, in (0, 1).
        seed: Seeds the random train/val split.

    Returns:
        A bundle with float32 x ``[N, 1, 8, 8]`` in [0, 1], int64 y ``[N]``, task ``"multiclass"``.
    """
    x_np, y_np = _read_digits()
    # Pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap), hence /16 to reach [0, 1].
    x = torch.from_numpy(x_np).to(torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(y_np)
    train_idx, val_idx = _split(len(x), val_fraction, seed)
    return DataBundle(
        train=TensorDataset(x[train_idx], y[train_idx]),
        val=TensorDataset(x[val_idx], y[val_idx]),
        task="multiclass",
        # in_features lets an MLP (which flattens its input) take the images too.
        model_kwargs={"in_channels": 1, "image_size": 8, "in_features": 64, "num_classes": 10},
        name="digits",
    )


def tiny_text(
    seq_len: int = 64, val_fraction: float = 0.1, seed: int = 0, max_chars: int | None = None
) -> DataBundle:
    """Character-level language modelling on CPython's documentation (``pydoc_data.topics``).

    The text is the ``topics`` values joined in sorted key order (~465,000 characters). It is cut
    into non-overlapping windows of ``seq_len`` characters; the target of each window is the same
    window shifted one character ahead. Validation is the contiguous *tail* of windows, not a
    random sample: neighbouring windows come from the same help topic, so a random split would
    score the model on text it has effectively seen. Hence the split does not depend on ``seed``.

    Args:
        seq_len: Characters per window (the model's context length); at least 1.
        val_fraction: Share of windows (taken from the end of the text) held out for validation.
        seed: Accepted so every data factory takes the launcher's seed; this split is
            deterministic and does not use it.
        max_chars: Use only the first ``max_chars`` characters (for quick tests); None for all.

    Returns:
        A bundle with int64 x and y ``[N, seq_len]``, task ``"lm"``, and
        ``model_kwargs={"vocab_size": V, "seq_len": seq_len}``.
    """
    del seed  # see docstring: the contiguous-tail split has no randomness
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len!r}")
    if max_chars is not None and max_chars < seq_len + 1:
        raise ValueError(
            f"max_chars must be at least seq_len + 1 = {seq_len + 1} (one window plus its "
            f"shifted target), got {max_chars!r}"
        )
    # Imported here: only this dataset needs the 0.5 MB module.
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    if max_chars is not None:
        text = text[:max_chars]
    # Vocabulary from the text actually used, so every id occurs somewhere.
    vocab = torch.tensor(sorted(map(ord, set(text))), dtype=torch.int64)
    # Code points via UTF-32 (4 bytes each) then a sorted lookup: vectorised, no per-char Python.
    codepoints = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
    ids = torch.searchsorted(vocab, codepoints.to(torch.int64))

    n_windows = (len(ids) - 1) // seq_len  # -1: the last window needs one more char as target
    if n_windows < 2:
        raise ValueError(
            f"seq_len={seq_len} leaves {n_windows} window(s) of {len(ids)} characters; "
            "need at least 2 for a train/val split"
        )
    n_val = _check_fraction(val_fraction, n_windows)
    n_tokens = n_windows * seq_len
    x = ids[:n_tokens].reshape(n_windows, seq_len)
    y = ids[1 : n_tokens + 1].reshape(n_windows, seq_len)
    n_train = n_windows - n_val
    return DataBundle(
        # .clone(): own contiguous storage rather than views pinning the full-length tensor.
        train=TensorDataset(x[:n_train].clone(), y[:n_train].clone()),
        val=TensorDataset(x[n_train:].clone(), y[n_train:].clone()),
        task="lm",
        model_kwargs={"vocab_size": len(vocab), "seq_len": seq_len},
        name="tiny_text",
    )


def synthetic(
    num_samples: int = 8192,
    in_features: int = 784,
    num_classes: int = 10,
    val_fraction: float = 0.1,
    seed: int = 0,
    noise: float = 0.1,
) -> DataBundle:
    """Gaussian inputs labelled by a fixed random linear teacher: learnable, instant to build.

    Labels are ``argmax(x @ W + noise * eps)`` with ``W`` of shape ``[in_features, num_classes]``
    scaled so the teacher's logits have unit variance; ``noise`` is thus relative to that scale.

    Args:
        num_samples: Total samples (train + val); at least 2.
        in_features: Input dimension; at least 1.
        num_classes: Number of classes; at least 2 (task is always ``"multiclass"``).
        val_fraction: Share of samples held out for validation, in (0, 1).
        seed: Seeds the teacher, the inputs and the label noise.
        noise: Std of the gaussian noise added to the teacher's logits; at least 0.

    Returns:
        A bundle with float32 x ``[N, in_features]``, int64 y ``[N]``, task ``"multiclass"``.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples!r}")
    if in_features < 1:
        raise ValueError(f"in_features must be at least 1, got {in_features!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes!r}")
    if noise < 0:
        raise ValueError(f"noise must be at least 0, got {noise!r}")
    n_val = _check_fraction(val_fraction, num_samples)

    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(in_features, num_classes, generator=gen) / math.sqrt(in_features)
    x = torch.randn(num_samples, in_features, generator=gen)
    logits = x @ teacher + noise * torch.randn(num_samples, num_classes, generator=gen)
    y = logits.argmax(dim=1)
    # Rows are i.i.d., so a plain cut is already a random split.
    n_train = num_samples - n_val
    return DataBundle(
        train=TensorDataset(x[:n_train], y[:n_train]),
        val=TensorDataset(x[n_train:], y[n_train:]),
        task="multiclass",
        model_kwargs={"in_features": in_features, "num_classes": num_classes},
        name="synthetic",
    )
