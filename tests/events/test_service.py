"""Events in a Service: ``service.events`` and ``@service.on`` started and stopped
with the service, readiness detail, metrics; on the in-memory bus of the testing
helpers and on the machine's NATS; ``meshgate db upgrade`` makes the event tables."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import AsyncSession
from typer.testing import CliRunner

from meshgate.data import Database
from meshgate.events import Event
from meshgate.service import Service
from meshgate.service.testing import in_process, serving, settle, use_memory_bus

metadata = MetaData()
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("text", String(100), nullable=False),
)


def make_services(tmp_path: Path) -> tuple[Service, Service]:
    """A publisher and a consumer, each with its own SQLite database."""
    orders = Service("orders", database=Database(f"sqlite:///{tmp_path / 'orders.db'}"))
    mail = Service("mail", database=Database(f"sqlite:///{tmp_path / 'mail.db'}"))

    @orders.app.post("/orders/{n}", status_code=202)
    async def place(n: int) -> dict[str, object]:
        assert orders.database is not None
        async with orders.database.session() as session:
            await session.execute(insert(notes).values(text=f"order {n}"))
            event = await orders.events.publish(session, "orders.placed", {"n": n}, key=str(n))
        return {"event": event.id}

    @mail.on("orders.placed")
    async def send(event: Event, session: AsyncSession) -> None:
        await session.execute(insert(notes).values(text=f"mail for {event.data['n']}"))

    return orders, mail


async def texts(service: Service) -> list[str]:
    assert service.database is not None
    async with service.database.connection() as conn:
        return list((await conn.execute(select(notes.c.text).order_by(notes.c.id))).scalars())


async def prepare(*services: Service) -> None:
    for service in services:
        assert service.database is not None
        await service.database.create_all(metadata)
        await service.events.create_tables()


async def test_two_services_on_the_memory_bus_publish_and_handle_in_a_test(
    tmp_path: Path,
) -> None:
    orders, mail = make_services(tmp_path)
    bus = use_memory_bus(orders)
    use_memory_bus(mail, bus)
    await prepare(orders, mail)
    async with in_process(orders) as client, in_process(mail):
        for n in (1, 2):
            assert (await client.post(f"/orders/{n}")).status_code == 202
        await settle(orders, mail)
        assert await texts(orders) == ["order 1", "order 2"]
        assert await texts(mail) == ["mail for 1", "mail for 2"]
        assert len(bus.published("orders.placed")) == 2
        ready = (await client.get("/health/ready")).json()
        detail = ready["checks"]["events"]["detail"]
        assert detail["connected"] is True
        assert detail["outbox"]["pending"] == 0
        metrics = (await client.get("/metrics")).text
        assert (
            'meshgate_events_published_total{service="orders",topic="orders.placed"} 2.0' in metrics
        )
        assert "meshgate_events_outbox_oldest_seconds" in metrics


async def test_the_service_group_defaults_to_its_name_and_consumers_stop_with_it(
    tmp_path: Path,
) -> None:
    orders, mail = make_services(tmp_path)
    [consumer] = mail.events.consumers
    assert consumer.group == "mail"
    bus = use_memory_bus(mail)
    use_memory_bus(orders, bus)
    await prepare(orders, mail)
    async with in_process(mail):
        await mail.events.wait_started()
        assert consumer._task is not None
    assert consumer._task is None
    assert mail.events.relay is None


@pytest.fixture
def nats_env(monkeypatch: pytest.MonkeyPatch, namespace: str) -> str:
    from tests.events.conftest import machine_nats

    monkeypatch.setenv("MESHGATE_EVENTS_URL", machine_nats())
    monkeypatch.setenv("MESHGATE_EVENTS_NAMESPACE", namespace)
    return namespace


@pytest.mark.services
async def test_services_serving_on_loopback_exchange_events_through_nats(
    tmp_path: Path, nats_env: str
) -> None:
    import asyncio

    import httpx

    from tests.events.conftest import clean_bus

    orders, mail = make_services(tmp_path)
    await prepare(orders, mail)
    try:
        async with serving(orders) as address, serving(mail):
            async with httpx.AsyncClient(base_url=f"http://{address}") as client:
                assert (await client.post("/orders/7")).status_code == 202
                async with asyncio.timeout(15):
                    while await texts(mail) != ["mail for 7"]:
                        await asyncio.sleep(0.05)
                ready = (await client.get("/health/ready")).json()
            assert ready["checks"]["events"]["detail"]["bus"] == "nats://127.0.0.1:4222"
    finally:
        bus = orders.events.bus
        await bus.connect()
        await clean_bus(bus)
        await bus.close()


async def test_readiness_passes_while_the_bus_is_away_and_says_so(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    service = Service("lonely", database=Database(f"sqlite:///{tmp_path / 'l.db'}"))
    from meshgate.events import connect_bus

    service.events.use_bus(connect_bus(f"nats://127.0.0.1:{port}"))
    await service.events.create_tables()
    async with in_process(service) as client:
        answer = await client.get("/health/ready")
    assert answer.status_code == 200
    detail = answer.json()["checks"]["events"]["detail"]
    assert detail["connected"] is False
    assert f"127.0.0.1:{port}" in detail["bus_error"]


def test_db_upgrade_of_a_service_that_uses_events_makes_its_event_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshgate.cli import app
    from meshgate.data import migrations

    package = tmp_path / "evsvc"
    package.mkdir()
    (package / "__init__.py").write_text("")
    migrations.init(package / "migrations")
    db_file = tmp_path / "svc.db"
    (package / "app.py").write_text(
        textwrap.dedent(
            f"""
            from meshgate.data import Database
            from meshgate.service import Service

            service = Service("evsvc", database=Database("sqlite:///{db_file}"))

            @service.on("users.created")
            async def welcome(event, session):
                pass
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        result = CliRunner().invoke(app, ["db", "upgrade", "evsvc.app"])
    finally:
        sys.modules.pop("evsvc.app", None)
        sys.modules.pop("evsvc", None)
    assert result.exit_code == 0, result.output
    assert "event tables at revision" in result.output
    import sqlite3

    with sqlite3.connect(db_file) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meshgate_outbox", "meshgate_inbox", "meshgate_sagas", "meshgate_saga_steps"} <= names
