"""Driving sagas durably: state in the orchestrating service's database, leases
that decide which instance drives which saga, retries with idempotency keys,
timeouts, compensation in reverse order, and ``stuck`` sagas kept for a person.

A saga is a row of the sagas table (status, position, input and results, error,
lease) and one row per finished attempt of a step in the saga steps table. The
instance that starts a saga holds its lease and drives it at once; every instance
also looks, every ``poll_interval``, for sagas whose lease ran out (their driver
died) and takes them over with a compare-and-set on the lease. Each finished
attempt is recorded in the same transaction that moves the saga on, guarded by the
lease: an instance that lost its lease changes nothing. A step that crashed with
its driver is attempted again by the next one with the same idempotency key.

Statuses: ``running`` (forward steps), ``compensating`` (undoing, last first),
``completed``, ``compensated``, and ``stuck`` (a compensation kept failing: nothing
more happens until :meth:`SagaRunner.retry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from meshgate.data.database import Database
from meshgate.data.errors import DataError
from meshgate.events import _faults
from meshgate.events.envelope import encode_data, new_event_id
from meshgate.events.errors import EnvelopeError, SagaError, SagaNotFoundError, StepFailed
from meshgate.events.metrics import EventMetrics
from meshgate.events.outbox import stop_task
from meshgate.events.saga import Saga, Step, StepContext
from meshgate.events.schema import EventTables

__all__ = ["ACTIVE", "STATUSES", "SagaRunner"]

log = logging.getLogger("meshgate.events.sagas")

STATUSES = ("running", "compensating", "completed", "compensated", "stuck")
"""Every status a saga can have."""
ACTIVE = ("running", "compensating")
"""The statuses of sagas that are driven."""

_STARTED = "meshgate.sagas.started"

_Counts = dict[tuple[str, str], int]
"""The last attempt number by (step, phase)."""
_Adopt = dict[tuple[str, str], tuple[int, int]]
"""Attempts recorded as running, to take over: (step, phase) -> (row id, attempt)."""


@dataclass(frozen=True, slots=True)
class _Fresh:
    """A saga this instance just started: what its drive needs, without reading it back."""

    id: str
    name: str
    data: dict[str, Any]
    deadline: datetime
    first_attempt: int
    """The row of its first attempt, recorded as running at the start."""

    def row(self) -> Any:
        return SimpleNamespace(
            id=self.id,
            name=self.name,
            status="running",
            position=0,
            error=None,
            data=json.dumps(self.data),
            deadline=self.deadline,
        )


class _LeaseLostError(Exception):
    """Another instance drives this saga now."""


class _StoppingError(Exception):
    """This instance stops; the saga is let go, to be resumed."""


def _new_id(result: Any) -> int:
    """The id the database gave the row an INSERT just made."""
    key = result.inserted_primary_key
    if not key or key[0] is None:  # pragma: no cover - every supported engine returns it
        raise SagaError("the database did not return the id of a saga step it recorded")
    return int(key[0])


async def _lazy_commit(conn: AsyncConnection | AsyncSession) -> None:
    """On PostgreSQL, do not wait for the disk at this commit: a transition lost in a
    crash of the database itself means a step attempted again with its idempotency
    key, which the callee applies once. Endings, which carry the service's own
    writes, keep the full guarantee."""
    bind = conn.bind if isinstance(conn, AsyncSession) else conn
    if bind is not None and bind.dialect.name == "postgresql":
        await conn.execute(text("SET LOCAL synchronous_commit TO OFF"))


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat().replace("+00:00", "Z")


def _error(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SagaRunner:
    """Drives the sagas registered with it, in ``database``; see the module docstring."""

    def __init__(
        self,
        database: Database,
        tables: EventTables,
        *,
        service: str,
        metrics: EventMetrics,
        instance: str,
        lease: float = 10.0,
        poll_interval: float = 0.5,
        max_active: int = 64,
    ) -> None:
        self.database = database
        self.tables = tables
        self.service = service
        self.metrics = metrics
        self.instance = instance
        self.lease = lease
        self.poll_interval = poll_interval
        self.max_active = max_active
        self.sagas: dict[str, Saga] = {}
        self.active: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[str, _Fresh | None] = {}
        """Sagas leased here, waiting for a free slot (in order)."""
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.last_error: str | None = None

    # -- declaring and starting

    def register(self, saga: Saga) -> None:
        """Drive ``saga`` here (its ``start`` then works)."""
        if saga.name in self.sagas and self.sagas[saga.name] is not saga:
            raise SagaError(f"two sagas are named {saga.name!r} in {self.service!r}")
        if not saga.steps:
            raise SagaError(f"saga {saga.name!r} has no steps; add them with @saga.step(...)")
        self.sagas[saga.name] = saga
        saga.runner = self

    async def start(
        self, session: AsyncSession | AsyncConnection, saga: Saga, data: Any, *, saga_id: str | None
    ) -> str:
        """Insert the saga (leased to this instance) in the caller's transaction; it is
        driven once that commits."""
        saga_id = saga_id or new_event_id()
        doc = {"input": encode_data(data), "results": {}}
        now = _now()
        await session.execute(
            insert(self.tables.sagas).values(
                id=saga_id,
                name=saga.name,
                status="running",
                data=json.dumps(doc),
                position=0,
                error=None,
                lease_owner=self.instance,
                lease_until=now + timedelta(seconds=self.lease),
                deadline=now + timedelta(seconds=saga.timeout),
                created_at=now,
                updated_at=now,
            )
        )
        # The first attempt is recorded as running in the same transaction: the
        # drive that starts after the commit takes it over (one write fewer per saga).
        first = await session.execute(
            insert(self.tables.saga_steps).values(
                saga_id=saga_id,
                position=0,
                step=saga.steps[0].name,
                phase="action",
                attempt=1,
                status="running",
                started_at=now,
            )
        )
        fresh = _Fresh(
            id=saga_id,
            name=saga.name,
            data=doc,
            deadline=now + timedelta(seconds=saga.timeout),
            first_attempt=_new_id(first),
        )
        self._after_commit(session, fresh)
        return saga_id

    def _after_commit(self, session: AsyncSession | AsyncConnection, fresh: _Fresh) -> None:
        sync: Any = session.sync_session if isinstance(session, AsyncSession) else None
        if sync is None:
            # A Core connection has no after-commit event: the poll takes the saga
            # once its lease (ours, unused) runs out.
            return
        started: list[_Fresh] = sync.info.setdefault(_STARTED, [])
        first = not started
        started.append(fresh)
        if not first:
            return

        def after_commit(s: Any) -> None:
            for one in s.info.pop(_STARTED, []):
                self.metrics.sagas.labels(self.service, one.name, "started").inc()
                self._launch(one.id, fresh=one)

        def after_rollback(s: Any) -> None:
            s.info.pop(_STARTED, None)

        sa_event.listen(sync, "after_commit", after_commit, once=True)
        sa_event.listen(sync, "after_soft_rollback", after_rollback, once=True)

    # -- running

    def start_background(self) -> None:
        """Start looking for sagas to drive (until :meth:`stop`)."""
        if self._loop_task is None:
            self._stopping = False
            self._loop_task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"meshgate-sagas-{self.service}"
            )

    async def stop(self) -> None:
        """Stop driving; the sagas in hand are let go (their leases cleared) so that
        another instance, or this one after a restart, resumes them at once."""
        self._stopping = True
        self._wake.set()
        task, self._loop_task = self._loop_task, None
        if task is not None:
            await stop_task(task, grace=1.0)
        # Drives stop between two attempts by themselves; cancelling one inside a
        # database call could lose its pooled connection (Python 3.11's wait_for),
        # so they are cancelled only if they take longer than the grace.
        drives = list(self.active.values())
        if drives:
            await asyncio.wait(drives, timeout=5.0)
        for drive in drives:
            await stop_task(drive, grace=0.0)
        self.active.clear()
        self._waiting.clear()
        sagas = self.tables.sagas
        with contextlib.suppress(DataError, sa_exc.SQLAlchemyError, TimeoutError):
            async with asyncio.timeout(3.0), self.database.connection() as conn:
                await conn.execute(
                    update(sagas)
                    .where(sagas.c.lease_owner == self.instance, sagas.c.status.in_(ACTIVE))
                    .values(lease_owner=None, lease_until=None)
                )

    def _launch(self, saga_id: str, *, fresh: _Fresh | None = None) -> None:
        """Drive ``saga_id`` (held by our lease). ``fresh``: it was just started here,
        and this is all there is to know of it (nothing to read back); otherwise it is
        read from the database, and attempts left running (a dead driver's) are
        recorded as lost."""
        if self._stopping or saga_id in self.active:
            return
        if len(self.active) >= self.max_active:
            # Ours by lease: driven when a slot frees (or by another instance, if the
            # lease runs out first).
            if saga_id not in self._waiting:
                self._waiting[saga_id] = fresh
            return
        task = asyncio.get_running_loop().create_task(
            self._drive(saga_id, fresh=fresh), name=f"meshgate-saga-{saga_id}"
        )
        self.active[saga_id] = task
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        for saga_id, running in list(self.active.items()):
            if running is task:
                del self.active[saga_id]
        while self._waiting and len(self.active) < self.max_active and not self._stopping:
            saga_id, fresh = next(iter(self._waiting.items()))
            del self._waiting[saga_id]
            self._launch(saga_id, fresh=fresh)

    async def _loop(self) -> None:
        next_renew = 0.0
        backoff = 0.2
        while not self._stopping:
            self._wake.clear()
            try:
                now = time.monotonic()
                if now >= next_renew and self.active:
                    next_renew = now + self.lease / 3
                    await self._renew()
                if len(self.active) < self.max_active:
                    for saga_id in await self._claim(self.max_active - len(self.active)):
                        self._launch(saga_id)
                self.last_error = None
                backoff = 0.2
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any failure
                reason = _error(exc)
                if reason != self.last_error:
                    log.warning("the saga runner of %s: %s", self.service, reason)
                self.last_error = reason
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()

    async def _renew(self) -> None:
        sagas = self.tables.sagas
        ids = list(self.active)
        async with self.database.connection() as conn:
            await _lazy_commit(conn)
            for start in range(0, len(ids), 200):
                await conn.execute(
                    update(sagas)
                    .where(sagas.c.id.in_(ids[start : start + 200]))
                    .where(sagas.c.lease_owner == self.instance)
                    .values(lease_until=_now() + timedelta(seconds=self.lease))
                )

    async def _claim(self, room: int) -> list[str]:
        """Sagas of the names this instance drives whose lease ran out, taken over
        (and its own leased ones it does not drive, after a restart of its loop)."""
        if not self.sagas or room <= 0:
            return []
        sagas = self.tables.sagas
        busy = [*self.active, *self._waiting]
        expired = (sagas.c.lease_until.is_(None)) | (sagas.c.lease_until < _now())
        mine = sagas.c.lease_owner == self.instance
        query = (
            select(sagas.c.id)
            .where(sagas.c.status.in_(ACTIVE), sagas.c.name.in_(list(self.sagas)))
            .where(expired | mine)
            .order_by(sagas.c.created_at)
            .limit(room)
        )
        if busy:
            query = query.where(sagas.c.id.not_in(busy))
        async with self.database.connection() as conn:
            candidates = (await conn.execute(query)).scalars().all()
        taken = []
        for saga_id in candidates:
            async with self.database.connection() as conn:
                await _lazy_commit(conn)
                got = await conn.execute(
                    update(sagas)
                    .where(sagas.c.id == saga_id, sagas.c.status.in_(ACTIVE))
                    .where(expired | mine)
                    .values(
                        lease_owner=self.instance,
                        lease_until=_now() + timedelta(seconds=self.lease),
                    )
                )
            if got.rowcount == 1:
                taken.append(saga_id)
        if taken:
            log.info("%s took over %d sagas: %s", self.instance, len(taken), ", ".join(taken))
        return taken

    # -- driving one saga

    async def _drive(self, saga_id: str, *, fresh: _Fresh | None) -> None:
        gauge = None
        try:
            if fresh is not None:
                row: Any = fresh.row()
                counts: _Counts = {}
                adopt: _Adopt = {
                    (self.sagas[fresh.name].steps[0].name, "action"): (fresh.first_attempt, 1)
                }
            else:
                loaded = await self._load(saga_id)
                if loaded is None:
                    return
                row, counts, adopt = loaded
            saga = self.sagas.get(row.name)
            if saga is None:
                return
            gauge = self.metrics.sagas_active.labels(self.service, saga.name)
            gauge.inc()
            await _Drive(self, saga, row, counts, adopt).run()
        except _LeaseLostError:
            log.info("saga %s is driven by another instance now", saga_id)
        except _StoppingError:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug, or the database going away: the lease runs out and the saga is
            # resumed (here or elsewhere) from what was recorded.
            log.exception("driving saga %s stopped; it resumes once its lease ends", saga_id)
        finally:
            if gauge is not None:
                gauge.dec()

    async def _load(self, saga_id: str) -> tuple[Any, _Counts, _Adopt] | None:
        """The saga (if our lease holds it) and the attempts made so far by step and
        phase; attempts left running (by a driver that died) are recorded as lost."""
        t = self.tables
        steps = t.saga_steps
        async with self.database.connection() as conn:
            row = (
                await conn.execute(
                    select(t.sagas).where(
                        t.sagas.c.id == saga_id,
                        t.sagas.c.lease_owner == self.instance,
                        t.sagas.c.status.in_(ACTIVE),
                    )
                )
            ).first()
            if row is None:
                return None
            running = (
                await conn.execute(
                    select(steps.c.id, steps.c.step, steps.c.phase, steps.c.attempt).where(
                        steps.c.saga_id == saga_id, steps.c.status == "running"
                    )
                )
            ).all()
            if running:
                await conn.execute(
                    update(steps)
                    .where(steps.c.id.in_([r.id for r in running]))
                    .values(
                        status="lost",
                        finished_at=_now(),
                        error="its driver stopped before it ended (a crash or a stop); "
                        "attempted again with the same idempotency key",
                    )
                )
            counted = (
                await conn.execute(
                    select(steps.c.step, steps.c.phase, func.max(steps.c.attempt))
                    .where(steps.c.saga_id == saga_id)
                    .group_by(steps.c.step, steps.c.phase)
                )
            ).all()
        counts = {(step, phase): int(n or 0) for step, phase, n in counted}
        return row, counts, {}

    # -- reading, for the API and the CLI

    async def list(
        self, *, status: str | None = None, name: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The sagas, newest first (of one status or name)."""
        sagas = self.tables.sagas
        query = select(sagas).order_by(sagas.c.created_at.desc(), sagas.c.id.desc()).limit(limit)
        if status is not None:
            query = query.where(sagas.c.status == status)
        if name is not None:
            query = query.where(sagas.c.name == name)
        async with self.database.connection() as conn:
            rows = (await conn.execute(query)).all()
        return [self._summary(row) for row in rows]

    async def counts(self) -> dict[str, int]:
        """How many sagas have each status."""
        sagas = self.tables.sagas
        async with self.database.connection() as conn:
            rows = (
                await conn.execute(select(sagas.c.status, func.count()).group_by(sagas.c.status))
            ).all()
        return {status: int(n) for status, n in rows}

    async def get(self, saga_id: str) -> dict[str, Any]:
        """One saga with every attempt of every step.

        Raises:
            SagaNotFoundError: no saga has that id.
        """
        t = self.tables
        async with self.database.connection() as conn:
            row = (await conn.execute(select(t.sagas).where(t.sagas.c.id == saga_id))).first()
            if row is None:
                raise SagaNotFoundError(
                    f"no saga {saga_id!r} in {self.service!r}; list them with `meshgate sagas list`"
                )
            steps = (
                await conn.execute(
                    select(t.saga_steps)
                    .where(t.saga_steps.c.saga_id == saga_id)
                    .order_by(t.saga_steps.c.id)
                )
            ).all()
        out = self._summary(row)
        doc = json.loads(row.data)
        out["input"] = doc.get("input")
        out["results"] = doc.get("results", {})
        out["lease"] = {"owner": row.lease_owner, "until": _iso(row.lease_until)}
        out["attempts"] = [
            {
                "position": s.position,
                "step": s.step,
                "phase": s.phase,
                "attempt": s.attempt,
                "status": s.status,
                "started_at": _iso(s.started_at),
                "finished_at": _iso(s.finished_at),
                "duration_ms": round((s.finished_at - s.started_at).total_seconds() * 1000, 1)
                if s.finished_at is not None
                else None,
                "error": s.error,
                "result": json.loads(s.result) if s.result else None,
            }
            for s in steps
        ]
        return out

    def _summary(self, row: Any) -> dict[str, Any]:
        saga = self.sagas.get(row.name)
        step = None
        if saga is not None and 0 <= row.position < len(saga.steps):
            step = saga.steps[row.position].name
        if row.status not in ACTIVE:
            step = None
        return {
            "id": row.id,
            "name": row.name,
            "status": row.status,
            "step": step,
            "position": row.position,
            "error": row.error,
            "created_at": _iso(row.created_at),
            "updated_at": _iso(row.updated_at),
            "deadline": _iso(row.deadline),
        }

    async def retry(self, saga_id: str) -> dict[str, Any]:
        """Compensate a ``stuck`` saga again (from the compensation that failed).

        Raises:
            SagaNotFoundError: no saga has that id.
            SagaError: it is not stuck (the message says what it is).
        """
        sagas = self.tables.sagas
        async with self.database.connection() as conn:
            done = await conn.execute(
                update(sagas)
                .where(sagas.c.id == saga_id, sagas.c.status == "stuck")
                .values(
                    status="compensating",
                    lease_owner=self.instance,
                    lease_until=_now() + timedelta(seconds=self.lease),
                    updated_at=_now(),
                )
            )
        if done.rowcount != 1:
            current = await self.get(saga_id)  # raises SagaNotFoundError
            raise SagaError(
                f"saga {saga_id} is {current['status']}, not stuck: only a stuck saga is "
                "retried (a running one is being driven already)"
            )
        self._launch(saga_id)
        return await self.get(saga_id)


class _Drive:
    """One instance driving one saga until it ends, gets stuck, or the lease is lost."""

    def __init__(
        self, runner: SagaRunner, saga: Saga, row: Any, counts: _Counts, adopt: _Adopt
    ) -> None:
        self.runner = runner
        self.saga = saga
        self.id: str = row.id
        self.status: str = row.status
        self.position: int = row.position
        self.error: str | None = row.error
        doc = json.loads(row.data)
        self.input = doc.get("input")
        self.results: dict[str, Any] = doc.get("results", {})
        deadline = row.deadline
        if deadline is not None and deadline.tzinfo is None:
            deadline = deadline.replace(tzinfo=UTC)
        self.deadline: datetime | None = deadline
        self.counts = counts
        self.adopt = adopt

    def context(self, step: str, phase: str, attempt: int) -> StepContext:
        return StepContext(
            saga_id=self.id,
            saga=self.saga.name,
            step=step,
            phase=phase,
            attempt=attempt,
            input=self.input,
            results=dict(self.results),
            error=self.error,
            deadline=self.deadline,
        )

    def _out_of_time(self) -> bool:
        return self.deadline is not None and _now() >= self.deadline

    async def run(self) -> None:
        steps = self.saga.steps
        while not self.runner._stopping:
            if self.status == "running":
                if self.position >= len(steps):
                    await self._end("completed")
                    return
                if self._out_of_time():
                    await self._turn(
                        f"saga timed out ({self.saga.timeout:g} s) before step "
                        f"{steps[self.position].name!r}",
                        self.position - 1,
                    )
                    continue
                await self._forward(steps[self.position])
            elif self.status == "compensating":
                while self.position >= 0 and steps[self.position].compensation is None:
                    self.position -= 1
                if self.position < 0:
                    await self._end("compensated")
                    return
                if not await self._backward(steps[self.position]):
                    return  # stuck
            else:
                return

    # -- forward and backward

    async def _forward(self, step: Step) -> None:
        tried = 0
        while True:
            tried += 1
            row_id, attempt, started = await self._begin(step, "action")
            outcome, result, error = await self._attempt(step, step.action, "action", attempt)
            if outcome == "ok":
                self.results[step.name] = result
                await self._finish_attempt(step, row_id, "action", "ok", started, result=result)
                return
            final = outcome == "failed-final"
            out_of_time = self._out_of_time()
            if final or tried >= step.attempts or out_of_time:
                if final or not out_of_time:
                    reason = f"step {step.name!r} failed: {error}"
                else:
                    reason = (
                        f"saga timed out ({self.saga.timeout:g} s) in step {step.name!r}: {error}"
                    )
                # A step that failed for good had no effect; one whose outcome is
                # unknown may have had one: it is compensated too.
                undo_from = self.position - 1 if final else self.position
                await self._finish_attempt(
                    step, row_id, "action", "failed", started, error=error, turn=(reason, undo_from)
                )
                return
            await self._finish_attempt(step, row_id, "action", "failed", started, error=error)
            await self._pause(step.delay(tried))

    async def _backward(self, step: Step) -> bool:
        compensation = step.compensation
        assert compensation is not None  # noqa: S101 - checked by the caller
        tried = 0
        while True:
            tried += 1
            row_id, attempt, started = await self._begin(step, "compensation")
            outcome, result, error = await self._attempt(
                step, compensation, "compensation", attempt
            )
            if outcome == "ok":
                await self._finish_attempt(
                    step, row_id, "compensation", "ok", started, result=result
                )
                return True
            if tried >= step.compensation_attempts:
                reason = (
                    f"compensation of step {step.name!r} failed {tried} times, last: {error}; "
                    f"fix the cause, then `meshgate sagas retry {self.id}`"
                )
                await self._finish_attempt(
                    step, row_id, "compensation", "failed", started, error=error, stuck=reason
                )
                log.error("saga %s (%s) is stuck: %s", self.id, self.saga.name, reason)
                return False
            await self._finish_attempt(step, row_id, "compensation", "failed", started, error=error)
            await self._pause(step.delay(tried))

    async def _pause(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.runner._stopping:
            raise _StoppingError(self.id)

    async def _turn(self, reason: str, undo_from: int) -> None:
        async with self.runner.database.connection() as conn:
            await self._guarded(conn, status="compensating", position=undo_from, error=reason)
        self.status, self.position, self.error = "compensating", undo_from, reason
        log.warning("saga %s (%s) compensates: %s", self.id, self.saga.name, reason)

    # -- one attempt

    async def _begin(self, step: Step, phase: str) -> tuple[int, int, datetime]:
        """The attempt's row, recorded as running: the one the start (or the step
        before) recorded, else a new one."""
        key = (step.name, phase)
        adopted = self.adopt.pop(key, None)
        attempt = self.counts.get(key, 0) + 1
        self.counts[key] = attempt
        if adopted is not None:
            return adopted[0], adopted[1], _now()
        started = _now()
        async with self.runner.database.connection() as conn:
            await _lazy_commit(conn)
            done = await conn.execute(
                insert(self.runner.tables.saga_steps).values(
                    saga_id=self.id,
                    position=self.position,
                    step=step.name,
                    phase=phase,
                    attempt=attempt,
                    status="running",
                    started_at=started,
                )
            )
        return _new_id(done), attempt, started

    async def _attempt(
        self, step: Step, func: Callable[[StepContext], Any], phase: str, attempt: int
    ) -> tuple[str, Any, str | None]:
        ctx = self.context(step.name, phase, attempt)
        clock = time.perf_counter()
        outcome, result, error = "ok", None, None
        try:
            async with asyncio.timeout(step.timeout):
                result = await func(ctx)
            result = encode_data(result)
            await _faults.point(f"saga.{phase}.{step.name}")
        except StepFailed as exc:
            outcome = "failed-final" if phase == "action" else "failed"
            error = exc.reason
        except TimeoutError:
            outcome, error = "failed", f"no answer within {step.timeout:g} s (timeout)"
        except EnvelopeError as exc:
            outcome, error = "failed", f"the step returned what is not JSON: {exc}"
        except Exception as exc:  # noqa: BLE001 - any failure of a step is recorded and retried
            outcome, error = "failed", _error(exc)
        self.runner.metrics.step_duration.labels(
            self.runner.service,
            self.saga.name,
            step.name,
            phase,
            "ok" if outcome == "ok" else "failed",
        ).observe(time.perf_counter() - clock)
        return outcome, result, error

    # -- recording

    async def _guarded(self, conn: AsyncConnection | AsyncSession, **values: Any) -> None:
        """Update the saga row if this instance still holds its lease."""
        sagas = self.runner.tables.sagas
        now = _now()
        values.setdefault("lease_until", now + timedelta(seconds=self.runner.lease))
        done = await conn.execute(
            update(sagas)
            .where(sagas.c.id == self.id, sagas.c.lease_owner == self.runner.instance)
            .values(updated_at=now, **values)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise _LeaseLostError(self.id)

    async def _finish_attempt(
        self,
        step: Step,
        row_id: int,
        phase: str,
        status: str,
        started: datetime,
        *,
        error: str | None = None,
        result: Any = None,
        turn: tuple[str, int] | None = None,
        stuck: str | None = None,
    ) -> None:
        """Record one finished attempt and move the saga on in one transaction: to
        the next step (whose first attempt is recorded as running), to compensating,
        to stuck, or to its end (with ``on_completed`` / ``on_compensated``)."""
        runner = self.runner
        steps_table = runner.tables.saga_steps
        steps = self.saga.steps
        status_after, position, error_after = self.status, self.position, self.error
        if status == "ok":
            position += 1 if phase == "action" else -1
        if turn is not None:
            status_after, (error_after, position) = "compensating", turn
        if stuck is not None:
            status_after, error_after = "stuck", stuck
        ending: str | None = None
        if status_after == "running" and position >= len(steps):
            ending = "completed"
        elif status_after == "compensating" and not any(
            steps[p].compensation is not None for p in range(position + 1)
        ):
            ending = "compensated"
        values: dict[str, Any] = {"position": position, "status": ending or status_after}
        if error_after != self.error:
            values["error"] = error_after
        if ending is not None or stuck is not None:
            values.update(lease_owner=None, lease_until=None)
        if status == "ok" and phase == "action":
            values["data"] = json.dumps({"input": self.input, "results": self.results})
        next_first = (
            status == "ok"
            and phase == "action"
            and ending is None
            and status_after == "running"
            and position < len(steps)
        )
        now = _now()
        finisher = {"completed": self.saga.completed, "compensated": self.saga.compensated}.get(
            ending or ""
        )
        # A session (the ORM's) only for an ending, whose code writes the service's
        # own rows; a plain connection otherwise.
        opened = runner.database.session() if finisher is not None else runner.database.connection()
        async with opened as session:
            if finisher is None:
                await _lazy_commit(session)
            await self._guarded(session, **values)
            await session.execute(
                update(steps_table)
                .where(steps_table.c.id == row_id)
                .values(
                    status=status,
                    finished_at=now,
                    error=error,
                    result=json.dumps(result) if result is not None else None,
                )
            )
            if next_first:
                following = steps[position].name
                attempt = self.counts.get((following, "action"), 0) + 1
                done = await session.execute(
                    insert(steps_table).values(
                        saga_id=self.id,
                        position=position,
                        step=following,
                        phase="action",
                        attempt=attempt,
                        status="running",
                        started_at=now,
                    )
                )
                self.adopt[(following, "action")] = (_new_id(done), attempt)
            if finisher is not None:
                self.error = error_after
                assert isinstance(session, AsyncSession)  # noqa: S101 - opened as one above
                await finisher(self.context("", "end", 1), session)
        self.position, self.status, self.error = position, ending or status_after, error_after
        if turn is not None:
            log.warning("saga %s (%s) compensates: %s", self.id, self.saga.name, error_after)
        outcome = ending or ("stuck" if stuck is not None else None)
        if outcome is not None:
            runner.metrics.sagas.labels(runner.service, self.saga.name, outcome).inc()

    async def _end(self, status: str) -> None:
        """End a saga with no attempt left to record (resumed at its very end, or
        nothing to compensate)."""
        runner = self.runner
        finisher = self.saga.completed if status == "completed" else self.saga.compensated
        async with runner.database.session() as session:
            await self._guarded(session, status=status, lease_owner=None, lease_until=None)
            if finisher is not None:
                await finisher(self.context("", "end", 1), session)
        runner.metrics.sagas.labels(runner.service, self.saga.name, status).inc()
        self.status = status
