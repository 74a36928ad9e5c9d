"""The declarative configuration model: YAML in, frozen typed models out.

Every model forbids unknown keys and is immutable once built. Values users write
as text (addresses, durations, sizes) are parsed here, once, so that nothing
downstream parses them again. Cross-field checks that need the whole document
(dangling references, duplicates, unreachable routes) live in
:func:`meshgate.config.loader.check`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from meshgate.config.secrets import SecretURL, SecretValue, mask_url
from meshgate.routing import EncodedSlashes, PathError, normalize_path

__all__ = [
    "AccessLogSettings",
    "Address",
    "AdminSettings",
    "Config",
    "EndpointSettings",
    "GatewaySettings",
    "HeaderMatch",
    "LimitsSettings",
    "MatchSettings",
    "RouteSettings",
    "TimeoutSettings",
    "UpstreamSettings",
    "parse_duration",
    "parse_size",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_FRAMING_HEADERS = frozenset(
    ("content-length", "transfer-encoding", "connection", "upgrade", "keep-alive", "te", "trailer")
)
"""Headers that frame the message or the connection: only the gateway sets them."""
_HOST_RE = re.compile(r"^(\*\.)?([A-Za-z0-9-]+\.)*[A-Za-z0-9-]+\.?$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([KMG])(i)?)?B?\s*$", re.IGNORECASE)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, use_attribute_docstrings=True
    )


# ---------------------------------------------------------------------------- scalars


def parse_duration(value: object) -> float:
    """Seconds from ``1.5``, ``"250ms"``, ``"5s"``, ``"2m"`` or ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like '250ms', '5s', '2m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]
        seconds = float(m.group(1)) * scale
    else:
        raise ValueError(
            f"{value!r} is not a duration; write seconds as a number or text like "
            "'250ms', '5s', '2m' or '1h'"
        )
    if math.isnan(seconds):
        # NaN compares false with everything: the timeout would silently never fire.
        raise ValueError(f"{value!r} is not a duration; write a number of seconds")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``1024``, ``"64KiB"``, ``"10MB"`` (KB = 1000 bytes, KiB = 1024)."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or text like '64KiB' or '10MB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        power = " KMG".index(m.group(2).upper()) if m.group(2) else 0
        size = int(m.group(1)) * (1024 if m.group(3) else 1000) ** power
    else:
        raise ValueError(
            f"{value!r} is not a size; write bytes as a number or text like '64KiB' or '10MB'"
        )
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


