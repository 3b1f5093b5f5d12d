"""The shell's own errors (settings, the embedded stack); the root is ``schemas.errors``."""

from schemas.errors import SluiceError


class SettingsError(SluiceError):
    """A setting is missing or invalid; the message names it."""


class StackError(SluiceError):
    """The embedded Kafka/Redis stack could not be started, reached or stopped."""
