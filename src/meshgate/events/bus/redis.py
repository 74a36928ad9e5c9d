"""The Redis Streams bus (redis.asyncio): the second backend, for systems that run
Redis already and not NATS.

Each topic is one stream (key ``meshgate:events:<topic>``), each consumer group a
Redis consumer group that starts at the stream's beginning. A publish first sets a
dedupe key of the event id (``SET NX`` with the topic's duplicate window) and adds
the entry only when that was new, in one script, so that a relay publishing again
after a crash adds nothing inside the window. Deliveries that were not
acknowledged within ``ack_wait``, or were naked with a delay, are claimed again
(``XPENDING ... IDLE`` then ``XCLAIM``); a nak sets the entry's idle time so that it
becomes claimable after its delay. Streams are trimmed by ``max_age`` (``MINID``)
or ``max_msgs`` (``MAXLEN``) as entries are added. Dead letters are one stream.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from meshgate.events.bus.base import Bus, DeadLetter, Delivery, Subscription
from meshgate.events.errors import (
    BusUnavailableError,
    DeadLetterNotFoundError,
    MissingDependencyError,
)
from meshgate.events.settings import ConsumerSettings, TopicSettings

try:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError, ResponseError
except ImportError as _missing:
    raise MissingDependencyError(
        "the Redis event bus needs the redis package: pip install 'meshgate[redis]'"
    ) from _missing

__all__ = ["RedisBus"]

log = logging.getLogger("meshgate.events")

DEAD_LETTERS = "meshgate.dead-letters"

_PUBLISH = """
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then
  if ARGV[4] ~= '0' then
    return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'id', ARGV[1], 'data', ARGV[3])
  end
  if ARGV[5] ~= '0' then
    return redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[5], '*', 'id', ARGV[1], 'data', ARGV[3])
  end
  return redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'data', ARGV[3])
