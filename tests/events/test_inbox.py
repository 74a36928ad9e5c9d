"""The idempotent inbox: consumers on SQLite, PostgreSQL and MariaDB with the
machine's NATS apply each event once, retry failures with backoff and dead-letter
poison events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from meshgate.data.database import Database
from meshgate.events import ConsumerSettings, Event, Events, TopicSettings

pytestmark = pytest.mark.services

FAST = ConsumerSettings(ack_wait=2.0, backoff=(0.05,), max_deliver=3, batch=20)


class Charged(BaseModel):
    order_id: int


def effects_table(events: Events) -> Table:
    return Table(
        f"{events.tables.prefix}effects",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(64), nullable=False),
        Column("note", String(100), nullable=False),
    )


async def count(database: Database, table: Table, **where: object) -> int:
    query = select(func.count()).select_from(table)
    for name, value in where.items():
        query = query.where(table.c[name] == value)
    async with database.connection() as conn:
        return int((await conn.execute(query)).scalar() or 0)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


@pytest.fixture
async def effects(events: Events) -> Table:
    table = effects_table(events)
    assert events.database is not None
    async with events.database.connection() as conn:
        await conn.run_sync(table.metadata.create_all)
    yield table  # type: ignore[misc]
    await events.stop()  # before its table goes
    async with events.database.connection() as conn:
        await conn.run_sync(table.metadata.drop_all)


async def publish_direct(
    events: Events, topic: str, event: Event, msg_id: str | None = None
) -> None:
    await events.bus.connect()
    await events.bus.ensure_topic(topic, TopicSettings())
    await events.bus.publish(topic, event.encode(), msg_id=msg_id or event.id)


async def test_a_redelivered_event_has_no_second_effect(events: Events, effects: Table) -> None:
    assert events.database is not None
    seen: list[int] = []

    @events.on("payments.charged", group="orders", settings=FAST, model=Charged)
    async def handle(event: Event, session: AsyncSession) -> None:
        assert isinstance(event.data, Charged)
        seen.append(event.attempt)
        await session.execute(
            insert(effects).values(event_id=event.id, note=str(event.data.order_id))
        )

    event = Event(id="ev-dup-1", type="payments.charged", source="/payments", data={"order_id": 5})
    # Published twice under different message ids: the bus keeps both (as after a
    # crash outside the duplicate window), the inbox applies one.
    await publish_direct(events, "payments.charged", event, msg_id="first")
    await publish_direct(events, "payments.charged", event, msg_id="second")
    await events.start()
    await events.wait_started()
    database = events.database
    await until(lambda: _lag_zero(events))
    assert await count(database, effects, event_id="ev-dup-1") == 1
    assert seen == [1]
    assert await count(database, events.tables.inbox, consumer="orders") == 1
    labels = {"service": "test", "topic": "payments.charged", "group": "orders"}
    assert (
        events.registry.get_sample_value(
            "meshgate_events_handled_total", {**labels, "outcome": "ok"}
        )
        == 1
    )
    assert (
        events.registry.get_sample_value(
            "meshgate_events_handled_total", {**labels, "outcome": "duplicate"}
        )
        == 1
    )


async def _lag_zero(events: Events) -> bool:
    """Everything published reached the bus and was acknowledged by the consumer."""
    assert events.database is not None
    if await count(events.database, events.tables.outbox, sent_at=None):
        return False
    consumer = events.consumers[0]
    sub = await consumer.subscription()
    return await sub.pending() == 0


async def test_a_failing_handler_is_retried_with_its_writes_undone_until_it_succeeds(
    events: Events, effects: Table
) -> None:
    assert events.database is not None
    attempts: list[int] = []

    @events.on("t.flaky", group="g", settings=FAST)
    async def handle(event: Event, session: AsyncSession) -> None:
        attempts.append(event.attempt)
        await session.execute(
            insert(effects).values(event_id=event.id, note=f"try {event.attempt}")
        )
        if event.attempt < 3:
            raise RuntimeError("not yet")

    async with events.database.session() as session:
        await events.publish(session, "t.flaky", {"x": 1})
    await events.start()
    await events.wait_started()
    await until(lambda: _lag_zero(events))
    assert attempts == [1, 2, 3]
    async with events.database.connection() as conn:
        notes = (await conn.execute(select(effects.c.note))).scalars().all()
    assert notes == ["try 3"]


async def test_one_failing_event_in_a_batch_does_not_undo_the_others(
    events: Events, effects: Table
) -> None:
    assert events.database is not None

    @events.on("t.batch", group="g", settings=FAST)
    async def handle(event: Event, session: AsyncSession) -> None:
        await session.execute(insert(effects).values(event_id=event.id, note="x"))
        if event.data["n"] == 3 and event.attempt == 1:
            raise ValueError("three fails once")

    async with events.database.session() as session:
        for n in range(6):
            await events.publish(session, "t.batch", {"n": n})
    await events.start()
    await events.wait_started()
    await until(lambda: _lag_zero(events))
    assert await count(events.database, effects) == 6
    assert await count(events.database, events.tables.inbox) == 6


async def test_a_poison_event_goes_to_the_dead_letters_after_max_deliver_with_its_error(
    events: Events, effects: Table
) -> None:
    assert events.database is not None
    attempts: list[int] = []

    @events.on("t.poison", group="g", settings=FAST)
    async def handle(event: Event, session: AsyncSession) -> None:
        attempts.append(event.attempt)
        raise KeyError("no such sku")

    async with events.database.session() as session:
        published = await events.publish(session, "t.poison", {"sku": "?"})
    await events.start()
    await events.wait_started()

    async def dead() -> bool:
        return bool(await events.bus.dead_letters(service="test"))

    await until(dead)
    [letter] = await events.bus.dead_letters(service="test")
    assert letter.event_id == published.id
    assert letter.group == "g"
    assert letter.topic == "t.poison"
    assert letter.attempts == 3
    assert "KeyError" in letter.error
    assert "no such sku" in letter.error
    assert json.loads(letter.data)["id"] == published.id
    assert attempts == [1, 2, 3]
    assert await count(events.database, events.tables.inbox) == 0


async def test_an_envelope_that_is_not_cloudevents_is_dead_lettered_at_once(
    events: Events,
) -> None:
    @events.on("t.garbage", group="g", settings=FAST)
    async def handle(event: Event) -> None:
        raise AssertionError("never called")

    await events.bus.connect()
    await events.bus.ensure_topic("t.garbage", TopicSettings())
    await events.bus.publish("t.garbage", b"not json at all", msg_id="garbage")
    await events.start()
    await events.wait_started()

    async def dead() -> bool:
        return bool(await events.bus.dead_letters())

    await until(dead)
    [letter] = await events.bus.dead_letters()
    assert letter.data == b"not json at all"
    assert "not JSON" in letter.error
    assert letter.attempts == 1


async def test_the_handler_runs_in_the_publishers_trace(events: Events) -> None:
    from meshgate.service.context import TraceContext, current_request_id, current_trace

    assert events.database is not None
    seen: list[tuple[str | None, str | None]] = []

    @events.on("t.trace", group="g", settings=FAST)
    async def handle(event: Event) -> None:
        trace = current_trace.get()
        seen.append((trace.trace_id if trace else None, current_request_id.get()))

    parent = TraceContext.new()
    token = current_trace.set(parent)
    try:
        async with events.database.session() as session:
            published = await events.publish(session, "t.trace", {})
    finally:
        current_trace.reset(token)
    await events.start()
    await events.wait_started()
    await until(lambda: _lag_zero(events))
    assert seen == [(parent.trace_id, published.id)]


async def test_a_database_that_is_down_during_a_delivery_gets_it_again_later_applied_once(
    events: Events, effects: Table
) -> None:
    """Crash injection: the consumer's database goes away mid-stream (through a TCP
    proxy that cuts every connection), comes back, and every event is applied once."""
    from tests.data.conftest import tcp_proxy

    database = events.database
    assert database is not None
    if database.engine.dialect.name == "sqlite":
        pytest.skip("an embedded SQLite file cannot go down")
    port = database.engine.url.port
    assert port is not None
    async with tcp_proxy(port) as proxy:
        url = database.engine.url.set(port=proxy.port).render_as_string(hide_password=False)
        behind = Database(url, name="behind-proxy", connect_timeout=1.0, pool_timeout=2.0)
        consumer_events = Events(
            behind, service="test", bus=events.bus, table_prefix=events.tables.prefix, relay=False
        )
        handled = 0

        @consumer_events.on("t.dbdown", group="g", settings=FAST)
        async def handle(event: Event, session: AsyncSession) -> None:
            nonlocal handled
            handled += 1
            await session.execute(insert(effects).values(event_id=event.id, note="x"))

        try:
            await consumer_events.start()
            await consumer_events.wait_started()
            async with database.session() as session:
                for n in range(5):
                    await events.publish(session, "t.dbdown", {"n": n})
            await events.start()
            await events.wait_started()

            async def some() -> bool:
                return await count(database, effects) >= 1

            await until(some)
            proxy.cut()
            async with database.session() as session:
                for n in range(5, 10):
                    await events.publish(session, "t.dbdown", {"n": n})
            await asyncio.sleep(1.0)  # deliveries fail while it is down
            proxy.restore()

            async def all_applied() -> bool:
                return await count(database, events.tables.inbox, consumer="g") == 10

            await until(all_applied, 30)
            async with database.connection() as conn:
                ids = (await conn.execute(select(effects.c.event_id))).scalars().all()
            assert len(ids) == len(set(ids)) == 10
        finally:
            await consumer_events.stop()
            await behind.close()


def test_a_handler_needs_a_database_and_one_handler_per_group_and_topic() -> None:
    from meshgate.errors import ConfigError

    without = Events(None, service="web", bus="nats://127.0.0.1:1")
    with pytest.raises(ConfigError, match="has no database"):
        without.on("orders.placed")(_noop)
    with_db = Events(Database("sqlite://"), service="web", bus="nats://127.0.0.1:1")
    with_db.on("orders.placed", group="web")(_noop)
    with pytest.raises(ConfigError, match="already handles"):
        with_db.on("orders.placed", group="web")(_noop)
    with pytest.raises(ConfigError, match="not a consumer group name"):
        with_db.on("orders.placed", group="a.b")(_noop)
    with pytest.raises(ConfigError, match="max_deliver"):
        with_db.on("x.y", max_deliver=0)(_noop)


async def _noop(event: Event) -> None:
    return None
