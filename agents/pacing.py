"""How many batches the balance stage may compose now, when the trainer sets the pace.

The trainer's position comes from the broker now and then (``streams.lag.unconsumed``: the
batches on ``curated-batches`` its group has not committed); between two probes, every
batch sent is counted on top. ``budget`` is what keeps the topic at most ``ahead_batches``
ahead: nothing until the first probe answers, and a batch sent while a probe was in
flight is counted twice rather than not at all (overshooting the trainer is the error to
avoid; composing one batch late costs one timer tick).
"""

from __future__ import annotations


class Pacer:
    """Batches ahead of the trainer: the last probe plus what was sent since it began."""

    def __init__(self, ahead_batches: int) -> None:
        self.ahead_batches = int(ahead_batches)
        self.probed: int | None = None
        """Unconsumed batches at the last probe (``None``: never answered)."""
        self._sent = 0  # batches sent since the worker started
        self._sent_at_probe = 0

    def mark(self) -> int:
        """Call as a probe starts; hand the result to ``observe`` with its answer."""
        return self._sent

    def observe(self, unconsumed: int, mark: int) -> None:
        """The probe begun at ``mark`` found ``unconsumed`` batches not yet committed."""
        self.probed = max(0, int(unconsumed))
        self._sent_at_probe = mark

    def sent(self, n: int = 1) -> None:
        """``n`` batches were delivered to the topic."""
        self._sent += n

    @property
    def ahead(self) -> int | None:
        """Batches written and not yet consumed, as far as is known (``None``: unknown)."""
        if self.probed is None:
            return None
        return self.probed + self._sent - self._sent_at_probe

    def budget(self) -> int:
        """Batches that may be composed now without passing ``ahead_batches``."""
        ahead = self.ahead
        return 0 if ahead is None else max(0, self.ahead_batches - ahead)
