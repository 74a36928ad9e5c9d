"""The in-memory bus, for unit tests of services (re-exported, and only documented,
as :class:`meshgate.service.testing.MemoryBus`): the same contract as the real
buses, in one process, with nothing kept. Never for production: it is not shared
between processes and forgets everything when the process ends."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from meshgate.events.bus.base import Bus, DeadLetter, Delivery, Subscription
from meshgate.events.errors import DeadLetterNotFoundError, PublishError
from meshgate.events.settings import ConsumerSettings, TopicSettings

__all__ = ["MemoryBus"]


@dataclass
class _Group:
    settings: ConsumerSettings
    next: int = 0
    """Index of the next entry never delivered."""
    inflight: dict[int, float] = field(default_factory=dict)
    """Entry index -> when it may be delivered again (ack wait, or a nak's delay)."""
    attempts: dict[int, int] = field(default_factory=dict)


@dataclass
class _Topic:
    settings: TopicSettings
    entries: list[bytes] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)
    groups: dict[str, _Group] = field(default_factory=dict)


class _MemoryDelivery(Delivery):
    def __init__(self, bus: MemoryBus, topic: str, group: _Group, index: int) -> None:
        self.bus = bus
        self.topic = topic
        self.group = group
        self.index = index
        self.data = bus._topics[topic].entries[index]
        self.attempt = group.attempts[index]

    async def ack(self) -> None:
        self.group.inflight.pop(self.index, None)
        self.bus._changed()

    async def nak(self, delay: float) -> None:
        if self.index in self.group.inflight:
            self.group.inflight[self.index] = time.monotonic() + delay
            self.bus._wake_later(delay)

    async def term(self) -> None:
        await self.ack()

    async def in_progress(self) -> None:
        if self.index in self.group.inflight:
            self.group.inflight[self.index] = time.monotonic() + self.group.settings.ack_wait


class _MemorySubscription(Subscription):
    def __init__(self, bus: MemoryBus, topic: str, group: str) -> None:
        self.bus = bus
        self.topic = topic
        self.group = group

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            got = self._take(batch)
            if got:
                return got
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            self.bus._event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.05)):
                    await self.bus._event.wait()

    def _take(self, batch: int) -> list[Delivery]:
        topic = self.bus._topics[self.topic]
        group = topic.groups[self.group]
        now = time.monotonic()
        out: list[Delivery] = []
        for index, due in sorted(group.inflight.items()):
            if len(out) >= batch:
                break
            if due <= now:
                group.attempts[index] += 1
                group.inflight[index] = now + group.settings.ack_wait
                out.append(_MemoryDelivery(self.bus, self.topic, group, index))
        while len(out) < batch and group.next < len(topic.entries):
            index = group.next
            group.next += 1
            group.attempts[index] = 1
            group.inflight[index] = now + group.settings.ack_wait
            out.append(_MemoryDelivery(self.bus, self.topic, group, index))
        return out

    async def pending(self) -> int | None:
        topic = self.bus._topics[self.topic]
        group = topic.groups[self.group]
        return len(topic.entries) - group.next + len(group.inflight)

    async def close(self) -> None:
        return None


class MemoryBus(Bus):
    """An event bus in this process's memory, for unit tests: publish, consumer
    groups with acks, naks with delays and redeliveries, dedupe of message ids, dead
    letters. :meth:`idle` tells when every group has acknowledged everything."""

    kind = "memory"

    def __init__(self, namespace: str = "") -> None:
        self.url = "memory://"
        self.namespace = namespace
        self._topics: dict[str, _Topic] = {}
        self._letters: list[DeadLetter] = []
        self._next_letter = 1
        self._event = asyncio.Event()

    def _changed(self) -> None:
        self._event.set()

    def _wake_later(self, delay: float) -> None:
        asyncio.get_running_loop().call_later(max(0.0, delay), self._event.set)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def check(self) -> None:
        return None

    async def ensure_topic(self, topic: str, settings: TopicSettings) -> None:
        existing = self._topics.get(topic)
        if existing is None:
            self._topics[topic] = _Topic(settings)
        else:
            existing.settings = settings

    async def publish(self, topic: str, data: bytes, *, msg_id: str) -> bool:
        found = self._topics.get(topic)
        if found is None:
            raise PublishError(f"the memory bus has no topic {topic!r}: ensure_topic() first")
        now = time.monotonic()
        seen = found.seen.get(msg_id)
        if seen is not None and now - seen < found.settings.duplicate_window:
            return False
        found.seen[msg_id] = now
        found.entries.append(bytes(data))
        self._changed()
        return True

    async def subscribe(self, topic: str, group: str, settings: ConsumerSettings) -> Subscription:
        found = self._topics.get(topic)
        if found is None:
            raise PublishError(f"the memory bus has no topic {topic!r}: ensure_topic() first")
        found.groups.setdefault(group, _Group(settings))
        return _MemorySubscription(self, topic, group)

    async def dead_letter(self, letter: DeadLetter) -> None:
        if any(d.event_id == letter.event_id and d.group == letter.group for d in self._letters):
            return
        self._letters.append(
            DeadLetter(
                topic=letter.topic,
                group=letter.group,
                service=letter.service,
                event_id=letter.event_id,
                data=letter.data,
                error=letter.error,
                attempts=letter.attempts,
                id=str(self._next_letter),
                time=letter.time,
            )
        )
        self._next_letter += 1

    async def dead_letters(
        self, *, service: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        return [d for d in self._letters if service is None or d.service == service][:limit]

    async def take_dead_letter(self, letter_id: str) -> DeadLetter:
        for letter in self._letters:
            if letter.id == letter_id:
                self._letters.remove(letter)
                return letter
        raise DeadLetterNotFoundError(f"no dead letter {letter_id!r} on the memory bus")

    def published(self, topic: str) -> list[bytes]:
        """Every envelope published to ``topic`` (duplicates dropped), in order."""
        found = self._topics.get(topic)
        return list(found.entries) if found is not None else []

    def idle(self) -> bool:
        """Whether every group has acknowledged every event of its topic."""
        return all(
            group.next == len(topic.entries) and not group.inflight
            for topic in self._topics.values()
            for group in topic.groups.values()
        )
