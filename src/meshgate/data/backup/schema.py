"""Tables described without an engine: from a reflected SQLAlchemy table to a
:class:`~meshgate.data.backup.manifest.TableEntry`, and back to a table that can be
created on any engine.

Restore prefers the service's migrations to make the schema (they know the exact
types, defaults and constraints the service expects); the description here creates
the tables the migrations do not (docs/backup.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.types import TypeEngine

from meshgate.data.backup.manifest import (
    ColumnEntry,
    ForeignKeyEntry,
    IndexEntry,
    LogicalType,
    TableEntry,
)
from meshgate.data.types import UTCDateTime

__all__ = ["build_table", "describe_table", "logical_type", "sorted_tables"]


def logical_type(type_: TypeEngine[Any]) -> dict[str, Any]:
    """The logical type of a reflected column type, with its parameters (keyword
    arguments of :class:`ColumnEntry`)."""
    if isinstance(type_, sa.Boolean):
        return {"type": "boolean"}
    if isinstance(type_, sa.JSON):
        return {"type": "json"}
    if isinstance(type_, sa.Uuid):
        return {"type": "uuid"}
    if isinstance(type_, sa.Integer):
        if isinstance(type_, mysql.TINYINT) and type_.display_width == 1:
            return {"type": "boolean"}  # MySQL's BOOL, as the SDK's Boolean makes it
        small = isinstance(type_, sa.SmallInteger | mysql.TINYINT)
        size = "small" if small else "big" if isinstance(type_, sa.BigInteger) else "normal"
        return {"type": "integer", "size": size}
    if isinstance(type_, sa.Float):
        return {"type": "float"}
    if isinstance(type_, sa.Numeric):
        return {"type": "decimal", "precision": type_.precision, "scale": type_.scale}
    if isinstance(type_, sa.DateTime):
        return {"type": "datetime", "timezone": bool(type_.timezone)}
    if isinstance(type_, sa.Date):
        return {"type": "date"}
    if isinstance(type_, sa.Time):
        return {"type": "time"}
    if isinstance(type_, sa.types._Binary):
        return {"type": "bytes"}
    if isinstance(type_, sa.Enum):
        length = max((len(e) for e in type_.enums), default=None)
        return {"type": "string", "length": length}
    if isinstance(type_, sa.Text) or (isinstance(type_, sa.String) and not type_.length):
        return {"type": "text"}
    if isinstance(type_, sa.String):
        return {"type": "string", "length": type_.length}
    return {"type": "other"}


def _sql(type_: TypeEngine[Any], dialect: sa.Dialect) -> str:
    try:
        return str(type_.compile(dialect=dialect))
    except Exception:  # noqa: BLE001 - a label for people; never worth a failure
        return type(type_).__name__


def describe_table(
    table: sa.Table,
    dialect: sa.Dialect,
    overrides: Mapping[str, LogicalType] | None = None,
) -> dict[str, Any]:
    """The schema part of a :class:`TableEntry` (keyword arguments) for a reflected
    table; ``overrides`` gives logical types the engine knows better (MariaDB's JSON
    columns are LONGTEXT with a check)."""
    overrides = overrides or {}
    pk = tuple(c.name for c in table.primary_key.columns)
    columns = []
    for column in table.columns:
        kind = logical_type(column.type)
        if column.name in overrides:
            kind = {"type": overrides[column.name]}
        auto = (
            len(pk) == 1
            and column.primary_key
            and kind["type"] == "integer"
            and column.autoincrement in (True, "auto")
        )
        columns.append(
            ColumnEntry(
                name=column.name,
                nullable=bool(column.nullable),
                autoincrement=auto,
                sql=_sql(column.type, dialect),
                **kind,
            )
        )
    unique = []
    unique_sets = set()
    for constraint in table.constraints:
        if isinstance(constraint, sa.UniqueConstraint):
            cols = tuple(c.name for c in constraint.columns)
            unique_sets.add(cols)
            unique.append(IndexEntry(name=_name(constraint.name), columns=cols, unique=True))
    indexes = []
    for index in table.indexes:
        cols = tuple(c.name for c in index.columns if isinstance(c, sa.Column))
        if not cols or len(cols) != len(index.expressions):
            continue  # an expression index: the migrations' business
        if index.unique and cols in unique_sets:
            continue  # MySQL reflects a unique constraint as a unique index too
        indexes.append(IndexEntry(name=_name(index.name), columns=cols, unique=bool(index.unique)))
    fks = [
        ForeignKeyEntry(
            name=_name(fk.name),
            columns=tuple(fk.column_keys),
            table=fk.referred_table.name,
            referred=tuple(e.column.name for e in fk.elements),
            ondelete=fk.ondelete,
            onupdate=fk.onupdate,
        )
        for fk in table.foreign_key_constraints
    ]
    return {
        "name": table.name,
        "columns": tuple(columns),
        "primary_key": pk,
        "indexes": tuple(indexes),
        "unique": tuple(unique),
        "foreign_keys": tuple(fks),
    }


def _name(name: Any) -> str | None:
    # SQLAlchemy marks "no name" with an enum member, not None, in a few places.
    return name if isinstance(name, str) else None


def sorted_tables(tables: Sequence[sa.Table]) -> list[sa.Table]:
    """``tables`` with referenced tables first (cycles broken as SQLAlchemy does)."""
    return list(sa.sql.ddl.sort_tables(tables))


# -- back to a table


def _column_type(column: ColumnEntry) -> TypeEngine[Any]:
    kind = column.type
    if kind == "integer":
        if column.size == "small":
            return sa.SmallInteger()
        if column.size == "big":
            # SQLite numbers rows only through an INTEGER PRIMARY KEY.
            return sa.BigInteger().with_variant(sa.Integer(), "sqlite")
        return sa.Integer()
    if kind == "boolean":
        return sa.Boolean()
    if kind == "float":
        return sa.Double()
    if kind == "decimal":
        return sa.Numeric(column.precision, column.scale)
    if kind == "string" and column.length:
        return sa.String(column.length)
    if kind in ("string", "text", "other"):
        return sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
    if kind == "datetime":
        if column.timezone:
            return UTCDateTime()
        return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    if kind == "date":
        return sa.Date()
    if kind == "time":
        return sa.Time().with_variant(mysql.TIME(fsp=6), "mysql", "mariadb")
    if kind == "bytes":
        return sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
    if kind == "json":
        return sa.JSON(none_as_null=True)
    return sa.Uuid()  # "uuid"


def build_table(entry: TableEntry, metadata: sa.MetaData) -> sa.Table:
    """A table of ``metadata`` made from ``entry``, for ``metadata.create_all`` on any
    engine: columns, primary key, unique constraints, indexes and foreign keys."""
    pk = set(entry.primary_key)
    items: list[Any] = [
        sa.Column(
            c.name,
            _column_type(c),
            primary_key=c.name in pk,
            nullable=c.nullable and c.name not in pk,
            autoincrement=c.autoincrement if c.name in pk else False,
        )
        for c in entry.columns
    ]
    items += [sa.UniqueConstraint(*u.columns, name=u.name) for u in entry.unique]
    items += [
        sa.ForeignKeyConstraint(
            list(fk.columns),
            [f"{fk.table}.{col}" for col in fk.referred],
            name=fk.name,
            ondelete=fk.ondelete,
            onupdate=fk.onupdate,
        )
        for fk in entry.foreign_keys
    ]
    table = sa.Table(entry.name, metadata, *items)
    for index in entry.indexes:
        name = index.name or f"ix_{entry.name}_{'_'.join(index.columns)}"[:60]
        sa.Index(name, *[table.c[c] for c in index.columns], unique=index.unique)
    return table
