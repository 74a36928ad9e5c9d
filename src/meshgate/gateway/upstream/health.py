"""Upstream health from live traffic: outlier detection, circuit breaking, retry budget.

Each is per upstream and per worker, fed by the outcome of every exchange, and
costs a few integer operations per request. Active probes live in
:mod:`meshgate.gateway.upstream.probe`, in the supervisor, which shares their
results with every worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from meshgate.config.model import (
    CircuitBreakerSettings,
    PassiveHealthSettings,
    RetryBudgetSettings,
)
from meshgate.gateway.messages import EJECTED

if TYPE_CHECKING:
    from meshgate.gateway.upstream.pool import Endpoint

__all__ = ["CircuitBreaker", "OutlierDetector", "RetryBudget"]


class OutlierDetector:
    """Ejects an endpoint after consecutive failures (5xx answers, connection failures).

    An ejection lasts ``base_ejection`` doubled for each earlier ejection of the same
    endpoint (capped at ``max_ejection``); an endpoint that then serves cleanly for as
    long as its last ejection lasted is forgiven its history. At most
    ``max_ejected_percent`` of the endpoints are out at once, and never all of them.
    """

    __slots__ = ("_changed", "_endpoints", "_max_ejected", "settings")

    def __init__(
        self,
        settings: PassiveHealthSettings,
        endpoints: Sequence[Endpoint],
        changed: Callable[[], None],
    ) -> None:
        self.settings = settings
        self._endpoints = tuple(endpoints)
        count = len(self._endpoints)
        percent = settings.max_ejected_percent
        # At least one ejection is allowed when any is (3 endpoints at 10 % would
        # otherwise never eject); never all of them.
        self._max_ejected = min(count - 1, max(1 if percent else 0, count * percent // 100))
        self._changed = changed

    def failure(self, endpoint: Endpoint, now: float) -> None:
        """An exchange with ``endpoint`` failed (its ``failures`` already counted it)."""
        endpoint.clean_since = now
        if endpoint.failures < self.settings.consecutive_failures or endpoint.ejected_until:
            return
        endpoints = self._endpoints
        if sum(1 for e in endpoints if e.ejected_until) >= self._max_ejected:
            return
        if sum(1 for e in endpoints if e.available) <= 1:
            return  # the last endpoint standing stays, whatever else took the others out
        settings = self.settings
        length = min(settings.max_ejection, settings.base_ejection * 2**endpoint.ejections)
        endpoint.ejections += 1
        endpoint.ejected_until = now + length
        endpoint.failures = 0
        endpoint.refresh()
        self._changed()
        upstream = endpoint.upstream
        if upstream is not None and upstream.notify is not None:
            upstream.notify(EJECTED, upstream.name, endpoint.label, now + length)

    def tick(self, now: float) -> None:
        """Return endpoints whose ejection is over (called by the worker's sweep)."""
        changed = False
        for endpoint in self._endpoints:
            until = endpoint.ejected_until
            if until and now >= until:
                endpoint.ejected_until = 0.0
                endpoint.clean_since = now
                endpoint.refresh()
                changed = True
            elif (
                endpoint.ejections
                and not until
                and now - endpoint.clean_since
                > min(
                    self.settings.max_ejection,
                    self.settings.base_ejection * 2 ** (endpoint.ejections - 1),
                )
            ):
                endpoint.ejections = 0  # forgiven after a clean spell
        if changed:
            self._changed()


class CircuitBreaker:
    """Closed -> open when the failure ratio over the window passes the threshold
    (with enough requests); open -> half-open after ``open_for``; half-open lets a
    few trial requests through and closes if all succeed, reopens on any failure.

    The window is a ring of one-second buckets, so recording costs two increments.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    __slots__ = (
        "_bucket",
        "_failures",
        "_requests",
        "_second",
        "opened_at",
        "settings",
        "state",
        "trial_failed",
        "trials",
        "trials_done",
    )

    def __init__(self, settings: CircuitBreakerSettings) -> None:
        self.settings = settings
        size = max(1, int(settings.window))
        self._requests = [0] * size
        self._failures = [0] * size
        self._bucket = 0
        self._second = 0
        self.state = self.CLOSED
        self.opened_at = 0.0
        self.trials = 0
        self.trials_done = 0
        self.trial_failed = False

    def _advance(self, now: float) -> None:
        second = int(now)
        if second == self._second:
            return
        size = len(self._requests)
        steps = min(size, second - self._second)
        for _ in range(steps):
            self._bucket = (self._bucket + 1) % size
            self._requests[self._bucket] = 0
            self._failures[self._bucket] = 0
        self._second = second

    def allow(self, now: float) -> bool:
        """Whether a request may go to the upstream now."""
        state = self.state
        if state == self.CLOSED:
            return True
        if state == self.OPEN:
            if now - self.opened_at < self.settings.open_for:
                return False
            self.state = self.HALF_OPEN
            self.trials = 0
            self.trials_done = 0
            self.trial_failed = False
        if self.trials >= self.settings.half_open_requests:
            if now - self.opened_at < 2 * self.settings.open_for:
                return False
            # Trials that never came back with an outcome (the client left, no
            # endpoint was free): start a new round rather than stay half-open.
            self.opened_at = now - self.settings.open_for
            self.trials = 0
            self.trials_done = 0
        self.trials += 1
        return True

    def retry_after(self, now: float) -> int:
        """Seconds until the circuit lets a trial request through (at least 1)."""
        return max(1, int(self.settings.open_for - (now - self.opened_at) + 0.999))

    def record(self, ok: bool, now: float) -> None:
        """Count one finished exchange."""
        if self.state == self.HALF_OPEN:
            self.trials_done += 1
            if not ok:
                self._open(now)
            elif self.trials_done >= self.settings.half_open_requests:
                self.state = self.CLOSED
                self._requests = [0] * len(self._requests)
                self._failures = [0] * len(self._failures)
            return
        self._advance(now)
        self._requests[self._bucket] += 1
        if ok:
            return
        self._failures[self._bucket] += 1
        if self.state == self.CLOSED:
            requests = sum(self._requests)
            if (
                requests >= self.settings.min_requests
                and sum(self._failures) >= self.settings.failure_ratio * requests
            ):
                self._open(now)

    def _open(self, now: float) -> None:
        self.state = self.OPEN
        self.opened_at = now


class RetryBudget:
    """Retries may be at most ``ratio`` of requests, plus ``min_per_second`` retries
    a second: a token bucket that each request sent fills by ``ratio`` (credited by
    the worker's sweep every 100 ms) and each retry drains by one. It holds at most
    two seconds of the floor (at least 2 tokens) plus one second of ratio credit at the
    current request rate, so that a quiet period does not bank a retry storm: over any
    interval, retries <= ratio x requests + floor x seconds + that cap."""

    __slots__ = ("_base_cap", "_floor", "_ratio", "tokens")

    def __init__(self, settings: RetryBudgetSettings) -> None:
        self._ratio = settings.ratio
        self._floor = settings.min_per_second
        self._base_cap = max(2.0, 2 * self._floor)
        self.tokens = self._base_cap

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when the budget is spent."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def tick(self, seconds: float, requests: int) -> None:
        """Add ``ratio`` per request sent and the floor for ``seconds`` of time."""
        credit = self._ratio * requests
        cap = self._base_cap + (credit / seconds if seconds > 0 else credit)
        tokens = self.tokens + self._floor * seconds + credit
        self.tokens = tokens if tokens < cap else cap
