"""Importance weights reach the loss: ``batch_loss`` against a hand computation, and
``prepare`` carrying each sample's weight (or refusing a batch whose weights are not
usable) to the training step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from schemas.records import BatchSample, CuratedBatch
from trainer.batches import prepare
from trainer.loss import WeightError, batch_loss, normalized_weights
from trainer.models import IGNORE, EmbeddingClassifier, Output
from trainer.source import SourcedBatch


def _output(logits: list[list[float]], targets: list[int], owner: list[int]) -> Output:
    return Output(torch.tensor(logits), torch.tensor(targets), torch.tensor(owner))


def test_weights_scale_each_samples_loss_as_a_hand_computation_says() -> None:
    out = _output([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0, 0, 1], [0, 1, 2])
    # Cross-entropy by hand: -log softmax of the target.
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.0)), math.log(2.0)]
    weights = torch.tensor([1.0, 2.0, 3.0])
    # Normalized to sum to the batch size: 0.5, 1.0, 1.5; the loss is their weighted mean.
    expected = (0.5 * ce[0] + 1.0 * ce[1] + 1.5 * ce[2]) / 3
    loss = batch_loss(out, weights, label_smoothing=0.0)
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert normalized_weights(weights).tolist() == pytest.approx([0.5, 1.0, 1.5])
    unweighted = sum(ce) / 3
    assert not math.isclose(float(loss), unweighted, rel_tol=1e-3)


def test_equal_weights_or_none_give_the_unweighted_loss_smoothing_and_ignore_included() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 5)
    targets = torch.tensor([1, 2, IGNORE, 0, 4, 4, IGNORE])
    owner = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    out = Output(logits, targets, owner)
    plain = F.cross_entropy(logits, targets, ignore_index=IGNORE, label_smoothing=0.1)
    for weights in (None, torch.full((3,), 0.25), torch.full((3,), 7.0)):
        loss = batch_loss(out, weights, label_smoothing=0.1)
        assert torch.allclose(loss, plain, atol=1e-6), weights


def test_a_language_models_positions_take_their_samples_weight() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 4)
    targets = torch.tensor([1, 2, 3, IGNORE, 0])
    owner = torch.tensor([0, 0, 0, 1, 1])
    tok = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE)
    # Weights 1 and 3 → 0.5 and 1.5; the valid positions: three of sample 0, one of 1.
    expected = (0.5 * tok[:3].sum() + 1.5 * tok[4]) / (3 * 0.5 + 1.5)
    loss = batch_loss(Output(logits, targets, owner), torch.tensor([1.0, 3.0]), 0.0)
    assert torch.allclose(loss, expected)


def test_the_weighted_loss_has_gradients_and_zero_weights_silence_a_sample() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    out = Output(logits, torch.tensor([0, 0]), torch.tensor([0, 1]))
    batch_loss(out, torch.tensor([0.0, 1.0]), 0.0).backward()
    assert logits.grad is not None
    assert logits.grad[0].abs().sum() == 0 and logits.grad[1].abs().sum() > 0


@pytest.mark.parametrize("bad", [[1.0, float("nan")], [1.0, float("inf")], [1.0, -0.5],
                                 [0.0, 0.0]])
def test_unusable_weights_are_a_weight_error(bad: list[float]) -> None:
    with pytest.raises(WeightError):
        normalized_weights(torch.tensor(bad))


def _sourced(weights: list[float]) -> SourcedBatch:
    samples = [BatchSample(id=f"s{i}", label="x", kind="CODE", source="s", content="x = 1",
                           embedding=np.full(8, i, dtype="<f2").tobytes(), embedding_dim=8,
                           weight=w, replay=False) for i, w in enumerate(weights)]
    batch = CuratedBatch(batch_id="b", partition=0, sequence=0, created_at=0, policy="p",
                         samples=samples, class_shares={}, target_shares={}, difficulty={},
                         content_digest="d")
    return SourcedBatch("t", 0, 7, batch, 0)


def test_prepare_carries_the_weights_to_the_step_and_refuses_unusable_ones() -> None:
    plugin = EmbeddingClassifier(embedding_dim=8, hidden=4)
    ready = prepare(plugin, 0.0, _sourced([0.5, 2.0, 1.0]))
    assert ready.train is not None and ready.train.weights is not None
    # The loss weight is the inverse of the importance weight: a class drawn twice as often
    # as the stream offers it counts half.
    assert ready.train.weights.tolist() == [2.0, 0.5, 1.0]
    assert prepare(plugin, 0.0, _sourced([1.0, 0.0])).skipped == "unusable"

    refused = prepare(plugin, 0.0, _sourced([1.0, float("nan")]))
    assert refused.skipped == "unusable" and refused.train is None
    # Switched off (trainer.loss_weights = false), the weights are not read at all.
    ignored = prepare(plugin, 0.0, _sourced([1.0, float("nan")]), weighted=False)
    assert ignored.train is not None and ignored.train.weights is None
