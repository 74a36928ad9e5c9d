"""The transactional outbox and its relay, on SQLite, PostgreSQL and MariaDB with the
machine's NATS."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel
from sqlalchemy import func, select, update

from meshgate.data import Database
from meshgate.errors import ConfigError
from meshgate.events import ConsumerSettings, EnvelopeError, Event, Events, TopicSettings
from meshgate.events.bus.base import Bus, Delivery
from meshgate.events.outbox import Relay
from meshgate.service.context import TraceContext, current_trace

pytestmark = pytest.mark.services


class OrderPlaced(BaseModel):
    order_id: int
    total: int


async def received(bus: Bus, topic: str, want: int, group: str = "check") -> list[Delivery]:
    """The deliveries of ``topic`` to a fresh group, waiting for ``want`` of them."""
    await bus.ensure_topic(topic, TopicSettings())
    sub = await bus.subscribe(topic, group, ConsumerSettings(ack_wait=5))
    got: list[Delivery] = []
    async with asyncio.timeout(15):
        while len(got) < want:
            got += await sub.fetch(100, 0.3)
    extra = await sub.fetch(100, 0.3)
    return got + extra


async def pending(events: Events) -> int:
    outbox = events.tables.outbox
    assert events.database is not None
    async with events.database.connection() as conn:
        count = (
            await conn.execute(select(func.count()).where(outbox.c.sent_at.is_(None)))
        ).scalar()
    return int(count or 0)


async def test_an_event_published_in_a_committed_transaction_reaches_the_bus_as_cloudevents(
    events: Events,
) -> None:
    await events.start()
    await events.wait_started()
    assert events.database is not None
    trace = TraceContext.new()
    token = current_trace.set(trace)
    try:
        async with events.database.session() as session:
            published = await events.publish(
                session, "orders.placed", OrderPlaced(order_id=7, total=1250), key="7"
            )
    finally:
        current_trace.reset(token)
    [delivery] = await received(events.bus, "orders.placed", 1)
    doc = json.loads(delivery.data)
    assert doc["specversion"] == "1.0"
    assert doc["id"] == published.id
    assert doc["type"] == "orders.placed"
    assert doc["source"] == "/test"
    assert doc["subject"] == "7"
    assert doc["datacontenttype"] == "application/json"
    assert doc["traceparent"] == trace.header()
    assert doc["time"].endswith("Z")
    assert doc["data"] == {"order_id": 7, "total": 1250}
    event = Event.decode(delivery.data)
    assert event.payload(OrderPlaced) == OrderPlaced(order_id=7, total=1250)
    async with asyncio.timeout(5):
        while await pending(events):
            await asyncio.sleep(0.05)


async def test_a_rolled_back_transaction_publishes_nothing(events: Events) -> None:
    assert events.database is not None
    database = events.database

    async def failing_write() -> None:
        async with database.session() as session:
            await events.publish(session, "orders.placed", {"n": 1})
            raise RuntimeError("the business write failed")

    with pytest.raises(RuntimeError):
        await failing_write()
    async with events.database.session() as session:
        await events.publish(session, "orders.placed", {"n": 2})
    await events.start()
    await events.wait_started()
    got = await received(events.bus, "orders.placed", 1)
    assert [json.loads(d.data)["data"] for d in got] == [{"n": 2}]


async def test_the_relay_wakes_on_commit_rather_than_waiting_for_its_poll(
    database: Database, namespace: str, prefix: str
) -> None:
    from meshgate.events.bus.nats import NatsBus
    from tests.events.conftest import clean_bus, machine_nats

    bus = NatsBus(machine_nats(), namespace=namespace)
    # A poll so slow that only the wake-up can deliver within the test's wait.
    events = Events(database, service="test", bus=bus, table_prefix=prefix, poll_interval=60)
    await events.create_tables()
    try:
        await events.start()
        await events.wait_started()
        relay = events.relay
        assert relay is not None
        # Let the first round (at start) finish and the relay settle in its wait.
        for _ in range(3):
            await relay.run_once()
        async with database.session() as session:
            await events.publish(session, "orders.placed", {"n": 1})
        async with asyncio.timeout(5):
            while await pending(events):
                await asyncio.sleep(0.02)
    finally:
        await events.stop()
        await bus.connect()
        await clean_bus(bus)
        await bus.close()
        await events.drop_tables()


async def test_events_of_one_key_reach_the_bus_in_commit_order(events: Events) -> None:
    assert events.database is not None
    for n in range(30):
        async with events.database.session() as session:
            await events.publish(session, "t.ordered", {"n": n}, key=f"k{n % 3}")
    await events.start()
    await events.wait_started()
    got = await received(events.bus, "t.ordered", 30)
    by_key: dict[str, list[int]] = {}
    for d in got:
        doc = json.loads(d.data)
        by_key.setdefault(doc["subject"], []).append(doc["data"]["n"])
    assert by_key == {f"k{k}": list(range(k, 30, 3)) for k in range(3)}


async def test_a_relay_that_crashed_before_marking_publishes_again_and_the_bus_drops_it(
    events: Events,
) -> None:
    assert events.database is not None
    async with events.database.session() as session:
        await events.publish(session, "t.crash", {"n": 1}, key="a")
    await events.bus.connect()
    relay = Relay(
        events.database, events.bus, events.tables, service="test", metrics=events.metrics
    )
    assert await relay.run_once() == 1
    # As if the process died between the publish and the mark:
    outbox = events.tables.outbox
    async with events.database.connection() as conn:
        await conn.execute(update(outbox).values(sent_at=None))
    assert await relay.run_once() == 1
    assert await pending(events) == 0
    got = await received(events.bus, "t.crash", 1)
    assert len(got) == 1  # the second publish fell inside the duplicate window


async def test_lag_counts_rows_waiting_and_the_age_of_the_oldest(events: Events) -> None:
    assert events.database is not None
    async with events.database.session() as session:
        for n in range(3):
            await events.publish(session, "t.lag", {"n": n})
    relay = Relay(
        events.database, events.bus, events.tables, service="test", metrics=events.metrics
    )
    lag = await relay.measure()
    assert lag.pending == 3
    assert 0 <= lag.oldest_seconds < 60
    assert (
        events.registry.get_sample_value("meshgate_events_outbox_pending", {"service": "test"}) == 3
    )
    await events.bus.connect()
    await relay.run_once()
    assert (await relay.measure()).pending == 0
    assert (await relay.measure()).oldest_seconds == 0


async def test_sent_rows_are_pruned_after_the_retention(events: Events) -> None:
    assert events.database is not None
    async with events.database.session() as session:
        await events.publish(session, "t.prune", {"n": 1})
    await events.bus.connect()
    relay = Relay(
        events.database,
        events.bus,
        events.tables,
        service="test",
        metrics=events.metrics,
        retention=3600,
    )
    await relay.run_once()
    assert await relay.prune() == 0  # sent just now: kept
    relay.retention = 0.000001
    await asyncio.sleep(0.01)
    assert await relay.prune() == 1
    async with events.database.connection() as conn:
        left = (await conn.execute(select(func.count()).select_from(events.tables.outbox))).scalar()
    assert left == 0


async def test_relays_of_several_instances_share_the_work_without_losing_an_event(
    events: Events,
) -> None:
    assert events.database is not None
    total = 200
    for start in range(0, total, 20):
        async with events.database.session() as session:
            for n in range(start, start + 20):
                await events.publish(session, "t.shared", {"n": n}, key=f"k{n % 7}")
    await events.bus.connect()
    relays = [
        Relay(
            events.database,
            events.bus,
            events.tables,
            service="test",
            metrics=events.metrics,
            batch=25,
            instance=f"relay-{i}",
        )
        for i in range(3)
    ]

    async def drain(relay: Relay) -> int:
        moved = 0
        while await pending(events):
            moved += await relay.run_once()
        return moved

    async with asyncio.timeout(30):
        counts = await asyncio.gather(*(drain(r) for r in relays))
    assert sum(counts) >= total
    got = await received(events.bus, "t.shared", total)
    numbers = [json.loads(d.data)["data"]["n"] for d in got]
    assert sorted(numbers) == list(range(total))
    by_key: dict[int, list[int]] = {}
    for n in numbers:
        by_key.setdefault(n % 7, []).append(n)
    assert all(ns == sorted(ns) for ns in by_key.values())
    if events.database.engine.dialect.name == "sqlite":
        assert sum(1 for c in counts if c) == 1  # one writer: the lease holder


async def test_on_sqlite_one_relay_leads_and_another_takes_over_when_its_lease_ends(
    tmp_path: object, namespace: str, prefix: str
) -> None:
    from pathlib import Path

    from meshgate.events.bus.nats import NatsBus
    from tests.events.conftest import clean_bus, machine_nats

    assert isinstance(tmp_path, Path)
    database = Database(f"sqlite:///{tmp_path / 'lease.db'}")
    bus = NatsBus(machine_nats(), namespace=namespace)
    events = Events(database, service="test", bus=bus, table_prefix=prefix)
    await events.create_tables()
    await bus.connect()
    try:
        first, second = (
            Relay(
                database,
                bus,
                events.tables,
                service="test",
                metrics=events.metrics,
                lease=0.5,
                instance=name,
            )
            for name in ("first", "second")
        )
        async with database.session() as session:
            await events.publish(session, "t.lease", {"n": 1})
        assert await first.run_once() == 1
        async with database.session() as session:
            await events.publish(session, "t.lease", {"n": 2})
        assert await second.run_once() == 0
        assert not second.leading
        # The first stops renewing (as if it died); past its lease the second leads.
        await asyncio.sleep(0.6)
        assert await second.run_once() == 1
        assert second.leading
        assert await first.run_once() == 0
        assert not first.leading
    finally:
        await clean_bus(bus)
        await bus.close()
        await database.close()


async def test_publishing_refuses_a_bad_topic_and_a_payload_that_is_not_json(
    events: Events,
) -> None:
    assert events.database is not None
    async with events.database.session() as session:
        with pytest.raises(ConfigError, match="not a topic name"):
            await events.publish(session, "orders..placed", {})
        with pytest.raises(EnvelopeError, match="not JSON"):
            await events.publish(session, "orders.placed", object())
