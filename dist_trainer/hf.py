"""Hugging Face `transformers` models: built from a config (no download), saved as they load.

Training them needs nothing of this module: the loop takes a `ModelOutput`'s `logits` (and its
`loss` with `loss=model`, dist_trainer.tasks), dict batches go to `forward` as keyword
arguments (dist_trainer.loading), and `save_pretrained` writes the final artifact
(`save_pretrained` below). What is here: `tiny_gpt2`, a GPT-2-shaped causal LM built from a
`GPT2Config` for `experiment=tiny_gpt2` (transformers is the optional extra `pip install .[hf]`),
and `pad_collate`, padding dict items of unequal length to the longest of the batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["pad_collate", "save_pretrained", "tiny_gpt2"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        from dist_trainer.config import ConfigError

        raise ConfigError(
            "model._target_=dist_trainer.hf.tiny_gpt2 needs transformers, which is not "
            "installed. Fix: pip install 'dist-trainer[hf]' (or pip install transformers)"
        ) from None
    return transformers


def tiny_gpt2(
    vocab_size: int,
    seq_len: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    dropout: float = 0.0,
) -> torch.nn.Module:
    """`transformers.GPT2LMHeadModel` from a `GPT2Config` (random weights, nothing downloaded).

    Args:
        vocab_size: Tokens (the data offers it).
        seq_len: Longest sequence, GPT-2's `n_positions` (the data offers it).
        n_layer, n_head, n_embd: Depth, heads and width.
        dropout: GPT-2's residual, embedding and attention dropout.
    """
    transformers = _transformers()
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        # GPT-2's own ids (50256) lie outside a small vocabulary: transformers warns of them.
        bos_token_id=None,
        eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # what it falls back to anyway, without a warning per build
    return model


def pad_collate(
    items: list[Mapping[str, Any]],
    pad_id: int = 0,
    label_pad: int = -100,
    target_key: str = "labels",
) -> dict[str, torch.Tensor]:
    """Dict items of 1-d sequences of unequal length as one batch padded to the longest.

    Every key is right-padded with `pad_id`, the targets (`target_key`) with `label_pad` (what
    `loss.ignore_index` leaves out); `attention_mask` (1 on real tokens) is added where the
    items have none. For `data.collate._target_=dist_trainer.hf.pad_collate`.
    """
    if not items:
        raise ValueError("pad_collate got no items")
    keys = list(items[0])
    longest = max(len(torch.as_tensor(item[keys[0]])) for item in items)
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        fill = label_pad if key == target_key else pad_id
        rows = [torch.as_tensor(item[key]) for item in items]
        out = torch.full((len(rows), longest), fill, dtype=rows[0].dtype)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        batch[key] = out
    if "attention_mask" not in batch:
        lengths = torch.tensor([len(torch.as_tensor(item[keys[0]])) for item in items])
        batch["attention_mask"] = (torch.arange(longest)[None] < lengths[:, None]).long()
    return batch


def save_pretrained(model: torch.nn.Module, folder: str) -> list[tuple[str, str]]:
    """Save a model that has `save_pretrained` into `folder`: its files as (path, the folder
    they sit in relative to `folder`, '' or '/sub'); [] for any other model."""
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        return []
    save(folder)
    files = []
    for root, _, names in os.walk(folder):
        rel = os.path.relpath(root, folder)
        for name in sorted(names):
            files.append((os.path.join(root, name), "" if rel == "." else f"/{rel}"))
    return files
