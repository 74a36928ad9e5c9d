"""Readiness: a service's checks, and its database made sure of before it starts.

``/health/ready`` runs every check at once, each bounded in time; a check passes by
returning (a mapping it returns adds to its outcome, as the database's ``revision``)
and fails by raising, its exception's text being the reason shown.

Before a service with a database that names its ``migrations`` starts, the database
must be at their head revision (:func:`prepare_database`): a service that would
answer "no such table" refuses to start, saying so, or migrates the database first
when it may (``Service(..., migrate=True)``, ``MESHGATE_MIGRATE=1``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from meshgate.service.errors import ServiceStartupError

if TYPE_CHECKING:
    from meshgate.data import Database

__all__ = ["CHECK_TIMEOUT", "Check", "prepare_database", "run_checks"]

log = logging.getLogger("meshgate.service")

Check = Callable[[], Awaitable[object]]
"""A readiness check: returns when the dependency answers (a mapping it returns is
shown with the outcome), raises when not."""

CHECK_TIMEOUT = 2.0
"""Seconds each check may take."""


async def _run(check: Check, timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            found = await check()
    except TimeoutError:
        return {"ok": False, "error": f"no answer within {timeout:g}s"}
    except Exception as exc:  # noqa: BLE001 - any failure is "not ready", with its reason
        return {"ok": False, "error": str(exc) or type(exc).__name__}
    outcome: dict[str, Any] = {
        "ok": True,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if isinstance(found, Mapping):
        outcome.update((str(k), v) for k, v in found.items() if k not in outcome)
    return outcome


async def run_checks(
    checks: Mapping[str, Check], timeout: float = CHECK_TIMEOUT
) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Run every check at once; (all passed, each check's outcome by name)."""
    names = list(checks)
    results = await asyncio.gather(*(_run(checks[n], timeout) for n in names))
    return all(r["ok"] for r in results), dict(zip(names, results, strict=True))


async def prepare_database(service: str, database: Database, *, migrate: bool) -> None:
    """Make sure ``database`` is at the head of its ``migrations`` before ``service``
    starts: migrate it when ``migrate``, else refuse.

    Nothing to do without ``migrations``. A database that does not answer now is left
    to readiness (the service starts, and registers once it answers).

    Raises:
        ServiceStartupError: not at the head revision and ``migrate`` is off, or the
            migration failed; the message says which and what to do.
    """
    from meshgate.data import migrations  # noqa: PLC0415 - the sql extra is optional
    from meshgate.data.errors import (  # noqa: PLC0415
        DatabaseUnavailableError,
        DataError,
        UnmigratedDatabaseError,
    )

    folder = database.migrations
    if folder is None:
        return
    try:
        await database.check(timeout=10.0)
    except UnmigratedDatabaseError as exc:
        if not migrate:
            raise ServiceStartupError(f"{service} cannot start: {exc}") from None
        log.warning("%s: %s; migrating it now (migrate is on)", service, exc)
    except DatabaseUnavailableError as exc:
        log.warning("%s starts without its database for now: %s", service, exc)
        return
    else:
        return
    try:
        reached = await asyncio.to_thread(
            migrations.upgrade, database, folder, version_table=database.version_table
        )
        await database.check(timeout=10.0)
    except DataError as exc:
        raise ServiceStartupError(
            f"{service} cannot start: migrating database {database.name!r} "
            f"({database.url}) failed: {exc}"
        ) from None
    log.info("%s: database %r migrated to revision %s", service, database.name, reached or "base")
