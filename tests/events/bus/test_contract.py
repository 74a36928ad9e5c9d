"""The bus contract, on every backend: the machine's NATS, an embedded nats-server
from the wheel, and Redis Streams. Each test runs on a namespace of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from meshgate.events import (
    BusUnavailableError,
    ConsumerSettings,
    DeadLetter,
    DeadLetterNotFoundError,
    TopicSettings,
    connect_bus,
)
from meshgate.events.bus.base import Bus, Delivery
from meshgate.events.embedded import EmbeddedNats
from tests.events.conftest import bus_url, clean_bus

BACKENDS = [
    pytest.param("nats", marks=pytest.mark.services),
    pytest.param("embedded"),
    pytest.param("redis", marks=pytest.mark.services),
    pytest.param("memory"),
]


@pytest.fixture(params=BACKENDS)
async def bus(
    request: pytest.FixtureRequest, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Bus]:
    if request.param == "memory":
        from meshgate.service.testing import MemoryBus

        yield MemoryBus(namespace)
        return
    embedded: EmbeddedNats | None = None
    if request.param == "embedded":
        embedded = EmbeddedNats(tmp_path_factory.mktemp("nats"))
        await embedded.start()
    the_bus = connect_bus(bus_url(request.param, embedded), namespace=namespace)
    await the_bus.connect()
    try:
        yield the_bus
    finally:
        try:
            await clean_bus(the_bus)
        finally:
            await the_bus.close()
            if embedded is not None:
                await embedded.stop()


FAST = ConsumerSettings(ack_wait=1.0, backoff=(0.1,), max_deliver=3)


async def fetch_all(
    bus: Bus, topic: str, group: str, want: int, settings: ConsumerSettings = FAST
) -> list[Delivery]:
    sub = await bus.subscribe(topic, group, settings)
    got: list[Delivery] = []
    async with asyncio.timeout(10):
        while len(got) < want:
            got += await sub.fetch(want - len(got), 0.5)
    return got


async def test_published_events_reach_a_group_in_order_and_acked_ones_do_not_come_back(
    bus: Bus,
) -> None:
    await bus.ensure_topic("orders.placed", TopicSettings())
    for n in range(5):
        assert await bus.publish("orders.placed", f"e{n}".encode(), msg_id=f"id-{n}")
    sub = await bus.subscribe("orders.placed", "payments", FAST)
    got: list[Delivery] = []
    async with asyncio.timeout(10):
        while len(got) < 5:
            got += await sub.fetch(10, 0.5)
    assert [d.data for d in got] == [f"e{n}".encode() for n in range(5)]
    assert all(d.attempt == 1 and d.topic == "orders.placed" for d in got)
    for d in got:
        await d.ack()
    assert await sub.fetch(10, 0.3) == []
    # Past ack_wait, still nothing: the acks held.
    await asyncio.sleep(FAST.ack_wait + 0.2)
    assert await sub.fetch(10, 0.3) == []


async def test_a_second_publish_of_one_event_id_is_dropped(bus: Bus) -> None:
    await bus.ensure_topic("users.created", TopicSettings())
    assert await bus.publish("users.created", b"one", msg_id="same") is True
    assert await bus.publish("users.created", b"one", msg_id="same") is False
    assert await bus.publish("users.created", b"two", msg_id="other") is True
    got = await fetch_all(bus, "users.created", "g", 2)
    assert [d.data for d in got] == [b"one", b"two"]


async def test_every_group_gets_every_event(bus: Bus) -> None:
    await bus.ensure_topic("t.x", TopicSettings())
    await bus.publish("t.x", b"a", msg_id="a")
    first = await fetch_all(bus, "t.x", "one", 1)
    second = await fetch_all(bus, "t.x", "two", 1)
    assert first[0].data == second[0].data == b"a"


async def test_a_nak_brings_the_event_back_after_its_delay_with_the_next_attempt(
    bus: Bus,
) -> None:
    await bus.ensure_topic("t.retry", TopicSettings())
    await bus.publish("t.retry", b"x", msg_id="x")
    sub = await bus.subscribe("t.retry", "g", FAST)
    [first] = await fetch_all(bus, "t.retry", "g", 1)
    assert first.attempt == 1
    loop = asyncio.get_running_loop()
    naked = loop.time()
    await first.nak(0.3)
    again: list[Delivery] = []
    async with asyncio.timeout(10):
        while not again:
            again = await sub.fetch(1, 0.5)
    assert again[0].data == b"x"
    assert again[0].attempt == 2
    assert loop.time() - naked >= 0.25
    await again[0].ack()


async def test_an_unacknowledged_delivery_comes_back_after_ack_wait(bus: Bus) -> None:
    await bus.ensure_topic("t.wait", TopicSettings())
    await bus.publish("t.wait", b"w", msg_id="w")
    sub = await bus.subscribe("t.wait", "g", FAST)
    [first] = await fetch_all(bus, "t.wait", "g", 1)
    again: list[Delivery] = []
    async with asyncio.timeout(10):
        while not again:
            again = await sub.fetch(1, 0.5)
    assert again[0].attempt == 2
    await again[0].term()
    await asyncio.sleep(FAST.ack_wait + 0.2)
    assert await sub.fetch(1, 0.3) == []
    assert first.data == b"w"


async def test_a_lagging_group_reports_what_it_has_not_acknowledged(bus: Bus) -> None:
    await bus.ensure_topic("t.lag", TopicSettings())
    for n in range(3):
        await bus.publish("t.lag", b"l", msg_id=f"l{n}")
    sub = await bus.subscribe("t.lag", "g", FAST)
    assert await sub.pending() == 3
    got = await fetch_all(bus, "t.lag", "g", 3)
    for d in got:
        await d.ack()
    async with asyncio.timeout(5):
        while await sub.pending() != 0:
            await asyncio.sleep(0.05)


async def test_dead_letters_are_kept_once_listed_by_service_and_taken_back(bus: Bus) -> None:
    letter = DeadLetter(
        topic="orders.placed",
        group="payments",
        service="payments",
        event_id="ev-1",
        data=b"\x00not json",
        error="ValueError: bad\nsecond line",
        attempts=5,
    )
    await bus.dead_letter(letter)
    await bus.dead_letter(letter)  # a second instance giving up on the same event
    other = DeadLetter("users.created", "mail", "notifications", "ev-2", b"{}", "boom", 3)
    await bus.dead_letter(other)
    listed = await bus.dead_letters()
    assert [(d.event_id, d.group) for d in listed] == [("ev-1", "payments"), ("ev-2", "mail")]
    assert listed[0].data == b"\x00not json"
    assert listed[0].error == "ValueError: bad\nsecond line"
    assert listed[0].attempts == 5
    assert [d.event_id for d in await bus.dead_letters(service="notifications")] == ["ev-2"]
    taken = await bus.take_dead_letter(listed[0].id)
    assert taken.event_id == "ev-1"
    assert [d.event_id for d in await bus.dead_letters()] == ["ev-2"]
    with pytest.raises(DeadLetterNotFoundError, match="no dead letter"):
        await bus.take_dead_letter(listed[0].id)
    with pytest.raises(DeadLetterNotFoundError):
        await bus.take_dead_letter("999999")


async def test_check_passes_on_a_connected_bus(bus: Bus) -> None:
    await bus.check()


@pytest.mark.parametrize("scheme", ["nats", "redis"])
async def test_an_unreachable_bus_is_reported_with_its_address(
    scheme: str, closed_port: int
) -> None:
    bus = connect_bus(f"{scheme}://127.0.0.1:{closed_port}")
    with pytest.raises(BusUnavailableError, match=f"127.0.0.1:{closed_port}"):
        await bus.connect()
    await bus.close()


@pytest.fixture
def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
