"""The inventory service: stock, and reservations that hold it for orders.

Reservations are idempotent by their key (the saga step's idempotency key): a
second ``POST /reservations`` with the same key answers the first one's result and
holds nothing more; ``release`` and ``commit`` can be repeated. Stored in SQL
(``INVENTORY_DATABASE_URL``; SQLite ``inventory.db`` by default), seeded at start
with the catalogue of ``INVENTORY_STOCK`` (``sku=units@cents,...``) when empty.
``INVENTORY_FAILURE_SHARE`` (0 to 1) makes that share of reservations fail with a
503 before doing anything, for demos and tests of retries.

Run it with ``meshgate serve examples.shop.inventory.app:service``.
"""

from __future__ import annotations

import json
import os
import random
from datetime import UTC, datetime
from pathlib import Path

from fastapi import HTTPException, Response
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from examples.shop.inventory.models import (
    Base,
    Line,
    Reservation,
    ReservationIn,
    ReservationOut,
    Stock,
    StockOut,
)
from meshgate.data import Database
from meshgate.service import Service

MIGRATIONS = Path(__file__).with_name("migrations")
metadata = Base.metadata

DEFAULT_STOCK = "apple=100@50,pear=100@75,coffee=50@1200,tea=80@900"
"""What a new inventory holds: sku=units@price in cents."""


def parse_stock(text: str) -> list[tuple[str, int, int]]:
    """``apple=100@50,...`` -> [(sku, units, cents)]; ValueError naming the bad entry."""
    out = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        try:
            sku, rest = entry.split("=", 1)
            units, cents = rest.split("@", 1)
            out.append((sku.strip(), int(units), int(cents)))
        except ValueError:
            raise ValueError(
                f"INVENTORY_STOCK entry {entry!r} is not sku=units@cents (apple=100@50)"
            ) from None
    return out


def _out(reservation: Reservation) -> ReservationOut:
    return ReservationOut(
        key=reservation.key,
        status=reservation.status,
        items=[Line.model_validate(i) for i in json.loads(reservation.items)],
        amount_cents=reservation.amount_cents,
    )


def create_service(database_url: str | None = None, stock: str | None = None) -> Service:
    """The inventory service on this database (default: from the environment)."""
    database = Database(
        database_url or os.environ.get("INVENTORY_DATABASE_URL", "sqlite:///inventory.db"),
        name="inventory",
    )
    catalogue = parse_stock(stock or os.environ.get("INVENTORY_STOCK", DEFAULT_STOCK))
    service = Service("inventory", version="1.0.0", database=database)
    app = service.app
    # A share of reservations answered 503 before doing anything, for demos and
    # tests of retries (the caller tries again with the same key).
    flaky = float(os.environ.get("INVENTORY_FAILURE_SHARE", "0") or 0)
    chance = random.Random()  # noqa: S311 - a demo's coin, not cryptography

    @service.on_startup
    async def seed() -> None:
        if os.environ.get("INVENTORY_CREATE_TABLES") == "1":
            await database.create_all(metadata)
        try:
            async with database.session() as session:
                if (await session.scalar(select(func.count()).select_from(Stock))) == 0:
                    session.add_all(
                        Stock(sku=sku, on_hand=units, reserved=0, price_cents=cents)
                        for sku, units, cents in catalogue
                    )
        except IntegrityError:
            pass  # another instance seeded it first

    async def _hold(session: AsyncSession, lines: list[Line]) -> int:
        """Move the lines from on hand to reserved; 409 (all undone) if one is short."""
        amount = 0
        for line in lines:
            price = await session.scalar(select(Stock.price_cents).where(Stock.sku == line.sku))
            if price is None:
                raise HTTPException(422, f"no product has sku {line.sku!r}")
            moved = await session.execute(
                update(Stock)
                .where(Stock.sku == line.sku, Stock.on_hand >= line.quantity)
                .values(
                    on_hand=Stock.on_hand - line.quantity,
                    reserved=Stock.reserved + line.quantity,
                )
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                raise HTTPException(409, f"out of stock: {line.sku} (wanted {line.quantity})")
            amount += price * line.quantity
        return amount

    @app.post("/reservations", status_code=201)
    async def reserve(body: ReservationIn, response: Response) -> ReservationOut:
        """Hold the lines under ``key``; the same key again answers what the first did."""
        if flaky and chance.random() < flaky:
            raise HTTPException(503, "inventory is busy (INVENTORY_FAILURE_SHARE); try again")
        try:
            async with database.session() as session:
                existing = await session.get(Reservation, body.key)
                if existing is not None:
                    response.status_code = 200
                    return _out(existing)
                amount = await _hold(session, body.items)
                reservation = Reservation(
                    key=body.key,
                    status="reserved",
                    items=json.dumps([line.model_dump() for line in body.items]),
                    amount_cents=amount,
                )
                session.add(reservation)
                await session.flush()
                return _out(reservation)
        except IntegrityError:
            # The same key at the same time from a retry: the first one won.
            async with database.session() as session:
                found = await session.get(Reservation, body.key)
            if found is None:
                raise
            response.status_code = 200
            return _out(found)

    async def _finish(key: str, status: str) -> ReservationOut:
        async with database.session() as session:
            reservation = await session.get(Reservation, key, with_for_update=True)
            if reservation is None:
                if status == "committed":
                    raise HTTPException(404, f"no reservation has key {key!r}")
                # A release before (or instead of) the reserve: remember it, so that
                # a late reserve of this key holds nothing.
                reservation = Reservation(key=key, status="released", items="[]", amount_cents=0)
                session.add(reservation)
                await session.flush()
                return _out(reservation)
            if reservation.status == status:
                return _out(reservation)
            if reservation.status != "reserved":
                raise HTTPException(
                    409, f"reservation {key!r} is {reservation.status}; it cannot be {status}"
                )
            if status == "released":
                for line in json.loads(reservation.items):
                    await session.execute(
                        update(Stock)
                        .where(Stock.sku == line["sku"])
                        .values(
                            on_hand=Stock.on_hand + line["quantity"],
                            reserved=Stock.reserved - line["quantity"],
                        )
                    )
            reservation.status = status
            reservation.updated_at = datetime.now(UTC)
            return _out(reservation)

    @app.post("/reservations/{key}/release")
    async def release(key: str) -> ReservationOut:
        """Give the units back (a saga compensating); repeating it changes nothing."""
        return await _finish(key, "released")

    @app.post("/reservations/{key}/commit")
    async def commit(key: str) -> ReservationOut:
        """The order completed: the units stay reserved for it for good."""
        return await _finish(key, "committed")

    @app.get("/reservations/{key}")
    async def get_reservation(key: str) -> ReservationOut:
        async with database.session() as session:
            found = await session.get(Reservation, key)
        if found is None:
            raise HTTPException(404, f"no reservation has key {key!r}")
        return _out(found)

    @app.get("/stock")
    async def list_stock() -> list[StockOut]:
        async with database.session() as session:
            rows = await session.scalars(select(Stock).order_by(Stock.sku))
            return [StockOut.model_validate(r) for r in rows]

    return service


service = create_service()
app = service.app
