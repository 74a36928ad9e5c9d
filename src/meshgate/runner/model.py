"""The system file (``meshgate.yaml``): YAML in, frozen typed models out.

A system is a gateway (which hosts the registry) and services, each run as one or
more supervised processes. Every model forbids unknown keys and is immutable once
built. Checks that need the whole file (dependencies, placeholders, ports) live in
:mod:`meshgate.runner.loader`. The reference is docs/up.md.
"""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
)

from meshgate.config.model import Address, Duration, Name
from meshgate.config.secrets import mask_url
from meshgate.runner.events import EventsSpec

__all__ = [
    "EMBEDDED",
    "GatewaySpec",
    "ObservabilitySpec",
    "OtlpSpec",
    "ReadySpec",
    "RestartPolicy",
    "SamplingSpec",
    "ServiceSpec",
    "System",
]

EMBEDDED = "embedded"
"""The value of ``database``, ``cache`` or ``broker`` that asks for the embedded engine."""

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_APP_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

RestartPolicy = Literal["always", "on-failure", "never"]
"""When a process that exited by itself is started again."""


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, use_attribute_docstrings=True
    )


def _env_value(value: object) -> object:
    """YAML numbers and booleans become the text a shell would hold; None is refused."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if value is None:
        raise ValueError("an environment value cannot be null; write '' for an empty one")
    return value


def _env_name(value: str) -> str:
    if not _ENV_NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not an environment variable name; use letters, digits and '_', "
            "not starting with a digit"
        )
    return value


EnvName = Annotated[str, AfterValidator(_env_name)]
EnvValue = Annotated[str, BeforeValidator(_env_value)]
Environment = dict[EnvName, EnvValue]


def _dependency_url(value: str | None) -> str | None:
    if value is None or value == EMBEDDED or "://" in value:
        return value
    raise ValueError(
        f"{value!r} is neither {EMBEDDED!r} nor a URL; write embedded, or a URL such as "
        "postgresql://user@localhost/users"
    )


DependencyUrl = Annotated[str | None, AfterValidator(_dependency_url)]


class ReadySpec(_Model):
    """How the runner knows that an instance is ready. At most one of ``http``,
    ``tcp`` and ``log``; the default depends on the kind of service (docs/up.md)."""

    http: str | None = None
    """Ready once ``GET http://127.0.0.1:<port><http>`` answers 2xx or 3xx, from a
    listener of the instance's own processes (Linux: not one another process holds)."""
    tcp: bool = False
    """Ready once the instance accepts TCP connections on its port, on a listener of
    its own processes (as for ``http``)."""
    log: str | None = None
    """Ready once a line of its output matches this regular expression."""
    timeout: Duration = 60.0
    """How long an instance may take to become ready; past it, ``up`` and ``scale``
    fail with its last log lines, and a restarted instance is started again."""

    @field_validator("http")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"{value!r} is not a path; write it from the root, such as /health")
        return value

    @field_validator("log")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
        return value


class GatewaySpec(_Model):
    """The gateway process, which also hosts the registry that services register in."""

    config: str | None = None
    """Its configuration file, relative to the system file. Default: one generated
    with a route ``/<service>`` (prefix stripped) per service in the registry."""
    listen: Address | None = None
    """Where clients connect; replaces the configuration's ``gateway.listen``.
    Default ``127.0.0.1:0``: a free port, chosen at start."""
    admin: Address | None = None
    """The admin listener (and registry); replaces ``gateway.admin.listen``.
    Default ``127.0.0.1:0``: a free port, chosen at start."""
    workers: int | None = Field(default=None, ge=0, le=1024)
    """Worker processes; default: the configuration's ``gateway.workers`` (1 for a
    generated one). ``0`` or ``auto`` means one per CPU."""
    ready_timeout: Duration = 30.0
    """How long the gateway may take to start serving."""
    stop_timeout: Duration = 45.0
    """How long it may take to drain and exit after SIGTERM before it is killed."""

    @field_validator("workers", mode="before")
    @classmethod
    def _auto(cls, value: object) -> object:
        return 0 if value == "auto" else value


