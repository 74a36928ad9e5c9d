"""Crash injection with SIGKILL, each followed by the invariant it must keep:

- a relay killed between the publish and the mark: the next relay publishes again;
  outside the duplicate window the consumer sees the duplicate delivery, and the
  inbox applies it once (inside the window, JetStream drops it);
- an orchestrator killed in the middle of a saga: another process takes the saga
  over once the lease ran out, attempts the interrupted step again with the same
  idempotency key (applied once by the callee), and the saga ends completed.

(The broker restarted mid-stream: tests/e2e/test_up_events.py; the consumer's
database down during a delivery: tests/events/test_inbox.py.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import Request
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from meshgate.events import ConsumerSettings, Event, Events, TopicSettings
from meshgate.events.bus.nats import NatsBus
from meshgate.events.sagas import SagaRunner
from meshgate.service import Service
from meshgate.service.testing import serving
from tests.events.conftest import machine_nats

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "crash.events"


def spawn(*args: str, fault: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MESHGATE_FAULT_PAUSE", None)
    if fault is not None:
        env["MESHGATE_FAULT_PAUSE"] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "tests.events.crash_worker", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def frozen(proc: subprocess.Popen[str], marker: Path, timeout: float = 30) -> None:
    """Wait until ``proc`` reached its fault point (it wrote ``marker``), then SIGKILL it."""
    async with asyncio.timeout(timeout):
        while not marker.exists():  # noqa: ASYNC240 - a cheap stat, polled
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                pytest.fail(f"the worker exited with {proc.returncode} first:\n{out}")
            await asyncio.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    await asyncio.to_thread(proc.wait, 10)
    if proc.stdout is not None:
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


async def finished(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    try:
        out, _ = await asyncio.to_thread(proc.communicate, None, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the worker did not finish:\n{out}")
    assert proc.returncode == 0, out
    return out


@pytest.fixture
def kill_at_exit() -> Iterator[Callable[[subprocess.Popen[str]], subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def track(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
        procs.append(proc)
        return proc

    yield track
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None and not proc.stdout.closed:
            proc.stdout.close()


@pytest.mark.parametrize(
    "case",
    [
        pytest.param((0.2, 6), id="outside-window"),
        pytest.param((120.0, 3), id="inside-window"),
    ],
)
async def test_a_relay_killed_between_publish_and_mark_is_applied_once(
    events: Events,
    tmp_path: Path,
    namespace: str,
    case: tuple[float, int],
    kill_at_exit: Callable[[subprocess.Popen[str]], subprocess.Popen[str]],
) -> None:
    window, stored = case
    database = events.database
    assert database is not None
    url = database.engine.url.render_as_string(hide_password=False)
    effects = Table(
        f"{events.tables.prefix}effects",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(64), nullable=False),
    )
    async with database.connection() as conn:
        await conn.run_sync(effects.metadata.create_all)
    try:
        async with database.session() as session:
            for n in range(3):
                await events.publish(session, TOPIC, {"n": n}, key=str(n))
        marker = tmp_path / "published"
        args = ("relay", url, machine_nats(), namespace, events.tables.prefix, str(window))
        first = kill_at_exit(spawn(*args, fault=f"relay.published:{marker}"))
        await frozen(first, marker)
        # Killed after the bus stored the events, before the rows were marked sent.
        assert (await Relay_pending(events)) == 3
        if window < 5:  # let the duplicate window pass, so that the bus keeps the copy
            await asyncio.sleep(window + 0.3)
        out = await finished(kill_at_exit(spawn(*args)))
        assert "drained" in out
        assert (await Relay_pending(events)) == 0
        bus = events.bus
        await bus.connect()
        from meshgate.events.envelope import stream_name

        assert isinstance(bus, NatsBus)
        info = await bus.js.stream_info(stream_name(bus.subject(TOPIC)))
        assert info.state.messages == stored  # the bus kept the duplicates or dropped them

        consumer = Events(
            database, service="crash", bus=bus, table_prefix=events.tables.prefix, relay=False
        )
        consumer.topic(TOPIC, TopicSettings(duplicate_window=window))

        @consumer.on(TOPIC, group="g", settings=ConsumerSettings(batch=1))
        async def handle(event: Event, session: AsyncSession) -> None:
            await session.execute(insert(effects).values(event_id=event.id))

        [the] = consumer.consumers
        async with asyncio.timeout(20):
            while sum([await the.run_once(0.3) for _ in range(stored)]) or await _lag(the):
                pass
        async with database.connection() as conn:
            ids = (await conn.execute(select(effects.c.event_id))).scalars().all()
        assert len(ids) == len(set(ids)) == 3
        labels = {"service": "crash", "topic": TOPIC, "group": "g"}
        duplicates = consumer.registry.get_sample_value(
            "meshgate_events_handled_total", {**labels, "outcome": "duplicate"}
        )
        assert duplicates == stored - 3
    finally:
        async with database.connection() as conn:
            await conn.run_sync(effects.metadata.drop_all)


async def _lag(consumer: object) -> bool:
    sub = await consumer.subscription()  # type: ignore[attr-defined]
    return bool(await sub.pending())


async def Relay_pending(events: Events) -> int:  # noqa: N802 - reads like the thing it counts
    outbox = events.tables.outbox
    assert events.database is not None
    async with events.database.connection() as conn:
        count = (
            await conn.execute(select(func.count()).where(outbox.c.sent_at.is_(None)))
        ).scalar()
    return int(count or 0)


async def test_an_orchestrator_killed_mid_saga_is_resumed_by_another_and_completes(
    events: Events,
    tmp_path: Path,
    kill_at_exit: Callable[[subprocess.Popen[str]], subprocess.Popen[str]],
) -> None:
    database = events.database
    assert database is not None
    url = database.engine.url.render_as_string(hide_password=False)
    calls: list[str] = []
    applied: Counter[str] = Counter()
    callee = Service("callee")

    @callee.app.post("/apply")
    async def apply(request: Request) -> dict[str, bool]:
        key = request.query_params["key"]
        calls.append(key)
        first = key not in applied
        applied[key] = 1
        return {"applied": first}

    async with serving(callee) as address:
        marker = tmp_path / "acted"
        args = ("saga", url, f"http://{address}", events.tables.prefix, "1.0")
        first = kill_at_exit(spawn(*args, "start", fault=f"saga.action.b:{marker}"))
        await frozen(first, marker)
        # Step b reached the callee; its driver died before recording it.
        second = kill_at_exit(spawn(*args))
        out = await finished(second)
    assert "ended {'completed': 1}" in out
    runner = SagaRunner(
        database, events.tables, service="crash", metrics=events.metrics, instance="reader"
    )
    from tests.events.crash_worker import crash_saga

    runner.register(crash_saga("http://unused"))
    [saga] = await runner.list()
    shown = await runner.get(saga["id"])
    assert [(a["step"], a["attempt"], a["status"]) for a in shown["attempts"]] == [
        ("a", 1, "ok"),
        ("b", 1, "lost"),
        ("b", 2, "ok"),
        ("c", 1, "ok"),
    ]
    key_b = f"{saga['id']}:b"
    assert calls.count(key_b) == 2  # attempted again after the crash, with the same key
    assert applied == Counter({f"{saga['id']}:{s}": 1 for s in "abc"})  # and applied once
