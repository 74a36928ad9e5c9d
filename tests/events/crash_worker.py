"""A process for the crash tests (not a test module): an outbox relay, or a saga
orchestrator, that a test starts, freezes at a fault point and kills with SIGKILL.

    python -m tests.events.crash_worker relay DB_URL NATS_URL NAMESPACE PREFIX WINDOW
    python -m tests.events.crash_worker saga DB_URL CALLEE_URL PREFIX LEASE [start]
"""

from __future__ import annotations

import asyncio
import sys

import httpx

from meshgate.data import Database
from meshgate.events import Events, Saga, StepContext, TopicSettings
from meshgate.events.bus.nats import NatsBus
from meshgate.events.outbox import Relay
from meshgate.events.sagas import SagaRunner

TOPIC = "crash.events"


async def relay(db_url: str, nats_url: str, namespace: str, prefix: str, window: str) -> None:
    database = Database(db_url)
    bus = NatsBus(nats_url, namespace=namespace)
    events = Events(database, service="crash", bus=bus, table_prefix=prefix)
    events.topic(TOPIC, TopicSettings(duplicate_window=float(window)))
    await bus.connect()
    worker = Relay(
        database,
        bus,
        events.tables,
        service="crash",
        metrics=events.metrics,
        topics=events.topic_settings,
        lease=1.0,
    )
    while (await worker.measure()).pending:
        await worker.run_once()
    print("drained", flush=True)
    await bus.close()
    await database.close()


def crash_saga(callee: str) -> Saga:
    saga = Saga("crash-saga", timeout=60)

    async def apply(ctx: StepContext) -> dict[str, str]:
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{callee}/apply", params={"key": ctx.idempotency_key})
        answer.raise_for_status()
        return {"step": ctx.step}

    for name in ("a", "b", "c"):
        saga.step(name, timeout=5)(apply)
    return saga


async def saga(db_url: str, callee: str, prefix: str, lease: str, start: bool) -> None:
    database = Database(db_url)
    events = Events(database, service="crash", bus="nats://127.0.0.1:1", table_prefix=prefix)
    runner = SagaRunner(
        database,
        events.tables,
        service="crash",
        metrics=events.metrics,
        instance=f"crash-{id(events)}",
        lease=float(lease),
        poll_interval=0.1,
    )
    the_saga = crash_saga(callee)
    runner.register(the_saga)
    runner.start_background()
    if start:
        async with database.session() as session:
            saga_id = await the_saga.start(session, {"n": 1})
        print(f"started {saga_id}", flush=True)
    while True:
        counts = await runner.counts()
        if counts and set(counts) <= {"completed", "compensated", "stuck"}:
            break
        await asyncio.sleep(0.05)
    print(f"ended {counts}", flush=True)
    await runner.stop()
    await database.close()


def main() -> None:
    kind, *args = sys.argv[1:]
    if kind == "relay":
        asyncio.run(relay(*args))
    else:
        db_url, callee, prefix, lease, *rest = args
        asyncio.run(saga(db_url, callee, prefix, lease, start=rest == ["start"]))


if __name__ == "__main__":
    main()
