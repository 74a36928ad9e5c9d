"""The inventory service's tables and its API's shapes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from meshgate.data.types import UTCDateTime

Sku = Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,40}$")]


class Base(DeclarativeBase):
    pass


class Stock(Base):
    """One product: ``on_hand`` can be reserved; ``reserved`` is held by orders. Their
    sum never changes: reservations move units from one to the other and back."""

    __tablename__ = "stock"

    sku: Mapped[str] = mapped_column(String(40), primary_key=True)
    price_cents: Mapped[int] = mapped_column(Integer, nullable=False)
    on_hand: Mapped[int] = mapped_column(Integer, nullable=False)
    reserved: Mapped[int] = mapped_column(Integer, nullable=False, default=0)


class Reservation(Base):
    """Units held for one saga step, under its idempotency key: ``reserved``, then
    ``committed`` (the order completed) or ``released`` (it was compensated). A
    release of a key never reserved leaves a ``released`` row, so that a reserve
    arriving late for it holds nothing."""

    __tablename__ = "reservations"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[str] = mapped_column(String(12), nullable=False)
    items: Mapped[str] = mapped_column(Text, nullable=False)
    amount_cents: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=lambda: datetime.now(UTC)
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=lambda: datetime.now(UTC)
    )


class Line(BaseModel):
    """Units of one product."""

    model_config = ConfigDict(extra="forbid")

    sku: Sku
    quantity: int = Field(ge=1, le=1000)


class ReservationIn(BaseModel):
    """What reserving takes: the caller's idempotency key and the lines."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=200)
    items: list[Line] = Field(min_length=1, max_length=50)


class ReservationOut(BaseModel):
    key: str
    status: str
    items: list[Line]
    amount_cents: int


class StockOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    sku: str
    price_cents: int
    on_hand: int
    reserved: int
