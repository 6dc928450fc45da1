"""Built-in models, small enough for CPU workers and shaped for the built-in datasets.

Each is a plain ``nn.Module`` that Hydra instantiates from ``conf/model/<name>.yaml``
(``_target_: dist_trainer.models.<Class>``). Dimensions that depend on the data (``in_features``,
``num_classes``, ``vocab_size``, ...) come from ``DataBundle.model_kwargs`` unless the config sets
them. Every parameter takes part in every forward pass, so DDP never needs
``find_unused_parameters`` (which costs an extra graph traversal per step).

Output shapes match ``dist_trainer.tasks``: ``[B]`` when ``num_classes == 1`` (binary), ``[B, C]``
otherwise, ``[B, T, V]`` for the language model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "CharTransformer", "SmallCNN"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def _check_positive(**values: int) -> None:
    """Raise ValueError naming the first argument that is not a positive int."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value!r}")


def _check_dropout(dropout: float) -> None:
    """Raise ValueError unless ``dropout`` is a probability in [0, 1)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


class MLP(nn.Module):
    """Multi-layer perceptron over flattened inputs.

    Args:
        in_features: Number of input features after flattening ``[B, ...]`` to ``[B, F]``.
        num_classes: Output width; 1 gives a ``[B]`` logit for the binary task.
        hidden_sizes: Width of each hidden layer, input side first; empty for a linear model.
        dropout: Dropout probability after each hidden activation.
        activation: Hidden activation: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        output_activation: ``None`` (logits, for the default losses) or ``"sigmoid"``
            (probabilities, e.g. with ``loss._target_=torch.nn.BCELoss``).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (64, 64),
        dropout: float = 0.0,
        activation: str = "relu",
        output_activation: str | None = None,
    ) -> None:
        super().__init__()
        _check_positive(in_features=in_features, num_classes=num_classes)
        if output_activation not in (None, "sigmoid"):
            raise ValueError(
                f"output_activation must be null or sigmoid, got {output_activation!r}"
            )
        for i, width in enumerate(hidden_sizes):
            _check_positive(**{f"hidden_sizes[{i}]": width})
        _check_dropout(dropout)
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = in_features
        for width in hidden_sizes:
            layers += [nn.Linear(width_in, width), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width_in = width
        layers.append(nn.Linear(width_in, num_classes))
        if output_activation == "sigmoid":
            layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, ...]`` inputs to ``[B, num_classes]`` outputs (``[B]`` if one class)."""
        out = self.net(x)
        return out.squeeze(-1) if self.num_classes == 1 else out


class SmallCNN(nn.Module):
    """Small convolutional classifier for little square images (e.g. 8x8 digits).

    One ``conv3x3 (padding 1) -> ReLU`` block per entry of ``channels``, so the spatial size is
    kept; then flatten, dropout and a linear head. Flattening (rather than global average
    pooling) keeps *where* strokes are, which matters for tiny images seen by only a few convs.

    Args:
        in_channels: Channels of the input images (1 for greyscale).
        num_classes: Output width; 1 gives a ``[B]`` logit for the binary task.
        image_size: Height and width of the (square) input images; sizes the head.
        channels: Output channels of each conv block, input side first; at least one.
        dropout: Dropout probability before the linear head.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        channels: Sequence[int] = (16, 32),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        if len(channels) == 0:
            raise ValueError("channels must list at least one conv block, got []")
        for i, width in enumerate(channels):
            _check_positive(**{f"channels[{i}]": width})
        _check_dropout(dropout)
        blocks: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            blocks += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c_in * image_size * image_size, num_classes),
        )
        self.image_size = image_size
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``[B, in_channels, S, S]`` to logits ``[B, num_classes]`` (``[B]`` if one)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"SmallCNN was built for {self.image_size}x{self.image_size} images, "
                f"got input of shape {tuple(x.shape)}"
            )
        out = self.head(self.features(x))
        return out.squeeze(-1) if self.num_classes == 1 else out


class CharTransformer(nn.Module):
    """Decoder-only (causal) transformer for character-level language modelling.

    Token and learned position embeddings, ``n_layers`` pre-norm self-attention blocks with a
    causal mask, a final LayerNorm and a linear head over the vocabulary.

    Args:
        vocab_size: Number of distinct tokens (characters).
        seq_len: Longest input length; sizes the position embedding.
        d_model: Width of the residual stream; must be divisible by ``n_heads``.
        n_heads: Attention heads per block.
        n_layers: Number of transformer blocks.
        dropout: Dropout probability on embeddings, attention and feed-forward outputs.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive(
            vocab_size=vocab_size,
            seq_len=seq_len,
            d_model=d_model,
            n_heads=n_heads,
            n_layers=n_layers,
        )
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        _check_dropout(dropout)
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model,
            n_heads,
            dim_feedforward=4 * d_model,  # the usual 4x expansion (GPT-2)
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,  # pre-norm trains stably without warmup tricks at this size
        )
        # Nested tensors only help with padding masks, and are unsupported with norm_first.
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        # Small embedding init as in GPT-2/nanoGPT: N(0, 1) (PyTorch's default) would swamp the
        # residual stream relative to the blocks' outputs.
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """Map token ids ``[B, T]`` (T <= seq_len) to next-token logits ``[B, T, vocab_size]``."""
        t = x.shape[1]
        if t > self.seq_len:
            raise ValueError(f"input length {t} exceeds seq_len={self.seq_len}")
        pos = torch.arange(t, device=x.device)
        h = self.drop(self.tok_emb(x) + self.pos_emb(pos))
        # Built per call (one tiny kernel) rather than kept as a buffer, which DDP would
        # broadcast from rank 0 before every forward.
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device, dtype=h.dtype)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))
