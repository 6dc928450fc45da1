"""Pure tests of loss_sums against independent references, plus a tiny end-to-end fit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_trainer import data
from dist_trainer.models import MLP
from dist_trainer.tasks import (
    TASKS,
    Loss,
    OutputShapeError,
    Predictions,
    loss_sum_and_predictions,
    loss_sums,
)


def _manual_bce_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of -[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))], in float64 Python math."""
    total = 0.0
    for z, y in zip(logits.tolist(), targets.tolist(), strict=True):
        p = 1.0 / (1.0 + math.exp(-z))
        total -= y * math.log(p) + (1.0 - y) * math.log(1.0 - p)
    return total


@pytest.mark.parametrize("shape", [(6,), (6, 1)])
def test_binary_matches_manual_bce(shape):
    torch.manual_seed(0)
    logits = torch.randn(shape)
    targets = torch.randint(0, 2, shape).float()
    loss, correct, count = loss_sums("binary", logits, targets)
    assert loss.shape == correct.shape == count.shape == ()
    assert loss.item() == pytest.approx(
        _manual_bce_sum(logits.flatten(), targets.flatten()), rel=1e-5
    )
    pairs = zip(logits.flatten().tolist(), targets.flatten().tolist(), strict=True)
    expected_correct = sum((z > 0) == (y == 1) for z, y in pairs)
    assert correct.item() == expected_correct
    assert count.item() == 6


def test_binary_accepts_int_targets_and_1d_logits_with_2d_targets():
    logits = torch.tensor([2.0, -1.0, 0.5])
    loss, correct, count = loss_sums("binary", logits, torch.tensor([[1], [1], [0]]))
    assert correct.item() == 1 and count.item() == 3
    assert loss.item() == pytest.approx(_manual_bce_sum(logits, torch.tensor([1.0, 1.0, 0.0])))


def test_multiclass_matches_mean_cross_entropy_times_batch():
    torch.manual_seed(0)
    logits = torch.randn(7, 5)
    targets = torch.randint(0, 5, (7,))
    loss, correct, count = loss_sums("multiclass", logits, targets)
    ref = F.cross_entropy(logits, targets, reduction="mean") * 7
    torch.testing.assert_close(loss, ref)
    assert correct.item() == int((logits.argmax(1) == targets).sum())
    assert count.item() == 7


def test_lm_is_a_sum_over_tokens_with_per_token_accuracy():
    torch.manual_seed(0)
    b, t, v = 3, 4, 6
    logits = torch.randn(b, t, v)
    targets = torch.randint(0, v, (b, t))
    loss, correct, count = loss_sums("lm", logits, targets)
    # Divided by the count (tokens): the token mean, torch's own cross-entropy.
    torch.testing.assert_close(
        loss / count, F.cross_entropy(logits.reshape(-1, v), targets.flatten())
    )
    assert correct.item() == int((logits.argmax(-1) == targets).sum())
    assert count.item() == b * t  # loss and accuracy count tokens


@pytest.mark.parametrize(
    ("task", "logits_shape", "targets"),
    [
        ("binary", (0,), torch.zeros(0)),
        ("binary", (0, 1), torch.zeros(0, 1)),
        ("multiclass", (0, 4), torch.zeros(0, dtype=torch.long)),
        ("lm", (0, 3, 5), torch.zeros(0, 3, dtype=torch.long)),
    ],
)
def test_empty_batch_gives_zeros_and_backpropagates(task, logits_shape, targets):
    logits = torch.zeros(logits_shape, requires_grad=True)
    loss, correct, count = loss_sums(task, logits, targets)
    assert loss.item() == 0 and correct.item() == 0 and count.item() == 0
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape


def test_empty_batch_through_a_model_gives_zero_parameter_gradients():
    model = MLP(in_features=3, num_classes=1)
    loss, _, _ = loss_sums("binary", model(torch.zeros(0, 3)), torch.zeros(0))
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("task", TASKS)
def test_dtypes_device_and_no_graph_on_counts(task):
    shapes = {"binary": ((4,), (4,)), "multiclass": ((4, 3), (4,)), "lm": ((4, 2, 3), (4, 2))}
    logits_shape, target_shape = shapes[task]
    logits = torch.randn(logits_shape, dtype=torch.bfloat16, requires_grad=True)
    if task == "binary":
        targets = torch.randint(0, 2, target_shape).float()
    else:
        targets = torch.randint(0, 3, target_shape)
    loss, correct, count = loss_sums(task, logits, targets)
    assert loss.dtype == torch.float32 and loss.requires_grad  # summed in float32
    assert correct.dtype == count.dtype == torch.int64
    assert not correct.requires_grad and not count.requires_grad
    assert loss.device == correct.device == count.device == logits.device


