"""The notifications service: tells users what happened, once per event.

It consumes ``users.created`` (a welcome) and ``orders.completed`` (a receipt)
through the idempotent inbox: an event delivered twice (a redelivery, a relay that
crashed after publishing) makes one notification. Stored in SQL
(``NOTIFICATIONS_DATABASE_URL``; SQLite ``notifications.db`` by default).

Run it with ``meshgate serve examples.shop.notifications.app:service``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from examples.shop.notifications.models import Base, Notification, NotificationOut
from meshgate.data import Database
from meshgate.events import Event
from meshgate.service import Service

MIGRATIONS = Path(__file__).with_name("migrations")
metadata = Base.metadata


class UserCreated(BaseModel):
    id: int
    email: str
    name: str


class OrderCompleted(BaseModel):
    order_id: int
    user_id: int | None
    total_cents: int


def create_service(database_url: str | None = None) -> Service:
    """The notifications service on this database (default: from the environment)."""
    database = Database(
        database_url or os.environ.get("NOTIFICATIONS_DATABASE_URL", "sqlite:///notifications.db"),
        name="notifications",
    )
    service = Service("notifications", version="1.0.0", database=database)
    app = service.app

    @service.on_startup
    async def tables() -> None:
        if os.environ.get("NOTIFICATIONS_CREATE_TABLES") == "1":
            await database.create_all(metadata)
            await service.events.create_tables()

    @service.on("users.created", group="notifications", model=UserCreated)
    async def welcome(event: Event, session: AsyncSession) -> None:
        user: UserCreated = event.data
        session.add(
            Notification(
                event_id=event.id,
                kind="welcome",
                user_id=user.id,
                text=f"Welcome, {user.name}! ({user.email})",
            )
        )

    @service.on("orders.completed", group="notifications", model=OrderCompleted)
    async def receipt(event: Event, session: AsyncSession) -> None:
        order: OrderCompleted = event.data
        session.add(
            Notification(
                event_id=event.id,
                kind="receipt",
                user_id=order.user_id,
                text=f"Order {order.order_id} is confirmed: {order.total_cents / 100:.2f} charged.",
            )
        )

    @app.get("/notifications")
    async def list_notifications(
        user_id: int | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> list[NotificationOut]:
        async with database.session() as session:
            query = select(Notification).order_by(Notification.id.desc()).limit(limit)
            if user_id is not None:
                query = query.where(Notification.user_id == user_id)
            return [NotificationOut.model_validate(n) for n in await session.scalars(query)]

    return service


service = create_service()
app = service.app
