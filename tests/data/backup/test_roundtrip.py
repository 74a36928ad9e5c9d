"""Round trips on real SQLite, PostgreSQL and MariaDB with writers running during the
backup: the restored copy keeps the invariant the writers keep (a constant sum
across two tables), which a backup that read the tables at different instants
would break."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshgate.data.backup import backup, restore, verify
from tests.data.backup.conftest import (
    ENGINES,
    TOTAL,
    InterleavingProgress,
    NewDatabase,
    Writers,
    bank_total,
    make_bank,
)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_backup_taken_while_writers_run_is_one_consistent_snapshot(
    engine: str, new_database: NewDatabase, tmp_path: Path
) -> None:
    source = new_database(engine)
    make_bank(source)
    archive = tmp_path / "bank.mgbak"
    with Writers(source) as writers:
        progress = InterleavingProgress(writers)
        manifest = backup(source, archive, service="bank", progress=progress)
        writers.wait_for(10)  # the source goes on changing after the snapshot
    assert not writers.errors
    # Transfers committed between the reads of the two tables (and before the first).
    assert progress.steps == ["table checking", "table savings"]
    assert progress.during >= 2 * progress.per_step

    assert [t.name for t in manifest.tables] == ["checking", "savings"]
    assert manifest.rows == 2 * 1500
    assert manifest.source.engine == ("mariadb" if engine == "mariadb" else engine)
    assert manifest.snapshot.position  # LSN, GTID/binlog or the SQLite copy's pages
    verify(archive)

    target = new_database(engine)
    report = restore(target, archive, service="bank")
    assert report.rows == manifest.rows
    assert [t.digest for t in report.tables] == [t.digest for t in manifest.tables]
    total, n_checking, n_savings = bank_total(target)
    assert (n_checking, n_savings) == (1500, 1500)
    assert total == TOTAL, "the restored copy is not one snapshot: money appeared or vanished"
    # The source itself still holds the invariant (the writers are correct).
    assert bank_total(source)[0] == TOTAL


@pytest.mark.parametrize("engine", ENGINES)
def test_a_restore_into_a_non_empty_database_is_refused_and_force_replaces_it(
    engine: str, new_database: NewDatabase, tmp_path: Path
) -> None:
    from meshgate.data.backup import TargetNotEmptyError

    source = new_database(engine)
    make_bank(source)
    archive = tmp_path / "bank.mgbak"
    backup(source, archive, service="bank")

    target = new_database(engine)
    make_bank(target)
    import sqlalchemy as sa

    from tests.data.backup.conftest import checking, sync_engine

    with sync_engine(target).begin() as conn:
        conn.execute(checking.update().where(checking.c.id == 1).values(balance=999_999))
    before = bank_total(target)
    with pytest.raises(
        TargetNotEmptyError, match=r"not empty: table\(s\) checking, savings hold rows.*--force"
    ):
        restore(target, archive, service="bank")
    assert bank_total(target) == before  # untouched

    report = restore(target, archive, service="bank", force=True)
    assert report.rows == 3000
    assert bank_total(target) == (TOTAL, 1500, 1500)
    with sync_engine(target).connect() as conn:
        assert conn.execute(sa.select(checking.c.balance).where(checking.c.id == 1)).scalar() == 100
