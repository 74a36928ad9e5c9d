"""The orders service's table, its API's shapes and its events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from meshgate.data.types import UTCDateTime

Sku = Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,40}$")]
Status = Literal["pending", "completed", "cancelled"]


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    items: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(String(12), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    total_cents: Mapped[int | None] = mapped_column(Integer, nullable=True)
    saga_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=lambda: datetime.now(UTC)
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=lambda: datetime.now(UTC)
    )


class Line(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sku: Sku
    quantity: int = Field(ge=1, le=1000)


class OrderIn(BaseModel):
    """What placing an order takes."""

    model_config = ConfigDict(extra="forbid")

    user_id: int | None = Field(default=None, ge=1)
    items: list[Line] = Field(min_length=1, max_length=50)


class OrderOut(BaseModel):
    """An order as the API shows it: ``pending`` until its saga ends, then
    ``completed`` or ``cancelled`` with the reason."""

    id: int
    status: Status
    reason: str | None
    user_id: int | None
    items: list[Line]
    total_cents: int | None
    saga_id: str | None
    created_at: datetime
    updated_at: datetime


class OrderPage(BaseModel):
    """One page of orders, in id order; pass ``next`` as ``after`` for the next page."""

    items: list[OrderOut]
    next: int | None


class OrderCompleted(BaseModel):
    """``orders.completed``: an order went through (stock held, money taken)."""

    order_id: int
    user_id: int | None
    total_cents: int


class OrderCancelled(BaseModel):
    """``orders.cancelled``: an order was undone, and why."""

    order_id: int
    user_id: int | None
    reason: str
