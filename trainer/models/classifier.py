"""``embedding-classifier``: an MLP over the curated embeddings (the default model).

The embeddings arrive ready-made from the dedup stage, so training is cheap and the trainer
keeps up with the stream on a CPU. Classes are not known in advance: the output layer
starts empty and grows by one zero-initialized row per new label, keeping every learned
weight and its AdamW moments — a new class never resets the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from schemas.embedding import decode_embedding
from schemas.records import BatchSample
from trainer.models.base import IGNORE, BatchError, ModelPlugin, Output, TrainBatch


class GrowingLinear(nn.Module):
    """A linear layer whose number of outputs can grow (rows are appended as zeros)."""

    def __init__(self, in_features: int, out_features: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    @property
    def out_features(self) -> int:
        """Current number of outputs."""
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias``."""
        return F.linear(x, self.weight, self.bias)

    def grow(self, out_features: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Append zero rows up to ``out_features``; pad the optimizer's state to match."""
        extra = out_features - self.out_features
        if extra <= 0:
            return
        for name in ("weight", "bias"):
            old = getattr(self, name)
            pad = old.new_zeros((extra, *old.shape[1:]))
            new = nn.Parameter(torch.cat([old.detach(), pad]))
            setattr(self, name, new)
            if optimizer is not None:
                _swap_param(optimizer, old, new, extra)


def _swap_param(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, extra: int
) -> None:
    """Put ``new`` where ``old`` was in ``optimizer``, padding its per-element state."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        for key, value in state.items():
            # Moments have the parameter's shape; scalars such as ``step`` do not.
            if torch.is_tensor(value) and value.shape == old.shape:
                state[key] = torch.cat([value, value.new_zeros((extra, *value.shape[1:]))])
        optimizer.state[new] = state


class EmbeddingMLP(nn.Module):
    """LayerNorm → Linear → GELU → Dropout → growing output layer."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
        )
        self.head = GrowingLinear(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes)."""
        out: torch.Tensor = self.head(self.body(x))
        return out


class EmbeddingClassifier(ModelPlugin):
    """Predict each sample's label from its float16 embedding."""

    name = "embedding-classifier"
    task = "classify"

    def __init__(self, embedding_dim: int = 384, hidden: int = 256, dropout: float = 0.1) -> None:
        self.embedding_dim, self.hidden, self.dropout = embedding_dim, hidden, dropout
        self.module: EmbeddingMLP
        super().__init__(EmbeddingMLP(embedding_dim, hidden, dropout))
        self._labels: list[str] = []
        self._index: dict[str, int] = {}

    def config(self) -> dict[str, Any]:
        """See ``ModelPlugin.config``."""
        return {"embedding_dim": self.embedding_dim, "hidden": self.hidden, "dropout": self.dropout}

    @property
    def labels(self) -> list[str]:
        """See ``ModelPlugin.labels``."""
        return self._labels

    def collate(self, batch_id: str, samples: Sequence[BatchSample]) -> TrainBatch:
        """Stack the embeddings as float32 (B, dim)."""
        if not samples:
            raise BatchError(f"batch {batch_id} has no sample to train on")
        rows = []
        for s in samples:
            dim = self.embedding_dim
            if s["embedding_dim"] != dim or len(s["embedding"]) != 2 * dim:
                raise BatchError(
                    f"batch {batch_id}: sample {s['id']} has a {s['embedding_dim']}-dim embedding "
                    f"({len(s['embedding'])} bytes); the model takes {self.embedding_dim}"
                )
            rows.append(decode_embedding(s["embedding"], dim))
        x = torch.from_numpy(np.stack(rows))
        if not torch.isfinite(x).all():
            # One NaN or infinity makes the step's loss NaN and the weights with it.
            bad = [s["id"] for s, row in zip(samples, x, strict=True) if not row.isfinite().all()]
            raise BatchError(f"batch {batch_id}: samples {bad} have non-finite embeddings")
        ids, labels = [s["id"] for s in samples], [s["label"] for s in samples]
        return TrainBatch(batch_id, ids, labels, {"x": x})

    def unseen_labels(self, batch: TrainBatch) -> list[str]:
        """See ``ModelPlugin.unseen_labels``."""
        return list(dict.fromkeys(lb for lb in batch.labels if lb not in self._index))

    def add_labels(self, labels: Sequence[str], optimizer: torch.optim.Optimizer | None) -> None:
        """See ``ModelPlugin.add_labels``."""
        for label in labels:
            if label not in self._index:
                self._index[label] = len(self._labels)
                self._labels.append(label)
        self.module.head.grow(len(self._labels), optimizer)

    def targets(self, labels: Sequence[str]) -> torch.Tensor:
        """Class indices of ``labels``; ``IGNORE`` for a label the model has never seen."""
        return torch.tensor([self._index.get(lb, IGNORE) for lb in labels], dtype=torch.long)

    def forward(self, batch: TrainBatch, device: torch.device) -> Output:
        """One position per sample."""
        logits = self._call(batch.to(device)["x"])
        targets = self.targets(batch.labels).to(device)
        return Output(logits, targets, torch.arange(len(batch), device=device))


def embedding_classifier(**options: Any) -> EmbeddingClassifier:
    """Factory for ``--model embedding-classifier`` (``trainer.models:embedding_classifier``)."""
    return EmbeddingClassifier(**options)
