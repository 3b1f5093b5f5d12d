"""The trainer's errors: one root under ``SluiceError``, one line each."""

from schemas.errors import SluiceError


class TrainerError(SluiceError):
    """The trainer cannot go on (bad setting, unreachable topic, diverged loss)."""


class PluginError(TrainerError):
    """A ``--model`` plugin cannot be found, imported or built."""


class CheckpointError(TrainerError):
    """A checkpoint cannot be written, or none of the existing ones can be read."""
