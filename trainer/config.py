"""Settings of the continuously training consumer.

``TrainerConfig`` is the shape of the composed settings the trainer reads;
``sluice.settings`` builds it, so the trainer never imports the shell (nor curation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

from pydantic import Field

from streams.config import KafkaSettings, MetricsSettings, Section, TopicSettings


class TrainerSettings(Section):
    """The continuously training consumer."""

    model: str = "embedding-classifier"
    group_id: str = "sluice-trainer"
    checkpoint_dir: Path | None = Field(None, description="default: <state_dir>/checkpoints")
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    total_steps: int = Field(10_000, ge=1, description="cosine schedule length")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    device: str = "auto"
    compile: bool = False
    prefetch: int = Field(4, ge=1)
    eval_every: int = Field(200, ge=1)


class TrainerConfig(Protocol):
    """What the trainer reads of the composed settings (``sluice.settings.Settings``)."""

    @property
    def kafka(self) -> KafkaSettings: ...
    @property
    def topics(self) -> TopicSettings: ...
    @property
    def metrics(self) -> MetricsSettings: ...
    @property
    def trainer(self) -> TrainerSettings: ...
