"""The users service's tables and its API's shapes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from meshgate.data.types import UTCDateTime

MAX_ID = 2**31 - 1
"""The largest id: ``id`` is an INTEGER column, 32 bits on PostgreSQL and MariaDB.
Ids in paths and queries are bounded by it, so that a larger one is a 422 rather
than an error of the database driver."""

# Deliberately simple: one @, something before it, a dot after it. Whether the
# address exists is for a confirmation mail to find out, not for a regex. Control
# characters are refused everywhere: PostgreSQL cannot store NUL in text.
Email = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True,
        to_lower=True,
        max_length=254,
        pattern=r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+$",
    ),
]
Name = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$"
    ),
]


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(String(254), unique=True, nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=lambda: datetime.now(UTC)
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=lambda: datetime.now(UTC)
    )


class UserIn(BaseModel):
    """What creating a user takes."""

    model_config = ConfigDict(extra="forbid")

    email: Email
    name: Name


class UserPatch(BaseModel):
    """What updating a user may change."""

    model_config = ConfigDict(extra="forbid")

    email: Email | None = None
    name: Name | None = None


class UserOut(BaseModel):
    """A user as the API shows it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    name: str
    created_at: datetime
    updated_at: datetime


class UserPage(BaseModel):
    """One page of users, in id order; pass ``next`` as ``after`` for the next page."""

    items: list[UserOut]
    next: int | None = Field(description="The ``after`` of the next page; null on the last.")


class UserCreated(BaseModel):
    """``users.created``: a user was created (published in the creating transaction)."""

    id: int
    email: str
    name: str
