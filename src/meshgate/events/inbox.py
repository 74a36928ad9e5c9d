"""The idempotent inbox: consumers that apply each event once.

A :class:`Consumer` is one consumer group's durable subscription to one topic. It
takes a batch of deliveries and handles them in one transaction of the service's
database, each under its own savepoint: the event's id goes into the inbox table
first (a redelivered event is found there and skipped), then the handler runs with
the same session, so the inbox row and the handler's writes commit together or not
at all. Deliveries are acknowledged only after the commit; a crash before it means
a redelivery, which the inbox turns into no second effect.

A handler that raises has its event delivered again after the group's backoff; at
``max_deliver`` deliveries the event goes to the dead letters with the last error.
A database that is down is not the handler's fault: those deliveries come back
later without counting towards the dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from meshgate.data.database import Database
from meshgate.data.errors import DatabaseUnavailableError, DataError, StatementTimeoutError
from meshgate.errors import ConfigError, ConfigIssue
from meshgate.events.bus.base import Bus, DeadLetter, Delivery, Subscription
from meshgate.events.envelope import Event
from meshgate.events.errors import BusUnavailableError, EnvelopeError, EventsError
from meshgate.events.metrics import EventMetrics
from meshgate.events.outbox import stop_task
from meshgate.events.schema import EventTables
from meshgate.events.settings import ConsumerSettings, TopicSettings
from meshgate.service.context import TraceContext, current_request_id, current_trace

__all__ = ["Consumer", "Handler", "check_group"]

log = logging.getLogger("meshgate.events")

Handler = Callable[..., Awaitable[Any]]
"""``async def handler(event, session)`` (or ``(event)`` without a session)."""

_INFRA = (DatabaseUnavailableError, StatementTimeoutError, BusUnavailableError)
_FETCH_WAIT = 1.0
_LAG_EVERY = 2.0


class _OneByOne(Exception):  # noqa: N818 - a signal between two methods, never raised out
    """The batch must be handled again one event at a time, under savepoints (but
    for the event whose handler failed, if one did: it is not run twice)."""

    def __init__(self, event_id: str | None = None, error: BaseException | None = None) -> None:
        super().__init__(event_id)
        self.event_id = event_id
        self.error = error


def check_group(group: str, where: str = "group") -> str:
    """``group`` if it is a valid consumer group name (letters, digits, ``-``, ``_``)."""
    ok = isinstance(group, str) and 0 < len(group) <= 100
    if ok and all(c.isalnum() or c in "-_" for c in group) and group[0].isalnum():
        return group
    raise ConfigError(
        [
            ConfigIssue(
                where,
                f"{group!r} is not a consumer group name; use letters, digits, '-' and "
                "'_', starting with a letter or digit, such as payments",
            )
        ]
    )


def _wants_session(handler: Handler) -> bool:
    params = [
        p
        for p in inspect.signature(handler).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(params) >= 2


class Consumer:
    """One consumer group's handler of one topic; see the module docstring."""

    def __init__(
        self,
        database: Database,
        bus: Bus | None,
        tables: EventTables,
        *,
        topic: str,
        group: str,
        handler: Handler,
        service: str,
        metrics: EventMetrics,
        settings: ConsumerSettings | None = None,
        topic_settings: TopicSettings | None = None,
        model: type[BaseModel] | None = None,
    ) -> None:
        self.database = database
        self.bus = bus
        self.tables = tables
        self.topic = topic
        self.group = check_group(group)
        self.handler = handler
        self.service = service
        self.settings = settings or ConsumerSettings()
        self.topic_settings = topic_settings or TopicSettings()
        self.model = model
        self._with_session = _wants_session(handler)
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.last_error: str | None = None
        self.lag: int | None = None
        labels = (service, topic, group)
        self._m_ok = metrics.handled.labels(*labels, "ok")
        self._m_dup = metrics.handled.labels(*labels, "duplicate")
        self._m_failed = metrics.handled.labels(*labels, "failed")
        self._m_dead = metrics.handled.labels(*labels, "dead")
        self._m_redelivered = metrics.redeliveries.labels(*labels)
        self._m_lag = metrics.consumer_lag.labels(*labels)
        self._m_duration = metrics.handler_duration.labels(*labels)
        self._m_latency = metrics.delivery_latency.labels(*labels)
        self._m_dead_letters = metrics.dead_letters.labels(*labels)

    @property
    def name(self) -> str:
        return f"{self.group}<-{self.topic}"

    # -- lifecycle

    def start(self) -> None:
        """Start consuming in the background (until :meth:`stop`)."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"meshgate-consumer-{self.name}"
            )

    async def stop(self, timeout: float = 5.0) -> None:
        """Finish the batch in hand (up to ``timeout`` seconds), then stop; what was
        not acknowledged is delivered again later."""
        task, self._task = self._task, None
        self._stopping = True
        if task is not None:
            await stop_task(task, grace=timeout)
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.close()

    async def subscription(self) -> Subscription:
        """The group's subscription (the topic's stream and the consumer are made
        on first use)."""
        if self._sub is None:
            if self.bus is None:
                raise BusUnavailableError(f"consumer {self.name} has no bus yet: start the events")
            await self.bus.ensure_topic(self.topic, self.topic_settings)
            self._sub = await self.bus.subscribe(self.topic, self.group, self.settings)
        return self._sub

    async def _run(self) -> None:
        backoff = 0.1
        next_lag = 0.0
        while not self._stopping:
            try:
                await self.run_once(_FETCH_WAIT)
                self.last_error = None
                backoff = 0.1
            except Exception as exc:
                reason = str(exc) or type(exc).__name__
                if not isinstance(exc, EventsError | DataError | sa_exc.SQLAlchemyError | OSError):
                    log.exception("consumer %s of %s hit a bug", self.name, self.service)
                if reason != self.last_error:
                    log.warning("consumer %s of %s: %s", self.name, self.service, reason)
                self.last_error = reason
                if isinstance(exc, BusUnavailableError):
                    sub, self._sub = self._sub, None
                    if sub is not None:
                        await sub.close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            now = time.monotonic()
            if now >= next_lag and self._sub is not None:
                next_lag = now + _LAG_EVERY
                self.lag = await self._sub.pending()
                if self.lag is not None:
                    self._m_lag.set(self.lag)

    # -- handling

    async def run_once(self, timeout: float = _FETCH_WAIT) -> int:
        """Fetch one batch (waiting up to ``timeout`` seconds for it) and handle it;
        returns how many deliveries came.

        Raises:
            BusUnavailableError: the bus cannot be reached.
        """
        sub = await self.subscription()
        deliveries = await sub.fetch(self.settings.batch, timeout)
        if deliveries:
            await self.handle(deliveries)
        return len(deliveries)

    async def handle(self, deliveries: list[Delivery]) -> None:
        """Handle one batch in one transaction; ack, nak or dead-letter each delivery.

        The common case takes one query to find the duplicates, one insert for the
        inbox rows, the handlers, and one commit. When a handler fails (or another
        instance records one of the events at the same time), the batch is rolled
        back and handled again, each event under its own savepoint, so that one
        failure undoes only its own writes.
        """
        events: list[tuple[Delivery, Event]] = []
        for delivery in deliveries:
            try:
                event = Event.decode(delivery.data, attempt=delivery.attempt)
                if self.model is not None:
                    event = dataclasses.replace(event, data=event.payload(self.model))
            except EnvelopeError as exc:
                await self._dead(delivery, _poison_id(delivery.data), str(exc))
                continue
            events.append((delivery, event))
            if event.attempt > 1:
                self._m_redelivered.inc()
            else:
                self._m_latency.observe(max(0.0, (datetime.now(UTC) - event.time).total_seconds()))
        if not events:
            return
        done: list[tuple[Delivery, bool]] = []  # (delivery, duplicate)
        failed: list[tuple[Delivery, Event, BaseException]] = []
        try:
            try:
                done = await self._all_at_once(events)
            except _OneByOne as one_by_one:
                done = []
                async with self.database.session() as session:
                    for delivery, event in events:
                        if event.id == one_by_one.event_id and one_by_one.error is not None:
                            failed.append((delivery, event, one_by_one.error))
                            continue
                        outcome = await self._apply(session, event)
                        if isinstance(outcome, BaseException):
                            failed.append((delivery, event, outcome))
                        else:
                            done.append((delivery, outcome is True))
        except (DataError, sa_exc.SQLAlchemyError, OSError) as exc:
            # The commit failed (or the database went away): nothing of the batch
            # is known to be applied. The inbox makes the redelivery safe even if
            # the commit did happen.
            for delivery, event in events:
                await self._retry(delivery, event, exc, infra=True)
            return
        for delivery, duplicate in done:
            (self._m_dup if duplicate else self._m_ok).inc()
            with contextlib.suppress(Exception):
                await delivery.ack()
        for delivery, event, error in failed:
            await self._retry(delivery, event, error, infra=isinstance(error, _INFRA))

    async def _all_at_once(
        self, events: list[tuple[Delivery, Event]]
    ) -> list[tuple[Delivery, bool]]:
        """The batch in one transaction without savepoints; raises :class:`_OneByOne`
        (everything rolled back) when that cannot be done."""
        if any(event.attempt > 1 for _, event in events):
            raise _OneByOne  # redeliveries fail more often: savepoints at once
        inbox = self.tables.inbox
        done: list[tuple[Delivery, bool]] = []
        async with self.database.session() as session:
            ids = [event.id for _, event in events]
            seen = set(
                (
                    await session.execute(
                        select(inbox.c.event_id).where(
                            inbox.c.consumer == self.group, inbox.c.event_id.in_(ids)
                        )
                    )
                ).scalars()
            )
            fresh: list[tuple[Delivery, Event]] = []
            for delivery, event in events:
                duplicate = event.id in seen
                seen.add(event.id)
                done.append((delivery, duplicate))
                if not duplicate:
                    fresh.append((delivery, event))
            if fresh:
                now = datetime.now(UTC)
                try:
                    await session.execute(
                        insert(inbox),
                        [
                            {
                                "consumer": self.group,
                                "event_id": event.id,
                                "topic": event.type,
                                "received_at": now,
                            }
                            for _, event in fresh
                        ],
                    )
                except sa_exc.IntegrityError:
                    # One was recorded meanwhile by another instance.
                    raise _OneByOne from None
                for _, event in fresh:
                    await self._run_or_roll_back(event, session)
        return done

    async def _run_or_roll_back(self, event: Event, session: AsyncSession) -> None:
        error = await self._call(event, session)
        if error is not None:
            raise _OneByOne(event.id, error)  # the session's block rolls everything back

    async def _call(self, event: Event, session: AsyncSession) -> BaseException | None:
        """Run the handler in the event's trace; the exception it raised, if any."""
        parent = TraceContext.parse(event.traceparent)
        trace = parent.child() if parent is not None else TraceContext.new()
        tokens = (current_trace.set(trace), current_request_id.set(event.id))
        started = time.perf_counter()
        try:
            if self._with_session:
                await self.handler(event, session)
            else:
                await self.handler(event)
        except Exception as exc:  # noqa: BLE001 - a handler's failure is retried, not fatal
            return exc
        finally:
            self._m_duration.observe(time.perf_counter() - started)
            current_request_id.reset(tokens[1])
            current_trace.reset(tokens[0])
        return None

    async def _apply(self, session: AsyncSession, event: Event) -> BaseException | bool | None:
        """Record and handle one event under a savepoint. None: applied; True: a
        duplicate; an exception: it failed (its writes undone)."""
        try:
            savepoint = await session.begin_nested()
            try:
                await session.execute(
                    insert(self.tables.inbox).values(
                        consumer=self.group,
                        event_id=event.id,
                        topic=event.type,
                        received_at=datetime.now(UTC),
                    )
                )
            except sa_exc.IntegrityError:
                await savepoint.rollback()
                return True
            failure = await self._call(event, session)
            if failure is not None:
                with contextlib.suppress(Exception):
                    await savepoint.rollback()
                return failure
            await savepoint.commit()
        except (DataError, sa_exc.SQLAlchemyError, OSError) as exc:
            return exc
        return None

    async def _retry(
        self, delivery: Delivery, event: Event, error: BaseException, *, infra: bool
    ) -> None:
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if not infra and delivery.attempt >= self.settings.max_deliver:
            await self._dead(delivery, event.id, reason)
            return
        self._m_failed.inc()
        delay = self.settings.delay(delivery.attempt)
        log.warning(
            "%s failed event %s (%s), delivery %d of %d; again in %gs: %s",
            self.name,
            event.id,
            event.type,
            delivery.attempt,
            self.settings.max_deliver,
            delay,
            reason,
            extra={"event_id": event.id, "topic": event.type, "group": self.group},
        )
        with contextlib.suppress(Exception):
            await delivery.nak(delay)

    async def _dead(self, delivery: Delivery, event_id: str, reason: str) -> None:
        letter = DeadLetter(
            topic=self.topic,
            group=self.group,
            service=self.service,
            event_id=event_id,
            data=delivery.data,
            error=reason[:4000],
            attempts=delivery.attempt,
        )
        try:
            if self.bus is None:
                raise BusUnavailableError("no bus")
            await self.bus.dead_letter(letter)
        except EventsError as exc:
            log.warning("%s could not dead-letter event %s: %s", self.name, event_id, exc)
            with contextlib.suppress(Exception):
                await delivery.nak(self.settings.delay(delivery.attempt))
            return
        self._m_dead.inc()
        self._m_dead_letters.inc()
        log.error(
            "%s gave up on event %s (%s) after %d deliveries; it is in the dead letters "
            "(meshgate events dead-letters): %s",
            self.name,
            event_id,
            self.topic,
            delivery.attempt,
            reason,
            extra={"event_id": event_id, "topic": self.topic, "group": self.group},
        )
        with contextlib.suppress(Exception):
            await delivery.term()


def _poison_id(data: bytes) -> str:
    return "unreadable-" + hashlib.sha256(data).hexdigest()[:24]
