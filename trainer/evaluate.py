"""The held-out slice and the periodic evaluation on it.

Samples are held out by a hash of their id (stable across restarts, ranks and replays: a
sample is either always trained on or never), or read from a JSONL file. Held-out samples
seen in batches are kept, newest last, up to a bound.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from schemas.records import BatchSample
from trainer.errors import TrainerError
from trainer.models.base import IGNORE, BatchError, ModelPlugin


def is_heldout(sample_id: str, fraction: float) -> bool:
    """True for about ``fraction`` of ids, always the same ones."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(sample_id.encode(), digest_size=8, person=b"sluice-eval").digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


class EvalSet:
    """Distinct held-out samples by id, the newest ``capacity`` kept."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._samples: OrderedDict[str, BatchSample] = OrderedDict()

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, samples: Sequence[BatchSample]) -> None:
        """Keep ``samples`` (a replayed id moves to the newest end)."""
        for s in samples:
            self._samples.pop(s["id"], None)
            self._samples[s["id"]] = s
        while len(self._samples) > self.capacity:
            self._samples.popitem(last=False)

    def samples(self) -> list[BatchSample]:
        """The kept samples, oldest first."""
        return list(self._samples.values())


def load_eval_jsonl(path: Path) -> list[BatchSample]:
    """Read a fixed evaluation set: one object a line with ``id``, ``label``, ``content``
    and, for the classifier, ``embedding`` as a list of floats (``kind``/``source``
    optional)."""
    samples: list[BatchSample] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TrainerError(f"eval file {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            vector = np.asarray(obj.get("embedding", []), dtype="<f2")
            samples.append(
                BatchSample(
                    id=str(obj["id"]), label=str(obj["label"]), kind=obj.get("kind", "TEXT"),
                    source=str(obj.get("source", path)), content=str(obj.get("content", "")),
                    embedding=vector.tobytes(), embedding_dim=int(vector.shape[0]),
                    weight=1.0, replay=False,
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise TrainerError(f"eval file {path} line {number}: {exc}") from exc
    return samples


def macro_f1(true: Sequence[str], pred: Sequence[str]) -> float:
    """Unweighted mean F1 over every label that is true or predicted (scikit-learn's)."""
    labels = set(true) | set(pred)
    if not labels:
        return 0.0
    scores = []
    for label in labels:
        tp = sum(1 for t, p in zip(true, pred, strict=True) if t == label and p == label)
        fp = sum(1 for t, p in zip(true, pred, strict=True) if t != label and p == label)
        fn = sum(1 for t, p in zip(true, pred, strict=True) if t == label and p != label)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))


@torch.no_grad()
def evaluate(
    plugin: ModelPlugin,
    samples: Sequence[BatchSample],
    device: torch.device,
    autocast: AbstractContextManager[Any],
    chunk: int = 256,
) -> dict[str, float]:
    """``loss`` (mean CE, no smoothing) and ``accuracy`` for every model, plus ``macro_f1``
    for a classifier or ``perplexity`` for a language model. Empty dict without samples."""
    module = plugin.module
    was_training = module.training
    module.eval()
    total_loss, total_positions, correct = 0.0, 0, 0
    true: list[str] = []
    pred: list[str] = []
    try:
        for start in range(0, len(samples), chunk):
            try:
                batch = plugin.collate("eval", samples[start : start + chunk])
            except BatchError:
                continue
            with autocast:
                out = plugin.forward(batch, device)
            logits = out.logits.float()
            valid = out.targets != IGNORE
            if valid.any():
                total_loss += F.cross_entropy(
                    logits[valid], out.targets[valid], reduction="sum"
                ).item()
                total_positions += int(valid.sum())
                correct += int((logits[valid].argmax(-1) == out.targets[valid]).sum())
            if plugin.task == "classify":
                names = plugin.labels
                true.extend(batch.labels)
                pred.extend(names[i] if names else "" for i in logits.argmax(-1).tolist())
    finally:
        module.train(was_training)
    if not total_positions and not true:
        return {}
    result: dict[str, float] = {"samples": float(len(samples))}
    if total_positions:
        result["loss"] = total_loss / total_positions
        result["accuracy"] = correct / total_positions
    if plugin.task == "classify":
        # Labels never trained on count as errors (the model cannot predict them).
        result["accuracy"] = sum(t == p for t, p in zip(true, pred, strict=True)) / len(true)
        result["macro_f1"] = macro_f1(true, pred)
    elif total_positions:
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    return result
