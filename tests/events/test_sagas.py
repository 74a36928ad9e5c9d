"""Durable sagas on SQLite, PostgreSQL and MariaDB: steps in order with results,
retries with stable idempotency keys, timeouts, compensation in reverse order,
``stuck`` and retry, takeover after a lost driver, and the HTTP API."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from meshgate.data import Database
from meshgate.events import Events, Saga, SagaError, StepContext, StepFailed
from meshgate.events.sagas import SagaRunner

pytestmark = pytest.mark.services


class Callee:
    """A fake remote service that applies each idempotency key once."""

    def __init__(self) -> None:
        self.applied: Counter[str] = Counter()
        self.calls: list[str] = []

    def call(self, ctx: StepContext) -> None:
        self.calls.append(ctx.idempotency_key)
        self.applied[ctx.idempotency_key] = 1


@pytest.fixture
async def sagas_events(database: Database, prefix: str) -> AsyncIterator[Events]:
    """Events with saga tables, no bus needed (the steps are local)."""
    events = Events(database, service="orders", bus="nats://127.0.0.1:1", table_prefix=prefix)
    await events.create_tables()
    events.runners = []  # type: ignore[attr-defined]
    try:
        yield events
    finally:
        for runner in [events._sagas, *events.runners]:  # type: ignore[attr-defined]
            if runner is not None:
                await runner.stop()
        await events.drop_tables()


def runner_of(events: Events, **options: Any) -> SagaRunner:
    assert events.database is not None
    defaults: dict[str, Any] = {"lease": 5.0, "poll_interval": 0.05}
    runner = SagaRunner(
        events.database,
        events.tables,
        service="orders",
        metrics=events.metrics,
        instance=options.pop("instance", "me"),
        **{**defaults, **options},
    )
    events.runners.append(runner)  # type: ignore[attr-defined]
    return runner


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def status_of(runner: SagaRunner, saga_id: str, *wanted: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal found
        found = await runner.get(saga_id)
        return found["status"] in wanted

    await until(done)
    return found


def three_steps(callee: Callee, *, fail: dict[str, Any] | None = None) -> tuple[Saga, list[str]]:
    """reserve -> charge -> confirm, with compensations; ``fail`` makes steps fail."""
    fail = fail or {}
    log: list[str] = []
    saga = Saga("place-order", timeout=30)

    async def act(ctx: StepContext) -> Any:
        log.append(f"{ctx.step}#{ctx.attempt}")
        how = fail.get(ctx.step)
        if callable(how):
            how = how(ctx)
        if how == "final":
            raise StepFailed(f"{ctx.step} said no")
        if how == "error":
            raise RuntimeError(f"{ctx.step} broke")
        if how == "slow":
            await asyncio.sleep(10)
        callee.call(ctx)
        return {"done": ctx.step, "saw": sorted(ctx.results)}

    async def undo(ctx: StepContext) -> None:
        log.append(f"undo {ctx.step}#{ctx.attempt}")
        how = fail.get(f"undo {ctx.step}")
        if callable(how):
            how = how(ctx)
        if how == "error":
            raise RuntimeError(f"cannot undo {ctx.step}")
        callee.call(ctx)

    for name in ("reserve", "charge"):
        step = saga.step(name, timeout=1.0, attempts=2, compensation_attempts=2, retry_delay=0.01)(
            act
        )
        step.compensate(undo)
    saga.step("confirm", timeout=1.0, attempts=2, retry_delay=0.01)(act)
    return saga, log


async def start(events: Events, runner: SagaRunner, saga: Saga, data: Any) -> str:
    assert events.database is not None
    async with events.database.session() as session:
        return await saga.start(session, data)


async def test_a_saga_runs_its_steps_in_order_and_ends_completed(sagas_events: Events) -> None:
    callee = Callee()
    saga, log = three_steps(callee)
    ended: list[tuple[str, dict[str, Any]]] = []

    @saga.on_completed
    async def completed(ctx: StepContext, session: AsyncSession) -> None:
        ended.append((ctx.saga_id, ctx.results))

    runner = runner_of(sagas_events)
    runner.register(saga)
    runner.start_background()
    saga_id = await start(sagas_events, runner, saga, {"order": 1})
    shown = await status_of(runner, saga_id, "completed")
    assert log == ["reserve#1", "charge#1", "confirm#1"]
    assert shown["results"]["confirm"] == {"done": "confirm", "saw": ["charge", "reserve"]}
    assert shown["input"] == {"order": 1}
    assert [(a["step"], a["phase"], a["attempt"], a["status"]) for a in shown["attempts"]] == [
        ("reserve", "action", 1, "ok"),
        ("charge", "action", 1, "ok"),
        ("confirm", "action", 1, "ok"),
    ]
    assert all(a["duration_ms"] is not None for a in shown["attempts"])
    assert ended == [(saga_id, shown["results"])]
    assert callee.calls == [f"{saga_id}:reserve", f"{saga_id}:charge", f"{saga_id}:confirm"]
    assert shown["lease"]["owner"] is None
    labels = {"service": "orders", "saga": "place-order"}
    metrics = sagas_events.registry
    assert metrics.get_sample_value("meshgate_sagas_total", {**labels, "outcome": "started"}) == 1
    assert metrics.get_sample_value("meshgate_sagas_total", {**labels, "outcome": "completed"}) == 1


async def test_a_step_that_fails_for_good_undoes_only_the_steps_before_it(
    sagas_events: Events,
) -> None:
    callee = Callee()
    saga, log = three_steps(callee, fail={"charge": "final"})
    why: list[str | None] = []

    @saga.on_compensated
    async def compensated(ctx: StepContext, session: AsyncSession) -> None:
        why.append(ctx.error)

    runner = runner_of(sagas_events)
    runner.register(saga)
    runner.start_background()
    saga_id = await start(sagas_events, runner, saga, {})
    shown = await status_of(runner, saga_id, "compensated")
    assert log == ["reserve#1", "charge#1", "undo reserve#1"]
    assert why == ["step 'charge' failed: charge said no"]
    assert shown["error"] == "step 'charge' failed: charge said no"
    assert callee.calls[-1] == f"{saga_id}:reserve:compensation"


async def test_a_step_of_unknown_outcome_is_retried_with_its_key_then_undone_too(
    sagas_events: Events,
) -> None:
    callee = Callee()
    saga, log = three_steps(callee, fail={"charge": "error"})
    runner = runner_of(sagas_events)
    runner.register(saga)
    runner.start_background()
    saga_id = await start(sagas_events, runner, saga, {})
    shown = await status_of(runner, saga_id, "compensated")
    assert log == ["reserve#1", "charge#1", "charge#2", "undo charge#1", "undo reserve#1"]
    attempts = [(a["step"], a["phase"], a["status"], a["error"]) for a in shown["attempts"]]
    assert attempts[1:3] == [
        ("charge", "action", "failed", "RuntimeError: charge broke"),
        ("charge", "action", "failed", "RuntimeError: charge broke"),
    ]


async def test_a_failed_attempt_then_a_good_one_completes(sagas_events: Events) -> None:
    callee = Callee()
    saga, log = three_steps(callee, fail={"reserve": lambda c: "error" if c.attempt == 1 else None})
    runner = runner_of(sagas_events)
    runner.register(saga)
    runner.start_background()
    saga_id = await start(sagas_events, runner, saga, {})
    await status_of(runner, saga_id, "completed")
    assert log[:2] == ["reserve#1", "reserve#2"]
    assert callee.applied[f"{saga_id}:reserve"] == 1


async def test_a_step_past_its_timeout_counts_as_failed(sagas_events: Events) -> None:
    callee = Callee()
    saga, _ = three_steps(callee, fail={"confirm": "slow"})
    runner = runner_of(sagas_events)
    runner.register(saga)
    runner.start_background()
    saga_id = await start(sagas_events, runner, saga, {})
    shown = await status_of(runner, saga_id, "compensated")
    confirm = [a for a in shown["attempts"] if a["step"] == "confirm"]
    assert [a["error"] for a in confirm] == ["no answer within 1 s (timeout)"] * 2


async def test_a_saga_past_its_own_timeout_compensates(sagas_events: Events) -> None:
    callee = Callee()
    saga = Saga("slow-saga", timeout=0.3)
    undone: list[str] = []

    @saga.step("first", timeout=5)
    async def first(ctx: StepContext) -> None:
        callee.call(ctx)

    @first.compensate
    async def unfirst(ctx: StepContext) -> None:
        undone.append(ctx.step)

    @saga.step("second", timeout=5, attempts=100, retry_delay=0.05)
    async def second(ctx: StepContext) -> None:
        raise RuntimeError("never")

    runner = runner_of(sagas_events)
    runner.register(saga)
    runner.start_background()
    saga_id = await start(sagas_events, runner, saga, {})
    shown = await status_of(runner, saga_id, "compensated")
    assert "saga timed out (0.3 s) in step 'second'" in shown["error"]
    assert undone == ["first"]


async def test_a_compensation_that_keeps_failing_leaves_the_saga_stuck_until_retried(
    sagas_events: Events,
) -> None:
    callee = Callee()
    broken = {"on": True}
    saga, _log = three_steps(
        callee,
        fail={"charge": "final", "undo reserve": lambda c: "error" if broken["on"] else None},
    )
    runner = runner_of(sagas_events)
    runner.register(saga)
    runner.start_background()
    saga_id = await start(sagas_events, runner, saga, {})
    shown = await status_of(runner, saga_id, "stuck")
    assert "compensation of step 'reserve' failed 2 times" in shown["error"]
    assert f"meshgate sagas retry {saga_id}" in shown["error"]
    assert shown["lease"]["owner"] is None
    await asyncio.sleep(0.2)
    assert (await runner.get(saga_id))["status"] == "stuck"  # nothing happens by itself
    other_id = await start(sagas_events, runner, saga, {})
    await status_of(runner, other_id, "stuck")
    broken["on"] = False
    await runner.retry(other_id)
    await status_of(runner, other_id, "compensated")
    with pytest.raises(SagaError, match="is compensated, not stuck"):
        await runner.retry(other_id)
    await runner.retry(saga_id)
    shown = await status_of(runner, saga_id, "compensated")
    undo = [a for a in shown["attempts"] if a["phase"] == "compensation"]
    assert [a["attempt"] for a in undo] == [1, 2, 3]
    assert [a["status"] for a in undo] == ["failed", "failed", "ok"]


async def test_another_instance_takes_over_a_saga_whose_driver_died(
    sagas_events: Events,
) -> None:
    callee = Callee()
    gate = asyncio.Event()
    saga = Saga("takeover")

    @saga.step("one")
    async def one(ctx: StepContext) -> str:
        callee.call(ctx)
        return "one"

    @saga.step("two", timeout=30)
    async def two(ctx: StepContext) -> str:
        callee.call(ctx)
        if ctx.attempt == 1:
            await gate.wait()  # the first driver "dies" here, after the effect
        return "two"

    first = runner_of(sagas_events, instance="first", lease=0.5)
    first.register(saga)
    first.start_background()
    saga_id = await start(sagas_events, first, saga, {})
    async with asyncio.timeout(10):
        while callee.calls.count(f"{saga_id}:two") < 1:
            await asyncio.sleep(0.01)
    # Dies without letting go: its drive ends in the step, its loop stops renewing;
    # its lease stays until it runs out.
    first._stopping = True
    first._wake.set()
    for task in first.active.values():
        task.cancel()
    assert first._loop_task is not None
    await asyncio.wait({first._loop_task, *first.active.values()}, timeout=5)
    second = runner_of(sagas_events, instance="second", lease=0.5)
    saga.runner = None
    second.register(saga)
    second.start_background()
    try:
        shown = await status_of(second, saga_id, "completed")
    finally:
        await second.stop()
    attempts = [(a["step"], a["attempt"], a["status"]) for a in shown["attempts"]]
    assert attempts == [("one", 1, "ok"), ("two", 1, "lost"), ("two", 2, "ok")]
    assert "its driver stopped" in shown["attempts"][1]["error"]
    assert callee.calls.count(f"{saga_id}:two") == 2  # tried again, with the same key
    assert callee.applied[f"{saga_id}:two"] == 1  # and applied once


async def test_a_start_in_a_rolled_back_transaction_never_runs(sagas_events: Events) -> None:
    callee = Callee()
    saga, log = three_steps(callee)
    runner = runner_of(sagas_events)
    runner.register(saga)
    runner.start_background()
    assert sagas_events.database is not None
    database = sagas_events.database

    async def rolled_back() -> None:
        async with database.session() as session:
            await saga.start(session, {})
            raise RuntimeError("the order could not be written")

    with pytest.raises(RuntimeError):
        await rolled_back()
    await asyncio.sleep(0.3)
    assert log == []
    assert await runner.list() == []


def test_declaring_sagas_refuses_what_cannot_work() -> None:
    from meshgate.errors import ConfigError

    saga = Saga("s")
    with pytest.raises(ConfigError, match="not a step name"):
        saga.step("has space")
    saga.step("a")(_nothing)
    with pytest.raises(ConfigError, match="has a step 'a' already"):
        saga.step("a")
    with pytest.raises(ConfigError, match="attempts"):
        saga.step("b", attempts=0)
    with pytest.raises(ConfigError, match="not a saga name"):
        Saga("")
    runner = SagaRunner.__new__(SagaRunner)
    runner.sagas = {}
    runner.service = "x"
    with pytest.raises(SagaError, match="has no steps"):
        runner.register(Saga("empty"))


async def test_start_needs_a_service_driving_the_saga() -> None:
    with pytest.raises(SagaError, match="not driven by any service"):
        await Saga("lonely").start(None, {})  # type: ignore[arg-type]


async def _nothing(ctx: StepContext) -> None:
    return None


async def test_the_http_api_lists_shows_and_retries(tmp_path: Path) -> None:
    from meshgate.service import Service
    from meshgate.service.testing import in_process

    service = Service("orders", database=Database(f"sqlite:///{tmp_path / 'o.db'}"))
    callee = Callee()
    saga, _ = three_steps(callee, fail={"charge": "final", "undo reserve": "error"})
    service.events.saga(saga)
    await service.events.create_tables()
    async with in_process(service) as client:
        assert service.database is not None
        async with service.database.session() as session:
            saga_id = await saga.start(session, {"n": 1})
        await status_of(service.events.sagas, saga_id, "stuck")
        listed = (await client.get("/meshgate/sagas")).json()
        assert listed["counts"] == {"stuck": 1}
        assert [s["id"] for s in listed["sagas"]] == [saga_id]
        assert (await client.get("/meshgate/sagas", params={"status": "completed"})).json()[
            "sagas"
        ] == []
        bad = await client.get("/meshgate/sagas", params={"status": "odd"})
        assert bad.status_code == 400
        assert bad.headers["content-type"] == "application/problem+json"
        shown = (await client.get(f"/meshgate/sagas/{saga_id}")).json()
        assert [a["step"] for a in shown["attempts"]] == ["reserve", "charge", "reserve", "reserve"]
        missing = await client.get("/meshgate/sagas/nope")
        assert missing.status_code == 404
        assert "meshgate sagas list" in missing.json()["detail"]
        retried = await client.post(f"/meshgate/sagas/{saga_id}/retry")
        assert retried.status_code == 202
        await status_of(service.events.sagas, saga_id, "stuck")
        again = await client.post("/meshgate/sagas/nope/retry")
        assert again.status_code == 404


async def test_a_service_without_sagas_says_so(tmp_path: Path) -> None:
    from meshgate.service import Service
    from meshgate.service.testing import in_process

    service = Service("web", database=Database(f"sqlite:///{tmp_path / 'w.db'}"))
    service.events  # noqa: B018 - uses events, but drives no saga
    async with in_process(service) as client:
        answer = await client.get("/meshgate/sagas")
    assert answer.status_code == 404
    assert "drives no sagas" in answer.json()["detail"]
