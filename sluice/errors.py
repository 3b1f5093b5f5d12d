"""The root of sluice's own errors; each part subclasses it in one line."""


class SluiceError(Exception):
    """Anything sluice reports to a user as one clear line."""


class SettingsError(SluiceError):
    """A setting is missing or invalid; the message names it."""


class StackError(SluiceError):
    """The embedded Kafka/Redis stack could not be started, reached or stopped."""
