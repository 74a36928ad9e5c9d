"""Upstreams: endpoints, balancing, health (active, passive, shared), circuit breaking,
timeouts, retries and TLS to the upstream (``upstreams.<name>:``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from meshgate.config._base import _HEADER_NAME_RE, Address, Duration, Name, Size, _Model
from meshgate.config.secrets import SecretURL, mask_url

__all__ = [
    "ActiveHealthSettings",
    "CircuitBreakerSettings",
    "EndpointSettings",
    "HashSettings",
    "HealthSettings",
    "PassiveHealthSettings",
    "RetryBudgetSettings",
    "RetrySettings",
    "SharedHealthSettings",
    "StickySettings",
    "TimeoutSettings",
    "UpstreamSettings",
    "UpstreamTlsSettings",
]


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
