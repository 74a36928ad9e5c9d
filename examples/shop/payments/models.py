"""The payments service's table and its API's shapes."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from meshgate.data.types import UTCDateTime


class Base(DeclarativeBase):
    pass


class Charge(Base):
    """One charge under its idempotency key: ``charged``, ``declined`` (the decision
    is kept, so that a retry gets the same answer) or ``refunded``. One per order at
    most: ``order_id`` is unique (a refund of a key never charged leaves a row
    without one, so that a late charge of that key does nothing)."""

    __tablename__ = "charges"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    order_id: Mapped[int | None] = mapped_column(Integer, unique=True, nullable=True)
    amount_cents: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(12), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=lambda: datetime.now(UTC)
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=lambda: datetime.now(UTC)
    )


class ChargeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=200)
    order_id: int = Field(ge=1)
    amount_cents: int = Field(ge=0)


class ChargeOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    key: str
    order_id: int | None
    amount_cents: int
    status: str


class Totals(BaseModel):
    charged_cents: int
    """Money taken and not given back."""
    charged: int
    refunded: int
    declined: int
