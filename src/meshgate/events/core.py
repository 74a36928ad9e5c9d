"""``Events``: one service's outbox, relay, consumers (and sagas), on its database
and one event bus.

::

    events = Events(database, service="orders")          # the bus from MESHGATE_EVENTS_URL

    @events.on("payments.charged", group="orders")
    async def charged(event: Event, session: AsyncSession) -> None: ...

    async with database.session() as session:
        session.add(order)
        await events.publish(session, "orders.placed", OrderPlaced(...), key=str(order.id))

A :class:`~meshgate.service.Service` makes one for you (``service.events``) and
starts and stops it with the service; see docs/events.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from meshgate.data.database import Database
from meshgate.errors import ConfigError, ConfigIssue
from meshgate.events.bus import connect_bus
from meshgate.events.bus.base import Bus
from meshgate.events.envelope import Event, check_topic
from meshgate.events.errors import BusUnavailableError
from meshgate.events.inbox import Consumer, Handler, check_group
from meshgate.events.metrics import EventMetrics
from meshgate.events.outbox import Lag, Outbox, Relay, instance_name, stop_task
from meshgate.events.saga import Saga
from meshgate.events.sagas import SagaRunner
from meshgate.events.schema import DEFAULT_PREFIX, PARTITIONS, EventTables
from meshgate.events.settings import ConsumerSettings, TopicSettings

__all__ = ["DEFAULT_URL", "Events", "bus_from_env"]

log = logging.getLogger("meshgate.events")

H = TypeVar("H", bound=Handler)

DEFAULT_URL = "nats://127.0.0.1:4222"
"""The bus when neither an argument nor ``MESHGATE_EVENTS_URL`` names one."""


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value or None


def bus_from_env(*, name: str | None = None, url: str | None = None) -> Bus:
    """The bus the environment names: ``MESHGATE_EVENTS_URL`` (default
    :data:`DEFAULT_URL`), ``MESHGATE_EVENTS_NAMESPACE``,
    ``MESHGATE_EVENTS_CREDENTIALS`` and ``MESHGATE_EVENTS_TLS_CA`` / ``_CERT`` /
    ``_KEY`` (``meshgate up`` sets them)."""
    return connect_bus(
        url or _env("MESHGATE_EVENTS_URL") or DEFAULT_URL,
        namespace=_env("MESHGATE_EVENTS_NAMESPACE") or "",
        credentials=_env("MESHGATE_EVENTS_CREDENTIALS"),
        tls_ca=_env("MESHGATE_EVENTS_TLS_CA"),
        tls_cert=_env("MESHGATE_EVENTS_TLS_CERT"),
        tls_key=_env("MESHGATE_EVENTS_TLS_KEY"),
        name=name,
    )


class Events:
    """A service's events on ``database`` and ``bus``; see the module docstring.

    Args:
        database: the service's database, where the outbox, inbox and saga tables
            are (needed to publish, consume and run sagas).
        service: the service's name (the events' ``source``, metrics labels).
        bus: a :class:`~meshgate.events.bus.base.Bus`, a URL, or None for the
            environment's (:func:`bus_from_env`).
        table_prefix: what the names of the event tables start with.
        registry: where the metrics go (a service passes its own).
        relay: whether this instance runs an outbox relay.
        outbox_retention: seconds sent outbox rows are kept before they are deleted.
        inbox_retention: seconds inbox rows are kept; keep it at least as long as the
            topics' ``max_age``, so that any redelivery or replay is still recognised.
        poll_interval: seconds between the relay's looks at the outbox when no local
            commit woke it (rows of other instances, rows left by a crash).
        relay_batch: outbox rows a relay round takes at most.
        saga_lease: seconds an instance holds a saga it drives; another instance
            takes over a saga whose lease ran out (its driver died).
    """

    def __init__(
        self,
        database: Database | None,
        *,
        service: str,
        bus: Bus | str | None = None,
        table_prefix: str = DEFAULT_PREFIX,
        registry: CollectorRegistry | None = None,
        relay: bool = True,
        outbox_retention: float = 3600.0,
        inbox_retention: float = 7 * 24 * 3600.0,
        poll_interval: float = 0.5,
        relay_batch: int = 500,
        saga_lease: float = 10.0,
    ) -> None:
        self.database = database
        self.service = service
        self._bus_arg = bus
        self._bus: Bus | None = bus if isinstance(bus, Bus) else None
        self.tables = EventTables(table_prefix)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = EventMetrics.make(self.registry)
        self.instance = instance_name(service)
        self._topics: dict[str, TopicSettings] = {}
        self.consumers: list[Consumer] = []
        self.outbox = Outbox(self.tables, service, on_commit=self._committed)
        self.relay: Relay | None = None
        self._relay_wanted = relay
        self._relay_options: dict[str, Any] = {
            "retention": outbox_retention,
            "inbox_retention": inbox_retention,
            "poll_interval": poll_interval,
            "batch": relay_batch,
        }
        self._starting: asyncio.Task[None] | None = None
        self._started = False
        self._sagas: SagaRunner | None = None
        self._saga_options: dict[str, Any] = {"lease": saga_lease}
        self._started_sagas = False
        self._hooks: list[tuple[Callable[[], Any], Callable[[], Any]]] = []
        """(start, stop) of parts added on top (the saga runner)."""

    # -- declaring

    @property
    def bus(self) -> Bus:
        """The bus (made from the URL or the environment on first use)."""
        if self._bus is None:
            url = self._bus_arg if isinstance(self._bus_arg, str) else None
            self._bus = bus_from_env(name=self.instance, url=url)
        return self._bus

    def use_bus(self, bus: Bus) -> None:
        """Use ``bus`` instead of the environment's (before :meth:`start`; tests give
        a :class:`meshgate.service.testing.MemoryBus`)."""
        if self._starting is not None:
            raise RuntimeError("use_bus() must come before the events start")
        self._bus = bus
        for consumer in self.consumers:
            consumer.bus = bus

    def topic(self, name: str, settings: TopicSettings | None = None, **fields: Any) -> None:
        """Declare the settings of a topic's stream (retention, replicas, max age,
        duplicate window...); topics not declared get :class:`TopicSettings`'s
        defaults. ``events.topic("orders.placed", max_age=86400)`` works too."""
        check_topic(name)
        if settings is None:
            settings = TopicSettings(**fields)
        elif fields:
            raise ConfigError([ConfigIssue(name, "give settings or fields, not both")])
        self._topics[name] = settings

    def topic_settings(self, name: str) -> TopicSettings:
        """The settings of ``name``'s stream (declared, or the defaults)."""
        return self._topics.get(name) or TopicSettings()

    def on(
        self,
        topic: str,
        *,
        group: str | None = None,
        settings: ConsumerSettings | None = None,
        model: type[BaseModel] | None = None,
        **fields: Any,
    ) -> Callable[[H], H]:
        """Declare a handler of ``topic`` for consumer ``group`` (default: the service's
        name), a decorator::

            @events.on("orders.placed", group="payments", model=OrderPlaced)
            async def charge(event: Event, session: AsyncSession) -> None: ...

        The handler runs once per event (the inbox records it in the handler's
        transaction); ``model`` validates ``event.data`` as that pydantic model
        first. ``settings`` (or its fields: ``max_deliver=``, ``backoff=``...) tune
        the delivery.

        Raises:
            ConfigError: a bad topic or group name, no database, or the same group
                declared twice on one topic.
        """
        check_topic(topic)
        group = check_group(group or self.service.replace(".", "-"))
        if settings is None:
            settings = ConsumerSettings(**fields)
        elif fields:
            raise ConfigError([ConfigIssue(topic, "give settings or fields, not both")])
        if self.database is None:
            raise ConfigError(
                [
                    ConfigIssue(
                        f"on({topic!r})",
                        f"service {self.service!r} has no database: the inbox that applies "
                        "each event once lives in it; give the service a Database",
                    )
                ]
            )
        for existing in self.consumers:
            if existing.topic == topic and existing.group == group:
                raise ConfigError(
                    [
                        ConfigIssue(
                            f"on({topic!r})",
                            f"group {group!r} already handles {topic!r} in "
                            f"{self.service!r}; one handler per topic and group",
                        )
                    ]
                )
        database = self.database

        def register(handler: H) -> H:
            consumer = Consumer(
                database,
                self._bus,
                self.tables,
                topic=topic,
                group=group,
                handler=handler,
                service=self.service,
                metrics=self.metrics,
                settings=settings,
                topic_settings=self.topic_settings(topic),
                model=model,
            )
            self.consumers.append(consumer)
            if self._started:
                consumer.start()
            return handler

        return register

    @property
    def sagas(self) -> SagaRunner:
        """What drives this service's sagas (made on first use)."""
        if self._sagas is None:
            self._sagas = SagaRunner(
                self._need_database("sagas"),
                self.tables,
                service=self.service,
                metrics=self.metrics,
                instance=self.instance,
                **self._saga_options,
            )
        return self._sagas

    def saga(self, saga: Saga) -> Saga:
        """Drive ``saga`` in this service (its ``start`` works from then on): state in
        this service's database, resumed here or by another instance after a crash."""
        self.sagas.register(saga)
        if self._started_sagas:
            self.sagas.start_background()
        return saga

    def add_part(self, start: Callable[[], Any], stop: Callable[[], Any]) -> None:
        """Start and stop something with the events (the saga runner)."""
        self._hooks.append((start, stop))

    # -- publishing

    async def publish(
        self,
        session: AsyncSession | AsyncConnection,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        event_id: str | None = None,
    ) -> Event:
        """Publish in the transaction of ``session`` (see :meth:`Outbox.publish`):
        the event is committed with the business rows, or not at all."""
        return await self.outbox.publish(session, topic, payload, key=key, event_id=event_id)

    def _committed(self) -> None:
        if self.relay is not None:
            self.relay.wake()

    # -- tables

    async def create_tables(self) -> None:
        """Make the event tables that do not exist yet, with the outbox partitions
        (tests and development; deployments run the migrations:
        :func:`meshgate.events.migrations.upgrade`)."""
        database = self._need_database("create_tables")
        await database.create_all(self.tables.metadata)
        from sqlalchemy import select  # noqa: PLC0415

        async with database.connection() as conn:
            have = set((await conn.execute(select(self.tables.partitions.c.part))).scalars().all())
            missing = [{"part": n} for n in range(PARTITIONS) if n not in have]
            if missing:
                await conn.execute(self.tables.partitions.insert(), missing)

    async def drop_tables(self) -> None:
        """Drop the event tables (tests)."""
        await self._need_database("drop_tables").drop_all(self.tables.metadata)

    def _need_database(self, what: str) -> Database:
        if self.database is None:
            raise ConfigError(
                [ConfigIssue(what, f"service {self.service!r} has no database for its events")]
            )
        return self.database

    # -- running

    async def start(self) -> None:
        """Connect to the bus and start the relay and the consumers. Returns at once:
        when the bus is not reachable yet, connecting goes on in the background (the
        outbox keeps what is published meanwhile)."""
        if self._starting is not None:
            return
        if self._sagas is not None:  # HTTP steps need no bus: sagas start at once
            self._sagas.start_background()
        self._started_sagas = True
        self._starting = asyncio.get_running_loop().create_task(
            self._connect_then_run(), name=f"meshgate-events-{self.service}"
        )

    async def _connect_then_run(self) -> None:
        delay = 0.2
        while True:
            try:
                await self.bus.connect()
                break
            except BusUnavailableError as exc:
                log.warning("%s: event bus not reachable yet (%s); retrying", self.service, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if self.database is not None and self._relay_wanted:
            self.relay = Relay(
                self.database,
                self.bus,
                self.tables,
                service=self.service,
                metrics=self.metrics,
                topics=self.topic_settings,
                instance=self.instance,
                **self._relay_options,
            )
            self.relay.start()
        for consumer in self.consumers:
            consumer.bus = self.bus
            consumer.start()
        for start, _ in self._hooks:
            await start()
        self._started = True

    async def wait_started(self, timeout: float = 10.0) -> None:
        """Return once the bus is connected and everything runs (tests)."""
        async with asyncio.timeout(timeout):
            while not self._started:
                if self._starting is None:
                    raise RuntimeError("Events.start() was not called")
                if self._starting.done():
                    self._starting.result()
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop the consumers (each finishes its batch), the relay and the bus
        connection. Safe to call twice."""
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            await stop_task(starting, grace=0.0)
        for _, stop in reversed(self._hooks):
            with contextlib.suppress(Exception):
                await stop()
        if self._sagas is not None:
            await self._sagas.stop()
        self._started_sagas = False
        await asyncio.gather(*(c.stop() for c in self.consumers))
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
        self._started = False
        if self._bus is not None:
            await self._bus.close()

    async def check(self) -> dict[str, Any]:
        """The readiness detail, as ``{"detail": ...}``: the bus, the relay's lag and
        each consumer's state. Passes while the bus is away (the outbox keeps events
        meanwhile); raises nothing."""
        detail: dict[str, Any] = {"bus": self.bus.url, "connected": False}
        try:
            await self.bus.check()
            detail["connected"] = True
        except BusUnavailableError as exc:
            detail["bus_error"] = str(exc)
        relay = self.relay
        if relay is not None:
            lag: Lag = relay.lag
            detail["outbox"] = {
                "pending": lag.pending,
                "oldest_seconds": round(lag.oldest_seconds, 3),
                "leading": relay.leading if relay.single_writer else None,
            }
            if relay.last_error:
                detail["outbox"]["error"] = relay.last_error
        if self._sagas is not None and self._sagas.sagas:
            detail["sagas"] = {
                "driving": len(self._sagas.active),
                **({"error": self._sagas.last_error} if self._sagas.last_error else {}),
            }
        if self.consumers:
            detail["consumers"] = {
                c.name: {"lag": c.lag, **({"error": c.last_error} if c.last_error else {})}
                for c in self.consumers
            }
        return {"detail": detail}
