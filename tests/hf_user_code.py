"""What a Hugging Face user brings: dict items of unequal length, tuple inputs with a mask, a
GPT-2 that returns tuples, and models whose outputs hold no logits.

Workers import it by module path (`data._target_=tests.hf_user_code.padded_text`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from dist_trainer import data, hf
from dist_trainer.data import DataBundle


class Sequences(Dataset):
    """Dict items {input_ids, labels} of unequal length (labels = input_ids, HF's causal-LM
    convention); `pairs=True`: fixed-length ((input_ids, attention_mask), labels) items whose
    padded tail is masked and labelled -100."""

    def __init__(self, windows: torch.Tensor, lengths: list[int], pairs: bool) -> None:
        self.windows, self.lengths, self.pairs = windows, lengths, pairs

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        n = self.lengths[i]
        if not self.pairs:
            ids = self.windows[i, :n].clone()
            return {"input_ids": ids, "labels": ids.clone()}
        ids = self.windows[i].clone()
        mask = (torch.arange(len(ids)) < n).long()
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        return (ids, mask), labels


def padded_text(
    num_samples: int = 96, min_len: int = 3, max_len: int = 16, pairs: bool = False
) -> DataBundle:
    """Windows of pydoc text cut to deterministic unequal lengths in [min_len, max_len]."""
    text = data.tiny_text(seq_len=max_len, max_chars=(num_samples + 2) * max_len * 2)
    windows = text.train.tensors[0][: num_samples + num_samples // 4]
    span = max_len - min_len + 1
    lengths = [min_len + (7 * i + i * i) % span for i in range(len(windows))]
    n_train = num_samples
    return DataBundle(
        train=Sequences(windows[:n_train], lengths[:n_train], pairs),
        val=Sequences(windows[n_train:], lengths[n_train:], pairs),
        task="lm",
        model_kwargs=dict(text.model_kwargs),
        name="padded_text",
    )


class TupleGPT2(nn.Module):
    """GPT-2 called with return_dict=False: a tuple (logits, ...), or (loss, logits, ...)."""

    def __init__(self, vocab_size: int, seq_len: int = 16) -> None:
        super().__init__()
        self.gpt = hf.tiny_gpt2(vocab_size, seq_len, n_layer=1, n_embd=32)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.gpt(input_ids, attention_mask=attention_mask, labels=labels, return_dict=False)


class NoLogits(nn.Module):
    """Returns a dict without 'logits' (a user's own naming)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids, attention_mask=None):
        return {"scores": self.embed(input_ids)}


class LogitsOnly(nn.Module):
    """Takes the labels but returns only logits: no loss for loss=model."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.embed(input_ids)


class Describes(nn.Module):
    """Returns a string: no tensor at all."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 4)

    def forward(self, input_ids, attention_mask=None):
        return f"{self.embed(input_ids).shape}"


class PositionalOnly(nn.Module):
    """Takes one tensor: dict batches (keyword arguments) do not fit it."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, vocab_size)

    def forward(self, x):
        return self.embed(x)


class OwnLossLM(nn.Module):
    """Computes its own loss from labels without shifting them (targets aligned with its
    logits), as a dict {loss, logits}."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.embed(input_ids)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return out


class Labelled(Dataset):
    """Dict items {input_ids, attention_mask, labels}: a class per sequence, -100 for some."""

    def __init__(self, windows: torch.Tensor, classes: int) -> None:
        self.windows, self.classes = windows, classes

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        ids = self.windows[i]
        label = -100 if i % 5 == 4 else int(ids[0]) % self.classes  # every 5th: unlabelled
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": label}


def labelled_text(num_samples: int = 96, seq_len: int = 8, classes: int = 3) -> DataBundle:
    """Sequence classification of pydoc windows (multiclass), a fifth of the labels -100."""
    text = data.tiny_text(seq_len=seq_len, max_chars=(num_samples * 2) * seq_len + 1)
    windows = text.train.tensors[0]
    return DataBundle(
        train=Labelled(windows[:num_samples], classes),
        val=Labelled(windows[num_samples : num_samples + 20], classes),
        task="multiclass",
        model_kwargs={"vocab_size": text.model_kwargs["vocab_size"], "num_classes": classes},
        name="labelled_text",
    )


def gpt2_classifier(vocab_size: int, num_classes: int) -> nn.Module:
    """transformers.GPT2ForSequenceClassification from a config (logits [B, C], its own loss)."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=16,
        n_layer=1,
        n_head=2,
        n_embd=16,
        num_labels=num_classes,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.GPT2ForSequenceClassification(config)
