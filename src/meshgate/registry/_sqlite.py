"""SQLite persistence for the embedded registry: one file, one writer thread.

Every change is committed before the registry applies it and answers, so what a
caller or watcher saw survives a crash of the process (WAL with
``synchronous=NORMAL``: a power cut may lose the last commits, never corrupt the
file). The connection lives on one thread and the event loop only waits for it.
The file is locked for the life of the registry: a second registry (another
gateway on the same machine) cannot use it at the same time.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from meshgate.registry.errors import RegistryStoreError
from meshgate.registry.model import Instance

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS services (service TEXT PRIMARY KEY, modify_index INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    service TEXT NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (service, id)
);
"""

T = TypeVar("T")


@dataclass
class Loaded:
    """The persisted state: the index, each service's modify index, the instances."""

    index: int = 0
    services: dict[str, int] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)
    skipped: int = 0
    """Rows that could not be read back (written by a different version); left out."""


@dataclass
class Change:
    """One transaction: instances written and removed, modify indexes, the new index."""

    index: int
    services: dict[str, int] = field(default_factory=dict)
    upserts: list[Instance] = field(default_factory=list)
    deletes: list[tuple[str, str]] = field(default_factory=list)


class SqliteStore:
    """The registry's SQLite file, used from one dedicated thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="meshgate-registry-sqlite")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[], T], doing: str) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except (sqlite3.Error, OSError) as exc:
            raise RegistryStoreError(self._explain(exc, doing)) from exc

    def _explain(self, exc: BaseException, doing: str) -> str:
        text = str(exc)
        if "locked" in text:
            fix = (
                "another process (a second gateway?) is using this file; give each "
                "registry its own file, or share one registry through Redis"
            )
        elif "not a database" in text or "malformed" in text:
            fix = "it is not a registry database; move it away (the registry starts empty)"
        else:
            fix = "check that the directory exists and is writable, and that the disk is not full"
        return f"registry file {self.path}: cannot {doing} ({text}); {fix}"

    async def open(self) -> Loaded:
        """Open (creating it if needed), lock and read the file."""
        return await self._run(self._open, "open")

    def _open(self) -> Loaded:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            db.execute("PRAGMA busy_timeout = 1000")
            # Held until close: a second registry on the same file fails at start.
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("BEGIN IMMEDIATE")
            self._check_version(db)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            db.execute("COMMIT")
            loaded = Loaded()
            row = db.execute("SELECT value FROM meta WHERE key = 'index'").fetchone()
            loaded.index = int(row[0]) if row else 0
            loaded.services = dict(db.execute("SELECT service, modify_index FROM services"))
            for (body,) in db.execute("SELECT body FROM instances ORDER BY service, id"):
                try:
                    loaded.instances.append(Instance.model_validate_json(body))
                except ValidationError:
                    loaded.skipped += 1
        except BaseException:
            db.close()
            raise
        self._db = db
        return loaded

    def _check_version(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            db.execute("ROLLBACK")
            raise RegistryStoreError(
                f"registry file {self.path} was written by a newer meshgate "
                f"(schema {version}, this one reads {_SCHEMA_VERSION}); upgrade meshgate "
                "or point the registry at another file"
            )

    async def commit(self, changes: Iterable[Change]) -> None:
        """Write ``changes`` in one transaction (all or nothing)."""
        batch = list(changes)
        await self._run(lambda: self._commit(batch), "write")

    def _commit(self, changes: list[Change]) -> None:
        db = self._db
        if db is None:
            raise sqlite3.ProgrammingError("the registry file is closed")
        db.execute("BEGIN IMMEDIATE")
        try:
            for change in changes:
                db.executemany(
                    "INSERT INTO instances (service, id, body) VALUES (?, ?, ?) "
                    "ON CONFLICT (service, id) DO UPDATE SET body = excluded.body",
                    [(i.service, i.id, i.model_dump_json()) for i in change.upserts],
                )
                db.executemany("DELETE FROM instances WHERE service = ? AND id = ?", change.deletes)
                db.executemany(
                    "INSERT INTO services (service, modify_index) VALUES (?, ?) "
                    "ON CONFLICT (service) DO UPDATE SET modify_index = excluded.modify_index",
                    list(change.services.items()),
                )
            if changes:
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('index', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (max(c.index for c in changes),),
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Close the file (after any write still queued) and stop the thread."""
        try:
            await self._run(self._close, "close")
        finally:
            self._executor.shutdown(wait=False)

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
