"""Column types that behave the same on SQLite, PostgreSQL and MariaDB/MySQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = ["UTCDateTime"]


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (UTC).

    ``DateTime(timezone=True)`` reads back naive values on SQLite and MariaDB, which
    keep no zone, and MariaDB/MySQL drop the microseconds unless asked; this type
    gives every engine the same answer: microseconds kept, UTC, aware. Naive values
    written are taken as UTC; aware ones are converted to UTC. Use it in migrations
    too (``from meshgate.data.types import UTCDateTime``), so that MariaDB/MySQL
    columns are created with microseconds (``DATETIME(6)``).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC) if dialect.name == "postgresql" else value
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)  # noqa: S101 - the column holds timestamps
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
