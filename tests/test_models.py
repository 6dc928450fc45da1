"""Pure tests of the built-in models: output shapes, gradients for every parameter, causality."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from dist_trainer.models import MLP, CharTransformer, SmallCNN

# (name, constructor, input factory, expected output shape)
CASES = [
    ("mlp-binary", lambda: MLP(in_features=30, num_classes=1), lambda: torch.randn(5, 30), (5,)),
    (
        "mlp-multiclass-flattens",
        lambda: MLP(in_features=64, num_classes=10, hidden_sizes=(32,), dropout=0.1),
        lambda: torch.randn(5, 1, 8, 8),
        (5, 10),
    ),
    (
        "mlp-linear-gelu",
        lambda: MLP(in_features=7, num_classes=3, hidden_sizes=(), activation="gelu"),
        lambda: torch.randn(4, 7),
        (4, 3),
    ),
    (
        "cnn-digits",
        lambda: SmallCNN(in_channels=1, num_classes=10, image_size=8),
        lambda: torch.rand(6, 1, 8, 8),
        (6, 10),
    ),
    (
        "cnn-binary-rgb",
        lambda: SmallCNN(in_channels=3, num_classes=1, image_size=5, channels=(4,), dropout=0.2),
        lambda: torch.rand(2, 3, 5, 5),
        (2,),
    ),
    (
        "transformer",
        lambda: CharTransformer(vocab_size=20, seq_len=12, d_model=16, n_heads=2, n_layers=2),
        lambda: torch.randint(0, 20, (3, 12)),
        (3, 12, 20),
    ),
    (
        "transformer-shorter-input-dropout",
        lambda: CharTransformer(vocab_size=20, seq_len=12, d_model=16, n_heads=4, dropout=0.1),
        lambda: torch.randint(0, 20, (3, 5)),
        (3, 5, 20),
    ),
]


@pytest.mark.parametrize(
    ("name", "make_model", "make_input", "out_shape"), CASES, ids=[c[0] for c in CASES]
)
def test_forward_shape_and_every_parameter_gets_a_gradient(name, make_model, make_input, out_shape):
    torch.manual_seed(0)
    model = make_model()
    model.train()
    out = model(make_input())
    assert tuple(out.shape) == out_shape
    out.square().mean().backward()
    # DDP without find_unused_parameters needs every parameter in the graph every step.
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("train_mode", [True, False])
def test_transformer_is_causal(train_mode):
    torch.manual_seed(0)
    model = CharTransformer(vocab_size=11, seq_len=16, d_model=16, n_heads=2, n_layers=2)
    model.train(train_mode)  # eval + no_grad may take PyTorch's fused fast path: check it too
    x = torch.randint(0, 11, (2, 16))
    x2 = x.clone()
    k = 9
    x2[:, k] = (x2[:, k] + 1) % 11
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :k], b[:, :k], atol=0, rtol=0)
    assert not torch.allclose(a[:, k:], b[:, k:])


def test_transformer_rejects_too_long_input():
    model = CharTransformer(vocab_size=5, seq_len=4, d_model=8, n_heads=2, n_layers=1)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_cnn_rejects_wrong_image_size():
    model = SmallCNN(in_channels=1, num_classes=3, image_size=8)
    with pytest.raises(ValueError, match="8x8"):
        model(torch.zeros(1, 1, 6, 6))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MLP(in_features=0, num_classes=2), "in_features"),
        (lambda: MLP(in_features=3, num_classes=0), "num_classes"),
        (lambda: MLP(in_features=3, num_classes=2, hidden_sizes=(4, 0)), r"hidden_sizes\[1\]"),
        (lambda: MLP(in_features=3, num_classes=2, dropout=1.0), "dropout"),
        (lambda: MLP(in_features=3, num_classes=2, activation="swish"), "activation"),
        (lambda: SmallCNN(in_channels=1, num_classes=2, image_size=8, channels=()), "channels"),
        (lambda: SmallCNN(in_channels=1, num_classes=2, image_size=0), "image_size"),
        (lambda: CharTransformer(vocab_size=5, seq_len=4, d_model=10, n_heads=4), "n_heads"),
        (lambda: CharTransformer(vocab_size=0, seq_len=4), "vocab_size"),
    ],
)
def test_constructor_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_empty_batch_backpropagates_zero_gradients():
    # A rank with no samples in the last step still runs forward/backward for DDP's all-reduce.
    model = MLP(in_features=4, num_classes=3)
    model(torch.zeros(0, 4)).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


# --- shipped configs ---------------------------------------------------------------------------

_CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
_DATA_DIMS = {"in_features": 64, "num_classes": 10, "in_channels": 1, "image_size": 8}


@pytest.mark.parametrize(
    ("name", "dims", "x"),
    [
        ("mlp", _DATA_DIMS, torch.rand(2, 1, 8, 8)),
        ("cnn", _DATA_DIMS, torch.rand(2, 1, 8, 8)),
        ("transformer", {"vocab_size": 30, "seq_len": 8}, torch.randint(0, 30, (2, 8))),
    ],
)
def test_model_yaml_instantiates_with_data_dims(name, dims, x):
    cfg = OmegaConf.load(_CONF / f"{name}.yaml")
    cls = get_class(cfg._target_)
    accepted = inspect.signature(cls).parameters
    # Data-derived dims belong to the data, not the model config.
    assert not set(cfg) & {
        "in_features",
        "num_classes",
        "vocab_size",
        "seq_len",
        "in_channels",
        "image_size",
    }
    model = instantiate(cfg, **{k: v for k, v in dims.items() if k in accepted})
    assert model(x).shape[0] == 2
