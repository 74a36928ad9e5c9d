"""MySQL and MariaDB through asyncmy.

Pooled connections are checked with a ping before use and replaced after
``pool_recycle`` seconds (shorter than the server's ``wait_timeout`` and than most
proxies' idle limits). Connections use utf8mb4 unless the URL names a charset.
``statement_timeout`` becomes MariaDB's ``max_statement_time`` (every statement) or
MySQL's ``max_execution_time`` (read-only SELECTs only: MySQL has no limit for
other statements).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine

from meshgate.data._engines.base import Backend, ErrorClass, Settings

__all__ = ["MariaDB", "MySQL"]

_UNAVAILABLE = frozenset({
    1040,  # too many connections
    1053,  # server shutdown in progress
    1927,  # connection was killed (MariaDB)
    2002,  # cannot connect through socket
    2003,  # cannot connect to server
    2005,  # unknown host
    2006,  # server has gone away
    2013,  # lost connection during query
    2055,  # lost connection (system error)
    4031,  # disconnected by the server for inactivity (MySQL 8)
})  # fmt: skip
_SCHEMA = frozenset({
    1146,  # table doesn't exist
    1054,  # unknown column
})  # fmt: skip
_TIMEOUT = frozenset({
    1969,  # MariaDB: max_statement_time exceeded
    3024,  # MySQL: max_execution_time exceeded
})  # fmt: skip


class MySQL(Backend):
    name = "mysql"
    drivers: ClassVar[Mapping[str, str]] = {"asyncmy": "asyncmy"}
    default_driver = "asyncmy"
    extra = "mysql"

    def __init__(self, url: URL, settings: Settings) -> None:
        if "charset" not in url.query:
            url = url.update_query_dict({"charset": "utf8mb4"})
        super().__init__(url, settings)

    def engine_options(self) -> dict[str, Any]:
        s = self.settings
        return {
            "pool_size": 10 if s.pool_size is None else s.pool_size,
            "max_overflow": 10 if s.max_overflow is None else s.max_overflow,
            "pool_timeout": s.pool_timeout,
            "pool_recycle": 1800 if s.pool_recycle is None else s.pool_recycle,
            "pool_pre_ping": True,
            "connect_args": {
                "connect_timeout": max(1, math.ceil(s.connect_timeout)),
                **s.connect_args,
            },
        }

    def install(self, engine: Engine) -> None:
        timeout = self.settings.statement_timeout
        if timeout is None:
            return

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT VERSION()")
                (version,) = cursor.fetchone()
                if "mariadb" in str(version).lower():
                    cursor.execute(f"SET SESSION max_statement_time = {timeout:.3f}")
                else:
                    cursor.execute(
                        f"SET SESSION max_execution_time = {max(1, round(timeout * 1000))}"
                    )
            finally:
                cursor.close()

    def classify(self, error: BaseException) -> ErrorClass | None:
        code = error.args[0] if error.args else None
        if not isinstance(code, int):
            return None
        if code in _TIMEOUT:
            return "timeout"
        if code in _UNAVAILABLE:
            return "unavailable"
        if code in _SCHEMA:
            return "schema"
        return None


class MariaDB(MySQL):
    name = "mariadb"
