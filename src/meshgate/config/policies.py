"""Route policies: authentication (JWT, API keys) and consumers, rate limits, CORS,
header rules and IP lists (``routes[].auth``, ``rate_limit``, ``cors``, ``headers``,
``ip``; ``consumers:``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from meshgate.config._base import _FRAMING_HEADERS, _HEADER_NAME_RE, Duration, _Model
from meshgate.config.secrets import SecretURL, SecretValue, mask_url

__all__ = [
    "ApiKeySettings",
    "AuthSettings",
    "ConsumerSettings",
    "CorsSettings",
    "HeaderPolicySettings",
    "HeaderRules",
    "IpFilterSettings",
    "JwtKeySettings",
    "JwtSettings",
    "RateLimitSettings",
    "RequestHeaderRules",
    "parse_rate",
]


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
