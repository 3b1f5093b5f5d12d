"""The continuously training PyTorch consumer of curated batches.

``KafkaBatchSource`` (a resumable ``IterableDataset`` over ``curated-batches``), model
plugins (``trainer.models``), atomic checkpoints (``trainer.checkpoint``), what a run
carries and saves (``trainer.run_state``) and the loop (``trainer.loop.train``, configured
by ``trainer.config.TrainerSettings``); the ``sluice train`` command lives in the shell
(``sluice.train``).

Nothing is imported here: the composed settings import ``trainer.config``, and a curation
worker must not pay for torch.
"""
