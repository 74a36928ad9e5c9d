"""The archive's schema version against a service's migrations: may it be restored,
and how is the schema made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshgate.data import migrations
from meshgate.data.backup.errors import IncompatibleArchiveError
from meshgate.data.backup.manifest import Manifest

__all__ = ["SchemaPlan", "lineage", "plan_schema"]


def _folder(folder: Path | None) -> Path | None:
    return folder if folder is not None and (folder / "env.py").is_file() else None


def lineage(folder: Path | None, revision: str | None) -> tuple[str, ...]:
    """``revision`` (heads joined by commas) and every revision before it, newest
    first, from the migrations in ``folder``; empty when either is missing."""
    folder = _folder(folder)
    if folder is None or not revision:
        return ()
    downs = {r.revision: r.down_revision for r in migrations.history(folder)}
    seen: list[str] = []
    todo = [r for r in revision.split(",") if r]
    while todo:
        rev = todo.pop(0)
        if rev in seen or rev not in downs:
            continue
        seen.append(rev)
        todo.extend(downs[rev])
    return tuple(seen)


@dataclass
class SchemaPlan:
    """How restore makes the schema."""

    folder: Path | None
    """The migrations folder to run, or None: the archive's own description."""
    revision: str | None
    """The revision to migrate to (the archive's)."""
    heads: tuple[str, ...] = ()
    """The heads of the service's migrations."""
    notes: list[str] = field(default_factory=list)

    @property
    def behind_head(self) -> bool:
        return (
            bool(self.heads)
            and self.revision is not None
            and (set(self.revision.split(",")) != set(self.heads))
        )


def plan_schema(manifest: Manifest, folder: Path | None, service: str) -> SchemaPlan:
    """Check the archive's revision against the migrations in ``folder``.

    Raises :class:`IncompatibleArchiveError` when the archive's schema is newer than
    the migrations (its history shares revisions with them, but they lack its
    revision) or from another service (it shares none).
    """
    revision = manifest.migrations.revision
    found = _folder(folder)
    if found is None:
        notes = []
        if revision is not None:
            notes.append(
                f"no migrations folder for {service} (looked at {folder}): the schema is made "
                f"from the archive's description and stamped at revision {revision}, unchecked"
            )
        return SchemaPlan(folder=None, revision=revision, notes=notes)
    history = migrations.history(found)
    known = {r.revision for r in history}
    heads = tuple(sorted(r.revision for r in history if r.is_head))
    if revision is None:
        return SchemaPlan(
            folder=None,
            revision=None,
            heads=heads,
            notes=[
                (
                    "the archive's database had no migration applied: the schema is made from "
                    "the archive's description"
                )
            ],
        )
    wanted = [r for r in revision.split(",") if r]
    unknown = [r for r in wanted if r not in known]
    if unknown:
        shared = [r for r in manifest.migrations.lineage if r in known]
        head = ", ".join(heads) or "none"
        if shared:
            raise IncompatibleArchiveError(
                f"the archive's schema is newer than {service}'s migrations: it is at revision "
                f"{revision}, which the migrations in {found} (head {head}) do not have yet; "
                f"they share revision {shared[0]}. Restore it with the code that has "
                f"{unknown[0]} (or point --migrations to its migrations folder)"
            )
        raise IncompatibleArchiveError(
            f"the archive is at schema revision {revision}, which neither {service}'s "
            f"migrations in {found} (head {head}) nor their history know: it is the database "
            f"of another service (the archive says {manifest.service.name!r}). Name the "
            "service it belongs to, or point --migrations to its migrations folder"
        )
    return SchemaPlan(folder=found, revision=revision, heads=heads)


def head_text(heads: Sequence[str]) -> str:
    return ",".join(heads) or "base"
