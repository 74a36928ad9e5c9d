"""The payments service: charges and refunds, idempotent by key.

``PAYMENTS_FAILURE_SHARE`` (0 to 1, default 0) makes that share of new charges be
declined (402), for demos and tests of compensation; the decision is stored, so a
retried charge gets the same answer. Stored in SQL (``PAYMENTS_DATABASE_URL``;
SQLite ``payments.db`` by default). No card is ever involved: this is the shop's
stand-in for a payment provider.

Run it with ``meshgate serve examples.shop.payments.app:service``.
"""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime
from pathlib import Path

from fastapi import HTTPException, Response
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from examples.shop.payments.models import Base, Charge, ChargeIn, ChargeOut, Totals
from meshgate.data import Database
from meshgate.service import Service

MIGRATIONS = Path(__file__).with_name("migrations")
metadata = Base.metadata


def _share(value: str | None) -> float:
    try:
        share = float(value) if value else 0.0
    except ValueError:
        raise ValueError(f"PAYMENTS_FAILURE_SHARE={value!r} is not a number from 0 to 1") from None
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"PAYMENTS_FAILURE_SHARE={value!r} is not a number from 0 to 1")
    return share


def _declined(charge: Charge) -> JSONResponse:
    return JSONResponse(
        {"detail": f"payment declined for order {charge.order_id}", **_dump(charge)},
        status_code=402,
    )


def _dump(charge: Charge) -> dict[str, object]:
    return ChargeOut.model_validate(charge).model_dump()


def create_service(database_url: str | None = None, failure_share: float | None = None) -> Service:
    """The payments service on this database (default: from the environment)."""
    database = Database(
        database_url or os.environ.get("PAYMENTS_DATABASE_URL", "sqlite:///payments.db"),
        name="payments",
    )
    share = (
        failure_share
        if failure_share is not None
        else _share(os.environ.get("PAYMENTS_FAILURE_SHARE"))
    )
    service = Service("payments", version="1.0.0", database=database)
    service.metadata["failure_share"] = str(share)
    app = service.app
    chance = random.Random()  # noqa: S311 - a demo's coin, not cryptography

    @service.on_startup
    async def tables() -> None:
        if os.environ.get("PAYMENTS_CREATE_TABLES") == "1":
            await database.create_all(metadata)

    @app.post("/charges", status_code=201, response_model=None)
    async def charge(body: ChargeIn, response: Response) -> ChargeOut | JSONResponse:
        """Charge once per key (and once per order); a key seen before answers as it did."""
        try:
            async with database.session() as session:
                existing = await session.get(Charge, body.key)
                if existing is not None:
                    response.status_code = 200
                    return (
                        _declined(existing)
                        if existing.status == "declined"
                        else ChargeOut.model_validate(existing)
                    )
                status = "declined" if chance.random() < share else "charged"
                made = Charge(
                    key=body.key,
                    order_id=body.order_id,
                    amount_cents=body.amount_cents,
                    status=status,
                )
                session.add(made)
                await session.flush()
        except IntegrityError:
            async with database.session() as session:
                found = await session.get(Charge, body.key)
                if found is None:
                    raise HTTPException(
                        409, f"order {body.order_id} has a charge under another key already"
                    ) from None
            response.status_code = 200
            return (
                _declined(found) if found.status == "declined" else ChargeOut.model_validate(found)
            )
        return _declined(made) if made.status == "declined" else ChargeOut.model_validate(made)

    @app.post("/charges/{key}/refund")
    async def refund(key: str) -> ChargeOut:
        """Give the money back (a saga compensating); repeating it changes nothing."""
        async with database.session() as session:
            found = await session.get(Charge, key, with_for_update=True)
            if found is None:
                found = Charge(key=key, order_id=None, amount_cents=0, status="refunded")
                session.add(found)
                await session.flush()
            elif found.status == "charged":
                found.status = "refunded"
                found.updated_at = datetime.now(UTC)
            return ChargeOut.model_validate(found)

    @app.get("/charges")
    async def list_charges(order_id: int | None = None) -> list[ChargeOut]:
        async with database.session() as session:
            query = select(Charge).order_by(Charge.created_at)
            if order_id is not None:
                query = query.where(Charge.order_id == order_id)
            return [ChargeOut.model_validate(c) for c in await session.scalars(query)]

    @app.get("/totals")
    async def totals() -> Totals:
        async with database.session() as session:
            rows = (
                await session.execute(
                    select(
                        Charge.status, func.count(), func.coalesce(func.sum(Charge.amount_cents), 0)
                    ).group_by(Charge.status)
                )
            ).all()
        by = {status: (int(n), int(total)) for status, n, total in rows}
        return Totals(
            charged_cents=by.get("charged", (0, 0))[1],
            charged=by.get("charged", (0, 0))[0],
            refunded=by.get("refunded", (0, 0))[0],
            declined=by.get("declined", (0, 0))[0],
        )

    return service


service = create_service()
app = service.app
