"""A coarse monotonic clock for timeout bookkeeping on the hot path.

Timeouts are enforced by a sweep every 100 ms, so stamping every read and every
idle period with a fresh ``time.monotonic()`` call would buy nothing: the data
plane reads :attr:`Clock.now`, which each worker's sweep refreshes. Durations are
therefore exact to within one sweep interval. Latency metrics use
``time.perf_counter()`` and are exact.
"""

from __future__ import annotations

from time import monotonic

__all__ = ["CLOCK", "Clock"]


class Clock:
    """The last time the worker's sweep looked at the clock."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = monotonic()

    def tick(self) -> float:
        """Read the real clock; returns the new :attr:`now`."""
        self.now = now = monotonic()
        return now


CLOCK = Clock()
