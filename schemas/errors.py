"""The root of sluice's own errors. It lives at the bottom layer so that every part can
subclass it in one line without importing the parts above it."""


class SluiceError(Exception):
    """Anything sluice reports to a user as one clear line."""