class ServiceSpec(_Model):
    """One service: how to start an instance, how many, with what around it."""

    app: str | None = None
    """``module:attribute`` of a :class:`meshgate.service.Service`, run with
    ``meshgate serve`` (registers itself; ready when ``/health/ready`` passes and
    it is registered)."""
    command: tuple[str, ...] | None = None
    """A command instead of ``app``: a string (split like a shell does) or a list.
    Placeholders such as ``{port}`` are replaced in each argument."""
    replicas: int = Field(default=1, ge=0, le=64)
    """How many instances to run (``meshgate scale`` changes it while running)."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """The first instance's port; instance N listens on ``port + N - 1``. Default:
    a free port per instance."""
    env: Environment = Field(default_factory=dict)
    """Environment variables of its processes (after the system's ``env``)."""
    depends_on: tuple[Name, ...] = ()
    """Services whose instances must all be ready before this one starts; they stop
    after it."""
    database: DependencyUrl = None
    """A database URL, or ``embedded`` for SQLite in the state folder; given to the
    processes as ``<PREFIX>_DATABASE_URL`` and ``MESHGATE_DATABASE_URL``."""
    cache: DependencyUrl = None
    """A cache URL, or ``embedded`` (``memory://``); given as ``<PREFIX>_CACHE_URL``
    and ``MESHGATE_CACHE_URL``."""
    broker: DependencyUrl = None
    """``embedded`` for the system's event bus (``events:``; by default a nats-server
    the runner starts), or a bus URL; given as ``<PREFIX>_BROKER_URL``,
    ``MESHGATE_BROKER_URL`` and ``MESHGATE_EVENTS_URL`` (which ``service.events``
    reads), with ``MESHGATE_EVENTS_*`` for credentials and TLS."""
    env_prefix: str | None = None
    """``<PREFIX>`` of the dependency variables; default: the service name in capitals,
    with ``-`` and ``.`` made ``_``."""
    migrate: bool = False
    """Run ``meshgate db upgrade`` of the app's module before its first instance starts."""
    ready: ReadySpec = Field(default_factory=ReadySpec)
    """How readiness is known."""
    restart: RestartPolicy = "always"
    """When an instance that exited by itself is started again: ``always``,
    ``on-failure`` (not after exit code 0) or ``never``. Crash loops back off."""
    stop_timeout: Duration = 20.0
    """How long an instance may take to drain and exit after SIGTERM before it is killed."""
    registry: bool | None = None
    """For a ``command``: whether the runner registers each instance in the registry
    under the service's name (so that gateway routes with ``service:`` reach it).
    Default: yes when it is ready by ``http`` or ``tcp``. An ``app`` registers itself."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """The log level of an ``app`` (``meshgate serve --log-level``)."""

    @field_validator("app")
    @classmethod
    def _app(cls, value: str | None) -> str | None:
        if value is not None and not _APP_RE.match(value):
            raise ValueError(
                f"{value!r} is not module:attribute; write it like examples.shop.users.app:service"
            )
        return value

    @field_validator("command", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"cannot split the command like a shell: {exc}") from None
        if isinstance(value, list | tuple) and not value:
            raise ValueError("the command is empty; give the program to run")
        return value

    @field_validator("env_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is not None:
            _env_name(value)
        return value


def _header_name(value: str) -> str:
    if not _HEADER_NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not an HTTP header name; use letters, digits and '-', such as x-api-key"
        )
    return value


def _header_value(value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError("a header value cannot hold a line break or NUL; write it on one line")
    return value


HeaderName = Annotated[str, AfterValidator(_header_name)]
HeaderValue = Annotated[str, BeforeValidator(_env_value), AfterValidator(_header_value)]


class OtlpSpec(_Model):
    """The OpenTelemetry collector every process of the system exports to."""

    endpoint: str | None = None
    """The collector's OTLP/HTTP base URL (``http://collector:4318``): traces go to
    ``<endpoint>/v1/traces``. Default: the collector of the gateway's admin listener."""
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    """Headers sent with every export, such as a hosted collector's API key (the
    embedded collector's token is sent without being written here)."""

    @field_validator("endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{mask_url(value)!r} is not an http(s) URL; write the collector's OTLP/HTTP "
                "base URL, such as http://127.0.0.1:4318"
            )
        if parts.query or parts.fragment:
            raise ValueError(
                f"{mask_url(value)!r} has a query or fragment; give the base URL only "
                "(/v1/traces is added)"
            )
        return value


class SamplingSpec(_Model):
    """How many traces are kept."""

    ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    """The share of new traces (requests without a trace context) that are sampled,
    from 0 to 1; a sampled request is traced in every process it reaches. Default:
    1 with the embedded collector (a system on one machine: every request), else the
    processes' own default (0.01)."""


class ObservabilitySpec(_Model):
    """Telemetry of every process: where it goes and how much of it."""

    otlp: OtlpSpec = Field(default_factory=OtlpSpec)
    """The collector (default: the embedded one)."""
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    """Trace sampling."""


class System(_Model):
    """A whole system file: the gateway and the services run by ``meshgate up``."""

    name: Name | None = None
    """The system's name in messages; default: the name of the system file's folder."""
    root: str = "."
    """The folder processes run in, relative to the system file: ``app`` modules are
    imported from it and relative paths in commands are read from it."""
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    """The gateway and its registry."""
    services: dict[Name, ServiceSpec] = Field(default_factory=dict)
    """Services by name."""
    env: Environment = Field(default_factory=dict)
    """Environment variables of every service's processes."""
    events: EventsSpec = Field(default_factory=EventsSpec)
    """The event bus of services with ``broker: embedded``: a NATS cluster (``url``,
    ``credentials``, ``tls``) or, by default, an embedded nats-server."""
    examples: tuple[str, ...] = ()
    """Lines printed once everything is ready (commands to try), with placeholders
    such as ``{gateway}``."""
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec)
    """Where every process's traces go (OTLP), and how many are sampled."""
