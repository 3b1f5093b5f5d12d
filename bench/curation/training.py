"""One arm's training run and its evaluation curve (steps 5–6 of
``bench.curated_vs_raw``'s method): the arm's batches on its own topic of the private
Kafka, ``trainer.loop.train`` over exactly ``steps`` of them, a checkpoint every
``eval_every`` steps, and each checkpoint evaluated on the held-out set afterwards (the
trainer keeps only its last evaluation)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

#: Evaluation points per run (checkpoints, evenly spaced, the last one at ``steps``).
EVAL_POINTS = 10


def produce(settings: Any, batches: list[dict[str, Any]], steps: int) -> int:
    """``steps`` batches (the arm's batches, cycled if fewer) to partition 0 of the
    arm's batches topic."""
    from kafka import KafkaProducer

    from streams.connections import kafka_client_options
    from streams.serde import encode
    from streams.topics import ensure_topics

    ensure_topics(settings.kafka, settings.topics)
    producer = KafkaProducer(**kafka_client_options(settings.kafka), linger_ms=20,
                             max_request_size=8 * 1024 * 1024)
    try:
        for n in range(steps):
            batch = batches[n % len(batches)]
            producer.send(settings.topics.batches, key=batch["batch_id"].encode(),
                          value=encode("CuratedBatch", batch), partition=0)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)
    return steps


def eval_every(steps: int) -> int:
    """Steps between two evaluation points."""
    return max(1, math.ceil(steps / EVAL_POINTS))


def arm_settings(base: Any, tag: str, steps: int, folder: Path, seed: int, eval_file: Path,
                 loss_weights: bool, model: str = "embedding-classifier") -> Any:
    """The base settings with the arm's own batches and feedback topics (``bench-<tag>-…``),
    the run's trainer settings (same for every arm but ``loss_weights`` and the model) and
    a quiet metrics endpoint."""
    every = eval_every(steps)
    return base.model_copy(update={
        "topics": base.topics.model_copy(update={"batches": f"bench-{tag}-batches",
                                                 "feedback": f"bench-{tag}-feedback"}),
        "trainer": base.trainer.model_copy(update={
            "model": model, "max_steps": steps, "checkpoint_dir": folder,
            "start": "earliest", "device": "cpu", "eval_file": eval_file,
            "idle_timeout_s": 30.0, "seed": seed, "loss_weights": loss_weights,
            # Warm-up scaled to the run (the default 20 steps is most of a short run).
            "warmup_steps": max(1, steps // 10), "eval_every": steps,
            "checkpoint_every": every, "keep_checkpoints": steps // every + 2}),
        "metrics": base.metrics.model_copy(update={"trainer_port": 0, "interval_s": 60.0}),
    })


def train_arm(settings: Any, eval_samples: list[Any]) -> dict[str, Any]:
    """One training run on the arm's topic: the run's figures and its evaluation curve."""
    from trainer.loop import train

    return run_figures(settings, train(settings), eval_samples)


def run_figures(settings: Any, result: Any, eval_samples: list[Any]) -> dict[str, Any]:
    """A finished run's figures (``trainer.loop.TrainResult``) and the evaluation curve of
    its checkpoints; the last point must equal the trainer's own final evaluation."""
    curve = evaluate_checkpoints(settings.trainer, eval_samples)
    final = curve[-1] if curve else {}
    key = "macro_f1" if "macro_f1" in final else "loss"
    if final and abs(final[key] - result.eval.get(key, math.nan)) > 1e-6:
        raise RuntimeError(f"the last checkpoint's {key} {final[key]} is not the "
                           f"trainer's own final evaluation {result.eval}")
    return {"steps": result.step, "stopped": result.stopped, "samples": result.samples,
            "loss": result.loss, "wall_s": round(result.wall_s, 2),
            **{f"eval_{k}": v for k, v in result.eval.items()}, "curve": curve}


def evaluate_checkpoints(cfg: Any, samples: list[Any], last_only: bool = False
                         ) -> list[dict[str, Any]]:
    """Each checkpoint of the run (``last_only``: the last), oldest first, rebuilt as the
    trainer rebuilds it and evaluated on ``samples``: the trainer's ``evaluate`` (macro-F1,
    accuracy, loss) and, from the model's predictions, the F1 of every held-out class; for
    a language model its loss (nats per byte for ``byte-lm``) and ``bits_per_byte``."""
    import torch

    from trainer.checkpoint import CheckpointStore
    from trainer.evaluate import evaluate, macro_f1
    from trainer.run_state import build_model

    store = CheckpointStore(cfg.checkpoint_dir)
    device = torch.device("cpu")
    curve: list[dict[str, Any]] = []
    paths = store.checkpoints()
    for path in paths[-1:] if last_only else paths:
        ckpt = store.load(path)
        plugin, _ = build_model(ckpt, cfg)
        figures = evaluate(plugin, samples, device, nullcontext())
        if plugin.task != "classify":
            curve.append({"step": ckpt.step, "loss": figures["loss"],
                          "bits_per_byte": figures["loss"] / math.log(2),
                          "accuracy": figures["accuracy"]})
            continue
        true, pred = predictions(plugin, samples, device)
        if abs(macro_f1(true, pred) - figures["macro_f1"]) > 1e-9:
            raise RuntimeError("predictions differ from the trainer's evaluation")
        per_class = class_f1(true, pred)
        curve.append({"step": ckpt.step, "macro_f1": figures["macro_f1"],
                      "accuracy": figures["accuracy"], "loss": figures.get("loss"),
                      "worst_class_f1": min(per_class.values()), "class_f1": per_class})
    return curve


def predictions(plugin: Any, samples: list[Any], device: Any, chunk: int = 256
                ) -> tuple[list[str], list[str]]:
    """(true labels, predicted labels) of ``samples``, collated and run as ``evaluate``
    runs them."""
    import torch

    plugin.module.eval()
    true: list[str] = []
    pred: list[str] = []
    names = plugin.labels
    with torch.no_grad():
        for start in range(0, len(samples), chunk):
            batch = plugin.collate("eval", samples[start:start + chunk])
            logits = plugin.forward(batch, device).logits.float()
            true.extend(batch.labels)
            pred.extend(names[i] if names else "" for i in logits.argmax(-1).tolist())
    return true, pred


def class_f1(true: list[str], pred: list[str]) -> dict[str, float]:
    """F1 of each true class (its mean with the predicted-only classes' zeros is
    ``trainer.evaluate.macro_f1``)."""
    out = {}
    for label in sorted(set(true)):
        tp = sum(t == label and p == label for t, p in zip(true, pred, strict=True))
        fp = sum(t != label and p == label for t, p in zip(true, pred, strict=True))
        fn = sum(t == label and p != label for t, p in zip(true, pred, strict=True))
        out[label] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out
