"""PostgreSQL through asyncpg.

Pooled connections are checked with a ping before use (``pool_pre_ping``) and
replaced after ``pool_recycle`` seconds, so that connections dropped by a restart,
a failover or a proxy never reach a session. Each connection names itself
``meshgate/<database name>`` (``application_name``, as seen in
``pg_stat_activity``); ``statement_timeout`` is a server setting of the session.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from meshgate.data._engines.base import Backend, ErrorClass

__all__ = ["PostgreSQL"]

_SCHEMA = frozenset({
    "42P01",  # undefined_table
    "42703",  # undefined_column
})  # fmt: skip
_UNAVAILABLE = frozenset({
    "57P01",  # admin_shutdown: terminated by pg_terminate_backend or a shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now: starting up, shutting down, in recovery
    "53300",  # too_many_connections
})  # fmt: skip


class PostgreSQL(Backend):
    name = "postgresql"
    drivers: ClassVar[Mapping[str, str]] = {"asyncpg": "asyncpg"}
    default_driver = "asyncpg"
    extra = "postgres"

    def engine_options(self) -> dict[str, Any]:
        s = self.settings
        server_settings = {"application_name": f"meshgate/{s.name}"[:63]}
        if s.statement_timeout is not None:
            server_settings["statement_timeout"] = str(max(1, round(s.statement_timeout * 1000)))
        connect_args = dict(s.connect_args)
        server_settings.update(connect_args.pop("server_settings", {}))
        return {
            "pool_size": 10 if s.pool_size is None else s.pool_size,
            "max_overflow": 10 if s.max_overflow is None else s.max_overflow,
            "pool_timeout": s.pool_timeout,
            "pool_recycle": 1800 if s.pool_recycle is None else s.pool_recycle,
            "pool_pre_ping": True,
            "connect_args": {
                "timeout": s.connect_timeout,
                "server_settings": server_settings,
                **connect_args,
            },
        }

    def classify(self, error: BaseException) -> ErrorClass | None:
        state = getattr(error, "sqlstate", None)
        if not isinstance(state, str):
            return None
        if state == "57014":  # query_canceled: statement_timeout
            return "timeout"
        if state.startswith("08") or state in _UNAVAILABLE:  # class 08: connection exception
            return "unavailable"
        if state in _SCHEMA:
            return "schema"
        return None
