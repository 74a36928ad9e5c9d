"""Settings of topics (the stream that keeps a topic's events) and of consumer
groups (how events are delivered to one group), with safe defaults.

Both are frozen and checked when made: a bad value is a
:class:`~meshgate.errors.ConfigError` naming the field and the fix, raised where the
topic or handler is declared, never while events flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from meshgate.errors import ConfigError, ConfigIssue

__all__ = ["ConsumerSettings", "TopicSettings"]

Retention = Literal["limits", "interest", "workqueue"]


def _bad(where: str, name: str, value: object, want: str) -> ConfigIssue:
    return ConfigIssue(f"{where}.{name}", f"got {value!r}; expected {want}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True, slots=True)
class TopicSettings:
    """How the bus keeps a topic's events (a JetStream stream; a Redis stream)."""

    max_age: float = 7 * 24 * 3600.0
    """Seconds an event is kept (7 days): consumers that are down longer miss events."""
    replicas: int = 1
    """Copies kept in a NATS cluster (1 to 5); a single server has 1."""
    retention: Retention = "limits"
    """``limits``: kept until ``max_age`` or a size limit, whoever reads it (every
    consumer group gets every event); ``interest``: dropped once every group acked it;
    ``workqueue``: one group only, dropped once acked."""
    storage: Literal["file", "memory"] = "file"
    """``file`` survives a broker restart; ``memory`` does not."""
    duplicate_window: float = 120.0
    """Seconds in which the bus drops a second publish of the same event id (the
    relay publishing again after a crash). The inbox covers what falls outside it."""
    max_bytes: int | None = None
    """A size limit of the stream in bytes; None: none (``max_age`` only)."""
    max_msgs: int | None = None
    """A limit of events kept; None: none."""

    def __post_init__(self) -> None:
        where = "TopicSettings"
        issues = []
        if not _number(self.max_age) or self.max_age <= 0:
            issues.append(_bad(where, "max_age", self.max_age, "seconds above 0"))
        if not isinstance(self.replicas, int) or not 1 <= self.replicas <= 5:
            issues.append(_bad(where, "replicas", self.replicas, "an integer from 1 to 5"))
        if self.retention not in ("limits", "interest", "workqueue"):
            issues.append(_bad(where, "retention", self.retention, "limits, interest or workqueue"))
        if self.storage not in ("file", "memory"):
            issues.append(_bad(where, "storage", self.storage, "file or memory"))
        if not _number(self.duplicate_window) or not 0 < self.duplicate_window <= self.max_age:
            issues.append(
                _bad(
                    where,
                    "duplicate_window",
                    self.duplicate_window,
                    "seconds above 0 and at most max_age",
                )
            )
        for name in ("max_bytes", "max_msgs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                issues.append(_bad(where, name, value, "a positive integer, or None"))
        if issues:
            raise ConfigError(issues, "topic settings")


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    """How a consumer group gets a topic's events (a JetStream durable pull
    consumer with explicit acks; a Redis consumer group)."""

    max_deliver: int = 5
    """Deliveries of one event before it goes to the dead letters with its last error."""
    ack_wait: float = 30.0
    """Seconds a delivery may stay unacknowledged (the handler running) before the bus
    delivers it again; a handler still working extends it."""
    backoff: tuple[float, ...] = (0.5, 2.0, 10.0, 30.0)
    """Seconds before the next delivery after a handler failed, by attempt (the last
    one repeats)."""
    max_ack_pending: int = 1000
    """Deliveries of the group in flight at most, across its instances."""
    batch: int = 100
    """Events an instance takes at once; one batch is handled in one transaction,
    each event under its own savepoint."""

    def __post_init__(self) -> None:
        where = "ConsumerSettings"
        issues = []
        if not isinstance(self.max_deliver, int) or self.max_deliver < 1:
            issues.append(_bad(where, "max_deliver", self.max_deliver, "an integer of at least 1"))
        if not _number(self.ack_wait) or self.ack_wait < 1:
            issues.append(_bad(where, "ack_wait", self.ack_wait, "seconds, at least 1"))
        if (
            not isinstance(self.backoff, tuple)
            or not self.backoff
            or not all(_number(b) and b >= 0 for b in self.backoff)
        ):
            issues.append(
                _bad(where, "backoff", self.backoff, "a non-empty tuple of seconds, 0 or more")
            )
        for name in ("max_ack_pending", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                issues.append(_bad(where, name, value, "an integer of at least 1"))
        if issues:
            raise ConfigError(issues, "consumer settings")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before delivery ``attempt + 1`` after delivery ``attempt`` failed."""
        return self.backoff[min(attempt, len(self.backoff)) - 1]
