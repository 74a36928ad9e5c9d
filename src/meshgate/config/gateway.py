"""The gateway process: its listener, workers, admin API, registry, access log, tracing,
limits on clients, and TLS termination (``gateway:``).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from meshgate.config._base import _HEADER_NAME_RE, Address, Duration, Size, _Model
from meshgate.config.secrets import SecretURL, SecretValue, mask_url
from meshgate.routing import EncodedSlashes

__all__ = [
    "AccessLogSettings",
    "AdminSettings",
    "CertificateSettings",
    "GatewaySettings",
    "LimitsSettings",
    "RegistrySettings",
    "TlsSettings",
    "TracingSettings",
]


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
