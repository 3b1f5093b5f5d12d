"""The reducible-loss replay policy (RHO-LOSS) beside the plain ``hard_k`` rule: scores by
hand on a tiny reference model, the fit, the selection, and a measurement of how often each
policy replays mislabeled samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import redis

from agents.feedback import Feedback as FeedbackStep
from agents.feedback import LossStore, in_holdout
from agents.feedback_logic import (
    ReferenceModel,
    process_feedback,
    reducible_examples,
    reducible_losses,
)
from agents.keys import holdout_key
from agents.step import Coords, Item
from schemas.embedding import decode_embedding
from schemas.records import Feedback, SampleLoss
from sluice.settings import Settings
from tests.agents.test_balance_step import MIX, balancer, cleanup, feed, imbalanced_stream


def loss(sample_id: str, label: str, value: float) -> SampleLoss:
    return SampleLoss(id=sample_id, label=label, loss=value, correct=None)


def feedback(losses: list[SampleLoss]) -> Feedback:
    return Feedback(batch_id="0-00000001-0123456789ab", step=1, model="test", created_at=0,
                    losses=losses)


def test_reducible_loss_scores_match_a_hand_computation_on_a_tiny_model() -> None:
    # Two classes over 2-d embeddings: logits = x·W + b.
    model = ReferenceModel(["a", "b"], np.array([[2.0, -1.0], [0.0, 1.0]]),
                           np.array([0.5, 0.0]))
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Logits: (2.5, -1), (0.5, 1), (2.5, 0). Cross-entropy = log(Σ e^z) − z_label.
    by_hand = [math.log(math.exp(2.5) + math.exp(-1.0)) - 2.5,
               math.log(math.exp(0.5) + math.exp(1.0)) - 0.5,
               math.log(math.exp(2.5) + math.exp(0.0)) - 0.0]
    irreducible = model.losses(x, ["a", "a", "b"])
    np.testing.assert_allclose(irreducible, by_hand, rtol=1e-12)
    assert math.isnan(model.losses(x[:1], ["unseen"])[0])
    # The value for selection: the trainer's loss minus the irreducible loss.
    trainer = [loss("s1", "a", 0.9), loss("s2", "a", 1.2), loss("s3", "b", 3.0)]
    values = reducible_losses(trainer, dict(zip(["s1", "s2", "s3"], irreducible,
                                                strict=True)))
    assert values == pytest.approx({"s1": 0.9 - by_hand[0], "s2": 1.2 - by_hand[1],
                                    "s3": 3.0 - by_hand[2]})
    # By hand: s1 0.9 − 0.0298 = 0.870, s2 1.2 − 0.974 = 0.226, s3 3.0 − 2.579 = 0.421.
    assert [round(values[i], 3) for i in ("s1", "s2", "s3")] == [0.870, 0.226, 0.421]
    assert reducible_examples(values, 2) == ["s1", "s3"]
    assert reducible_examples({"x": -0.5, "y": 0.1}, 5) == ["y"]  # nothing left to learn in x


def test_the_fit_learns_separable_classes_deterministically() -> None:
    rng = np.random.default_rng(0)
    centres = {"a": np.array([3.0, 0.0]), "b": np.array([0.0, 3.0]), "c": np.array([-3.0, 0.0])}
    labels = [c for c in centres for _ in range(30)]
    x = np.array([centres[c] + rng.normal(0, 0.5, 2) for c in labels])
    model = ReferenceModel.fit(x, labels, steps=300)
    again = ReferenceModel.fit(x, labels, steps=300)
    np.testing.assert_array_equal(model.weights, again.weights)
    assert model.labels == ["a", "b", "c"]
    assert float(np.mean(model.losses(x, labels))) < 0.15
    # A mislabeled point costs the reference model a lot: that is its irreducible loss.
    assert model.losses(centres["a"][None], ["b"])[0] > 3.0


def test_reducible_does_not_chase_a_mislabeled_sample_where_hard_k_does() -> None:
    # s-noisy: high trainer loss, but the reference model finds it as hard (irreducible).
    # s-learn: high trainer loss, easy for the reference model (learnable, not yet learnt).
    losses = [loss("s-noisy", "a", 4.0), loss("s-learn", "a", 3.5)] + [
        loss(f"s{n}", "a", 0.5) for n in range(8)]
    irreducible = {"s-noisy": 3.9, "s-learn": 0.3} | {f"s{n}": 0.2 for n in range(8)}
    plain = process_feedback(None, feedback(losses), alpha=0.9, hard_k=1.0)
    rho = process_feedback(None, feedback(losses), alpha=0.9, hard_k=1.0, policy="reducible",
                           irreducible=irreducible)
    assert plain.hard_ids == ["s-noisy", "s-learn"]
    # The same budget (two), spent on what is learnable: values 3.2, then 0.3 (s0…s7, ties
    # by id) before the mislabeled one's 0.1.
    assert rho.hard_ids == ["s-learn", "s0"]
    assert rho.state == plain.state and rho.difficulty == plain.difficulty
    with pytest.raises(ValueError, match="unknown replay policy"):
        process_feedback(None, feedback(losses), alpha=0.9, hard_k=1.0, policy="rho")


def test_measured_share_of_mislabeled_samples_among_replays() -> None:
    """Three Gaussian classes in 16 dimensions, 15 % of the training labels flipped. The
    'trainer' is a softmax regression fit briefly on the noisy training set; the reference
    model is fit on a clean held-out slice. Both policies replay the same number of samples
    from the same per-sample losses (k = 1); the reducible one picks far fewer mislabeled
    ones."""
    rng = np.random.default_rng(7)
    classes = ["a", "b", "c"]
    centres = rng.normal(0, 1.0, (3, 16))

    def draw(n: int) -> tuple[np.ndarray, list[str]]:
        truth = rng.integers(0, 3, n)
        return centres[truth] + rng.normal(0, 0.9, (n, 16)), [classes[t] for t in truth]

    x_train, clean = draw(600)
    flipped = rng.random(600) < 0.15
    noisy = [classes[(classes.index(c) + 1) % 3] if f else c
             for c, f in zip(clean, flipped, strict=True)]
    x_hold, hold_labels = draw(300)
    trainer = ReferenceModel.fit(x_train, noisy, steps=20, lr=0.5)  # early in training
    reference = ReferenceModel.fit(x_hold, hold_labels, steps=300)
    ids = [f"s{i}" for i in range(600)]
    trained = trainer.losses(x_train, noisy)
    record = feedback([loss(i, c, float(v)) for i, c, v in zip(ids, noisy, trained, strict=True)])
    irreducible = dict(zip(ids, reference.losses(x_train, noisy).tolist(), strict=True))
    mislabeled = {i for i, f in zip(ids, flipped, strict=True) if f}
    shares = {}
    for policy in ("hard_k", "reducible"):
        picked = process_feedback(None, record, alpha=0.9, hard_k=1.0, policy=policy,
                                  irreducible=irreducible).hard_ids
        shares[policy] = (len(set(picked) & mislabeled) / max(len(picked), 1), len(picked))
    print(f"\n[reducible] mislabeled among replays (15 % of the stream): hard_k "
          f"{shares['hard_k'][0]:.2f} of {shares['hard_k'][1]}, reducible "
          f"{shares['reducible'][0]:.2f} of {shares['reducible'][1]}")
    assert shares["hard_k"][1] == shares["reducible"][1] > 0
    assert shares["hard_k"][0] > 0.5
    assert shares["reducible"][0] < shares["hard_k"][0] / 2


@pytest.mark.integration
def test_the_reducible_policy_holds_a_slice_out_and_replays_by_reducible_loss(
        stack: Settings, client: redis.Redis) -> None:
    """The wiring, on the session Redis: the balance stage keeps the held-out slice out of
    every batch; the feedback step fits the reference model on it, scores the batch's
    samples from their buffered embeddings, and queues what ``process_feedback`` picks."""
    fraction = 0.25
    stream = imbalanced_stream()[:400]
    step = balancer(stack, client, "natural", replay_policy="reducible",
                    holdout_fraction=fraction, reference_refit=1, hard_k=1.0)
    try:
        _, batches = feed(step, stream)
        held = {s["id"] for s in stream if in_holdout(s["id"], fraction)}
        used = {s["id"] for b in batches for s in b["samples"]}
        assert 60 < len(held) < 140 and not held & used
        assert step.counters["held_out"] == len(held)
        losses = step.losses
        assert isinstance(losses, LossStore)
        assert client.hlen(holdout_key(losses.namespace)) == len(held)

        last = batches[-1]
        record = Feedback(batch_id=last["batch_id"], step=1, model="test", created_at=0,
                          losses=[loss(s["id"], s["label"], 0.5 + (n % 7) * 0.3)
                                  for n, s in enumerate(last["samples"])])
        feedback_step = FeedbackStep(step.settings, losses, lambda _: step.buffers,
                                     partitions=1)
        result = feedback_step.run([Item(record, Coords("training-feedback", 0, 0))])[0]
        # The same decision by hand: the reference model on the held-out samples, fed the
        # batch samples' own embeddings.
        model = losses.reference(1)
        assert model is not None and set(model.labels) == set(MIX)
        by_id = {s["id"]: s for s in stream}
        x = np.stack([decode_embedding(by_id[i["id"]]["embedding"], 8)
                      for i in record["losses"]])
        irreducible = dict(zip([i["id"] for i in record["losses"]],
                               model.losses(x, [i["label"] for i in record["losses"]]),
                               strict=True))
        expected = process_feedback(None, record, alpha=step.settings.loss_alpha, hard_k=1.0,
                                    policy="reducible", irreducible=irreducible).hard_ids
        assert expected and result.record["hard"] == len(expected)
        queued = [s["id"] for s in step.buffers.pop_replay(len(expected) + 5)]
        assert queued == expected
        assert feedback_step.counters["reference_missing"] == 0
    finally:
        cleanup(step)
        client.delete(holdout_key(step.losses.namespace))  # type: ignore[attr-defined]
