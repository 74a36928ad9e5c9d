"""Readiness and the database a service expects: the revision of its migrations shown
and required, a deleted SQLite file named, and a service that refuses to start on a
database that is not migrated (or migrates it, when it may)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from meshgate.data import Database, migrations
from meshgate.service import Service, ServiceStartupError
from meshgate.service.testing import in_process

TABLE_REVISION = '''\
"""notes"""

import sqlalchemy as sa
from alembic import op

revision = "0001notes"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("notes", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("notes")
'''


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Migrations that create one table, ``notes``, at revision 0001notes."""
    made = migrations.init(tmp_path / "migrations")
    (made / "versions" / "0001_notes.py").write_text(TABLE_REVISION)
    return made


def make_service(path: Path, folder: Path, **options: object) -> Service:
    database = Database(f"sqlite:///{path}", registry=CollectorRegistry(), migrations=folder)
    service = Service("notes", database=database, **options)  # type: ignore[arg-type]

    @service.app.post("/notes", status_code=201)
    async def add() -> dict[str, int]:
        async with database.session() as session:
            await session.execute(text("INSERT INTO notes DEFAULT VALUES"))
            count = (await session.execute(text("SELECT count(*) FROM notes"))).scalar_one()
        return {"count": count}

    return service


async def test_ready_shows_the_revision_then_names_a_deleted_file(
    tmp_path: Path, folder: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = data / "notes.db"
    migrations.upgrade(f"sqlite:///{path}", folder)
    async with in_process(make_service(path, folder)) as client:
        ready = await client.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"]["database"]["revision"] == "0001notes"
        assert (await client.post("/notes")).status_code == 201

        for leftover in data.iterdir():
            leftover.unlink()  # rm -rf .meshgate/data, as the README suggests

        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        database = ready.json()["checks"]["database"]
        assert database["ok"] is False
        assert f"SQLite file {path} was deleted" in database["error"]
        write = await client.post("/notes")
        assert write.status_code == 503  # not a 201 into a deleted file
        assert write.headers["content-type"] == "application/problem+json"
        assert write.json()["dependency"] == "database"
        assert "was deleted" in write.json()["detail"]


async def test_a_service_refuses_to_start_on_a_database_not_migrated(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHGATE_MIGRATE", raising=False)
    service = make_service(tmp_path / "notes.db", folder)
    with pytest.raises(ServiceStartupError) as caught:
        async with in_process(service):
            pass
    message = str(caught.value)
    assert message.startswith("notes cannot start: database 'default'")
    assert "has no schema revision" in message
    assert "0001notes" in message
    assert "MESHGATE_MIGRATE=1" in message
    # serve() refuses before it listens.
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(ServiceStartupError, match="cannot start"):
            await make_service(tmp_path / "notes.db", folder).serve(sock=sock)
    finally:
        sock.close()


@pytest.mark.parametrize("how", ["argument", "environment"])
async def test_a_service_that_may_migrate_does_so_when_it_starts(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "environment":
        monkeypatch.setenv("MESHGATE_MIGRATE", "1")
        service = make_service(tmp_path / "notes.db", folder)
    else:
        monkeypatch.delenv("MESHGATE_MIGRATE", raising=False)
        service = make_service(tmp_path / "notes.db", folder, migrate=True)
    async with in_process(service) as client:
        assert (await client.post("/notes")).json() == {"count": 1}
        ready = await client.get("/health/ready")
    assert ready.json()["checks"]["database"]["revision"] == "0001notes"
    assert migrations.current(f"sqlite:///{tmp_path / 'notes.db'}", folder) == "0001notes"


async def test_a_database_that_is_down_at_start_is_left_to_readiness(folder: Path) -> None:
    closed = socket.socket()  # bound, never listening: connections are refused
    closed.bind(("127.0.0.1", 0))
    database = Database(
        f"postgresql://postgres@127.0.0.1:{closed.getsockname()[1]}/none",
        registry=CollectorRegistry(),
        migrations=folder,
        connect_timeout=1.0,
    )
    service = Service("notes", database=database)
    try:
        async with in_process(service) as client:
            ready = await client.get("/health/ready")
    finally:
        closed.close()
    assert ready.status_code == 503
    assert "cannot connect" in ready.json()["checks"]["database"]["error"]


async def test_a_request_that_finds_no_table_is_a_503_naming_the_migrations(
    tmp_path: Path, folder: Path
) -> None:
    path = tmp_path / "notes.db"
    migrations.upgrade(f"sqlite:///{path}", folder)
    service = make_service(path, folder)
    async with in_process(service) as client:
        assert service.database is not None
        async with service.database.connection() as conn:
            await conn.execute(text("DROP TABLE notes"))  # a schema not the migrations'
        response = await client.post("/notes")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["error"] == "database_not_migrated"
    assert body["type"] == "https://meshgate.dev/problems/database_not_migrated"
    assert "no such table: notes" in body["detail"]
