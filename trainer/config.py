"""Settings of the continuously training consumer.

``TrainerSettings`` is everything one run reads, with its default: the ``trainer`` section
of the TOML file and the ``SLUICE_TRAINER__*`` variables, and the flags of ``sluice train``
as overrides. ``TrainerConfig`` is the shape of the composed settings the trainer reads;
``sluice.settings`` builds it, so the trainer never imports the shell (nor curation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field

from streams.config import KafkaSettings, MetricsSettings, Section, TopicSettings


class TrainerSettings(Section):
    """The continuously training consumer: one run of ``trainer.loop.train``."""

    # -- the model --------------------------------------------------------------------------
    model: str | None = Field(None, description="model plugin: embedding-classifier, byte-lm "
                              "or module:factory; unset: the checkpoint's model if built in, "
                              "else embedding-classifier. The only plugin ever imported: a "
                              "checkpoint naming another model is refused")
    model_options: dict[str, Any] = Field(
        default_factory=dict, description="keywords of the model's factory for a fresh model "
        "(a resumed one is rebuilt from its checkpoint's); command line: --model-option K=V")
    device: str = Field("auto", description="auto (this rank's GPU, else MPS, else CPU), cpu, "
                        "cuda, cuda:N, mps")
    compile: bool = Field(False, description="torch.compile the model")
    seed: int = Field(0, description="torch's seed (plus the rank) for a fresh run")
    # -- optimization -----------------------------------------------------------------------
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    total_steps: int = Field(10_000, ge=1, description="cosine schedule length")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    loss_weights: bool = Field(True, description="weight each sample's loss by the inverse "
                               "of the importance weight its batch carries (target share / "
                               "natural share), normalized per batch to sum to the batch size, "
                               "so re-balanced sampling does not shift the model's class "
                               "priors; false: every sample counts the same (the balanced mix "
                               "is what the model learns, e.g. for macro-F1)")
    grad_clip: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=0, description="stop once this many optimizer "
                                  "steps are done in total (resumed steps count); unset: never")
    # -- the stream -------------------------------------------------------------------------
    group_id: str = "sluice-trainer"
    start: Literal["earliest", "latest"] = Field(
        "earliest", description="where a partition starts when the run has no position for "
        "it (no checkpointed offset, no start recorded beside the checkpoints, no offset "
        "committed by group_id): earliest = the oldest batch still retained, latest = only "
        "batches written after the start; the position chosen is recorded at once, so a "
        "restart before the first checkpoint begins there too")
    idle_timeout_s: float | None = Field(None, ge=0, description="stop after this many seconds "
                                         "without a new batch; unset: wait for ever")
    prefetch: int = Field(4, ge=1, description="batches decoded and collated ahead of the step")
    commit_every_s: float | None = Field(0.5, ge=0, description="commit the trained position "
                                         "to group_id at most this often, and at once "
                                         "when the trainer waits for data (advisory: a "
                                         "restart resumes from its checkpoint); the balance "
                                         "stage's pace = trainer follows it; unset: only at "
                                         "checkpoints")
    # -- reporting --------------------------------------------------------------------------
    metrics_host: str = Field("127.0.0.1", description="address the Prometheus endpoint "
                              "(port metrics.trainer_port) listens on; it has no "
                              "authentication, so loopback unless opened on purpose "
                              "(0.0.0.0: every interface)")
    # -- checkpoints ------------------------------------------------------------------------
    checkpoint_dir: Path | None = Field(None, description="default: <state_dir>/checkpoints")
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    # -- evaluation -------------------------------------------------------------------------
    eval_every: int = Field(200, ge=1)
    holdout_fraction: float = Field(0.05, ge=0, le=0.5, description="share of sample ids "
                                    "(by hash) never trained on and evaluated instead")
    eval_file: Path | None = Field(None, description="a fixed JSONL evaluation set instead of "
                                   "the hash-held-out slice (then every sample is trained on)")
    eval_samples: int = Field(1024, ge=1, description="held-out samples kept for evaluation "
                              "(the newest)")


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
