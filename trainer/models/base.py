"""What a model plugin is: a module plus how a ``CuratedBatch`` becomes tensors.

``--model module:factory`` names a callable returning a ``ModelPlugin``; it is called with
keyword options (the plugin's ``config()`` when resuming from a checkpoint, so the module
is rebuilt with the shapes it was saved with). The loop stays generic because every plugin
reduces its output to one classification problem over positions: ``logits`` (N, C),
``targets`` (N,) with ``IGNORE`` where nothing is predicted, and ``owner`` (N,) the sample
each position belongs to — one position per sample for a classifier, one per byte for a
language model. Losses per sample are averages over their positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from schemas.records import BatchSample
from trainer.errors import PluginError, TrainerError

#: Target value for positions that carry no loss (cross-entropy's ``ignore_index``).
IGNORE = -100

Task = Literal["classify", "lm"]


class BatchError(TrainerError):
    """A batch this model cannot train on (wrong embedding size, no usable sample)."""


@dataclass(frozen=True, slots=True)
class TrainBatch:
    """Collated CPU tensors for one batch, with the ids and labels behind each row."""

    batch_id: str
    ids: list[str]
    labels: list[str]
    inputs: dict[str, torch.Tensor]
    weights: torch.Tensor | None = None
    """Each row's importance weight as the batch carries it (float32, CPU); set by
    ``trainer.batches.prepare`` after ``collate``, ``None`` when weights are switched off."""

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The inputs on ``device`` (non-blocking from pinned memory on CUDA)."""
        return {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}


@dataclass(frozen=True, slots=True)
class Output:
    """Predictions reduced to positions: see the module docstring."""

    logits: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor


class ModelPlugin(ABC):
    """A trainable model and its data contract. Subclasses set ``name`` and ``task``."""

    name: ClassVar[str]
    task: ClassVar[Task]

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._call: nn.Module = module

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Keyword options that rebuild this plugin's module with the same shapes."""

    @abstractmethod
    def collate(self, batch_id: str, samples: Sequence[BatchSample]) -> TrainBatch:
        """Tensors for ``samples`` on the CPU. Runs in the prefetch thread: it must not
        touch the module or any state the training step changes. Raises ``BatchError``."""

    @abstractmethod
    def forward(self, batch: TrainBatch, device: torch.device) -> Output:
        """Run the module (through ``compile()``'s wrapper) on one collated batch."""

    @property
    def labels(self) -> list[str]:
        """The label vocabulary in index order (empty for models without one)."""
        return []

    def unseen_labels(self, batch: TrainBatch) -> list[str]:
        """Labels in ``batch`` the model has no output for yet, in first-seen order."""
        return []

    def add_labels(self, labels: Sequence[str], optimizer: torch.optim.Optimizer | None) -> None:
        """Grow the output for ``labels`` keeping every learned weight (and its optimizer
        state). Models without a label vocabulary never report unseen labels."""
        if labels:
            raise PluginError(f"model {self.name} has no label vocabulary to add {labels} to")

    def compile(self) -> None:
        """Route ``forward`` through ``torch.compile`` (the saved weights stay unwrapped)."""
        self._call = torch.compile(self.module)  # type: ignore[assignment]

    def state_dict(self) -> dict[str, Any]:
        """Module weights and the label vocabulary: tensors and plain containers only, so a
        checkpoint loads with ``weights_only=True``."""
        return {"module": self.module.state_dict(), "labels": list(self.labels)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output (the vocabulary first: it sizes the output)."""
        if state.get("labels"):
            self.add_labels(state["labels"], None)
        self.module.load_state_dict(state["module"])
