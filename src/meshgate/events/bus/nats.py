"""The NATS JetStream bus (nats-py): the default, embedded by ``meshgate up`` or a
cluster of your own.

Each topic is one stream (``orders.placed`` -> stream ``orders__placed``, subject
``orders.placed``; with a namespace ``ns``: ``ns__orders__placed`` and
``ns.orders.placed``). Publishes carry ``Nats-Msg-Id`` (the event id), so that
JetStream drops a second publish of one event inside the stream's duplicate
window. Each consumer group is a durable pull consumer with explicit acks; failed
deliveries come back after a delay given with the nak. Dead letters are one
stream, ``meshgate__dead-letters``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from meshgate.events.bus.base import Bus, DeadLetter, Delivery, Subscription
from meshgate.events.envelope import stream_name
from meshgate.events.errors import (
    BusUnavailableError,
    DeadLetterNotFoundError,
    MissingDependencyError,
    PublishError,
)
from meshgate.events.settings import ConsumerSettings, TopicSettings

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext, api
except ImportError as _missing:  # pragma: no cover - nats-py is a dependency of meshgate
    raise MissingDependencyError(
        "the NATS event bus needs the nats-py package: pip install nats-py"
    ) from _missing

__all__ = ["NatsBus", "TlsFiles"]

log = logging.getLogger("meshgate.events")

DEAD_LETTERS = "meshgate.dead-letters"
"""The topic of the dead-letter stream (under the namespace)."""
_REQUEST_TIMEOUT = 5.0
_MSG_ID = "Nats-Msg-Id"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """TLS to the broker: the CA that signed its certificate, and this client's own
    certificate and key when the broker asks for one (mutual TLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def context(self) -> ssl.SSLContext:
        """An SSL context for these files.

        Raises:
            BusUnavailableError: a file cannot be read (named, with the reason).
        """
        try:
            context = ssl.create_default_context(cafile=self.ca)
            if self.cert is not None:
                context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise BusUnavailableError(
                f"cannot use the NATS TLS files (ca={self.ca}, cert={self.cert}, "
                f"key={self.key}): {exc}"
            ) from None
        return context


def _mask(url: str) -> str:
    parts = []
    for one in url.split(","):
        split = urlsplit(one.strip())
        shown = one.strip()
        if split.password:
            netloc = f"{split.username}:***@{split.hostname}" + (
                f":{split.port}" if split.port else ""
            )
            shown = urlunsplit(split._replace(netloc=netloc))
        parts.append(shown)
    return ",".join(parts)


def _unavailable(where: str, exc: BaseException) -> BusUnavailableError:
    reason = str(exc) or type(exc).__name__
    return BusUnavailableError(f"NATS at {where}: {reason}")


class _NatsDelivery(Delivery):
    __slots__ = ("attempt", "data", "msg", "topic")

    def __init__(self, topic: str, msg: Msg) -> None:
        self.topic = topic
        self.msg = msg
        self.data = msg.data
        try:
            self.attempt = msg.metadata.num_delivered
        except (ValueError, IndexError):  # pragma: no cover - not a JetStream message
            self.attempt = 1

    async def ack(self) -> None:
        await self.msg.ack()

    async def nak(self, delay: float) -> None:
        await self.msg.nak(delay=delay if delay > 0 else None)

    async def term(self) -> None:
        await self.msg.term()

    async def in_progress(self) -> None:
        await self.msg.in_progress()


class _NatsSubscription(Subscription):
    def __init__(
        self, bus: NatsBus, topic: str, group: str, sub: JetStreamContext.PullSubscription
    ) -> None:
        self.bus = bus
        self.topic = topic
        self.group = group
        self.sub = sub

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:
        try:
            msgs = await self.sub.fetch(batch, timeout=timeout)
        except (nats.errors.TimeoutError, TimeoutError):
            # nats-py raises the plain one too when its deadline ran out between its
            # two pull requests: nothing came either way.
            return []
        except (nats.errors.ConnectionClosedError, nats.errors.NoServersError) as exc:
            raise _unavailable(self.bus.url, exc) from None
        except nats.js.errors.APIError as exc:
            # The consumer was deleted behind our back (the stream was recreated):
            # the bus makes it again on the next subscribe.
            raise BusUnavailableError(
                f"NATS at {self.bus.url}: fetching for group {self.group!r} of "
                f"{self.topic!r} failed: {exc}"
            ) from None
        return [_NatsDelivery(self.topic, m) for m in msgs]

    async def pending(self) -> int | None:
        try:
            info = await self.sub.consumer_info()
        except (TimeoutError, nats.errors.Error):
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def close(self) -> None:
        with contextlib.suppress(nats.errors.Error, ValueError):  # gone with the connection
            await self.sub.unsubscribe()


class NatsBus(Bus):
    """NATS JetStream at ``url`` (``nats://host:4222``, ``tls://...``, several
    separated by commas; ``nats://user:password@host`` for a password).

    ``credentials`` is a NATS ``.creds`` file (JWT and NKey seed), ``tls`` the CA
    and client certificate files.
    """

    kind = "nats"

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        namespace: str = "",
        credentials: str | None = None,
        tls: TlsFiles | None = None,
        name: str | None = None,
        connect_timeout: float = 2.0,
    ) -> None:
        self._servers = [u.strip() for u in url.split(",") if u.strip()]
        self.url = _mask(url)
        self.namespace = namespace
        self.credentials = credentials
        self.tls = tls
        self.name = name
        self.connect_timeout = connect_timeout
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._known: dict[str, TopicSettings] = {}
        self._lock = asyncio.Lock()

    # -- connection

    async def connect(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            return
        options: dict[str, Any] = {
            "servers": self._servers,
            "name": self.name,
            "connect_timeout": max(1, round(self.connect_timeout)),
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if self.credentials is not None:
            if not Path(self.credentials).is_file():  # noqa: ASYNC240 - once, at connect
                raise BusUnavailableError(
                    f"the NATS credentials file {self.credentials} does not exist; give the "
                    ".creds file of a NATS user (nsc generate creds)"
                )
            options["user_credentials"] = self.credentials
        if self.tls is not None:
            options["tls"] = self.tls.context()
        # The first connection must succeed: a wrong URL is reported now rather than
        # retried for ever (nats-py retries the first connect as it does reconnects).
        # Later losses are reconnected by nats-py.
        await self._reachable()
        try:
            self._nc = await nats.connect(**options)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise _unavailable(self.url, exc) from None
        self._js = self._nc.jetstream(timeout=_REQUEST_TIMEOUT)

    async def _reachable(self) -> None:
        """Return when one of the servers accepts TCP connections."""
        last: BaseException | None = None
        for server in self._servers:
            split = urlsplit(server if "://" in server else f"nats://{server}")
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, writer = await asyncio.open_connection(
                        split.hostname or "127.0.0.1", split.port or 4222
                    )
            except (OSError, TimeoutError) as exc:
                last = exc
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        raise _unavailable(self.url, last or OSError("no server given"))

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError):
                await nc.close()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS at %s: %s", self.url, exc)

    async def _on_disconnected(self) -> None:
        if self._nc is None or self._nc.is_closed:
            return  # closed on purpose
        log.warning("lost the connection to NATS at %s; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS at %s", self.url)

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BusUnavailableError(f"not connected to NATS at {self.url}: call connect() first")
        return self._js

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def check(self) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise BusUnavailableError(f"not connected to NATS at {self.url} (reconnecting)")
        try:
            await self.js.account_info()
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable(self.url, exc) from None

    # -- topics

    def _stream_config(self, topic: str, settings: TopicSettings) -> api.StreamConfig:
        subject = self.subject(topic)
        return api.StreamConfig(
            name=stream_name(subject),
            subjects=[subject],
            retention=api.RetentionPolicy(settings.retention),
            storage=api.StorageType(settings.storage),
            max_age=settings.max_age,
            num_replicas=settings.replicas,
            duplicate_window=settings.duplicate_window,
            max_bytes=settings.max_bytes if settings.max_bytes is not None else -1,
            max_msgs=settings.max_msgs if settings.max_msgs is not None else -1,
        )

    async def ensure_topic(self, topic: str, settings: TopicSettings) -> None:
        if self._known.get(topic) == settings:
            return
        config = self._stream_config(topic, settings)
        name = config.name or ""
        try:
            try:
                info = await self.js.stream_info(name)
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(config)
            else:
                if _differs(info.config, config):
                    await self.js.update_stream(config)
        except nats.js.errors.APIError as exc:
            raise PublishError(
                f"NATS at {self.url} refused the stream {name} of topic {topic!r}: "
                f"{exc.description or exc}"
            ) from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable(self.url, exc) from None
        self._known[topic] = settings

    # -- publishing

    async def publish(self, topic: str, data: bytes, *, msg_id: str) -> bool:
        try:
            ack = await self.js.publish(self.subject(topic), data, headers={_MSG_ID: msg_id})
        except nats.js.errors.NoStreamResponseError:
            raise PublishError(
                f"NATS at {self.url} has no stream for topic {topic!r}: declare the topic "
                "(events.topic(...)) or let the relay make its stream"
            ) from None
        except nats.js.errors.APIError as exc:
            raise PublishError(
                f"NATS at {self.url} refused an event of {topic!r}: {exc.description or exc}"
            ) from None
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise _unavailable(self.url, exc) from None
        return not ack.duplicate

    # -- consuming

    async def subscribe(self, topic: str, group: str, settings: ConsumerSettings) -> Subscription:
        subject = self.subject(topic)
        stream = stream_name(subject)
        config = api.ConsumerConfig(
            durable_name=group,
            name=group,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=settings.ack_wait,
            # meshgate counts deliveries and dead-letters itself: a limit here would
            # stop deliveries of an event whose last try died with its process.
            max_deliver=-1,
            max_ack_pending=settings.max_ack_pending,
            filter_subject=subject,
        )
        try:
            async with self._lock:
                try:
                    await self.js.add_consumer(stream, config)
                except nats.js.errors.BadRequestError as exc:
                    # Settings that cannot change on a live consumer (its filter): keep
                    # it as it is rather than lose its position.
                    log.warning(
                        "the consumer %s of stream %s keeps its settings: %s",
                        group,
                        stream,
                        exc.description,
                    )
            sub = await self.js.pull_subscribe_bind(durable=group, stream=stream)
        except nats.js.errors.NotFoundError:
            raise PublishError(
                f"NATS at {self.url} has no stream for topic {topic!r} (stream {stream}): "
                "declare the topic so that its stream is made"
            ) from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable(self.url, exc) from None
        return _NatsSubscription(self, topic, group, sub)

    # -- dead letters

    def _dead_stream(self) -> str:
        return stream_name(self.subject(DEAD_LETTERS))

    async def _ensure_dead_letters(self) -> None:
        settings = TopicSettings(max_age=30 * 24 * 3600.0)
        config = self._stream_config(DEAD_LETTERS, settings)
        config.subjects = [f"{self.subject(DEAD_LETTERS)}.>"]
        try:
            try:
                await self.js.stream_info(config.name or "")
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(config)
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable(self.url, exc) from None

    async def dead_letter(self, letter: DeadLetter) -> None:
        await self._ensure_dead_letters()
        body = json.dumps(
            {
                "topic": letter.topic,
                "group": letter.group,
                "service": letter.service,
                "event_id": letter.event_id,
                "error": letter.error,
                "attempts": letter.attempts,
                "time": letter.time.isoformat(),
                "data": base64.b64encode(letter.data).decode(),
            }
        ).encode()
        subject = f"{self.subject(DEAD_LETTERS)}.{letter.group}"
        try:
            await self.js.publish(
                subject, body, headers={_MSG_ID: f"{letter.event_id}:{letter.group}"}
            )
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable(self.url, exc) from None

    async def dead_letters(
        self, *, service: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        stream = self._dead_stream()
        found: list[DeadLetter] = []
        seq = 1
        try:
            try:
                info = await self.js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                return []  # none yet (the stream is made with the first)
            seq = max(1, int(info.state.first_seq))
            last = int(info.state.last_seq)
            while seq <= last and len(found) < limit:
                try:
                    raw = await self.js.get_msg(
                        stream, seq, subject=f"{self.subject(DEAD_LETTERS)}.>", next=True
                    )
                except nats.js.errors.NotFoundError:
                    break
                letter = _letter(raw.data or b"", str(raw.seq))
                if letter is not None and (service is None or letter.service == service):
                    found.append(letter)
                seq = int(raw.seq or seq) + 1
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable(self.url, exc) from None
        return found

    async def take_dead_letter(self, letter_id: str) -> DeadLetter:
        stream = self._dead_stream()
        missing = DeadLetterNotFoundError(
            f"no dead letter {letter_id!r} on NATS at {self.url}; list them with "
            "`meshgate events dead-letters`"
        )
        if not letter_id.isdigit():
            raise missing
        try:
            raw = await self.js.get_msg(stream, int(letter_id))
            letter = _letter(raw.data or b"", letter_id)
            await self.js.delete_msg(stream, int(letter_id))
        except nats.js.errors.NotFoundError:
            raise missing from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable(self.url, exc) from None
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


def _differs(current: api.StreamConfig, wanted: api.StreamConfig) -> bool:
    def close(a: float | None, b: float | None) -> bool:
        return abs((a or 0) - (b or 0)) < 1e-3

    return not (
        current.retention == wanted.retention
        and current.storage == wanted.storage
        and close(current.max_age, wanted.max_age)
        and close(current.duplicate_window, wanted.duplicate_window)
        and current.num_replicas == wanted.num_replicas
        and (current.max_bytes or -1) == (wanted.max_bytes or -1)
        and (current.max_msgs or -1) == (wanted.max_msgs or -1)
        and list(current.subjects or []) == list(wanted.subjects or [])
    )
