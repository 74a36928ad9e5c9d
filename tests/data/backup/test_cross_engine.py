"""A logical archive restores across engines: every column type the SDK's models use
(UTCDateTime, Numeric, Boolean, LargeBinary, JSON, Text, String, Integer, BigInteger,
Float, Date, Uuid), NULLs and unicode read back equal through the models."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from meshgate.cli.db import app
from meshgate.data import migrations
from meshgate.data.backup import backup, restore
from meshgate.data.types import UTCDateTime
from tests.data.backup.conftest import NewDatabase, sync_engine

metadata = sa.MetaData()
things = sa.Table(
    "things",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("big", sa.BigInteger),
    sa.Column("label", sa.String(60)),
    sa.Column("body", sa.Text),
    sa.Column("active", sa.Boolean),
    sa.Column("ratio", sa.Double),
    sa.Column("price", sa.Numeric(12, 2)),
    sa.Column("at", UTCDateTime()),
    sa.Column("day", sa.Date),
    sa.Column("blob", sa.LargeBinary),
    sa.Column("doc", sa.JSON),
    sa.Column("ref", sa.Uuid),
)
ROWS: list[dict[str, Any]] = [
    {
        "id": 1,
        "big": 2**53 + 1,
        "label": "héllo wörld ✓ 日本",
        "body": 'line one\nline "two" \\ tab\t\u2028end',
        "active": True,
        "ratio": 0.1,
        "price": Decimal("1234567890.12"),
        "at": datetime(2025, 1, 31, 23, 59, 58, 123456, tzinfo=UTC),
        "day": date(2024, 2, 29),
        "blob": bytes(range(256)),
        "doc": {"z": [1, 2.5, None, True], "a": {"nested": "ü"}, "": ""},
        "ref": uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e"),
    },
    {
        "id": 2,
        "big": -1,
        "label": "",
        "body": "",
        "active": False,
        "ratio": -1e-300,
        "price": Decimal("-0.01"),
        # Written with another zone: stored and read back as the same instant in UTC.
        "at": datetime(2025, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
        "day": date(1970, 1, 1),
        "blob": b"",
        "doc": [],
        "ref": uuid.UUID(int=0),
    },
    dict.fromkeys(
        ("big", "label", "body", "active", "ratio", "price", "at", "day", "blob", "doc", "ref")
    )
    | {"id": 3},
]


def _read(url: str) -> list[dict[str, Any]]:
    engine = sync_engine(url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(things).order_by(things.c.id))]
    engine.dispose()
    return rows


def _expected() -> list[dict[str, Any]]:
    expected = [dict(r) for r in ROWS]
    expected[1]["at"] = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    return expected


PAIRS = [
    pytest.param("postgresql", "sqlite", id="postgresql-to-sqlite", marks=pytest.mark.services),
    pytest.param("sqlite", "mariadb", id="sqlite-to-mariadb", marks=pytest.mark.services),
    pytest.param("mariadb", "postgresql", id="mariadb-to-postgresql", marks=pytest.mark.services),
]


@pytest.mark.parametrize(("source_engine", "target_engine"), PAIRS)
def test_every_sdk_column_type_survives_a_restore_on_another_engine(
    source_engine: str, target_engine: str, new_database: NewDatabase, tmp_path: Path
) -> None:
    source = new_database(source_engine)
    engine = sync_engine(source)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(things.insert(), ROWS)
    engine.dispose()
    assert _read(source) == _expected()

    archive = tmp_path / "things.mgbak"
    manifest = backup(source, archive, service="things")
    target = new_database(target_engine)
    report = restore(target, archive, service="things")
    assert report.schema == "archive"  # no migrations: made from the archive's description
    assert [t.digest for t in report.tables] == [t.digest for t in manifest.tables]
    assert _read(target) == _expected()


@pytest.mark.services
def test_a_service_with_migrations_restores_on_another_engine_through_them(
    new_database: NewDatabase,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shop's users service: backed up from SQLite, restored into PostgreSQL and
    MariaDB by running its migrations to the archive's revision."""
    targets = {engine: new_database(engine) for engine in ("postgresql", "mariadb")}
    monkeypatch.chdir(Path(__file__).resolve().parents[3])
    service = "examples.shop.users.app"
    folder = Path("examples/shop/users/migrations")
    source = new_database("sqlite")
    revision = migrations.upgrade(source, folder)
    engine = sync_engine(source)
    users = sa.Table("users", sa.MetaData(), autoload_with=engine)
    now = datetime(2025, 3, 1, 8, 30, 0, 654321, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(
            users.insert(),
            [
                {
                    "email": f"u{i}@example.com",
                    "name": f"Üser {i}",
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(50)
            ],
        )
    engine.dispose()
    runner = CliRunner()
    archive = tmp_path / "users.mgbak"
    result = runner.invoke(app, ["backup", service, "-o", str(archive), "--database-url", source])
    assert result.exit_code == 0, result.output
    for target in targets.values():
        result = runner.invoke(
            app, ["restore", service, str(archive), "--database-url", target, "--json"]
        )
        assert result.exit_code == 0, result.output
        assert f'"revision": "{revision}"' in result.stdout
        assert '"schema": "migrations"' in result.stdout
        engine = sync_engine(target)
        with engine.begin() as conn:
            rows = conn.execute(sa.text("SELECT email, created_at FROM users ORDER BY id")).all()
            assert len(rows) == 50
            assert rows[0][0] == "u0@example.com"
            # The id generator goes on after the restored ids.
            conn.execute(
                users.insert().values(
                    email="new@example.com", name="New", created_at=now, updated_at=now
                )
            )
            assert conn.execute(sa.text("SELECT MAX(id) FROM users")).scalar() == 51
        engine.dispose()


shop = sa.MetaData()
customers = sa.Table(
    "customers",
    shop,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sa.String(100), nullable=False, unique=True),
    sa.Column("region", sa.String(10), nullable=True, index=True),
)
orders = sa.Table(
    "orders",
    shop,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("customer_id", sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
    sa.Column("parent_id", sa.ForeignKey("orders.id"), nullable=True),  # refers to itself
    sa.Column("total", sa.Numeric(10, 2), nullable=False),
    sa.UniqueConstraint("customer_id", "total", name="uq_orders_customer_total"),
)


@pytest.mark.parametrize(
    ("source_engine", "target_engine"),
    [
        pytest.param("sqlite", "sqlite", id="sqlite-to-sqlite"),
        pytest.param(
            "postgresql", "mariadb", id="postgresql-to-mariadb", marks=pytest.mark.services
        ),
        pytest.param(
            "mariadb", "postgresql", id="mariadb-to-postgresql", marks=pytest.mark.services
        ),
    ],
)
def test_the_archives_schema_keeps_keys_constraints_and_indexes(
    source_engine: str, target_engine: str, new_database: NewDatabase, tmp_path: Path
) -> None:
    source = new_database(source_engine)
    engine = sync_engine(source)
    shop.create_all(engine)
    with engine.begin() as conn:
        conn.execute(customers.insert(), [{"id": 1, "email": "a@x.y", "region": "eu"}])
        # The child row comes first in id order: loading must not trip on it.
        conn.execute(orders.insert(), [{"id": 1, "customer_id": 1, "total": 5}])
        conn.execute(orders.insert(), [{"id": 2, "customer_id": 1, "total": 6}])
        conn.execute(orders.update().where(orders.c.id == 1).values(parent_id=2))
    engine.dispose()
    archive = tmp_path / "shop.mgbak"
    manifest = backup(source, archive, service="shop")
    assert [t.name for t in manifest.tables] == ["customers", "orders"]  # referenced first

    target = new_database(target_engine)
    restore(target, archive, service="shop")
    engine = sync_engine(target)
    inspector = sa.inspect(engine)
    columns = {c["name"]: c for c in inspector.get_columns("orders")}
    assert not columns["customer_id"]["nullable"]
    assert columns["parent_id"]["nullable"]
    assert not {c["name"]: c for c in inspector.get_columns("customers")}["email"]["nullable"]
    fks = {
        (tuple(f["constrained_columns"]), f["referred_table"])
        for f in inspector.get_foreign_keys("orders")
    }
    assert fks == {(("customer_id",), "customers"), (("parent_id",), "orders")}
    uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("orders")}
    uniques |= {tuple(i["column_names"]) for i in inspector.get_indexes("orders") if i["unique"]}
    assert ("customer_id", "total") in uniques
    indexed = {tuple(i["column_names"]) for i in inspector.get_indexes("customers")}
    assert ("region",) in indexed
    with engine.begin() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(customers.insert(), [{"id": 2, "email": "a@x.y"}])  # unique email
    engine.dispose()
