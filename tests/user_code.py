"""Code a user would write: own model, data factory, loss and dataset, none of our presets.

Workers import it by module path (`model._target_=tests.user_code.TinyNet`), as they would a
user's package.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from dist_trainer.data import DataBundle


class TinyNet(nn.Module):
    """A model with a plain __init__(self): takes none of the built-in model group's keys."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class WideNet(nn.Module):
    """Takes one argument of its own."""

    def __init__(self, width: int = 4, in_features: int = 6, num_classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class NoParams(nn.Module):
    """A model that forgot its parameters (kept in a plain list)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = [nn.Linear(6, 3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


class FlatOutput(nn.Module):
    """Outputs [B] for a 3-class task: the wrong shape."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class Decoded(Dataset):
    """A map-style dataset that is not a TensorDataset: items built on access."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i].numpy().copy(), int(self.y[i])


def make_data(n: int = 300, as_tensors: bool = True) -> DataBundle:
    """Three gaussian blobs in 6 dimensions; a factory with no `seed`, `val_fraction`, ..."""
    gen = torch.Generator().manual_seed(123)
    y = torch.randint(0, 3, (n,), generator=gen)
    centers = torch.randn(3, 6, generator=gen) * 2
    x = centers[y] + torch.randn(n, 6, generator=gen)
    n_val = n // 5
    if as_tensors:
        train, val = TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val])
    else:
        train, val = Decoded(x[n_val:], y[n_val:]), Decoded(x[:n_val], y[:n_val])
    return DataBundle(train, val, "multiclass", {"in_features": 6, "num_classes": 3}, "blobs")


def focal_loss(outputs: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-sample focal loss (Lin et al. 2017): a user function with its own argument."""
    logp = torch.log_softmax(outputs, dim=1).gather(1, targets[:, None]).squeeze(1)
    return -((1 - logp.exp()) ** gamma) * logp


class Stacker:
    """A collate class (data.collate._target_): instances stack (x, y) items, x times `scale`."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([x for x, _ in items]) * self.scale
        return x, torch.tensor([y for _, y in items])