class Address(_Model):
    """A host and a port, written ``"host:port"``, ``"[::1]:port"`` or ``":port"``."""

    host: str
    port: int = Field(ge=0, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip()
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(
                f"{value!r} is not an address; write 'host:port' such as '127.0.0.1:8080'"
            )
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            host = "0.0.0.0"
        return {"host": host, "port": int(port)}

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str) -> str:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOST_RE.match(host) or host.startswith("*"):
                raise ValueError(f"{host!r} is not an IP address or host name") from None
        return host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """Whether the address only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name; use letters, digits, '_', '.', '-' "
            "(up to 63, starting with a letter or digit)"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]


# ---------------------------------------------------------------------------- gateway


class AdminSettings(_Model):
    """The admin listener: metrics, status and control. Loopback and a token by default."""

    listen: Address = Field(default_factory=lambda: Address(host="127.0.0.1", port=9901))
    """Where the admin API listens. Keep it on loopback unless it is behind TLS."""
    tls: CertificateSettings | None = None
    """Serve the admin API over HTTPS (TLS 1.2 or newer) with this certificate;
    needed to listen on a non-loopback address."""
    token: SecretStr | None = None
    """The bearer token the admin API requires. When unset, the token is read from
    ``token_file``, or generated and written there (mode 0600)."""
    token_file: str | None = None
    """Where the token is kept; default ``~/.meshgate/admin-<admin port>.token``."""
    allow_insecure_remote: bool = False
    """Allow a non-loopback admin listener without TLS (the token then crosses the
    network in clear text)."""

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> AdminSettings:
        remote = not self.listen.is_loopback
        if remote and self.tls is None and not self.allow_insecure_remote:
            raise ValueError(
                f"the admin API on {self.listen} would be reachable from other machines "
                "without TLS; bind it to 127.0.0.1, give it a certificate (tls: {cert, key}), "
                "or set allow_insecure_remote: true"
            )
        if self.token is not None and len(self.token.get_secret_value()) < 16:
            raise ValueError("the admin token is too short; use at least 16 characters")
        return self


class AccessLogSettings(_Model):
    """The access log: one JSON object per request, written off the request path."""

    enabled: bool = True
    """Set false to write no access log at all."""
    path: str = "-"
    """A file to append to, or ``-`` for standard output."""


class TracingSettings(_Model):
    """Traces of requests through the gateway, exported as OTLP (HTTP/protobuf).

    Tracing is on when an endpoint is known: ``endpoint`` here, or else the standard
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` variables
    (``meshgate up`` sets them for every process of a system).
    """

    enabled: bool = True
    """Set false to record no spans even when an endpoint is known."""
    endpoint: str | None = None
    """The OTLP/HTTP base URL (``http://collector:4318``); spans go to ``/v1/traces``."""
    headers: dict[str, SecretValue] = Field(default_factory=dict)
    """Headers sent with every export (an API key of a hosted collector)."""
    ratio: float = Field(default=0.01, ge=0.0, le=1.0)
    """The share of requests without a sampled parent that are traced (per route:
    ``routes[].tracing.ratio``). A request whose ``traceparent`` says sampled is
    always traced (parent-based sampling)."""
    errors: bool = True
    """Trace every request answered with a 5xx (or cut off), whatever the ratio."""
    service_name: str = "meshgate-gateway"
    """The ``service.name`` of the gateway's spans."""
    max_queue: int = Field(default=20_000, ge=100, le=10_000_000)
    """Spans waiting for export; beyond this the oldest are dropped (and counted)."""

    @field_validator("endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{mask_url(value)!r} is not an http(s) URL; write http://host:4318")
        return value


class RouteTracingSettings(_Model):
    """A route's own sampling."""

    ratio: float = Field(ge=0.0, le=1.0)
    """The share of this route's requests without a sampled parent that are traced."""


class LimitsSettings(_Model):
    """Limits on what a client may send; requests past them are refused."""

    max_header_bytes: Size = 32 * 1024
    """Request line plus all header bytes; larger requests get 431."""
    max_headers: int = Field(default=100, ge=1, le=10_000)
    """Number of header fields; more get 431."""
    max_url_bytes: Size = 8 * 1024
    """Length of the request target; longer get 414."""
    max_body_bytes: Size | None = None
    """Largest request body accepted (413 past it); unlimited when unset."""


class RegistrySettings(_Model):
    """The service registry, served by the gateway's control plane on the admin listener."""

    enabled: bool = True
    """Serve the registry API (``/v1/registry``) and allow ``service`` upstreams."""
    persist: bool = True
    """Keep the registry in a SQLite file, so that a restart keeps its instances."""
    path: str | None = None
    """The SQLite file; default ``~/.meshgate/registry-<admin port>.sqlite``."""
    redis: SecretURL | None = None
    """Share one registry between gateway nodes through this Redis
    (``redis://host:port/db``); ``persist`` and ``path`` then do not apply."""
    key_prefix: str = "meshgate:registry"
    """Prefix of the registry's Redis keys."""
    token: SecretStr | None = None
    """The bearer token services use to register (the admin token is accepted too).
    When unset it is read from ``token_file``, or generated and written there."""
    token_file: str | None = None
    """Where the token is kept; default ``~/.meshgate/registry-<admin port>.token``."""

    @field_validator("redis")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{mask_url(value)!r} is not a Redis URL; write redis://host:port/db")
        return value

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("the registry token is too short; use at least 16 characters")
        return value


class GatewaySettings(_Model):
    """The gateway process: listener, workers, admin and client-facing behaviour."""

    listen: Address = Field(default_factory=lambda: Address(host="127.0.0.1", port=8080))
    """Where clients connect."""
    workers: int = Field(default=0, ge=0, le=1024)
    """Worker processes sharing the listener; 0 or ``auto`` means one per CPU."""
    admin: AdminSettings = Field(default_factory=AdminSettings)
    """The admin listener."""
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    """The service registry (on the admin listener)."""
    access_log: AccessLogSettings = Field(default_factory=AccessLogSettings)
    """The access log."""
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    """Request traces (OpenTelemetry, OTLP)."""
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    """Limits on client requests."""
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Peers (CIDR ranges) whose X-Forwarded-* and Forwarded headers are believed and kept.
    From any other peer those headers are replaced with what the gateway sees."""
    request_id_header: str = "X-Request-ID"
    """The request id header: passed through when the client sends a valid one,
    otherwise generated; echoed to the client in the response."""
    encoded_slashes: EncodedSlashes = "reject"
    """What ``%2F`` (and ``%5C``) in a request path does. ``reject`` (the default): 400,
    since upstreams disagree on whether it separates segments (uvicorn decodes it, so
    ``/admin%2Fsecret`` would reach ``/admin/secret`` past a policy on ``/admin``).
    ``decode``: it is a slash, for the router and the upstream alike. ``keep``: matched
    as a slash, forwarded encoded, for upstreams that treat it as data."""
    via: str | None = "meshgate"
    """The pseudonym added to the Via header in both directions; null adds none."""
    keepalive_timeout: Duration = 75.0
    """How long an idle client keep-alive connection is kept open."""
    header_timeout: Duration = 30.0
    """How long a client may take to send a complete request head (then 408)."""
    body_timeout: Duration = 60.0
    """The longest a client may go without sending body bytes while its request body
    is expected (then 408)."""
    tls: TlsSettings | None = None
    """TLS termination on ``listen``."""
    drain_timeout: Duration = 30.0
    """On SIGTERM, how long in-flight requests may take before connections are closed."""

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        if value == "auto":
            return 0
        return value

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        if isinstance(data, dict) and "decode_encoded_slashes" in data:
            old = data["decode_encoded_slashes"]
            raise ValueError(
                "decode_encoded_slashes was replaced by encoded_slashes; write"
                f" 'encoded_slashes: {'decode' if old is True else 'keep'}' (or leave it"
                " out: the default, reject, answers 400 to an encoded slash)"
            )
        return data

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("request_id_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a valid HTTP header name")
        return value

    @property
    def worker_count(self) -> int:
        """The number of worker processes to run."""
        return self.workers or os.cpu_count() or 1


# ---------------------------------------------------------------------------- upstreams


class TimeoutSettings(_Model):
    """Timeouts of one exchange with an upstream."""

    connect: Duration = 5.0
    """Opening a connection to an endpoint (also the longest wait for a free
    connection when the upstream is at its connection limit)."""
    read: Duration = 60.0
    """The longest silence from the upstream while a response is awaited or streamed."""
    total: Duration | None = None
    """The longest a whole exchange may take, from sending the request to the
    last response byte; unset for no limit (streaming responses)."""


class HashSettings(_Model):
    """What a ``hash`` balancer hashes: one header, one cookie, or the client address."""

    header: str | None = None
    """Hash this request header's value (requests without it go by least request)."""
    cookie: str | None = None
    """Hash this cookie's value (requests without it go by least request)."""
    client_ip: bool = False
    """Hash the client's address (the peer's)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> HashSettings:
        given = [k for k in ("header", "cookie") if getattr(self, k) is not None]
        if self.client_ip:
            given.append("client_ip")
        if len(given) != 1:
            raise ValueError("give exactly one of header, cookie or client_ip: true")
        if self.header is not None and not _HEADER_NAME_RE.match(self.header):
            raise ValueError(f"{self.header!r} is not a valid HTTP header name")
        return self


class StickySettings(_Model):
    """Sticky sessions: the gateway sets a cookie naming the endpoint that served."""

    cookie: str = "meshgate_sticky"
    """The cookie's name."""
    max_age: Duration | None = None
    """The cookie's lifetime (at least 1s); unset for a session cookie. A cookie with
    a lifetime is renewed with every response."""

    @field_validator("max_age")
    @classmethod
    def _at_least_a_second(cls, value: float | None) -> float | None:
        if value is not None and value < 1:
            raise ValueError("max_age must be at least 1s (Max-Age=0 deletes the cookie)")
        return value

    @field_validator("cookie")
    @classmethod
    def _cookie_name(cls, value: str) -> str:
        if not _HEADER_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a valid cookie name")
        return value


class ActiveHealthSettings(_Model):
    """Active health checks: the supervisor probes every endpoint over HTTP."""

    path: str = "/health"
    """The path probed with GET; a 2xx or 3xx answer is healthy."""
    interval: Duration = 5.0
    """Time between probes of one endpoint."""
    timeout: Duration = 2.0
    """How long a probe may take; longer counts as a failure."""
    healthy_threshold: int = Field(default=2, ge=1, le=100)
    """Consecutive successes that bring an unhealthy endpoint back."""
    unhealthy_threshold: int = Field(default=3, ge=1, le=100)
    """Consecutive failures that take a healthy endpoint out."""

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must start with '/'")
        return value

    @model_validator(mode="after")
    def _timeout_below_interval(self) -> ActiveHealthSettings:
        if self.timeout > self.interval:
            raise ValueError("timeout must not be longer than interval")
        return self


class PassiveHealthSettings(_Model):
    """Outlier detection from live traffic: failing endpoints are ejected for a while."""

    consecutive_failures: int = Field(default=5, ge=1, le=1000)
    """Consecutive 5xx answers or connection failures that eject an endpoint."""
    base_ejection: Duration = 10.0
    """The first ejection's length; each repeat doubles it."""
    max_ejection: Duration = 300.0
    """The longest an ejection lasts."""
    max_ejected_percent: int = Field(default=50, ge=0, le=100)
    """At most this share of an upstream's endpoints is ejected at once; one endpoint
    always stays, so the detector never empties an upstream."""


class SharedHealthSettings(_Model):
    """Health shared through Redis, so that every gateway node agrees."""

    redis: SecretURL
    """The Redis URL, e.g. ``redis://127.0.0.1:6379/0``."""
    key_prefix: str = "meshgate"
    """Prefix of the keys and channel the gateways share."""

    @field_validator("redis")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{mask_url(value)!r} is not a Redis URL; write redis://host:port/db")
        return value


class HealthSettings(_Model):
    """How an upstream's endpoints are judged healthy."""

    active: ActiveHealthSettings | None = None
    """Active HTTP probes; off unless given."""
    passive: PassiveHealthSettings | None = Field(default_factory=PassiveHealthSettings)
    """Outlier detection from live traffic; on by default, ``null`` turns it off."""
    shared: SharedHealthSettings | None = None
    """Share health through Redis with the other gateway nodes."""


class CircuitBreakerSettings(_Model):
    """A circuit breaker per upstream: too many failures and requests fail fast."""

    failure_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    """The share of failed requests in the window that opens the circuit."""
    window: Duration = 10.0
    """The sliding time window the ratio is measured over."""
    min_requests: int = Field(default=20, ge=1)
    """Below this many requests in the window the circuit never opens."""
    open_for: Duration = 10.0
    """How long the circuit stays open (503 with Retry-After) before trying again."""
    half_open_requests: int = Field(default=3, ge=1, le=1000)
    """Trial requests let through when half-open; all must succeed to close it."""


_RETRY_CONDITIONS = frozenset({"connect_failure", "reset", "timeout"})


class RetryBudgetSettings(_Model):
    """Caps retries so that a failing upstream is not flooded."""

    ratio: float = Field(default=0.2, ge=0.0, le=10.0)
    """Retries allowed per request sent to the upstream (0.2: at most 20 %)."""
    min_per_second: float = Field(default=5.0, ge=0.0)
    """Retries always allowed per second, however few requests there are."""


class RetrySettings(_Model):
    """When and how a failed request is tried again, on another endpoint."""

    attempts: int = Field(default=2, ge=0, le=10)
    """Retries after the first try; 0 turns retries off."""
    retry_on: tuple[str | int, ...] = ("connect_failure", "reset", 502, 503)
    """What is retried: ``connect_failure``, ``reset`` (the connection closed before any
    response), ``timeout`` (the per-try timeout) and response statuses (500-599)."""
    per_try_timeout: Duration | None = None
    """Each try's timeout for the response head; the route's total timeout still bounds
    the whole exchange."""
    backoff_base: Duration = 0.025
    """The first backoff; each retry doubles it, with full jitter."""
    backoff_max: Duration = 0.25
    """The longest backoff."""
    buffer: Size = 64 * 1024
    """Request bodies up to this size are kept to be replayed; larger ones are not retried."""
    idempotency_key: bool = False
    """Also retry non-idempotent requests (POST, PATCH) that carry an Idempotency-Key."""
    budget: RetryBudgetSettings = Field(default_factory=RetryBudgetSettings)
    """The upstream's retry budget."""

    @field_validator("retry_on")
    @classmethod
    def _conditions(cls, values: tuple[str | int, ...]) -> tuple[str | int, ...]:
        for value in values:
            if isinstance(value, int):
                if not 500 <= value <= 599:
                    raise ValueError(f"status {value} cannot be retried; use 500-599")
            elif value not in _RETRY_CONDITIONS:
                raise ValueError(
                    f"{value!r} is not a retry condition; use "
                    f"{', '.join(sorted(_RETRY_CONDITIONS))} or a 5xx status"
                )
        return values


class EndpointSettings(_Model):
    """One endpoint of an upstream: ``"host:port"`` or ``{address: ..., weight: ...}``."""

    address: Address
    """Where the endpoint listens."""
    weight: int = Field(default=1, ge=1, le=1000)
    """The endpoint's share of traffic under weighted_round_robin."""

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        return {"address": value} if isinstance(value, str) else value


class UpstreamSettings(_Model):
    """A named group of endpoints that serve the same thing: listed here, or the
    instances of a service in the registry."""

    endpoints: tuple[EndpointSettings, ...] = ()
    """The endpoints, as ``"host:port"`` or ``{address: "host:port", weight: 2}``."""
    service: Name | None = None
    """Take the endpoints from the registry: the instances registered under this
    service name, updated as they come and go (instead of ``endpoints``)."""
    balancer: Literal["least_request", "round_robin", "weighted_round_robin", "hash", "sticky"] = (
        "least_request"
    )
    """How requests are spread: ``least_request`` (power of two choices over an EWMA of
    latency times requests in flight, the default), ``round_robin``,
    ``weighted_round_robin``, ``hash`` (consistent hashing, see ``hash``) or ``sticky``
    (a cookie keeps a client on one endpoint, see ``sticky``)."""
    hash: HashSettings | None = None
    """What the ``hash`` balancer hashes."""
    sticky: StickySettings | None = None
    """The ``sticky`` balancer's cookie."""
    health: HealthSettings = Field(default_factory=HealthSettings)
    """Active checks, passive outlier detection and shared health."""
    circuit_breaker: CircuitBreakerSettings | None = None
    """A circuit breaker for the whole upstream; off unless given."""
    retries: RetrySettings = Field(default_factory=RetrySettings)
    """Retry policy; a route may override it field by field."""
    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    """Connections open to this upstream at once, per worker; requests past it wait
    up to the connect timeout for one to free up, then get 503."""
    idle_timeout: Duration = 60.0
    """How long an idle pooled connection is kept; keep it below the upstream's own."""
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    """Connect, read and total timeouts; a route may override them."""
    tls: UpstreamTlsSettings | None = None
    """Connect to the endpoints over TLS."""

    @model_validator(mode="after")
    def _endpoints_or_service(self) -> UpstreamSettings:
        if self.service is not None and self.endpoints:
            raise ValueError(
                "give endpoints or service, not both: a service's endpoints come from the registry"
            )
        if self.service is None and not self.endpoints:
            raise ValueError(
                "an upstream needs endpoints (a list of host:port) or a service "
                "(a name in the registry)"
            )
        return self

    @model_validator(mode="after")
    def _balancer_settings(self) -> UpstreamSettings:
        if self.balancer == "round_robin" and any(e.weight != 1 for e in self.endpoints):
            raise ValueError(
                "endpoint weights are set but balancer is round_robin, which ignores them; "
                "set balancer: weighted_round_robin (or least_request, which weighs them)"
            )
        if self.balancer == "hash" and self.hash is None:
            raise ValueError("balancer: hash needs a hash setting, e.g. hash: {header: X-User}")
        if self.balancer != "hash" and self.hash is not None:
            raise ValueError("hash is only used with balancer: hash")
        if self.balancer != "sticky" and self.sticky is not None:
            raise ValueError("sticky is only used with balancer: sticky")
        return self


# ---------------------------------------------------------------------------- security


class CertificateSettings(_Model):
    """A certificate and its key, PEM files; chosen by SNI for its hosts."""

    cert: str
    """The certificate chain file (PEM)."""
    key: str
    """The private key file (PEM)."""
    hosts: tuple[str, ...] = ()
    """Server names (SNI) this certificate is for; the first certificate is also the
    default for clients that send no or an unknown name."""

    @field_validator("hosts", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class TlsSettings(_Model):
    """TLS termination on the gateway's listener."""

    certificates: tuple[CertificateSettings, ...] = Field(min_length=1)
    """Certificates, chosen by SNI."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    """The oldest TLS version accepted; older clients are refused in the handshake."""

    @field_validator("min_version", mode="before")
    @classmethod
    def _version_number(cls, value: object) -> object:
        # YAML reads an unquoted 1.2 as a number.
        if isinstance(value, float | int) and not isinstance(value, bool):
            return f"{value:.1f}"
        return value

    client_ca: str | None = None
    """A CA bundle (PEM) for client certificates; routes with ``mtls: true`` then
    require a client certificate it signed."""
    redirect_http: Address | None = None
    """Also listen here for plain HTTP and redirect every request to HTTPS (308)."""


class UpstreamTlsSettings(_Model):
    """TLS to an upstream's endpoints."""

    ca: str | None = None
    """A CA bundle (PEM) to verify the endpoints with; the system's by default."""
    verify: bool = True
    """Verify the endpoints' certificates and names (turn off only for tests)."""
    server_name: str | None = None
    """The name to send (SNI) and verify; the endpoint's host by default."""
    cert: str | None = None
    """A client certificate (PEM) to present to the upstream."""
    key: str | None = None
    """The client certificate's key (PEM)."""

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTlsSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both cert and key for a client certificate, or neither")
        return self


class JwtKeySettings(_Model):
    """One verification key: inline, from a file, or (for HMAC) a shared secret."""

    kid: str | None = None
    """The key id tokens name in their header; any key is tried when unset."""
    pem: str | None = None
    """A PEM public key (RSA, EC or Ed25519)."""
    file: str | None = None
    """A file holding a PEM public key."""
    secret: SecretStr | None = None
    """An HMAC secret (HS256)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> JwtKeySettings:
        given = [k for k in ("pem", "file", "secret") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of pem, file or secret")
        return self


_JWT_ALGORITHMS = ("HS256", "RS256", "ES256", "EdDSA")


class JwtSettings(_Model):
    """JWT bearer tokens (``Authorization: Bearer <token>``)."""

    algorithms: tuple[Literal["HS256", "RS256", "ES256", "EdDSA"], ...] = Field(min_length=1)
    """The only algorithms accepted: pinned, so that ``alg: none`` and HMAC signed
    with a public key are refused."""
    keys: tuple[JwtKeySettings, ...] = ()
    """Verification keys."""
    jwks_url: SecretURL | None = None
    """A JWKS endpoint; keys are cached, refetched for an unknown ``kid`` (at most
    every ``jwks_min_refresh``) and every ``jwks_refresh``."""
    jwks_refresh: Duration = 600.0
    """How long fetched keys are trusted before they are fetched again."""
    jwks_min_refresh: Duration = 10.0
    """The shortest time between two fetches (an unknown kid cannot flood the issuer)."""
    issuer: str | None = None
    """The required ``iss`` claim."""
    audience: tuple[str, ...] = ()
    """Accepted ``aud`` values (one must match)."""
    leeway: Duration = 30.0
    """Clock skew allowed for ``exp``, ``nbf`` and ``iat``."""
    required_claims: tuple[str, ...] = ()
    """Claims every token must have (``exp`` is always required)."""
    forward_claims: dict[str, str] = Field(default_factory=dict)
    """Claims sent to the upstream as headers: ``{sub: X-User-Id}``."""
    strip_authorization: bool = False
    """Remove the Authorization header before forwarding."""

    @field_validator("audience", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("forward_claims")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for header in value.values():
            if not _HEADER_NAME_RE.match(header):
                raise ValueError(f"{header!r} is not a valid HTTP header name")
        return value

    @model_validator(mode="after")
    def _keys(self) -> JwtSettings:
        if not self.keys and self.jwks_url is None:
            raise ValueError("give keys, a jwks_url, or both")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ValueError(f"jwks_url {mask_url(self.jwks_url)!r} must be an http(s) URL")
        hmac = "HS256" in self.algorithms
        if hmac and len(self.algorithms) > 1:
            raise ValueError(
                "HS256 cannot be accepted together with public-key algorithms: a token "
                "signed with the public key as an HMAC secret would pass; use separate routes"
            )
        for key in self.keys:
            if hmac != (key.secret is not None):
                raise ValueError(
                    "HS256 needs secret keys; RS256, ES256 and EdDSA need pem or file keys"
                )
        return self


class ApiKeySettings(_Model):
    """API keys, read from a header or a query parameter, mapped to consumers."""

    header: str | None = "X-API-Key"
    """The header carrying the key."""
    query: str | None = None
    """A query parameter carrying the key (removed from the forwarded target)."""
    consumer_header: str | None = "X-Consumer"
    """The header that tells the upstream which consumer called (a client-sent one
    is always removed); null sends none."""

    @model_validator(mode="after")
    def _somewhere(self) -> ApiKeySettings:
        if self.header is None and self.query is None:
            raise ValueError("give a header, a query parameter, or both")
        return self


class AuthSettings(_Model):
    """Who may call a route."""

    jwt: JwtSettings | None = None
    """Accept JWT bearer tokens."""
    api_key: ApiKeySettings | None = None
    """Accept API keys of the configured consumers."""
    anonymous: bool = False
    """Let requests without credentials through (bad credentials are still refused)."""
    scopes: tuple[str, ...] = ()
    """Scopes every caller must have (a JWT's ``scope``/``scp``, a consumer's scopes)."""
    roles: tuple[str, ...] = ()
    """Roles of which the caller must have at least one (a JWT's ``roles``, a
    consumer's roles)."""

    @model_validator(mode="after")
    def _some_method(self) -> AuthSettings:
        if self.jwt is None and self.api_key is None:
            raise ValueError("give jwt, api_key, or both")
        return self


class ConsumerSettings(_Model):
    """A named API consumer and its keys."""

    api_keys: tuple[SecretValue, ...] = Field(min_length=1)
    """Its keys, stored hashed: ``sha256:<hex>`` (``meshgate hash-key`` prints it)."""
    scopes: tuple[str, ...] = ()
    """Scopes the consumer has."""
    roles: tuple[str, ...] = ()
    """Roles the consumer has."""

    @field_validator("api_keys")
    @classmethod
    def _hashed(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        for key in keys:
            algo, _, digest = key.partition(":")
            if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(
                    "API keys are stored hashed as 'sha256:<64 hex digits>'; "
                    "print one with: meshgate hash-key"
                )
        return keys


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")


def parse_rate(value: object) -> float:
    """Requests per second from ``"100/s"``, ``"600/m"`` or ``"1000/h"``."""
    if isinstance(value, str) and (m := _RATE_RE.match(value)):
        unit = m.group(2)[0]
        per = {"s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        rate = float(m.group(1)) / per
        if rate <= 0:
            raise ValueError("a rate must be above zero")
        return rate
    raise ValueError(f"{value!r} is not a rate; write it like '100/s', '600/m' or '1000/h'")


class RateLimitSettings(_Model):
    """GCRA rate limiting: ``rate`` sustained, ``burst`` extra at once."""

    rate: Annotated[float, BeforeValidator(parse_rate)]
    """The sustained rate: ``100/s``, ``600/m``, ``1000/h``."""
    burst: int = Field(default=0, ge=0)
    """Requests allowed above the rate at once."""
    by: str = "ip"
    """What is limited: ``route`` (everyone together), ``ip``, ``consumer`` (the
    authenticated caller; else its IP), or ``header:<Name>``."""
    redis: SecretURL | None = None
    """Count in Redis (exact across workers and gateway nodes) instead of per worker."""
    on_redis_error: Literal["open", "closed"] = "open"
    """When Redis is unreachable: let requests through (open) or refuse them (closed)."""
    key_prefix: str = "meshgate"
    """Prefix of the Redis keys."""

    @field_validator("by")
    @classmethod
    def _by(cls, value: str) -> str:
        if value in ("route", "ip", "consumer"):
            return value
        if value.startswith("header:") and _HEADER_NAME_RE.match(value[7:]):
            return value
        raise ValueError(f"by {value!r}: use route, ip, consumer or header:<Name>")

    @field_validator("redis")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{mask_url(value)!r} is not a Redis URL; write redis://host:port/db")
        return value


class CorsSettings(_Model):
    """CORS answered at the gateway: preflights never reach the upstream."""

    allow_origins: tuple[str, ...] = Field(min_length=1)
    """Allowed origins (``https://app.example.com``), or ``*``."""
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    """Methods a preflight allows."""
    allow_headers: tuple[str, ...] = ("Authorization", "Content-Type")
    """Request headers a preflight allows (``*`` for any)."""
    expose_headers: tuple[str, ...] = ()
    """Response headers the browser may read."""
    allow_credentials: bool = False
    """Allow cookies and credentials (not with ``*`` origins)."""
    max_age: Duration = 600.0
    """How long a browser may cache a preflight."""

    @field_validator(
        "allow_origins", "allow_methods", "allow_headers", "expose_headers", mode="before"
    )
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _credentials(self) -> CorsSettings:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("allow_credentials cannot be used with the '*' origin; list them")
        return self


class HeaderRules(_Model):
    """Header changes: add (or replace), remove, rename."""

    add: dict[str, str] = Field(default_factory=dict)
    """Headers to set (replacing any of the same name)."""
    remove: tuple[str, ...] = ()
    """Headers to remove."""
    rename: dict[str, str] = Field(default_factory=dict)
    """Headers to rename: ``{X-Old: X-New}``."""

    @model_validator(mode="after")
    def _names(self) -> HeaderRules:
        names = [*self.add, *self.remove, *self.rename, *self.rename.values()]
        for name in names:
            if not _HEADER_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
        for name, value in self.add.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"the value of {name!r} contains a line break; remove it")
        for name in names:
            if name.lower() in _FRAMING_HEADERS:
                raise ValueError(
                    f"{name!r} frames the message and is managed by the gateway; "
                    "header rules cannot change it"
                )
        return self


class RequestHeaderRules(HeaderRules):
    """Header changes to the request sent upstream; the values it adds may be
    credentials (an upstream's API key), so they are masked wherever shown."""

    add: dict[str, SecretValue] = Field(default_factory=dict)
    """Headers to set (replacing any of the same name); shown masked."""


class HeaderPolicySettings(_Model):
    """Header changes on the way in (request) and out (response)."""

    request: RequestHeaderRules = Field(default_factory=RequestHeaderRules)
    """Changes to the request sent upstream."""
    response: HeaderRules = Field(default_factory=HeaderRules)
    """Changes to the response sent to the client."""

    @model_validator(mode="after")
    def _host(self) -> HeaderPolicySettings:
        rules = self.request
        touched = (*rules.add, *rules.remove, *rules.rename, *rules.rename.values())
        if any(n.lower() == "host" for n in touched):
            raise ValueError(
                "request rules cannot change Host; use the route's host_rewrite "
                "or preserve_host instead"
            )
        return self


class IpFilterSettings(_Model):
    """Client address allow and deny lists (CIDR)."""

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Only these may call (when given)."""
    deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """These may not call (checked first)."""
    forwarded: bool = False
    """Check the client address from X-Forwarded-For when the peer is a trusted
    proxy (gateway.trusted_proxies), rather than the peer's address."""


# ---------------------------------------------------------------------------- routes


class HeaderMatch(_Model):
    """A condition on one request header: an exact value, a regex, or presence."""

    exact: str | None = None
    """The header's value must equal this."""
    regex: str | None = None
    """The header's value must match this regular expression (anchored at both ends)."""
    present: bool | None = None
    """The header must be present (true) or absent (false)."""

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        return {"exact": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> HeaderMatch:
        given = [k for k in ("exact", "regex", "present") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of exact, regex or present")
        if self.regex is not None:
            _compile(self.regex, "latin-1")
        if self.exact is not None:
            try:
                self.exact.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError(
                    f"{self.exact!r} cannot appear in an HTTP header; use latin-1 characters"
                ) from None
        return self


def _compile(pattern: str, encoding: str) -> re.Pattern[bytes]:
    # The router matches bytes, so compile the pattern as it will: some str
    # patterns (\u escapes, the (?u) flag) are invalid as bytes.
    try:
        return re.compile(pattern.encode(encoding))
    except UnicodeEncodeError:
        raise ValueError(
            f"{pattern!r} has characters that cannot be written in {encoding}; "
            "use only ASCII (or escapes such as \\xe9)"
        ) from None
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None


class MatchSettings(_Model):
    """What a request must look like for a route to take it.

    At most one of ``path``, ``path_prefix`` and ``path_regex``; with none, every
    path matches (as ``path_prefix: /``).
    """

    host: tuple[str, ...] = ()
    """Host names (exact, or ``*.example.com`` for any subdomain); any host when empty."""
    path: str | None = None
    """The exact path."""
    path_prefix: str | None = None
    """A path prefix, matched on whole segments: ``/api`` matches ``/api`` and
    ``/api/x`` but not ``/apix``."""
    path_regex: str | None = None
    """A regular expression the whole path must match; named groups can be used in
    the route's ``rewrite``."""
    methods: tuple[str, ...] = ()
    """HTTP methods; when empty, any method but TRACE (which a route must list to
    allow). CONNECT is never routed."""
    headers: dict[str, HeaderMatch] = Field(default_factory=dict)
    """Header conditions, all of which must hold: ``{X-Version: "2"}``,
    ``{X-Canary: {regex: "yes|true"}}``, ``{X-Debug: {present: true}}``."""

    @field_validator("host", "methods", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("host")
    @classmethod
    def _hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for host in hosts:
            if not _HOST_RE.match(host):
                raise ValueError(
                    f"{host!r} is not a host name; write 'api.example.com' or '*.example.com'"
                )
            out.append(host.lower().rstrip("."))
        return tuple(out)

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for method in methods:
            upper = method.upper()
            if upper == "CONNECT":
                raise ValueError(
                    "CONNECT is never routed: the gateway is a reverse proxy, not a tunnel"
                    " to any host; remove it"
                )
            if upper not in _METHODS:
                raise ValueError(
                    f"{method!r} is not an HTTP method; use one of {', '.join(sorted(_METHODS))}"
                )
            out.append(upper)
        return tuple(dict.fromkeys(out))

    @field_validator("path", "path_prefix")
    @classmethod
    def _paths(cls, path: str | None) -> str | None:
        if path is None:
            return path
        if not path.startswith("/"):
            raise ValueError(f"{path!r} must start with '/'")
        if not path.isascii():
            encoded = quote(path, safe="/%:@!$&'()*+,;=-._~")
            raise ValueError(
                f"{path!r} has characters that need percent-encoding; write {encoded!r}"
            )
        # Requests are matched in normalized form; a route that is not could
        # never match. (A trailing slash is kept: it is part of the path.)
        normalized = _normalize(path)
        if normalized != path:
            raise ValueError(f"{path!r} is not in normalized form; write {normalized!r}")
        return path

    @field_validator("path_regex")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            _compile(pattern, "utf-8")
        return pattern

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, HeaderMatch]) -> dict[str, HeaderMatch]:
        for name in headers:
            if not _HEADER_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
        return headers

    @model_validator(mode="after")
    def _one_path_kind(self) -> MatchSettings:
        given = [k for k in ("path", "path_prefix", "path_regex") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of path, path_prefix, path_regex (got {given})")
        return self

    @property
    def path_kind(self) -> Literal["exact", "prefix", "regex"]:
        """Which kind of path condition the route has."""
        if self.path is not None:
            return "exact"
        if self.path_regex is not None:
            return "regex"
        return "prefix"

    @property
    def prefix(self) -> str:
        """The prefix of a prefix match, normalized without a trailing slash (``/`` stays)."""
        prefix = self.path_prefix or "/"
        return prefix.rstrip("/") or "/"


def _normalize(path: str) -> str:
    if ";" in path:
        raise ValueError(
            f"{path!r} has a ';': path parameters are ignored when matching, so this"
            " route could never match; leave them out"
        )
    try:
        forwarded, _ = normalize_path(path.encode("ascii"))
    except PathError as exc:
        raise ValueError(f"{path!r}: {exc}") from None
    return forwarded.decode("ascii")


_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RouteSettings(_Model):
    """A route: which requests (``match``) go to which upstream, and how."""

    name: Name
    """A unique name, used in metrics, logs and error bodies."""
    match: MatchSettings = Field(default_factory=MatchSettings)
    """What a request must look like for this route to take it."""
    upstream: Name
    """The name of the upstream that serves this route."""
    service: Name | None = None
    """Instead of ``upstream``: the service in the registry that serves this route.
    It uses the upstream of that name, which need not be configured (it then has
    default settings and ``service`` endpoints)."""
    strip_prefix: bool = False
    """Remove the matched ``path_prefix`` before forwarding (``/api/users/1`` -> ``/1``)."""
    rewrite: str | None = None
    """The path to forward instead, a template: ``{name}`` is a named group of
    ``path_regex``; ``{rest}`` is what follows a ``path_prefix``. The query is kept."""
    host_rewrite: str | None = None
    """Send this Host header to the upstream instead of the client's."""
    preserve_host: bool = True
    """Send the client's Host header (true) or the endpoint's address (false)."""
    priority: int = 0
    """Routes with a higher priority are tried first; see the routing docs for the
    order among routes of equal priority."""
    timeouts: TimeoutSettings | None = None
    """Overrides the upstream's timeouts for this route, field by field."""
    retries: RetrySettings | None = None
    """Overrides the upstream's retry policy for this route, field by field (the retry
    budget stays the upstream's)."""
    ip: IpFilterSettings | None = None
    """Client address allow and deny lists."""
    cors: CorsSettings | None = None
    """CORS answered at the gateway."""
    mtls: bool = False
    """Require a client certificate signed by gateway.tls.client_ca."""
    auth: AuthSettings | None = None
    """Authentication and authorization; anyone may call when unset."""
    rate_limit: RateLimitSettings | None = None
    """Rate limiting."""
    headers: HeaderPolicySettings | None = None
    """Request and response header changes."""
    tracing: RouteTracingSettings | None = None
    """Overrides ``gateway.tracing.ratio`` for this route."""
    upgrades: tuple[str, ...] = ("websocket",)
    """The protocols a client may switch to on this route (``Upgrade``), tunnelled once
    the upstream answers 101. An upgrade to any other protocol is forwarded as a plain
    request, without its ``Upgrade``; ``h2c`` never is tunnelled. ``[]``: none."""

    @field_validator("upgrades", mode="before")
    @classmethod
    def _upgrade_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("upgrades")
    @classmethod
    def _upgrade_tokens(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for token in value:
            low = token.strip().lower()
            if low.split("/", 1)[0] == "h2c":
                raise ValueError(
                    "h2c is never tunnelled: inside the tunnel a client would speak HTTP/2"
                    " to the upstream past every route and policy; remove it"
                )
            if not low or not _HEADER_NAME_RE.match(low.replace("/", "")):
                raise ValueError(f"{token!r} is not a protocol name such as websocket")
            out.append(low)
        return tuple(out)

    @model_validator(mode="before")
    @classmethod
    def _service_is_an_upstream(cls, value: object) -> object:
        if isinstance(value, dict) and value.get("service") is not None:
            if value.get("upstream") is not None:
                raise ValueError(
                    "give upstream or service, not both (a service route uses the "
                    "upstream of the same name)"
                )
            return {**value, "upstream": value["service"]}
        return value

    @field_validator("host_rewrite")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
        if not _HOST_RE.match(host) or host.startswith("*") or (port and not port.isdigit()):
            raise ValueError(
                f"{value!r} is not a host name (optionally with ':port'); "
                "write it as it should appear in the Host header, e.g. 'users.internal'"
            )
        return value

    @field_validator("retries")
    @classmethod
    def _no_route_budget(cls, value: RetrySettings | None) -> RetrySettings | None:
        if value is not None and "budget" in value.model_fields_set:
            raise ValueError(
                "the retry budget belongs to the upstream (all its routes share it); "
                "set it under upstreams.<name>.retries.budget"
            )
        return value

    @model_validator(mode="after")
    def _rewrites(self) -> RouteSettings:
        kind = self.match.path_kind
        if self.strip_prefix and kind != "prefix":
            raise ValueError("strip_prefix needs match.path_prefix; use rewrite for other matches")
        if self.strip_prefix and self.rewrite is not None:
            raise ValueError("give strip_prefix or rewrite, not both ({rest} strips in rewrite)")
        if self.rewrite is not None:
            if not self.rewrite.startswith("/"):
                raise ValueError(f"rewrite {self.rewrite!r} must start with '/'")
            names = set(_PLACEHOLDER_RE.findall(self.rewrite))
            if kind == "regex":
                known = set(re.compile(self.match.path_regex or "").groupindex)
            elif kind == "prefix":
                known = {"rest"}
            else:
                known = set()
            unknown = sorted(names - known)
            if unknown:
                hint = (
                    f"known placeholders: {', '.join(sorted(known))}"
                    if known
                    else "an exact path match has no placeholders"
                )
                raise ValueError(f"rewrite uses unknown placeholder {{{unknown[0]}}}; {hint}")
        return self


# ---------------------------------------------------------------------------- document


class Config(_Model):
    """A whole gateway configuration file.

    Routes that name a ``service`` get the upstream of that name, added with
    default settings when the file has none (what ``GET /config`` shows).
    """

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    """The gateway process."""
    upstreams: dict[Name, UpstreamSettings] = Field(default_factory=dict)
    """Upstreams by name."""
    consumers: dict[Name, ConsumerSettings] = Field(default_factory=dict)
    """API consumers by name, with their hashed keys."""
    routes: tuple[RouteSettings, ...] = ()
    """Routes; see the routing docs for the order in which they are tried."""

    @model_validator(mode="after")
    def _service_upstreams(self) -> Config:
        missing = {
            r.service: UpstreamSettings(service=r.service)
            for r in self.routes
            if r.service is not None and r.service not in self.upstreams
        }
        if missing:
            # Frozen, but still being built: the implicit upstreams join the others.
            object.__setattr__(self, "upstreams", {**self.upstreams, **missing})
        return self

    @classmethod
    def from_dict(cls, data: Any) -> Config:
        """Validate a parsed document; see :func:`meshgate.config.load` for errors."""
        return cls.model_validate(data)
