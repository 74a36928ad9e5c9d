"""``meshgate events dead-letters`` and ``meshgate events replay`` on the machine's NATS."""

from __future__ import annotations

import asyncio
import json

import pytest
from typer.testing import CliRunner

from meshgate.cli import app
from meshgate.events import ConsumerSettings, DeadLetter, Event, TopicSettings, connect_bus
from tests.events.conftest import clean_bus, machine_nats

pytestmark = pytest.mark.services


@pytest.fixture
def namespace() -> str:
    import uuid

    return f"t{uuid.uuid4().hex[:10]}"


async def test_dead_letters_are_listed_and_one_replayed_to_its_topic(namespace: str) -> None:
    url = machine_nats()
    bus = connect_bus(url, namespace=namespace)
    await bus.connect()
    try:
        event = Event(id="ev-7", type="orders.placed", source="/orders", data={"n": 7})
        await bus.dead_letter(
            DeadLetter(
                "orders.placed",
                "payments",
                "payments",
                "ev-7",
                event.encode(),
                "KeyError: 'sku'",
                5,
            )
        )
        await bus.dead_letter(
            DeadLetter("users.created", "mail", "notifications", "ev-8", b"{}", "boom", 3)
        )
        cli = CliRunner()
        base = ["--url", url, "--namespace", namespace]

        def run(*args: str) -> object:
            return cli.invoke(app, ["events", *args, *base], env={"COLUMNS": "250"})

        listed = await asyncio.to_thread(run, "dead-letters")
        assert listed.exit_code == 0, listed.output  # type: ignore[attr-defined]
        assert "payments" in listed.output
        assert "KeyError" in listed.output
        only = await asyncio.to_thread(run, "dead-letters", "--service", "notifications", "--json")
        rows = json.loads(only.output)  # type: ignore[attr-defined]
        assert [(r["event_id"], r["group"]) for r in rows] == [("ev-8", "mail")]
        everything = json.loads((await asyncio.to_thread(run, "dead-letters", "--json")).output)  # type: ignore[attr-defined]
        first = next(r for r in everything if r["event_id"] == "ev-7")
        replayed = await asyncio.to_thread(run, "replay", first["id"])
        assert replayed.exit_code == 0, replayed.output  # type: ignore[attr-defined]
        assert "sent back to orders.placed for group payments" in replayed.output  # type: ignore[attr-defined]
        left = [d.event_id for d in await bus.dead_letters()]
        assert left == ["ev-8"]
        await bus.ensure_topic("orders.placed", TopicSettings())
        sub = await bus.subscribe("orders.placed", "payments", ConsumerSettings())
        got = await sub.fetch(10, 2.0)
        assert [Event.decode(d.data).id for d in got] == ["ev-7"]
        again = await asyncio.to_thread(run, "replay", first["id"])
        assert again.exit_code == 1  # type: ignore[attr-defined]
        assert "no dead letter" in again.output  # type: ignore[attr-defined]
    finally:
        await clean_bus(bus)
        await bus.close()


def test_an_unreachable_bus_is_one_line_with_its_address() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = CliRunner().invoke(
        app, ["events", "dead-letters", "--url", f"nats://127.0.0.1:{port}"]
    )
    assert result.exit_code == 1
    assert f"127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output
