"""The orders service: places orders through the place-order saga.

``POST /orders`` writes the order (``pending``) and starts its saga in the same
transaction, and answers 202 with the order's id; the saga then, step by step,
through the platform's client:

1. **reserve-stock**: ``inventory`` holds the lines (``POST /reservations``); out of
   stock fails the order; undone by releasing them;
2. **charge-payment**: ``payments`` takes the amount (``POST /charges``); a declined
   payment fails the order; undone by a refund;
3. **confirm-reservation**: ``inventory`` keeps the units for the order for good.

Each call carries the step's idempotency key, so that a step retried (after a
timeout, or by another instance after a crash) is applied once. When the saga ends
the order becomes ``completed`` (and ``orders.completed`` is published) or
``cancelled`` with the reason (``orders.cancelled``), in the transaction that ends
the saga. ``GET /orders/{id}`` shows where it is; ``meshgate sagas show`` shows
every step. Stored in SQL (``ORDERS_DATABASE_URL``; SQLite ``orders.db`` by default).

Run it with ``meshgate serve examples.shop.orders.app:service``.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import HTTPException, Query, Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from examples.shop.orders.models import (
    Base,
    Line,
    Order,
    OrderCancelled,
    OrderCompleted,
    OrderIn,
    OrderOut,
    OrderPage,
    Status,
)
from meshgate.data import Database
from meshgate.events import Saga, StepContext, StepFailed
from meshgate.service import Service

MIGRATIONS = Path(__file__).with_name("migrations")
metadata = Base.metadata


def _out(order: Order) -> OrderOut:
    return OrderOut(
        id=order.id,
        status=order.status,  # type: ignore[arg-type]
        reason=order.reason,
        user_id=order.user_id,
        items=[Line.model_validate(i) for i in json.loads(order.items)],
        total_cents=order.total_cents,
        saga_id=order.saga_id,
        created_at=order.created_at,
        updated_at=order.updated_at,
    )


def _detail(response: Any) -> str:
    try:
        return str(response.json().get("detail"))
    except ValueError:
        return response.text[:200]


def _unexpected(callee: str, response: Any) -> RuntimeError:
    # Anything but a clear answer: the outcome is unknown, so the step is retried
    # (with its key), then undone.
    return RuntimeError(f"{callee} answered {response.status_code}: {_detail(response)}")


def create_service(database_url: str | None = None, *, step_timeout: float = 5.0) -> Service:
    """The orders service on this database (default: from the environment)."""
    database = Database(
        database_url or os.environ.get("ORDERS_DATABASE_URL", "sqlite:///orders.db"),
        name="orders",
    )
    service = Service("orders", version="1.0.0", database=database)
    app = service.app

    def inventory() -> Any:  # made on first use: discovery needs the registry's URL
        return service.client("inventory", timeout=step_timeout)

    def payments() -> Any:
        return service.client("payments", timeout=step_timeout)

    place_order = Saga("place-order", timeout=120)

    @place_order.step("reserve-stock", timeout=step_timeout, attempts=6, retry_delay=0.5)
    async def reserve(ctx: StepContext) -> dict[str, Any]:
        answer = await inventory().post(
            "/reservations",
            json={"key": ctx.idempotency_key, "items": ctx.input["items"]},
            headers={"Idempotency-Key": ctx.idempotency_key},
        )
        if answer.status_code in (409, 422):
            raise StepFailed(_detail(answer))
        if answer.status_code not in (200, 201):
            raise _unexpected("inventory", answer)
        reservation = answer.json()
        if reservation["status"] != "reserved":
            raise StepFailed(f"the reservation was {reservation['status']} already")
        return {"amount_cents": reservation["amount_cents"]}

    @reserve.compensate
    async def release(ctx: StepContext) -> None:
        answer = await inventory().post(
            f"/reservations/{ctx.action_key}/release",
            headers={"Idempotency-Key": ctx.idempotency_key},
        )
        if answer.status_code != 200:
            raise _unexpected("inventory", answer)

    @place_order.step("charge-payment", timeout=step_timeout, attempts=6, retry_delay=0.5)
    async def charge(ctx: StepContext) -> dict[str, Any]:
        amount = ctx.results["reserve-stock"]["amount_cents"]
        answer = await payments().post(
            "/charges",
            json={
                "key": ctx.idempotency_key,
                "order_id": ctx.input["order_id"],
                "amount_cents": amount,
            },
            headers={"Idempotency-Key": ctx.idempotency_key},
        )
        if answer.status_code == 402:
            raise StepFailed("payment declined")
        if answer.status_code == 409:
            raise StepFailed(_detail(answer))
        if answer.status_code not in (200, 201):
            raise _unexpected("payments", answer)
        if answer.json()["status"] != "charged":
            raise StepFailed(f"the charge was {answer.json()['status']} already")
        return {"charged_cents": amount}

    @charge.compensate
    async def refund(ctx: StepContext) -> None:
        answer = await payments().post(
            f"/charges/{ctx.action_key}/refund",
            headers={"Idempotency-Key": ctx.idempotency_key},
        )
        if answer.status_code != 200:
            raise _unexpected("payments", answer)

    @place_order.step("confirm-reservation", timeout=step_timeout, attempts=10, retry_delay=0.5)
    async def confirm(ctx: StepContext) -> None:
        key = f"{ctx.saga_id}:reserve-stock"
        answer = await inventory().post(
            f"/reservations/{key}/commit", headers={"Idempotency-Key": ctx.idempotency_key}
        )
        if answer.status_code != 200:
            raise _unexpected("inventory", answer)

    async def _ended(ctx: StepContext, session: AsyncSession, status: str) -> Order:
        order = await session.get(Order, ctx.input["order_id"], with_for_update=True)
        if order is None:  # pragma: no cover - written with the saga's start
            raise LookupError(f"order {ctx.input['order_id']} is gone")
        order.status = status
        order.updated_at = datetime.now(UTC)
        return order

    @place_order.on_completed
    async def completed(ctx: StepContext, session: AsyncSession) -> None:
        order = await _ended(ctx, session, "completed")
        order.total_cents = ctx.results["charge-payment"]["charged_cents"]
        await service.events.publish(
            session,
            "orders.completed",
            OrderCompleted(order_id=order.id, user_id=order.user_id, total_cents=order.total_cents),
            key=str(order.id),
        )

    @place_order.on_compensated
    async def cancelled(ctx: StepContext, session: AsyncSession) -> None:
        order = await _ended(ctx, session, "cancelled")
        order.reason = ctx.error or "cancelled"
        await service.events.publish(
            session,
            "orders.cancelled",
            OrderCancelled(order_id=order.id, user_id=order.user_id, reason=order.reason),
            key=str(order.id),
        )

    service.events.saga(place_order)
    # How long an instance holds a saga it drives; a crashed one's sagas are taken
    # over once it runs out.
    service.events.sagas.lease = float(os.environ.get("ORDERS_SAGA_LEASE", "10"))
    service.place_order = place_order  # type: ignore[attr-defined] - for tests and tools

    @service.on_startup
    async def tables() -> None:
        if os.environ.get("ORDERS_CREATE_TABLES") == "1":
            await database.create_all(metadata)
            await service.events.create_tables()

    @app.post("/orders", status_code=202)
    async def place(body: OrderIn, response: Response) -> OrderOut:
        """Accept an order: it is ``pending`` until its saga ends."""
        async with database.session() as session:
            order = Order(
                user_id=body.user_id,
                items=json.dumps([line.model_dump() for line in body.items]),
                status="pending",
            )
            session.add(order)
            await session.flush()
            order.saga_id = await place_order.start(
                session,
                {"order_id": order.id, "items": [line.model_dump() for line in body.items]},
            )
            out = _out(order)
        response.headers["Location"] = f"/orders/{out.id}"
        return out

    @app.get("/orders")
    async def list_orders(
        status: Status | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: Annotated[int, Query(ge=0, description="The last id of the previous page")] = 0,
    ) -> OrderPage:
        """Orders in id order (of one status)."""
        async with database.session() as session:
            query = select(Order).where(Order.id > after).order_by(Order.id).limit(limit + 1)
            if status is not None:
                query = query.where(Order.status == status)
            rows = list(await session.scalars(query))
        items = [_out(o) for o in rows[:limit]]
        return OrderPage(items=items, next=items[-1].id if len(rows) > limit else None)

    @app.get("/orders/{order_id}")
    async def get_order(order_id: int) -> OrderOut:
        async with database.session() as session:
            order = await session.get(Order, order_id)
        if order is None:
            raise HTTPException(404, f"no order has id {order_id}")
        return _out(order)

    return service


service = create_service()
app = service.app
