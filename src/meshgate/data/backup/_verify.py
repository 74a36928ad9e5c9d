"""``verify``: check an archive without restoring it."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from meshgate.data.backup._revisions import plan_schema
from meshgate.data.backup.archive import ArchiveReader, rows_altered
from meshgate.data.backup.codec import Digest
from meshgate.data.backup.errors import ArchiveError, RestoreVerificationError
from meshgate.data.backup.manifest import Manifest
from meshgate.data.backup.progress import NullProgress, Progress

__all__ = ["VerifyReport", "verify"]


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` checked."""

    manifest: Manifest
    checked: tuple[str, ...]
    """What was checked, in words."""
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "checked": list(self.checked),
            "notes": list(self.notes),
            "manifest": self.manifest.model_dump(mode="json"),
        }


def verify(
    path: str | Path,
    *,
    migrations: str | Path | None = None,
    service: str | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check the archive at ``path`` completely, without a database: its container,
    the manifest's own checksum, every member's SHA-256 and size, and every table's
    rows (each line a JSON array of the table's width; count and checksum as the
    manifest says). A native SQLite dump is opened and its tables checked the same
    way. With ``migrations`` (a service's folder), also that the archive's schema revision is one
    those migrations can restore.

    Raises :class:`ArchiveError` naming what is wrong, or
    :class:`IncompatibleArchiveError` for a schema the migrations cannot restore.
    """
    progress = progress or NullProgress()
    archive = Path(path)
    checked = ["container", "manifest checksum"]
    notes: list[str] = []
    with ArchiveReader(archive) as reader:
        manifest = reader.manifest
        rows_members = set()
        for table in manifest.tables:
            if table.member is None:
                continue
            rows_members.add(table.member)
            width = len(table.columns)
            digest = Digest()
            progress.begin(f"verify {table.name}", table.rows)
            for number, line in enumerate(reader.lines(table.member), start=1):
                try:
                    values = json.loads(line)
                except ValueError:
                    raise ArchiveError(
                        f"{archive}: {table.member} line {number} is not JSON"
                    ) from None
                if not isinstance(values, list) or len(values) != width:
                    raise ArchiveError(
                        f"{archive}: {table.member} line {number} does not hold {width} values"
                    )
                digest.add(line)
                if number % 1000 == 0:
                    progress.advance(1000)
            progress.advance(digest.rows % 1000)
            progress.end()
            if digest.rows != table.rows or digest.hexdigest() != table.digest:
                raise rows_altered(
                    archive, table.name, digest.rows, digest.hexdigest() == table.digest, table.rows
                )
        if rows_members:
            checked.append(f"rows of {len(rows_members)} table(s): count and checksum")
        for name in manifest.members:
            if name not in rows_members:
                for _chunk in reader.chunks(name):
                    pass
        checked.append(f"SHA-256 of {len(manifest.members)} member(s)")
        native = manifest.native
        if native is not None and native.format == "sqlite-database":
            _verify_sqlite_dump(reader, archive)
            checked.append("native SQLite database: rows of every table, count and checksum")
        elif native is not None:
            notes.append(
                f"the {native.tool} dump is checked by its SHA-256 only; its rows are checked "
                "when it is restored"
            )
        if migrations is not None:
            plan = plan_schema(manifest, Path(migrations), service or manifest.service.name)
            checked.append(f"schema revision against {migrations}")
            notes.extend(plan.notes)
    return VerifyReport(manifest=manifest, checked=tuple(checked), notes=tuple(notes))


def _verify_sqlite_dump(reader: ArchiveReader, archive: Path) -> None:
    from meshgate.data.backup._restore import _reflect, verify_target  # noqa: PLC0415
    from meshgate.data.backup.engines.sqlite import SQLite  # noqa: PLC0415

    native = reader.manifest.native
    assert native is not None  # noqa: S101 - checked by the caller
    with tempfile.TemporaryDirectory(prefix="meshgate-verify-") as tmp:
        dump = reader.extract(native.member, Path(tmp) / "database.sqlite")
        copy = SQLite(sa.engine.make_url(f"sqlite:///{dump}"))
        try:
            with copy.engine().connect() as conn:
                metadata = _reflect(copy, conn, reader.manifest.tables)
                verify_target(copy, conn, reader.manifest.tables, metadata)
        except RestoreVerificationError as exc:
            raise ArchiveError(f"{archive}: the native SQLite dump was altered: {exc}") from None
        finally:
            copy.dispose()
