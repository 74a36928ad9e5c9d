"""``meshgate up`` with the embedded event bus: a real nats-server from the wheel,
started before the services that use it (readiness-gated), its store in
``.meshgate/nats``, restarted after a crash on the same port, stopped after the
services; and the crash test of the issue: the broker killed (SIGKILL) mid-stream
while a service keeps publishing, with nothing lost and nothing applied twice."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_up import Up, finish, start_up

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

APP = '''
"""A service that publishes what it is posted and handles it back, counting."""
import os

from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select

from meshgate.data import Database
from meshgate.service import Service

metadata = MetaData()
seen = Table(
    "seen", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("n", Integer, nullable=False),
    Column("event_id", String(64), nullable=False),
)
service = Service("echo", database=Database(os.environ["ECHO_DATABASE_URL"], name="echo"))


@service.on_startup
async def tables() -> None:
    await service.database.create_all(metadata)
    await service.events.create_tables()


@service.app.post("/publish/{n}", status_code=202)
async def publish(n: int) -> dict:
    async with service.database.session() as session:
        await service.events.publish(session, "echo.said", {"n": n}, key=str(n % 4))
    return {"n": n}


@service.app.get("/seen")
async def counts() -> dict:
    async with service.database.session() as session:
        rows = (await session.execute(select(seen.c.n, func.count()).group_by(seen.c.n))).all()
    return {"counts": {str(n): c for n, c in rows}}


@service.on("echo.said", backoff=(0.1,))
async def said(event, session) -> None:
    await session.execute(insert(seen).values(n=event.data["n"], event_id=event.id))
'''

SYSTEM = """
name: evsys
services:
  echo:
    app: echoapp:service
    database: embedded
    broker: embedded
"""


@pytest.fixture
def system(tmp_path: Path) -> Iterator[Up]:
    (tmp_path / "echoapp.py").write_text(textwrap.dedent(APP))
    (tmp_path / "meshgate.yaml").write_text(SYSTEM)
    up = start_up(tmp_path)
    try:
        up.wait_ready()
        yield up
    finally:
        finish(up)


def echo_url(up: Up) -> str:
    return f"http://{up.instance('echo-1')['address']}"


def wait_counts(url: str, want: int, timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = httpx.get(f"{url}/seen", timeout=5).json()["counts"]
        if len(counts) >= want:
            return counts
        time.sleep(0.1)
    pytest.fail(f"only {len(counts)} of {want} events handled: {counts}")


def test_the_embedded_nats_server_runs_before_the_service_and_carries_its_events(
    system: Up,
) -> None:
    nats = system.instance("nats")
    assert nats["status"] == "ready"
    assert nats["pid"]
    text = system.text()
    # Readiness-gated: the service started only once nats was ready.
    assert text.index("nats") < text.index("echo-1")
    assert (system.state / "nats" / "jetstream").is_dir()
    url = echo_url(system)
    for n in range(5):
        assert httpx.post(f"{url}/publish/{n}", timeout=5).status_code == 202
    assert wait_counts(url, 5) == {str(n): 1 for n in range(5)}
    ready = httpx.get(f"{url}/health/ready", timeout=5).json()
    assert ready["checks"]["events"]["detail"]["connected"] is True
    assert ready["checks"]["events"]["detail"]["bus"].startswith("nats://127.0.0.1:")


def test_the_broker_killed_mid_stream_loses_nothing_and_applies_nothing_twice(
    system: Up,
) -> None:
    url = echo_url(system)
    port_before = system.instance("nats")["port"]
    total = 60
    killed = False
    with httpx.Client(timeout=10) as client:
        for n in range(total):
            assert client.post(f"{url}/publish/{n}").status_code == 202
            if n == total // 3:
                pid = system.instance("nats")["pid"]
                os.kill(pid, signal.SIGKILL)
                killed = True
    assert killed
    counts = wait_counts(url, total, timeout=90)
    assert counts == {str(n): 1 for n in range(total)}
    nats = system.instance("nats")
    assert nats["restarts"] >= 1
    assert nats["port"] == port_before  # same ports: services reconnect to the same URL
