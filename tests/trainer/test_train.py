"""The loop on a real broker: the classifier and the byte LM learn; feedback and metrics flow.

Batches are real code (functions of the standard library, labelled by package) with
hashed-word embeddings; see ``trainer_data``. Each run prints its samples/s and data-wait
share (``pytest -s`` shows them).
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.records import BatchSample
from sluice.settings import Settings
from streams.serde import decode
from tests.streams.kafka_io import consume_all, create_topic
from tests.trainer.trainer_data import batch_samples, make_batches, produce, stdlib_functions
from trainer.checkpoint import CheckpointStore
from trainer.evaluate import evaluate, is_heldout
from trainer.loop import TrainResult, train
from trainer.models import load_plugin

pytestmark = pytest.mark.integration

HOLDOUT = 0.2


def _settings(stack: Settings, partitions: int, **trainer: Any) -> Settings:
    topics = stack.topics.model_copy(update={
        "batches": create_topic(stack, "train-batches", partitions),
        "feedback": create_topic(stack, "train-feedback", 1),
        "metrics": create_topic(stack, "train-metrics", 1),
    })
    return stack.model_copy(update={
        "topics": topics,
        "trainer": stack.trainer.model_copy(update=trainer),
        "metrics": stack.metrics.model_copy(update={"trainer_port": 0, "interval_s": 1.0}),
    })


def _feedback(settings: Settings, expected: int) -> list[dict[str, Any]]:
    records = consume_all(settings, settings.topics.feedback, expected)
    return sorted((decode(r.value, "Feedback") for r in records), key=lambda f: f["step"])


def _mean_loss(feedback: list[dict[str, Any]]) -> float:
    losses = [s["loss"] for f in feedback for s in f["losses"]]
    return sum(losses) / len(losses)


def _report(name: str, result: TrainResult) -> None:
    print(f"\n{name}: {result.step} steps, {result.samples} samples in {result.wall_s:.1f} s: "
          f"{result.samples_per_s:.0f} samples/s, data-wait share "
          f"{result.data_wait_share:.1%}, eval {result.eval}")


def test_the_classifier_learns_the_package_of_real_code(stack: Settings, tmp_path: Path) -> None:
    steps = 300
    settings = _settings(stack, 4, checkpoint_every=100, eval_every=100, warmup_steps=20,
                         max_steps=steps, checkpoint_dir=tmp_path, holdout_fraction=HOLDOUT)
    samples = batch_samples(list(stdlib_functions()), content_chars=200)
    produce(settings, settings.topics.batches, make_batches(samples, steps, 32, 4, seed=1))

    result = train(settings)
    _report("embedding-classifier", result)

    assert result.step == steps and result.stopped == "max_steps"
    # The loss falls: per-sample losses (unsmoothed) of the first and last 20 batches.
    feedback = _feedback(settings, steps)
    assert [f["step"] for f in feedback] == list(range(1, steps + 1))
    first, last = _mean_loss(feedback[:20]), _mean_loss(feedback[-20:])
    assert last < 0.5 * first, (first, last)
    for f in feedback:
        assert f["model"] == "embedding-classifier"
        assert all(s["loss"] >= 0 and isinstance(s["correct"], bool) for s in f["losses"])
        assert not any(is_heldout(s["id"], HOLDOUT) for s in f["losses"])

    # Held-out accuracy of the final checkpoint against the majority class of the slice.
    heldout = [s for s in samples if is_heldout(s["id"], HOLDOUT)]
    loaded = CheckpointStore(tmp_path).load_latest()
    assert loaded is not None and loaded.step == steps
    plugin = load_plugin(loaded.state["model"]["spec"], loaded.state["model"]["config"])
    plugin.load_state_dict(loaded.state["model"])
    scores = evaluate(plugin, heldout, torch.device("cpu"), nullcontext())
    majority = Counter(s["label"] for s in heldout).most_common(1)[0][1] / len(heldout)
    print(f"held-out accuracy {scores['accuracy']:.3f} (majority {majority:.3f}, "
          f"n={len(heldout)}), macro-F1 {scores['macro_f1']:.3f}")
    assert scores["accuracy"] > majority + 0.30
    assert scores["macro_f1"] > 0.5

    # The metrics topic carries the trainer's gauges, including the periodic evaluation.
    snapshots = [decode(r.value, "MetricSnapshot")
                 for r in consume_all(settings, settings.topics.metrics, 1)]
    last_snapshot = snapshots[-1]
    assert last_snapshot["component"] == "trainer"
    assert {"step", "loss", "accuracy", "samples_per_s", "data_wait_share", "lag",
            "eval.macro_f1"} <= set(last_snapshot["gauges"])
    assert last_snapshot["gauges"]["step"] == steps
    assert last_snapshot["counters"]["samples"] == result.samples


def test_the_byte_lm_learns_real_code(stack: Settings, tmp_path: Path) -> None:
    steps = 120
    settings = _settings(stack, 2, eval_every=60, checkpoint_every=60, warmup_steps=10,
                         lr=3e-3, model="byte-lm",
                         model_options={"block_size": 96, "dim": 96, "layers": 2, "heads": 4},
                         max_steps=steps, checkpoint_dir=tmp_path, holdout_fraction=0.1)
    samples = batch_samples(list(stdlib_functions()), content_chars=200)
    produce(settings, settings.topics.batches, make_batches(samples, steps, 16, 2, seed=2))

    result = train(settings)
    _report("byte-lm", result)

    feedback = _feedback(settings, steps)
    first, last = _mean_loss(feedback[:10]), _mean_loss(feedback[-10:])
    assert first > 4.0 and last < 0.6 * first, (first, last)
    assert all(s["correct"] is None for f in feedback for s in f["losses"])
    assert 1 < result.eval["perplexity"] < 40


def test_held_out_samples_from_a_jsonl_file(stack: Settings, tmp_path: Path) -> None:
    """--eval-file replaces the hash slice: every sample in the batches is trained on."""
    eval_file = tmp_path / "eval.jsonl"
    settings = _settings(stack, 1, eval_every=10, max_steps=20, checkpoint_dir=tmp_path / "ckpt",
                         eval_file=eval_file)
    samples = batch_samples(list(stdlib_functions(scale=0.1)), content_chars=100)
    produce(settings, settings.topics.batches, make_batches(samples, 20, 16, 1))
    eval_file.write_text("\n".join(_jsonl(s) for s in samples[::5]))

    result = train(settings)

    assert result.eval["samples"] == len(samples[::5])
    assert 0 <= result.eval["macro_f1"] <= 1
    trained = {s["id"] for f in _feedback(settings, 20) for s in f["losses"]}
    assert any(is_heldout(i, 0.05) for i in trained)


def _jsonl(s: BatchSample) -> str:
    import json

    import numpy as np

    vector = np.frombuffer(s["embedding"], "<f2").astype(float).tolist()
    return json.dumps({"id": s["id"], "label": s["label"], "content": s["content"],
                       "embedding": vector})