def test_unknown_task_names_task_and_valid_list():
    with pytest.raises(ValueError, match=r"'regression'.*binary.*multiclass.*lm"):
        loss_sums("regression", torch.zeros(2, 2), torch.zeros(2))


@pytest.mark.parametrize(
    ("task", "logits", "targets"),
    [
        ("binary", torch.zeros(4, 2), torch.zeros(4)),
        ("binary", torch.zeros(4), torch.zeros(3)),
        ("multiclass", torch.zeros(4), torch.zeros(4, dtype=torch.long)),
        ("multiclass", torch.zeros(4, 3), torch.zeros(5, dtype=torch.long)),
        ("lm", torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)),
        ("lm", torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long)),
        ("lm", torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long)),
    ],
)
def test_shape_mismatch_is_a_value_error(task, logits, targets):
    with pytest.raises(ValueError, match=task):
        loss_sums(task, logits, targets)


def test_sgd_on_breast_cancer_reduces_training_loss():
    torch.manual_seed(0)
    bundle = data.breast_cancer()
    x, y = bundle.train.tensors
    model = MLP(**bundle.model_kwargs, hidden_sizes=(16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss_sum, correct, count = loss_sums(bundle.task, model(x), y)
        (loss_sum / len(x)).backward()  # the loop divides by the (global) sample count
        opt.step()
        losses.append(loss_sum.item() / len(x))
    assert losses[-1] < 0.5 * losses[0]
    assert correct.item() / count.item() > 0.9


def test_float64_outputs_keep_a_float64_loss():
    """64 precision: the loss and its sums stay float64 (no float32 rounding to hide behind)."""
    outputs = torch.randn(5, 3, dtype=torch.float64)
    targets = torch.randint(0, 3, (5,))
    loss, _, _ = loss_sums("multiclass", outputs, targets)
    assert loss.dtype == torch.float64
    ref = F.cross_entropy(outputs, targets, reduction="sum")
    assert abs(loss.item() - ref.item()) < 1e-14


def test_user_criterion_gets_per_element_losses_and_our_reduction():
    torch.manual_seed(0)
    outputs, targets = torch.randn(6, 4), torch.randint(0, 4, (6,))
    criterion = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)
    loss, correct, count = loss_sums("multiclass", outputs, targets, Loss(criterion, "ce"))
    ref = F.cross_entropy(outputs, targets, reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
    assert count.item() == 6 and correct.item() == int((outputs.argmax(1) == targets).sum())


def test_user_criterion_on_lm_sums_its_token_losses():
    torch.manual_seed(0)
    outputs, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    criterion = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=0.2)
    loss, _, count = loss_sums("lm", outputs, targets, Loss(criterion, "ce"))
    ref = F.cross_entropy(outputs.reshape(6, 5), targets.flatten(), label_smoothing=0.2)
    torch.testing.assert_close(loss / count, ref)


def test_probabilities_threshold_at_one_half():
    probabilities = torch.tensor([0.2, 0.4, 0.6, 0.9])
    targets = torch.tensor([0.0, 1.0, 1.0, 0.0])
    loss, correct, _ = loss_sums(
        "binary", probabilities, targets, Loss(torch.nn.BCELoss(reduction="none"), "bce", True)
    )
    assert correct.item() == 2  # 0.2 -> 0 right, 0.4 -> 0 wrong, 0.6 -> 1 right, 0.9 -> 1 wrong
    torch.testing.assert_close(
        loss, F.binary_cross_entropy(probabilities, targets, reduction="sum")
    )
    # As logits every output is > 0: all predicted positive, so 2 of 4 right by another route.
    _, as_logits, _ = loss_sums("binary", torch.tensor([-1.0, -0.5, 0.5, 2.0]), targets)
    assert as_logits.item() == 2


def test_a_reducing_criterion_is_refused():
    with pytest.raises(OutputShapeError, match=r"loss\._target_=mean_ce returned \(\), not one"):
        loss_sums(
            "multiclass",
            torch.randn(4, 3),
            torch.randint(0, 3, (4,)),
            Loss(lambda o, t: F.cross_entropy(o, t), "mean_ce"),
        )


def _reference_correct(outputs: list[torch.Tensor], targets: list[torch.Tensor], rule) -> int:
    """Correct predictions counted one element at a time, in Python."""
    hits = 0
    for out, y in zip(outputs, targets, strict=True):
        for o, t in zip(out.tolist(), y.tolist(), strict=True):
            hits += rule(o, t)
    return hits


@pytest.mark.parametrize("probabilities", [False, True])
def test_predictions_of_many_batches_count_as_one_by_one(probabilities):
    torch.manual_seed(1)
    loss = Loss(
        fn=torch.nn.BCELoss(reduction="none") if probabilities else None,
        probabilities=probabilities,
        sum_fn=torch.nn.BCELoss(reduction="sum") if probabilities else None,
    )
    outputs, targets, batches = [], [], []
    for size in (5, 7, 1, 0, 4):  # an empty micro-batch too (a rank with no data)
        out = torch.rand(size, 1) if probabilities else torch.randn(size, 1)
        y = torch.randint(0, 2, (size, 1)).float()
        _, predictions, _ = loss_sum_and_predictions("binary", out, y, loss)
        outputs.append(out.flatten())
        targets.append(y.flatten())
        batches.append(predictions)
    threshold = 0.5 if probabilities else 0.0
    expected = _reference_correct(outputs, targets, lambda o, t: (o > threshold) == (t > 0.5))
    assert int(Predictions.correct_of(batches)) == expected
    assert sum(int(p.correct()) for p in batches) == expected
    # Batches that do not stack ([B] beside [B,1]) are counted one at a time, the same.
    flat = loss_sum_and_predictions("binary", outputs[0], targets[0], loss)[1]
    assert int(Predictions.correct_of([flat, *batches])) == expected + int(flat.correct())


def test_predictions_with_ignored_targets_count_only_the_counted():
    torch.manual_seed(2)
    outputs, targets, batches = [], [], []
    for size in (6, 3):
        out = torch.randn(size, 4)
        y = torch.randint(0, 4, (size,))
        y[0] = -100  # ignored
        _, predictions, count = loss_sum_and_predictions("multiclass", out, y)
        assert int(count) == size - 1
        outputs.append(out)
        targets.append(y)
        batches.append(predictions)
    expected = sum(
        int(o.argmax()) == t
        for out, y in zip(outputs, targets, strict=True)
        for o, t in zip(out, y.tolist(), strict=True)
        if t != -100
    )
    assert int(Predictions.correct_of(batches)) == expected


def test_binary_column_outputs_sum_as_the_flat_ones_forward_and_backward():
    # The [B,1] against [B,1] path calls the summing criterion without flat views: same loss,
    # same gradient as the flat path (a [B] model output).
    torch.manual_seed(3)
    probs = torch.rand(8, 1).clamp(0.05, 0.95)
    y = torch.randint(0, 2, (8, 1)).float()
    loss = Loss(
        fn=torch.nn.BCELoss(reduction="none"),
        probabilities=True,
        sum_fn=torch.nn.BCELoss(reduction="sum"),
    )
    column = probs.clone().requires_grad_()
    flat = probs.flatten().clone().requires_grad_()
    column_sum, _, count = loss_sum_and_predictions("binary", column, y, loss, count_on_host=True)
    flat_sum, _, _ = loss_sum_and_predictions("binary", flat, y.flatten(), loss)
    manual = -sum(
        t * math.log(p) + (1 - t) * math.log(1 - p)
        for p, t in zip(probs.flatten().tolist(), y.flatten().tolist(), strict=True)
    )
    assert count == 8 and isinstance(count, int)
    assert column_sum.item() == pytest.approx(manual, rel=1e-5)
    assert flat_sum.item() == pytest.approx(manual, rel=1e-5)
    column_sum.backward()
    flat_sum.backward()
    torch.testing.assert_close(column.grad.flatten(), flat.grad)