end
return false
"""
"""Add the entry unless its id was seen within the window; the entry id, or nil."""


def _mask(url: str) -> str:
    split = urlsplit(url)
    if split.password:
        host = f"{split.hostname}:{split.port}" if split.port else f"{split.hostname}"
        return urlunsplit(split._replace(netloc=f"{split.username or ''}:***@{host}"))
    return url


class _RedisDelivery(Delivery):
    __slots__ = ("attempt", "data", "entry", "sub", "topic")

    def __init__(self, sub: _RedisSubscription, entry: str, data: bytes, attempt: int) -> None:
        self.sub = sub
        self.topic = sub.topic
        self.entry = entry
        self.data = data
        self.attempt = attempt

    async def ack(self) -> None:
        await self.sub.bus.call("xack", self.sub.key, self.sub.group, self.entry)

    async def nak(self, delay: float) -> None:
        # Claimable again once idle for ack_wait: set the idle time so that this is
        # ``delay`` from now. JUSTID leaves the delivery count alone.
        idle = max(0, round((self.sub.settings.ack_wait - delay) * 1000))
        await self.sub.bus.call(
            "xclaim",
            self.sub.key,
            self.sub.group,
            self.sub.consumer,
            0,
            [self.entry],
            idle=idle,
            justid=True,
        )

    async def term(self) -> None:
        await self.ack()

    async def in_progress(self) -> None:
        await self.sub.bus.call(
            "xclaim",
            self.sub.key,
            self.sub.group,
            self.sub.consumer,
            0,
            [self.entry],
            idle=0,
            justid=True,
        )


class _RedisSubscription(Subscription):
    def __init__(self, bus: RedisBus, topic: str, group: str, settings: ConsumerSettings) -> None:
        self.bus = bus
        self.topic = topic
        self.group = group
        self.settings = settings
        self.key = bus.key(topic)
        self.consumer = f"{group}-{os.getpid()}-{os.urandom(3).hex()}"

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:
        ack_wait = round(self.settings.ack_wait * 1000)
        pending = await self.bus.call(
            "xpending_range", self.key, self.group, "-", "+", batch, idle=ack_wait
        )
        if pending:
            counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
            claimed = await self.bus.call(
                "xclaim", self.key, self.group, self.consumer, ack_wait, list(counts)
            )
            out: list[Delivery] = []
            for entry, fields in claimed or []:
                if fields is None:  # deleted by trimming meanwhile
                    await self.bus.call("xack", self.key, self.group, entry)
                    continue
                entry_id = _text(entry)
                out.append(
                    _RedisDelivery(self, entry_id, fields[b"data"], counts.get(entry_id, 0) + 1)
                )
            if out:
                return out
        block = max(1, round(timeout * 1000))
        read = await self.bus.call(
            "xreadgroup", self.group, self.consumer, {self.key: ">"}, count=batch, block=block
        )
        out = []
        for _stream, entries in read or []:
            for entry, fields in entries:
                out.append(_RedisDelivery(self, _text(entry), fields[b"data"], 1))
        return out

    async def pending(self) -> int | None:
        try:
            groups = await self.bus.call("xinfo_groups", self.key)
        except BusUnavailableError:
            return None
        for info in groups:
            if _text(info.get("name", b"")) == self.group:
                lag = info.get("lag")
                return int(info.get("pending", 0)) + (int(lag) if lag is not None else 0)
        return None

    async def close(self) -> None:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBus(Bus):
    """Redis Streams at ``url`` (``redis://[user:password@]host:6379/0``, or
    ``rediss://`` with TLS; ``tls_ca``, ``tls_cert`` and ``tls_key`` are its files)."""

    kind = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "",
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.url = _mask(url)
        self.namespace = namespace
        options: dict[str, Any] = {
            "socket_connect_timeout": timeout,
            # Blocking reads wait up to their own timeout; this bounds the rest.
            "socket_timeout": timeout + 5.0,
            "health_check_interval": 15,
        }
        if url.startswith("rediss://"):
            options.update(ssl_ca_certs=tls_ca, ssl_certfile=tls_cert, ssl_keyfile=tls_key)
        try:
            self._client: Redis = Redis.from_url(url, **options)
        except ValueError as exc:
            raise BusUnavailableError(f"{self.url} is not a Redis URL: {exc}") from None
        self._publish = self._client.register_script(_PUBLISH)
        self._settings: dict[str, TopicSettings] = {}

    def key(self, topic: str) -> str:
        return f"meshgate:events:{self.subject(topic)}"

    async def call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """Run one redis-py command; errors become :class:`BusUnavailableError`."""
        try:
            return await getattr(self._client, command)(*args, **kwargs)
        except (RedisError, OSError) as exc:
            raise BusUnavailableError(
                f"Redis at {self.url}: {command} failed: {exc or type(exc).__name__}"
            ) from None

    async def connect(self) -> None:
        await self.check()

    async def close(self) -> None:
        await self._client.aclose()

    async def check(self) -> None:
        await self.call("ping")

    async def ensure_topic(self, topic: str, settings: TopicSettings) -> None:
        self._settings[topic] = settings

    async def publish(self, topic: str, data: bytes, *, msg_id: str) -> bool:
        settings = self._settings.get(topic) or TopicSettings()
        minid = "0"
        if settings.max_msgs is None:
            minid = f"{int((time.time() - settings.max_age) * 1000)}-0"
        try:
            added = await self._publish(
                keys=[self.key(topic), f"{self.key(topic)}:seen:{msg_id}"],
                args=[
                    msg_id,
                    round(settings.duplicate_window * 1000),
                    data,
                    settings.max_msgs or 0,
                    minid,
                ],
            )
        except (RedisError, OSError) as exc:
            raise BusUnavailableError(
                f"Redis at {self.url}: publishing to {topic!r} failed: {exc}"
            ) from None
        return added is not None

    async def subscribe(self, topic: str, group: str, settings: ConsumerSettings) -> Subscription:
        try:
            await self._client.xgroup_create(self.key(topic), group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise BusUnavailableError(f"Redis at {self.url}: {exc}") from None
        except (RedisError, OSError) as exc:
            raise BusUnavailableError(f"Redis at {self.url}: {exc}") from None
        return _RedisSubscription(self, topic, group, settings)

    # -- dead letters

    async def dead_letter(self, letter: DeadLetter) -> None:
        key = self.key(DEAD_LETTERS)
        seen = f"{key}:seen:{letter.event_id}:{letter.group}"
        if not await self.call("set", seen, "1", nx=True, ex=30 * 24 * 3600):
            return
        body = {
            "topic": letter.topic,
            "group": letter.group,
            "service": letter.service,
            "event_id": letter.event_id,
            "error": letter.error,
            "attempts": letter.attempts,
            "time": letter.time.isoformat(),
            "data": base64.b64encode(letter.data).decode(),
        }
        await self.call("xadd", key, {"body": json.dumps(body)})

    async def dead_letters(
        self, *, service: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        found: list[DeadLetter] = []
        start = "-"
        while len(found) < limit:
            entries = await self.call("xrange", self.key(DEAD_LETTERS), start, "+", count=200)
            if not entries:
                break
            for entry, fields in entries:
                letter = _letter(fields.get(b"body", b""), _text(entry))
                if letter is not None and (service is None or letter.service == service):
                    found.append(letter)
            last = _text(entries[-1][0])
            start = f"({last}"
            if len(entries) < 200:
                break
        return found[:limit]

    async def take_dead_letter(self, letter_id: str) -> DeadLetter:
        key = self.key(DEAD_LETTERS)
        missing = DeadLetterNotFoundError(
            f"no dead letter {letter_id!r} on Redis at {self.url}; list them with "
            "`meshgate events dead-letters`"
        )
        try:
            entries = await self.call("xrange", key, letter_id, letter_id)
        except BusUnavailableError as exc:
            if "Invalid stream ID" in str(exc):
                raise missing from None
            raise
        if not entries:
            raise missing
        letter = _letter(entries[0][1].get(b"body", b""), letter_id)
        await self.call("xdel", key, letter_id)
        if letter is None:
            raise missing
        return letter


def _letter(body: bytes, letter_id: str) -> DeadLetter | None:
    try:
        doc = json.loads(body)
        return DeadLetter(
            topic=doc["topic"],
            group=doc["group"],
            service=doc["service"],
            event_id=doc["event_id"],
            data=base64.b64decode(doc["data"]),
            error=doc["error"],
            attempts=int(doc["attempts"]),
            id=letter_id,
            time=datetime.fromisoformat(doc["time"]).astimezone(UTC),
        )
    except (ValueError, KeyError, TypeError):
        log.warning("dead letter %s is not one meshgate wrote; left alone", letter_id)
        return None
