"""Routes and matching: host, path (exact, prefix, regex), methods and header conditions,
path rewriting, and what a route allows (``routes[]:``).
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import quote

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from meshgate.config._base import _HEADER_NAME_RE, _HOST_RE, _METHODS, Name, _Model
from meshgate.config.policies import (
    AuthSettings,
    CorsSettings,
    HeaderPolicySettings,
    IpFilterSettings,
    RateLimitSettings,
)
from meshgate.config.upstreams import RetrySettings, TimeoutSettings
from meshgate.routing import PathError, normalize_path

__all__ = ["HeaderMatch", "MatchSettings", "RouteSettings", "RouteTracingSettings"]


class RouteTracingSettings(_Model):
    """A route's own sampling."""

    ratio: float = Field(ge=0.0, le=1.0)
    """The share of this route's requests without a sampled parent that are traced."""


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
