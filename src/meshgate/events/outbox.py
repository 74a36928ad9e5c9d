"""The transactional outbox and its relay.

:meth:`Outbox.publish` writes an event as a row of the outbox table in the
caller's own transaction: it is committed with the business rows or not at all.
The :class:`Relay` of each instance then moves committed rows to the bus:

- on PostgreSQL and MariaDB/MySQL, relays of several instances share the work:
  a round claims the outbox partitions that have rows waiting with
  ``SELECT ... FOR UPDATE SKIP LOCKED`` (a partition is relayed by one relay at a
  time, and the events of one key share a partition), publishes, and marks the rows
  sent in the same transaction;
- on SQLite, which has one writer, one relay leads (a lease in the leases table,
  taken over when its holder stops renewing it) and the others wait.

It wakes when a transaction that published commits, and polls too (rows committed
by other instances, rows left by a crash). Each event is published with its id as
``Nats-Msg-Id``, so that the bus drops a second publish after a crash between the
publish and the mark; the consumers' inbox covers the rest. Events of one key are
published one after the other, each once the one before it was stored, so they
reach the bus in the order they were committed. Sent rows are deleted after
``retention``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from meshgate.data.database import Database
from meshgate.data.errors import DatabaseUnavailableError, DataError
from meshgate.errors import ConfigError, ConfigIssue
from meshgate.events import _faults
from meshgate.events.bus.base import Bus
from meshgate.events.envelope import Event, check_topic, encode_data, new_event_id
from meshgate.events.errors import EventsError
from meshgate.events.metrics import EventMetrics
from meshgate.events.schema import EventTables, partition_of
from meshgate.events.settings import TopicSettings
from meshgate.service.context import current_trace

__all__ = ["Lag", "Outbox", "Relay", "instance_name", "stop_task"]

log = logging.getLogger("meshgate.events")

_WOKEN = "meshgate.outbox.woken"


async def stop_task(task: asyncio.Task[None], *, grace: float) -> None:
    """Let ``task`` end by itself within ``grace`` seconds, then cancel it until it is
    done: a cancellation can be lost inside libraries (and in Python 3.11's
    timeouts), so one ``cancel()`` is not enough to be sure."""
    await asyncio.wait({task}, timeout=grace)
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled() and task.exception() is not None:
        log.error("a background task of the events ended with %r", task.exception())


def instance_name(service: str) -> str:
    """A name for this process among the instances of ``service`` (leases, logs)."""
    return f"{service}@{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"[:100]


@dataclass(frozen=True, slots=True)
class Lag:
    """How far behind the relay is."""

    pending: int
    """Outbox rows committed and not yet on the bus."""
    oldest_seconds: float
    """Age of the oldest of them (0 when none)."""


class Outbox:
    """Writes events into the outbox table, inside the caller's transaction."""

    def __init__(
        self,
        tables: EventTables,
        source: str,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.tables = tables
        self.source = source if source.startswith("/") else f"/{source}"
        self.on_commit = on_commit
        """Called after a transaction that published committed (wakes the relay)."""

    async def publish(
        self,
        session: AsyncSession | AsyncConnection,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        event_id: str | None = None,
    ) -> Event:
        """Add an event to the transaction of ``session``: it reaches the bus once
        that transaction commits, and never if it rolls back.

        ``payload`` is a pydantic model or plain JSON values; ``key`` (the
        CloudEvents ``subject``) keeps the events of one key in commit order. Returns
        the event (its id is what consumers dedupe on).

        Raises:
            ConfigError: ``topic`` is not a valid topic name, or ``key`` is too long.
            EnvelopeError: the payload is not JSON.
        """
        check_topic(topic)
        if key is not None and len(key) > 200:
            raise ConfigError([ConfigIssue("key", f"{key[:40]!r}... is longer than 200")])
        trace = current_trace.get()
        event = Event(
            id=event_id or new_event_id(),
            type=topic,
            source=self.source,
            data=encode_data(payload),
            subject=key,
            traceparent=trace.header() if trace is not None else None,
        )
        await session.execute(
            insert(self.tables.outbox).values(
                event_id=event.id,
                topic=topic,
                event_key=key,
                part=partition_of(key if key is not None else event.id),
                envelope=event.encode(),
                created_at=event.time,
                sent_at=None,
            )
        )
        self._wake_after_commit(session)
        return event

    def _wake_after_commit(self, session: AsyncSession | AsyncConnection) -> None:
        callback = self.on_commit
        if callback is None:
            return
        if isinstance(session, AsyncSession):
            sync = session.sync_session
            if sync.info.get(_WOKEN):
                return
            sync.info[_WOKEN] = True

            def after_commit(s: Any) -> None:
                s.info.pop(_WOKEN, None)
                callback()

            sa_event.listen(sync, "after_commit", after_commit, once=True)
        else:
            # A Core connection has no after-commit event (its "commit" runs before
            # the commit): the relay's poll finds the row.
            pass


class Relay:
    """Moves committed outbox rows to the bus; see the module docstring.

    ``topics`` gives the settings of a topic's stream, made before its first event
    is published.
    """

    def __init__(
        self,
        database: Database,
        bus: Bus,
        tables: EventTables,
        *,
        service: str,
        metrics: EventMetrics,
        topics: Callable[[str], TopicSettings] = lambda _topic: TopicSettings(),
        batch: int = 500,
        poll_interval: float = 0.5,
        retention: float = 3600.0,
        inbox_retention: float = 7 * 24 * 3600.0,
        lease: float = 10.0,
        instance: str | None = None,
    ) -> None:
        self.database = database
        self.bus = bus
        self.tables = tables
        self.service = service
        self.metrics = metrics
        self.topics = topics
        self.batch = batch
        self.poll_interval = poll_interval
        self.retention = retention
        self.inbox_retention = inbox_retention
        self.lease = lease
        self.instance = instance or instance_name(service)
        self.single_writer = database.engine.dialect.name == "sqlite"
        """SQLite: one relay leads, through a lease."""
        self.lag = Lag(0, 0.0)
        """The last lag measured (every second while running)."""
        self.last_error: str | None = None
        """Why the last round failed, until one succeeds."""
        self.leading = False
        self._lease_until = 0.0
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._ensured: set[str] = set()
        self._published: dict[str, Any] = {}
        self._pending_gauge = metrics.outbox_pending.labels(service)
        self._oldest_gauge = metrics.outbox_oldest.labels(service)
        self._errors = metrics.relay_errors.labels(service)

    # -- lifecycle

    def wake(self) -> None:
        """Run a round now (a transaction that published committed)."""
        self._wake.set()

    def start(self) -> None:
        """Start relaying in the background (until :meth:`stop`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"meshgate-relay-{self.service}"
            )

    async def stop(self) -> None:
        """Stop after the round in progress (its rows are marked or left for later)."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            self._wake.set()
            await stop_task(task, grace=2.0)
        if self.leading:
            with contextlib.suppress(DataError, sa_exc.SQLAlchemyError):
                await self._release_lease()

    async def _run(self) -> None:
        backoff = 0.1
        next_lag = 0.0
        next_prune = time.monotonic() + 5.0
        while not self._stopping:
            self._wake.clear()
            moved = 0
            try:
                moved = await self.run_once()
                self.last_error = None
                backoff = 0.1
            except Exception as exc:
                self._errors.inc()
                reason = str(exc) or type(exc).__name__
                if not isinstance(exc, DataError | EventsError | sa_exc.SQLAlchemyError | OSError):
                    log.exception("the outbox relay of %s hit a bug", self.service)
                if reason != self.last_error:
                    log.warning("the outbox relay of %s failed a round: %s", self.service, reason)
                self.last_error = reason
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            now = time.monotonic()
            if now >= next_lag:
                next_lag = now + 1.0
                with contextlib.suppress(DataError, sa_exc.SQLAlchemyError):
                    await self.measure()
            if now >= next_prune:
                next_prune = now + 60.0
                try:
                    await self.prune()
                except (DataError, sa_exc.SQLAlchemyError) as exc:
                    log.warning("pruning the outbox of %s failed: %s", self.service, exc)
            if moved >= self.batch:
                continue  # more waiting
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()

    # -- one round

    async def run_once(self) -> int:
        """One round: relay up to ``batch`` committed rows; returns how many reached the bus.

        Raises:
            DatabaseUnavailableError: the database cannot be reached.
            BusUnavailableError: the bus cannot be reached (rows stay for the next round).
        """
        if self.single_writer:
            return await self._round_single()
        return await self._round_shared()

    async def _round_shared(self) -> int:
        t = self.tables
        outbox = t.outbox
        try:
            conn_cm = self.database.engine.connect()
            async with conn_cm as conn:
                if conn.dialect.name in ("mysql", "mariadb"):
                    # Each statement must see rows committed since the round began
                    # (REPEATABLE READ would show a snapshot taken before the
                    # partition lock was granted, so rows just marked by another relay).
                    await conn.execution_options(isolation_level="READ COMMITTED")
                async with conn.begin():
                    postgres = conn.dialect.name == "postgresql"
                    if postgres:
                        # Losing this round's marks in a crash of PostgreSQL itself
                        # only means publishing again (the bus and the inbox dedupe):
                        # not worth a disk flush per round.
                        await conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                    waiting = select(outbox.c.part).distinct().where(outbox.c.sent_at.is_(None))
                    if postgres:
                        claim = (
                            select(t.partitions.c.part)
                            .where(t.partitions.c.part.in_(waiting.scalar_subquery()))
                            .with_for_update(skip_locked=True, of=t.partitions)
                        )
                    else:
                        # MariaDB has no FOR UPDATE OF: find the partitions first, so
                        # that only their rows are locked.
                        parts = (await conn.execute(waiting)).scalars().all()
                        if not parts:
                            return 0
                        claim = (
                            select(t.partitions.c.part)
                            .where(t.partitions.c.part.in_(parts))
                            .with_for_update(skip_locked=True)
                        )
                    locked = (await conn.execute(claim)).scalars().all()
                    if not locked:
                        return 0
                    rows = (
                        await conn.execute(
                            select(
                                outbox.c.seq,
                                outbox.c.event_id,
                                outbox.c.topic,
                                outbox.c.event_key,
                                outbox.c.envelope,
                            )
                            .where(outbox.c.sent_at.is_(None), outbox.c.part.in_(locked))
                            .order_by(outbox.c.seq)
                            .limit(self.batch)
                        )
                    ).all()
                    sent, error = await self._publish(rows)
                    await _faults.point("relay.published")
                    if sent:
                        await self._mark(conn, sent)
        except sa_exc.TimeoutError as exc:
            raise DatabaseUnavailableError(
                f"database {self.database.name!r}: no pooled connection for the outbox relay"
            ) from exc
        if error is not None:
            raise error
        return len(sent)

    async def _round_single(self) -> int:
        if not await self._lead():
            return 0
        outbox = self.tables.outbox
        async with self.database.connection() as conn:
            rows = (
                await conn.execute(
                    select(
                        outbox.c.seq,
                        outbox.c.event_id,
                        outbox.c.topic,
                        outbox.c.event_key,
                        outbox.c.envelope,
                    )
                    .where(outbox.c.sent_at.is_(None))
                    .order_by(outbox.c.seq)
                    .limit(self.batch)
                )
            ).all()
        if not rows:
            return 0
        # Publishing outside any transaction: SQLite's one write lock is not held
        # while the bus answers. Only the leader gets here, so no other relay races.
        sent, error = await self._publish(rows)
        await _faults.point("relay.published")
        if sent:
            async with self.database.connection() as conn:
                await self._mark(conn, sent)
        if error is not None:
            raise error
        return len(sent)

    async def _mark(self, conn: AsyncConnection, sent: Sequence[int]) -> None:
        now = datetime.now(UTC)
        outbox = self.tables.outbox
        for start in range(0, len(sent), 500):
            chunk = sent[start : start + 500]
            await conn.execute(update(outbox).where(outbox.c.seq.in_(chunk)).values(sent_at=now))

    async def _publish(self, rows: Sequence[Any]) -> tuple[list[int], BaseException | None]:
        """Publish ``rows``; returns the seqs the bus stored (or dropped as duplicates)
        and the first error. Rows of one key go one after the other and stop at the
        first failure, so that none overtakes an earlier one of its key."""
        chains: dict[str, list[Any]] = {}
        for row in rows:
            chains.setdefault(row.event_key or f"\0{row.event_id}", []).append(row)
        sent: list[int] = []
        errors: list[BaseException] = []
        for topic in {row.topic for row in rows} - self._ensured:
            try:
                await self.bus.ensure_topic(topic, self.topics(topic))
            except EventsError as exc:
                return [], exc
            self._ensured.add(topic)

        async def chain(items: list[Any]) -> None:
            for row in items:
                try:
                    await self.bus.publish(row.topic, bytes(row.envelope), msg_id=row.event_id)
                except EventsError as exc:
                    errors.append(exc)
                    return
                sent.append(row.seq)
                counter = self._published.get(row.topic)
                if counter is None:
                    counter = self._published[row.topic] = self.metrics.published.labels(
                        self.service, row.topic
                    )
                counter.inc()

        if len(chains) == 1:
            await chain(next(iter(chains.values())))
        else:
            await asyncio.gather(*(chain(items) for items in chains.values()))
        sent.sort()
        return sent, errors[0] if errors else None

    # -- the lease (SQLite)

    async def _lead(self) -> bool:
        now = time.monotonic()
        if self.leading and self._lease_until - now > self.lease * 2 / 3:
            return True
        leases = self.tables.leases
        until = datetime.now(UTC) + timedelta(seconds=self.lease)
        wall = datetime.now(UTC)
        async with self.database.connection() as conn:
            taken = await conn.execute(
                update(leases)
                .where(
                    leases.c.name == "relay",
                    (leases.c.owner == self.instance) | (leases.c.until < wall),
                )
                .values(owner=self.instance, until=until)
            )
            got = taken.rowcount == 1
            if not got:
                exists = (
                    await conn.execute(select(leases.c.owner).where(leases.c.name == "relay"))
                ).first()
                if exists is None:
                    await conn.execute(
                        insert(leases).values(name="relay", owner=self.instance, until=until)
                    )
                    got = True
        if got and not self.leading:
            log.info("%s leads the outbox relay of %s", self.instance, self.service)
        self.leading = got
        self._lease_until = now + self.lease if got else 0.0
        return got

    async def _release_lease(self) -> None:
        leases = self.tables.leases
        async with self.database.connection() as conn:
            await conn.execute(
                delete(leases).where(leases.c.name == "relay", leases.c.owner == self.instance)
            )
        self.leading = False

    # -- lag and pruning

    async def measure(self) -> Lag:
        """Measure the lag now (also kept in :attr:`lag` and the gauges)."""
        outbox = self.tables.outbox
        async with self.database.connection() as conn:
            count, oldest = (
                await conn.execute(
                    select(func.count(), func.min(outbox.c.created_at)).where(
                        outbox.c.sent_at.is_(None)
                    )
                )
            ).one()
        age = 0.0
        if oldest is not None:
            if oldest.tzinfo is None:  # a MIN() over the column loses the type on SQLite
                oldest = _parse_naive(oldest)
            age = max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        self.lag = Lag(int(count or 0), age)
        self._pending_gauge.set(self.lag.pending)
        self._oldest_gauge.set(self.lag.oldest_seconds)
        return self.lag

    async def prune(self) -> int:
        """Delete outbox rows sent more than ``retention`` ago and inbox rows older than
        ``inbox_retention``; returns how many outbox rows went."""
        t = self.tables
        now = datetime.now(UTC)
        async with self.database.connection() as conn:
            gone = await conn.execute(
                delete(t.outbox).where(
                    t.outbox.c.sent_at.is_not(None),
                    t.outbox.c.sent_at < now - timedelta(seconds=self.retention),
                )
            )
            await conn.execute(
                delete(t.inbox).where(
                    t.inbox.c.received_at < now - timedelta(seconds=self.inbox_retention)
                )
            )
        return int(gone.rowcount or 0)


def _parse_naive(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)
