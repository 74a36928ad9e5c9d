"""The one contract every event bus backend fulfils (NATS JetStream, Redis Streams,
and the in-memory bus of :mod:`meshgate.service.testing`).

A backend publishes envelope bytes to a topic with a message id the bus dedupes on,
delivers a topic's events to durable consumer groups with explicit acks and
delayed redelivery, and keeps dead letters. Everything above it (outbox relay,
inbox consumers, sagas, the CLI) speaks only this contract.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Self

from meshgate.events.settings import ConsumerSettings, TopicSettings

__all__ = ["Bus", "DeadLetter", "Delivery", "Subscription"]


class Delivery(abc.ABC):
    """One delivery of one event to a consumer group."""

    topic: str
    """The topic it was published to."""
    data: bytes
    """The envelope."""
    attempt: int
    """1 the first time, then 2, 3... (as the bus counts deliveries)."""

    @abc.abstractmethod
    async def ack(self) -> None:
        """Done: never deliver it to this group again."""

    @abc.abstractmethod
    async def nak(self, delay: float) -> None:
        """Failed: deliver it again after ``delay`` seconds."""

    @abc.abstractmethod
    async def term(self) -> None:
        """Give up: never deliver it again (it went to the dead letters)."""

    @abc.abstractmethod
    async def in_progress(self) -> None:
        """Still working: restart the ack timer."""


class Subscription(abc.ABC):
    """A consumer group's durable subscription to one topic."""

    topic: str
    group: str

    @abc.abstractmethod
    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:
        """Up to ``batch`` deliveries, waiting up to ``timeout`` seconds for the first;
        an empty list when none came.

        Raises:
            BusUnavailableError: the bus is not reachable.
        """

    @abc.abstractmethod
    async def pending(self) -> int | None:
        """Events of the topic this group has not acknowledged yet (its lag), when the
        bus can tell."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop receiving (the group's position stays on the bus)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event a consumer group gave up on, with why."""

    topic: str
    """Where it was published."""
    group: str
    """The consumer group that failed it."""
    service: str
    """The service of that group."""
    event_id: str
    """The event's id."""
    data: bytes
    """Its envelope, as published."""
    error: str
    """The handler's last error."""
    attempts: int
    """Deliveries tried."""
    id: str = ""
    """The dead letter's id on the bus (what ``meshgate events replay`` takes)."""
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    """When it was dead-lettered."""


class Bus(abc.ABC):
    """An event bus: connect once, then publish, subscribe and keep dead letters.

    ``namespace`` (optional) is put in front of every topic on the bus, so that several
    systems (or tests) can share one broker.
    """

    kind: str
    """``nats``, ``redis`` or ``memory``."""
    url: str
    """Where it is, with any password masked (for messages and readiness)."""
    namespace: str

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect (reconnects happen by themselves afterwards).

        Raises:
            BusUnavailableError: the bus cannot be reached.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; safe to call twice."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Return when the bus answers; raise :class:`BusUnavailableError` saying why not."""

    @abc.abstractmethod
    async def ensure_topic(self, topic: str, settings: TopicSettings) -> None:
        """Make sure the topic's stream exists with ``settings`` (updated if it differs).

        Raises:
            BusUnavailableError: the bus cannot be reached.
            PublishError: the bus refused the settings.
        """

    @abc.abstractmethod
    async def publish(self, topic: str, data: bytes, *, msg_id: str) -> bool:
        """Publish ``data`` and wait for the bus to have stored it. Returns False when
        the bus dropped it as a duplicate of ``msg_id`` (it was stored before).

        Raises:
            BusUnavailableError: the bus cannot be reached (nothing may have been stored).
            PublishError: the bus refused it.
        """

    @abc.abstractmethod
    async def subscribe(self, topic: str, group: str, settings: ConsumerSettings) -> Subscription:
        """The durable subscription of ``group`` to ``topic`` (made on first use; its
        position is kept on the bus). The topic's stream must exist.

        Raises:
            BusUnavailableError: the bus cannot be reached.
        """

    @abc.abstractmethod
    async def dead_letter(self, letter: DeadLetter) -> None:
        """Keep ``letter`` in the dead letters (once per event and group)."""

    @abc.abstractmethod
    async def dead_letters(
        self, *, service: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        """The dead letters, oldest first, of one service or of all."""

    @abc.abstractmethod
    async def take_dead_letter(self, letter_id: str) -> DeadLetter:
        """Remove the dead letter ``letter_id`` and return it.

        Raises:
            DeadLetterNotFoundError: there is none with that id.
        """

    def subject(self, topic: str) -> str:
        """The name of ``topic`` on the bus (with the namespace in front)."""
        return f"{self.namespace}.{topic}" if self.namespace else topic

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
