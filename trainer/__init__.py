"""The continuously training PyTorch consumer of curated batches.

``KafkaBatchSource`` (a resumable ``IterableDataset`` over ``curated-batches``), model
plugins (``trainer.models``), atomic checkpoints (``trainer.checkpoint``) and the loop
(``trainer.loop.train``); ``trainer.cli.train`` is the ``sluice train`` command.
"""

from trainer.errors import CheckpointError, PluginError, TrainerError
from trainer.source import KafkaBatchSource, SourcedBatch

__all__ = ["CheckpointError", "KafkaBatchSource", "PluginError", "SourcedBatch", "TrainerError"]
