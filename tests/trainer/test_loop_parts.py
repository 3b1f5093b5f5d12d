"""The loop's pure parts: learning rate, per-sample losses, macro-F1, the held-out hash,
what ``prepare`` does with a batch the model cannot use."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from schemas.records import BatchSample, CuratedBatch
from trainer.batches import prepare
from trainer.config import TrainerSettings
from trainer.evaluate import EvalSet, is_heldout, macro_f1
from trainer.loop import get_lr, per_sample
from trainer.models import IGNORE, EmbeddingClassifier, TrainBatch
from trainer.source import SourcedBatch


def test_learning_rate_warms_up_then_holds_or_decays() -> None:
    constant = TrainerSettings(lr=1e-3, warmup_steps=10)
    assert get_lr(0, constant) < get_lr(5, constant) < get_lr(9, constant) < 1e-3
    assert get_lr(10, constant) == get_lr(5000, constant) == 1e-3
    cosine = TrainerSettings(lr=1e-3, warmup_steps=10, schedule="cosine", total_steps=110)
    assert get_lr(10, cosine) == 1e-3
    assert math.isclose(get_lr(60, cosine), 1e-4 + 0.5 * (1e-3 - 1e-4))
    assert math.isclose(get_lr(110, cosine), 1e-4) and math.isclose(get_lr(10**6, cosine), 1e-4)


def test_per_sample_loss_is_the_unsmoothed_mean_over_each_samples_positions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 5)
    targets = torch.tensor([1, 2, IGNORE, 0, 4, 4, IGNORE])
    owner = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    loss, right, count = per_sample(logits, targets, owner, 3)
    ce = F.cross_entropy(logits[:2], targets[:2], reduction="none")
    assert torch.allclose(loss[0], ce.mean())
    assert torch.allclose(loss[1], F.cross_entropy(logits[3:6], targets[3:6]))
    assert count.tolist() == [2, 3, 0] and loss[2] == 0
    hits = (logits.argmax(-1) == targets).float()
    assert torch.allclose(right[1], hits[3:6].mean())


def test_macro_f1_matches_a_hand_count() -> None:
    true = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    # a: p=1, r=2/3 → 0.8; b: p=1/2, r=1/2 → 0.5; c: p=1/2, r=1 → 2/3
    assert math.isclose(macro_f1(true, pred), (0.8 + 0.5 + 2 / 3) / 3)
    assert macro_f1(["a"], ["a"]) == 1.0


def test_the_held_out_slice_is_stable_and_about_the_asked_share() -> None:
    ids = [f"event-{i}" for i in range(20000)]
    held = [i for i in ids if is_heldout(i, 0.1)]
    assert 0.09 < len(held) / len(ids) < 0.11
    assert held == [i for i in ids if is_heldout(i, 0.1)]
    assert not any(is_heldout(i, 0.0) for i in ids[:100])


def test_the_eval_set_keeps_distinct_newest_samples() -> None:
    def sample(i: int) -> dict[str, object]:
        return {"id": f"s{i}", "label": "x"}

    evals = EvalSet(capacity=3)
    evals.add([sample(1), sample(2), sample(1), sample(3)])  # type: ignore[list-item]
    evals.add([sample(4)])  # type: ignore[list-item]
    assert [s["id"] for s in evals.samples()] == ["s1", "s3", "s4"]


def _sourced(samples: list[BatchSample]) -> SourcedBatch:
    batch = CuratedBatch(batch_id="b", partition=0, sequence=0, created_at=0, policy="p",
                         samples=samples, class_shares={}, target_shares={}, difficulty={},
                         content_digest="d")
    return SourcedBatch("t", 0, 7, batch, 0)


def _sample(sample_id: str, embedding: np.ndarray) -> BatchSample:
    return BatchSample(id=sample_id, label="x", kind="CODE", source="s", content="x = 1",
                       embedding=embedding.astype("<f2").tobytes(),
                       embedding_dim=len(embedding), weight=1.0, replay=False)


def test_prepare_skips_what_the_model_cannot_collate_instead_of_raising() -> None:
    plugin = EmbeddingClassifier(embedding_dim=8, hidden=4)
    ids = [f"s{i}" for i in range(40)]
    held = [i for i in ids if is_heldout(i, 0.3)][:2]
    train = [i for i in ids if not is_heldout(i, 0.3)][:3]
    ok, nan = np.ones(8), np.full(8, np.nan)

    fine = prepare(plugin, 0.3, _sourced([_sample(i, ok) for i in train + held]))
    assert fine.skipped is None and fine.train is not None and len(fine.train) == 3
    assert [s["id"] for s in fine.heldout] == held

    # A NaN in a trained sample would make the step's loss NaN: the batch is skipped.
    poisoned = prepare(plugin, 0.3, _sourced(
        [_sample(train[0], nan)] + [_sample(i, ok) for i in train[1:] + held]))
    assert (poisoned.skipped, poisoned.train, poisoned.heldout) == ("unusable", None, [])
    wrong_dim = prepare(plugin, 0.3, _sourced([_sample(i, np.ones(4)) for i in train]))
    assert wrong_dim.skipped == "unusable"
    assert prepare(plugin, 0.3, _sourced([])).skipped == "empty"

    # A bad held-out sample stays out of the evaluation set; the batch still trains.
    bad_eval = prepare(plugin, 0.3, _sourced(
        [_sample(i, ok) for i in train] + [_sample(held[0], nan), _sample(held[1], ok)]))
    assert bad_eval.train is not None and bad_eval.heldout_dropped == 1
    assert [s["id"] for s in bad_eval.heldout] == [held[1]]

    class Fragile(EmbeddingClassifier):
        def collate(self, batch_id: str, samples: Sequence[BatchSample]) -> TrainBatch:
            raise ValueError("a plugin bug on this content")

    assert prepare(Fragile(embedding_dim=8), 0.0, _sourced(
        [_sample(i, ok) for i in train])).skipped == "unusable"
