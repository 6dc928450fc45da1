"""Pure tests of the built-in datasets: shapes, seeding, exact match with scikit-learn's loaders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from dist_trainer import data
from dist_trainer.tasks import TASKS

# Small synthetic sizes keep these tests well under a second.
_SMALL_SYNTH = {"num_samples": 512, "in_features": 16, "num_classes": 4}

FACTORIES = {
    "breast_cancer": (data.breast_cancer, {}),
    "digits": (data.digits, {}),
    "tiny_text": (data.tiny_text, {"seq_len": 16, "max_chars": 20_000}),
    "synthetic": (data.synthetic, _SMALL_SYNTH),
}


def _tensors(ds: TensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = ds.tensors
    return x, y


@pytest.mark.parametrize(
    ("name", "x_shape", "x_dtype", "y_dtype", "task"),
    [
        ("breast_cancer", (30,), torch.float32, torch.float32, "binary"),
        ("digits", (1, 8, 8), torch.float32, torch.int64, "multiclass"),
        ("tiny_text", (16,), torch.int64, torch.int64, "lm"),
        ("synthetic", (16,), torch.float32, torch.int64, "multiclass"),
    ],
)
def test_bundle_shapes_and_dtypes(name, x_shape, x_dtype, y_dtype, task):
    factory, kwargs = FACTORIES[name]
    bundle = factory(**kwargs)
    assert bundle.name == name
    assert bundle.task == task and task in TASKS
    for ds in (bundle.train, bundle.val):
        assert isinstance(ds, TensorDataset)
        x, y = _tensors(ds)
        assert tuple(x.shape[1:]) == x_shape
        assert x.dtype == x_dtype and y.dtype == y_dtype
        assert len(x) == len(y) > 0
        item_x, item_y = ds[0]
        assert tuple(item_x.shape) == x_shape


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("breast_cancer", {"in_features": 30, "num_classes": 1}),
        ("digits", {"in_channels": 1, "image_size": 8, "in_features": 64, "num_classes": 10}),
        ("synthetic", {"in_features": 16, "num_classes": 4}),
    ],
)
def test_model_kwargs(name, expected):
    factory, kwargs = FACTORIES[name]
    assert factory(**kwargs).model_kwargs == expected


@pytest.mark.parametrize("name", ["breast_cancer", "digits", "synthetic"])
def test_split_is_deterministic_by_seed(name):
    factory, kwargs = FACTORIES[name]
    a, b, c = factory(seed=0, **kwargs), factory(seed=0, **kwargs), factory(seed=1, **kwargs)
    for split in ("train", "val"):
        xa, ya = _tensors(getattr(a, split))
        xb, yb = _tensors(getattr(b, split))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(_tensors(a.val)[0], _tensors(c.val)[0])


@pytest.mark.parametrize("name", list(FACTORIES))
def test_val_fraction_sets_the_val_size(name):
    factory, kwargs = FACTORIES[name]
    bundle = factory(val_fraction=0.25, **kwargs)
    n_train, n_val = len(bundle.train), len(bundle.val)
    assert n_val == round((n_train + n_val) * 0.25)


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction_is_rejected(name, val_fraction):
    factory, kwargs = FACTORIES[name]
    with pytest.raises(ValueError, match="val_fraction"):
        factory(val_fraction=val_fraction, **kwargs)


def test_tiny_val_fraction_that_leaves_no_val_is_rejected():
    with pytest.raises(ValueError, match="val_fraction"):
        data.synthetic(num_samples=10, in_features=2, num_classes=2, val_fraction=0.01)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 1}, "num_samples"),
        ({"in_features": 0}, "in_features"),
        ({"num_classes": 1}, "num_classes"),
        ({"noise": -1.0}, "noise"),
    ],
)
def test_synthetic_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.synthetic(**{**_SMALL_SYNTH, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"seq_len": 0}, "seq_len"), ({"seq_len": 8, "max_chars": 8}, "max_chars")],
)
def test_tiny_text_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.tiny_text(**kwargs)


def test_data_bundle_rejects_unknown_task():
    ds = TensorDataset(torch.zeros(1))
    with pytest.raises(ValueError, match="task"):
        data.DataBundle(train=ds, val=ds, task="regression", model_kwargs={}, name="x")


# --- exact agreement with scikit-learn ---------------------------------------------------------


def test_breast_cancer_reader_matches_sklearn_exactly():
    from sklearn.datasets import load_breast_cancer

    ref = load_breast_cancer()
    x, y = data._read_breast_cancer()
    assert x.shape == (569, 30) and x.dtype == np.float64
    np.testing.assert_array_equal(x, ref.data)
    np.testing.assert_array_equal(y, ref.target)


def test_breast_cancer_bundle_is_the_sklearn_data_split():
    from sklearn.datasets import load_breast_cancer

    ref = load_breast_cancer()
    bundle = data.breast_cancer(standardize=False, seed=3)
    train_idx, val_idx = data._split(569, 0.2, seed=3)
    ref_x = torch.from_numpy(ref.data).to(torch.float32)
    ref_y = torch.from_numpy(ref.target).to(torch.float32)
    assert torch.equal(bundle.train.tensors[0], ref_x[train_idx])
    assert torch.equal(bundle.train.tensors[1], ref_y[train_idx])
    assert torch.equal(bundle.val.tensors[0], ref_x[val_idx])
    assert torch.equal(bundle.val.tensors[1], ref_y[val_idx])
    # The split is a partition of all samples.
    assert sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(569))


def test_breast_cancer_standardizes_with_train_statistics_only():
    raw = data.breast_cancer(standardize=False)
    std = data.breast_cancer(standardize=True)
    x_train_raw = raw.train.tensors[0].double()
    mean = x_train_raw.mean(0)
    sd = x_train_raw.std(0, correction=0)
    x_train = std.train.tensors[0].double()
    torch.testing.assert_close(
        x_train.mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        x_train.std(0, correction=0), torch.ones(30, dtype=torch.float64), atol=1e-5, rtol=0
    )
    # Val is scaled by the train statistics, not its own.
    expected_val = ((raw.val.tensors[0].double() - mean) / sd).float()
    torch.testing.assert_close(std.val.tensors[0], expected_val, atol=1e-5, rtol=1e-5)


def test_digits_match_sklearn_exactly():
    from sklearn.datasets import load_digits

    ref = load_digits()
    x, y = data._read_digits()
    np.testing.assert_array_equal(x, ref.data)
    np.testing.assert_array_equal(y, ref.target)

    bundle = data.digits(seed=5)
    train_idx, val_idx = data._split(1797, 0.2, seed=5)
    ref_x = torch.from_numpy(ref.images).to(torch.float32).unsqueeze(1) / 16
    assert torch.equal(bundle.train.tensors[0], ref_x[train_idx])
    assert torch.equal(bundle.val.tensors[1], torch.from_numpy(ref.target)[val_idx])
    assert bundle.train.tensors[0].min() == 0 and bundle.train.tensors[0].max() == 1


def test_loaders_do_not_import_sklearn():
    # A fresh interpreter: this test process may already have imported sklearn.
    code = (
        "import sys; from dist_trainer import data; data.breast_cancer(); data.digits(); "
        "assert 'sklearn' not in sys.modules, 'sklearn was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_sklearn_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="scikit-learn"):
        data.breast_cancer()


# --- tiny_text -----------------------------------------------------------------------------------


def _full_text() -> str:
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


def test_tiny_text_windows_are_shifted_by_one():
    bundle = data.tiny_text(seq_len=16, max_chars=20_000)
    for ds in (bundle.train, bundle.val):
        x, y = ds.tensors
        assert torch.equal(y[:, :-1], x[:, 1:])  # y[i, t] == x[i, t + 1] within a window
    # Non-overlapping stride seq_len: a window's last target is the next window's first input.
    x, y = bundle.train.tensors
    assert torch.equal(y[:-1, -1], x[1:, 0])


def test_tiny_text_decodes_back_to_the_source_text():
    max_chars = 5_000
    seq_len = 32
    bundle = data.tiny_text(seq_len=seq_len, max_chars=max_chars)
    text = _full_text()[:max_chars]
    vocab = sorted(set(text))
    assert bundle.model_kwargs == {"vocab_size": len(vocab), "seq_len": seq_len}
    # Val is the contiguous tail: train windows then val windows rebuild the text in order.
    ids = torch.cat([bundle.train.tensors[0], bundle.val.tensors[0]]).flatten().tolist()
    assert "".join(vocab[i] for i in ids) == text[: len(ids)]
    assert len(ids) == (max_chars - 1) // seq_len * seq_len


def test_tiny_text_full_corpus_and_seed_independence():
    a = data.tiny_text(seed=0)
    b = data.tiny_text(seed=1)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])  # contiguous tail: no randomness
    n = len(a.train) + len(a.val)
    assert n == (len(_full_text()) - 1) // 64
    assert a.model_kwargs["vocab_size"] == len(set(_full_text()))
    assert int(a.train.tensors[0].max()) < a.model_kwargs["vocab_size"]


# --- synthetic -----------------------------------------------------------------------------------


def test_synthetic_labels_come_from_a_learnable_teacher():
    bundle = data.synthetic(num_samples=2048, in_features=32, num_classes=4, noise=0.0)
    x, y = bundle.train.tensors
    # With noise 0 the labels are a linear function of x: least squares on one-hot targets
    # should already classify most of them right.
    onehot = torch.nn.functional.one_hot(y, 4).float()
    w = torch.linalg.lstsq(x, onehot).solution
    acc = ((x @ w).argmax(1) == y).float().mean()
    assert acc > 0.8
    assert torch.bincount(y, minlength=4).min() > 0  # every class present


def test_synthetic_benchmark_size_builds_quickly():
    bundle = data.synthetic()
    assert len(bundle.train) + len(bundle.val) == 8192
    assert bundle.train.tensors[0].shape[1] == 784
    assert bundle.model_kwargs == {"in_features": 784, "num_classes": 10}


# --- shipped configs ---------------------------------------------------------------------------

_CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


@pytest.mark.parametrize("name", ["breast_cancer", "digits", "tiny_text", "synthetic"])
def test_data_yaml_instantiates(name):
    cfg = OmegaConf.load(_CONF / f"{name}.yaml")
    assert "seed" not in cfg  # the launcher passes trainer.seed
    overrides = {"max_chars": 5_000} if name == "tiny_text" else {}
    bundle = instantiate(cfg, seed=0, **overrides)
    assert isinstance(bundle, data.DataBundle) and bundle.name == name
