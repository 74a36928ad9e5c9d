"""The archive's schema revision against the service's migrations: an older schema
restores at its revision (and says to upgrade), a newer one or another service's is
refused before the target is touched; a failure on MariaDB, whose DDL commits by
itself, leaves the target empty again."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from meshgate.cli.db import app
from meshgate.data import migrations
from meshgate.data.backup import (
    IncompatibleArchiveError,
    RestoreVerificationError,
    TargetNotEmptyError,
    backup,
    restore,
)
from tests.data.backup.conftest import NewDatabase, sync_engine, write_migrations

V1 = (
    "a1000000",
    None,
    """
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(100), nullable=False, unique=True),
        sa.Column("balance", sa.Numeric(10, 2), nullable=False),
        sa.Column("opened", UTCDateTime(), nullable=True),
    )
    """,
)
V2 = ("b2000000", "a1000000", 'op.add_column("accounts", sa.Column("note", sa.Text))')
OTHER = (
    "c3000000",
    None,
    'op.create_table("other", sa.Column("id", sa.Integer, primary_key=True))',
)


def _fill(url: str, rows: int = 20) -> None:
    engine = sync_engine(url)
    accounts = sa.Table("accounts", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        conn.execute(
            accounts.insert(),
            [{"email": f"a{i}@example.com", "balance": f"{i}.50"} for i in range(rows)],
        )
    engine.dispose()


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    return {
        "v1": write_migrations(tmp_path / "v1", [V1]),
        "v2": write_migrations(tmp_path / "v2", [V1, V2]),
        "other": write_migrations(tmp_path / "other", [OTHER]),
    }


def _tables(url: str) -> list[str]:
    engine = sync_engine(url)
    names = sa.inspect(engine).get_table_names()
    engine.dispose()
    return sorted(names)


def test_an_archive_from_a_newer_schema_is_refused(
    folders: dict[str, Path], new_database: NewDatabase, tmp_path: Path
) -> None:
    source = new_database("sqlite")
    migrations.upgrade(source, folders["v2"])
    _fill(source)
    archive = tmp_path / "a.mgbak"
    manifest = backup(source, archive, service="accounts", migrations=folders["v2"])
    assert manifest.migrations.revision == "b2000000"
    assert manifest.migrations.lineage == ("b2000000", "a1000000")

    target = new_database("sqlite")
    with pytest.raises(
        IncompatibleArchiveError,
        match=r"newer than accounts's migrations: it is at revision b2000000, which the "
        r"migrations in .* \(head a1000000\) do not have yet; they share revision a1000000",
    ):
        restore(target, archive, service="accounts", migrations=folders["v1"])
    assert not Path(target.removeprefix("sqlite:///")).exists()

    result = CliRunner().invoke(app, ["verify", str(archive), "--migrations", str(folders["v1"])])
    assert result.exit_code == 1
    assert "newer than" in result.stderr


def test_an_archive_of_another_service_is_refused(
    folders: dict[str, Path], new_database: NewDatabase, tmp_path: Path
) -> None:
    source = new_database("sqlite")
    migrations.upgrade(source, folders["v1"])
    _fill(source)
    archive = tmp_path / "a.mgbak"
    backup(source, archive, service="accounts", migrations=folders["v1"])
    target = new_database("sqlite")
    with pytest.raises(
        IncompatibleArchiveError,
        match=r"a backup of service 'accounts', not 'orders': restore it into 'accounts', or "
        r"pass --any-service",
    ):
        restore(target, archive, service="orders", migrations=folders["other"])
    # Named to go into it anyway: its migrations know nothing of the archive's schema.
    with pytest.raises(
        IncompatibleArchiveError,
        match=r"neither orders's migrations in .* \(head c3000000\) nor their history know: "
        r"it is the database of another service \(the archive says 'accounts'\)",
    ):
        restore(
            target,
            archive,
            service="orders",
            migrations=folders["other"],
            any_service=True,
        )
    assert not Path(target.removeprefix("sqlite:///")).exists()


def test_an_older_schema_restores_at_its_revision_and_says_to_upgrade(
    folders: dict[str, Path], new_database: NewDatabase, tmp_path: Path
) -> None:
    source = new_database("sqlite")
    migrations.upgrade(source, folders["v1"])
    _fill(source)
    archive = tmp_path / "a.mgbak"
    backup(source, archive, service="accounts", migrations=folders["v1"])

    target = new_database("sqlite")
    result = CliRunner().invoke(
        app,
        [
            "restore",
            "accounts",
            str(archive),
            "--database-url",
            target,
            "--migrations",
            str(folders["v2"]),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "20 rows" in result.stdout
    assert "revision a1000000" in result.stdout
    assert "behind the service's head (b2000000): run `meshgate db upgrade accounts`" in (
        result.stderr
    )
    assert migrations.current(target, folders["v2"]) == "a1000000"
    assert migrations.upgrade(target, folders["v2"]) == "b2000000"


def test_empty_tables_at_the_archive_revision_are_reused_and_others_refused(
    folders: dict[str, Path], new_database: NewDatabase, tmp_path: Path
) -> None:
    source = new_database("sqlite")
    migrations.upgrade(source, folders["v1"])
    _fill(source)
    archive = tmp_path / "a.mgbak"
    backup(source, archive, service="accounts", migrations=folders["v1"])

    ready = new_database("sqlite")  # an operator ran `meshgate db upgrade --to a1000000`
    migrations.upgrade(ready, folders["v1"])
    report = restore(ready, archive, service="accounts", migrations=folders["v2"])
    assert (report.schema, report.rows) == ("existing", 20)

    ahead = new_database("sqlite")  # migrated to head: other tables than the archive's
    migrations.upgrade(ahead, folders["v2"])
    with pytest.raises(
        TargetNotEmptyError,
        match=r"already has tables \(accounts, alembic_version\) at schema revision b2000000, "
        r"the archive is at a1000000",
    ):
        restore(ahead, archive, service="accounts", migrations=folders["v2"])


@pytest.mark.services
def test_a_failed_restore_on_mariadb_drops_what_it_created(
    folders: dict[str, Path],
    new_database: NewDatabase,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from meshgate.data.backup import _restore

    source = new_database("sqlite")
    migrations.upgrade(source, folders["v1"])
    _fill(source)
    archive = tmp_path / "a.mgbak"
    backup(source, archive, service="accounts", migrations=folders["v1"])
    target = new_database("mariadb")

    def wrong(*_args: object, **_kwargs: object) -> None:
        raise RestoreVerificationError("the restored data does not match the archive (test)")

    monkeypatch.setattr(_restore, "verify_target", wrong)
    with pytest.raises(RestoreVerificationError):
        restore(target, archive, service="accounts", migrations=folders["v1"])
    assert _tables(target) == []
    monkeypatch.undo()
    report = restore(target, archive, service="accounts", migrations=folders["v1"])
    assert report.rows == 20
