"""``backup_system``: every service of a system, one archive each, and an index that
records the point each was taken at and what consistency that gives."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshgate.data.backup._backup import Method, backup
from meshgate.data.backup.progress import Progress
from meshgate.errors import MeshgateError

if TYPE_CHECKING:
    from meshgate.data import Database

__all__ = ["CONSISTENCY_STATEMENT", "INDEX", "ServiceTarget", "SystemBackup", "backup_system"]

INDEX = "index.json"
"""The index file of a system backup, in its folder."""

CONSISTENCY_STATEMENT = (
    "Each archive is a consistent snapshot of one service's database, taken at the point "
    "recorded for it (taken_at, and the engine's position: WAL LSN, GTID or binlog "
    "position). The services were backed up one after another: their snapshots are at "
    "different instants, and together they are not a snapshot of the whole system. A "
    "change that spans services (written by one, then delivered to another through its "
    "outbox) can be in one archive and not yet in another. Restored together, the services "
    "reconcile the way they do after any failure: each outbox still holds what it had not "
    "delivered at its snapshot (its position is recorded), and idempotent consumers accept "
    "a redelivery. There is no global snapshot across databases."
)
"""What a system backup promises, written into its index."""


@dataclass(frozen=True)
class ServiceTarget:
    """One service of a system to back up."""

    name: str
    database: str | Database | None
    """Its database; None: it has none (skipped)."""
    migrations: Path | None = None
    ref: str = ""
    version_table: str = "alembic_version"
    skip: str | None = None
    """Why it is skipped, when it is."""


@dataclass(frozen=True)
class SystemBackup:
    """The result of :func:`backup_system`."""

    directory: Path
    index: Path
    services: tuple[dict[str, Any], ...]
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [s["name"] for s in self.services if s["status"] == "failed"]


def backup_system(
    targets: Sequence[ServiceTarget],
    directory: str | Path,
    *,
    system: str = "system",
    method: Method = "logical",
    compresslevel: int = 6,
    progress: Callable[[str], Progress | None] | None = None,
) -> SystemBackup:
    """Back up each service of ``targets`` that has a database into
    ``directory/<name>.mgbak``, one after the other, and write ``directory/index.json``.

    A service whose backup fails is recorded as failed and the others go on; see
    :attr:`SystemBackup.failed`. ``progress(name)`` gives the progress of one service.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    for target in targets:
        entry: dict[str, Any] = {"name": target.name, "ref": target.ref or target.name}
        if target.database is None or target.skip is not None:
            entry.update(status="skipped", reason=target.skip or "it has no database")
            entries.append(entry)
            continue
        archive = folder / f"{target.name}.mgbak"
        try:
            manifest = backup(
                target.database,
                archive,
                service=target.name,
                service_ref=target.ref or target.name,
                migrations=target.migrations,
                version_table=target.version_table,
                method=method,
                compresslevel=compresslevel,
                progress=progress(target.name) if progress is not None else None,
            )
        except MeshgateError as exc:
            entry.update(status="failed", error=str(exc))
            entries.append(entry)
            continue
        entry.update(
            status="ok",
            archive=archive.name,
            engine=manifest.source.engine,
            taken_at=manifest.snapshot.taken_at.isoformat(),
            position=manifest.snapshot.position,
            revision=manifest.migrations.revision,
            outbox=manifest.outbox.model_dump() if manifest.outbox is not None else None,
            rows=manifest.rows,
            tables=len(manifest.tables),
            duration_s=manifest.duration_s,
        )
        entries.append(entry)
    data = {
        "format": "meshgate-backup-index",
        "format_version": 1,
        "system": system,
        "created_at": datetime.now(UTC).isoformat(),
        "consistency": CONSISTENCY_STATEMENT,
        "services": entries,
    }
    index = folder / INDEX
    tmp = index.with_name(f".{INDEX}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(index)
    return SystemBackup(directory=folder, index=index, services=tuple(entries), data=data)
