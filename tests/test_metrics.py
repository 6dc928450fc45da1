"""IntervalMetrics: the log interval's figures, held per micro-step and counted once, against
references computed batch by batch."""

from __future__ import annotations

import math

import pytest
import torch

from dist_trainer import metrics
from dist_trainer.metrics import IntervalMetrics
from dist_trainer.tasks import loss_sum_and_predictions


def _interval(defer: bool = True) -> IntervalMetrics:
    return IntervalMetrics(torch.device("cpu"), 0, 1, 0, 0, False, lambda a, b: b - a, defer)


def _collect(interval: IntervalMetrics) -> dict[str, float]:
    return interval.collect(steps_comm=[], pairs=[], per_rank_extra={}, gpu={}, comm_enabled=False)


@pytest.mark.parametrize("defer", [True, False])
def test_interval_loss_and_accuracy_equal_the_batch_by_batch_reference(defer):
    torch.manual_seed(0)
    interval = _interval(defer)
    loss_total, hits, count = 0.0, 0, 0
    for size in (8, 8, 3, 8):
        logits, y = torch.randn(size, 5), torch.randint(0, 5, (size,))
        y[:2] = -100  # ignored: out of the loss, the accuracy and the count
        loss_sum, predictions, n = loss_sum_and_predictions("multiclass", logits, y)
        interval.add_micro_step(loss_sum.detach(), predictions, n)
        kept = y != -100
        loss_total += torch.nn.functional.cross_entropy(logits[kept], y[kept], reduction="sum")
        hits += int((logits[kept].argmax(1) == y[kept]).sum())
        count += int(kept.sum())
    interval.add_step(27)
    got = _collect(interval)
    assert got["train/loss"] == pytest.approx(float(loss_total) / count, rel=1e-6)
    assert got["train/accuracy"] == pytest.approx(hits / count)


def test_large_outputs_are_counted_at_once_and_small_ones_wait():
    interval = _interval()
    small = loss_sum_and_predictions("binary", torch.randn(4), torch.ones(4))
    interval.add_micro_step(small[0].detach(), small[1], small[2])
    assert len(interval._pending) == 1, "small predictions wait for the interval"
    vocab = metrics._PENDING_ELEMENTS // 8 + 1  # an LM's logits: [B,T,V] past the bound
    logits, tokens = torch.randn(2, 4, vocab), torch.randint(0, vocab, (2, 4))
    big = loss_sum_and_predictions("lm", logits, tokens)
    interval.add_micro_step(big[0].detach(), big[1], big[2])
    assert interval._pending == [], "outputs past the bound are counted, not held"
    expected = int(small[1].correct()) + int((logits.argmax(-1) == tokens).sum())
    interval.add_step(6)
    assert _collect(interval)["train/accuracy"] == pytest.approx(expected / 12)


def test_a_very_long_interval_folds_its_lists():
    interval = _interval()
    total = 0.0
    for i in range(metrics._FOLD_EVERY * 2 + 5):
        value = torch.tensor(float(i % 7))
        interval.add_micro_step(value, torch.tensor(1), 1)
        total += i % 7
        assert len(interval._loss_sums) <= metrics._FOLD_EVERY
    steps = metrics._FOLD_EVERY * 2 + 5
    interval.add_step(steps)
    got = _collect(interval)
    assert got["train/loss"] == pytest.approx(total / steps)
    assert got["train/accuracy"] == 1.0
    assert not math.isnan(got["perf/step_time_s"])
