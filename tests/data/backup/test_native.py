"""The native method: the engine's own dump (pg_dump, mariadb-dump, SQLite's database
file) of the very snapshot the manifest's checksums were taken in, with writers
running, restored by the engine's own tool and then verified like a logical one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from meshgate.data.backup import (
    IncompatibleArchiveError,
    TargetNotEmptyError,
    backup,
    restore,
    verify,
)
from tests.data.backup.conftest import (
    ENGINES,
    TOTAL,
    InterleavingProgress,
    NewDatabase,
    Writers,
    bank_total,
    make_bank,
)

TOOLS = {"sqlite": None, "postgresql": "pg_dump", "mariadb": "mariadb-dump"}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_native_backup_shares_the_snapshot_and_restores_verified(
    engine: str, new_database: NewDatabase, tmp_path: Path
) -> None:
    tool = TOOLS[engine]
    if tool is not None and shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    source = new_database(engine)
    make_bank(source)
    archive = tmp_path / "bank.mgbak"
    with Writers(source) as writers:
        progress = InterleavingProgress(writers)
        manifest = backup(source, archive, service="bank", method="native", progress=progress)
    assert manifest.method == "native"
    assert manifest.native is not None
    assert all(t.member is None for t in manifest.tables)  # the rows are in the dump only
    assert progress.during >= 2 * progress.per_step
    report = verify(archive)
    assert any("native" in c for c in report.checked) or report.notes

    target = new_database(engine)
    restored = restore(target, archive, service="bank")
    assert restored.schema == "native"
    # Checked against the checksums of our own snapshot: equal only if the tool's
    # snapshot was the same one.
    assert [t.digest for t in restored.tables] == [t.digest for t in manifest.tables]
    assert bank_total(target) == (TOTAL, 1500, 1500)

    with pytest.raises(TargetNotEmptyError, match="native dump restores into an empty database"):
        restore(target, archive, service="bank")
    if engine != "sqlite":
        with pytest.raises(
            IncompatibleArchiveError, match=r"only \w+ restores; the target is sqlite"
        ):
            restore(new_database("sqlite"), archive, service="bank")
