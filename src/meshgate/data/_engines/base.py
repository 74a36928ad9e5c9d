"""The contract of a database engine module: :class:`Backend`, and the
:class:`Settings` it is built with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from sqlalchemy.engine import URL, Engine

from meshgate.errors import ConfigIssue

__all__ = ["Backend", "ErrorClass", "Settings"]

ErrorClass = Literal["unavailable", "timeout", "schema"]
"""What a driver error means to a service: retry later, or the statement was too slow."""


@dataclass(frozen=True, slots=True)
class Settings:
    """What the caller of :class:`~meshgate.data.Database` asked for (None: the engine's
    default)."""

    name: str
    pool_size: int | None
    max_overflow: int | None
    pool_timeout: float
    pool_recycle: float | None
    statement_timeout: float | None
    connect_timeout: float
    connect_args: Mapping[str, Any] = field(default_factory=dict)


class Backend:
    """One database engine: its defaults, connection setup and error meanings."""

    name: ClassVar[str]
    """The URL scheme without driver, as SQLAlchemy names the dialect."""
    drivers: ClassVar[Mapping[str, str]]
    """The async drivers meshgate supports: driver name in the URL -> module to import."""
    default_driver: ClassVar[str]
    extra: ClassVar[str]
    """The pip extra of meshgate that installs the default driver."""

    def __init__(self, url: URL, settings: Settings) -> None:
        self.url = url
        self.settings = settings

    def check(self) -> list[ConfigIssue]:
        """Problems with the URL or settings for this engine (none by default)."""
        return []

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments for ``create_async_engine`` (pool, connect arguments)."""
        raise NotImplementedError

    def install(self, engine: Engine) -> None:
        """Attach per-connection setup to the (sync) engine."""

    def file(self) -> Path | None:
        """The database's file, absolute, for an embedded engine that has one."""
        return None

    def classify(self, error: BaseException) -> ErrorClass | None:
        """What a driver error means, or None for an error of the statement itself."""
        raise NotImplementedError
