"""The compiled runtime snapshot: a :class:`~meshgate.config.Config` turned into the
immutable tables and pre-encoded bytes the hot path reads.

A worker holds one :class:`Runtime` at a time and swaps it whole; each request
keeps the runtime it started with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TypeVar

from meshgate.config.model import (
    Config,
    RetrySettings,
    RouteSettings,
    TimeoutSettings,
    UpstreamSettings,
)
from meshgate.gateway import http
from meshgate.gateway.addresses import parse_ip
from meshgate.gateway.filters import Chain, build_chain
from meshgate.gateway.metrics import RouteStats, WorkerMetrics
from meshgate.gateway.router import RouteMatch, Router
from meshgate.gateway.tracing import Tracer
from meshgate.gateway.upstream.pool import Endpoint, Notify, Upstream, endpoint_label

__all__ = ["CompiledRoute", "Runtime"]


_Settings = TypeVar("_Settings", TimeoutSettings, RetrySettings)


def _merge(base: _Settings, override: _Settings | None) -> _Settings:
    """The upstream's settings with the fields a route sets replacing them, one by one."""
    if override is None:
        return base
    return base.model_copy(update={k: getattr(override, k) for k in override.model_fields_set})


class RetryPolicy:
    """A route's retry settings, compiled for the hot path."""

    __slots__ = (
        "attempts",
        "backoff_base",
        "backoff_max",
        "buffer",
        "idempotency_key",
        "on_connect",
        "on_reset",
        "on_timeout",
        "per_try",
        "statuses",
    )

    def __init__(self, settings: RetrySettings) -> None:
        self.attempts = settings.attempts
        conditions = set(settings.retry_on)
        self.on_connect = "connect_failure" in conditions
        self.on_reset = "reset" in conditions
        self.on_timeout = "timeout" in conditions
        self.statuses = frozenset(c for c in conditions if isinstance(c, int))
        self.per_try = settings.per_try_timeout
        self.backoff_base = settings.backoff_base
        self.backoff_max = settings.backoff_max
        self.buffer = settings.buffer
        self.idempotency_key = settings.idempotency_key


EndpointSpec = tuple[str, int, int]
"""(host, port, weight) of an endpoint."""


def _upstream(
    name: str,
    settings: UpstreamSettings,
    notify: Notify | None,
    previous: Runtime | None,
    dynamic: Mapping[str, Sequence[EndpointSpec]],
) -> Upstream:
    """An upstream for a new configuration, keeping what a reload should keep.

    An upstream whose settings did not change is the same object: its pools, health
    and balancer state carry on. A changed one keeps the endpoints it still has, with
    their pooled connections, load and health; new endpoints start fresh. A service
    upstream's endpoints are the service's current instances (``dynamic``).
    """
    old = previous.upstreams.get(name) if previous is not None else None
    if old is not None and old.settings == settings:
        old.notify = notify
        return old
    # Connections made under other TLS settings (plain, or verified otherwise)
    # must not serve the new ones: with a TLS change every endpoint starts afresh.
    same_tls = old is not None and old.settings.tls == settings.tls
    kept = {e.label: e for e in old.endpoints} if old is not None and same_tls else {}
    if settings.service is not None:
        specs = list(dynamic.get(name, ()))
    else:
        specs = [(e.address.host, e.address.port, e.weight) for e in settings.endpoints]
    endpoints = []
    for host, port, weight in specs:
        endpoint = kept.get(endpoint_label(host, port))
        if endpoint is None:
            endpoint = Endpoint(host, port, weight)
        else:
            endpoint.weight = weight
        endpoints.append(endpoint)
    return Upstream(name, settings, endpoints, notify=notify)


class CompiledRoute:
    """What the data plane needs of a matched route."""

    __slots__ = (
        "chain",
        "connect_timeout",
        "host_line",
        "name",
        "preserve_host",
        "read_timeout",
        "retry",
        "rewrites",
        "settings",
        "stats",
        "total_timeout",
        "trace_ratio",
        "upgrades",
        "upstream",
    )

    def __init__(  # noqa: PLR0917 - built in one place, by Runtime
        self,
        settings: RouteSettings,
        upstream: Upstream,
        timeouts: TimeoutSettings,
        stats: RouteStats,
        retries: RetrySettings,
        chain: Chain | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.upstream = upstream
        self.stats = stats
        self.preserve_host = settings.preserve_host
        self.host_line = (
            b"Host: " + settings.host_rewrite.encode("idna") + b"\r\n"
            if settings.host_rewrite
            else None
        )
        self.rewrites = settings.strip_prefix or settings.rewrite is not None
        self.upgrades = frozenset(p.encode() for p in settings.upgrades)
        self.trace_ratio = 0.0  # set by Runtime: the route's, or gateway.tracing's
        self.connect_timeout = timeouts.connect
        self.read_timeout = timeouts.read
        self.total_timeout = timeouts.total
        self.retry = RetryPolicy(retries) if retries.attempts else None
        self.chain = chain


_SHARED_ENTRIES = 16_384
"""Entries of each per-client cache (addresses, forwarding lines) before it restarts."""


class Runtime:
    """One compiled configuration, ready for the hot path."""

    def __init__(
        self,
        config: Config,
        metrics: WorkerMetrics,
        scheme: str = "http",
        *,
        notify: Notify | None = None,
        previous: Runtime | None = None,
        dynamic: Mapping[str, Sequence[EndpointSpec]] | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        gw = config.gateway
        self.config = config
        # The worker's tracer (None: tracing is off, and trace context passes through).
        self.tracer = tracer
        self.scheme = scheme.encode()
        self.upstreams: dict[str, Upstream] = {
            name: _upstream(name, settings, notify, previous, dynamic or {})
            for name, settings in config.upstreams.items()
        }
        matches = []
        for index, route in enumerate(config.routes):
            upstream = self.upstreams[route.upstream]
            timeouts = _merge(upstream.settings.timeouts, route.timeouts)
            retries = _merge(upstream.settings.retries, route.retries)
            compiled = CompiledRoute(
                route,
                upstream,
                timeouts,
                metrics.route(route.name, route.upstream),
                retries,
                build_chain(route, config, index),
            )
            compiled.trace_ratio = (
                route.tracing.ratio if route.tracing is not None else gw.tracing.ratio
            )
            matches.append(RouteMatch(route, index, compiled))
        self.router = Router(matches)
        self.unrouted = metrics.route("", "")

        rid = gw.request_id_header
        self.rid_name = rid.encode()
        self.rid_lower = rid.lower().encode()
        self.resp_names = http.response_names(rid)
        self.rid_prefix = self.rid_name + b": "
        self.req_kinds = _request_header_kinds(config)
        if tracer is not None:
            # The gateway states the trace context it continues; the client's lines
            # are read, not forwarded.
            self.req_kinds[b"traceparent"] = http.TRACEPARENT
            self.req_kinds[b"tracestate"] = http.TRACESTATE
        via = gw.via
        self.via_req_10 = b"Via: 1.0 " + via.encode() + b"\r\n" if via else b""
        self.via_req_11 = b"Via: 1.1 " + via.encode() + b"\r\n" if via else b""
        self.via_resp = self.via_req_11

        limits = gw.limits
        self.max_headers = limits.max_headers
        self.max_url = limits.max_url_bytes
        self.max_head = limits.max_header_bytes
        self.max_body = limits.max_body_bytes
        self.encoded_slashes = gw.encoded_slashes
        self.header_timeout = gw.header_timeout
        self.body_timeout = gw.body_timeout
        self.keepalive_timeout = gw.keepalive_timeout
        self._trusted = gw.trusted_proxies
        self.is_trusted = lru_cache(maxsize=4096)(self._is_trusted)
        self._ips: dict[str, str] = {}
        self._fwd: dict[str, tuple[bytes, bytes, bytes]] = {}
        self._hosts: dict[tuple[str, bytes], tuple[bytes, bytes, bytes]] = {}

    def _is_trusted(self, ip: str) -> bool:
        if not self._trusted:
            return False
        addr = parse_ip(ip)
        if addr is None:
            return False
        return any(addr in net for net in self._trusted)

    def intern_ip(self, ip: str) -> str:
        """One string object per client address (connections hold it for their life)."""
        got = self._ips.get(ip)
        if got is None:
            if len(self._ips) > _SHARED_ENTRIES:
                self._ips.clear()
            got = self._ips[ip] = ip
        return got

    def forwarded_lines(self, ip: str) -> tuple[bytes, bytes, bytes]:
        """Per-client pieces of X-Forwarded-* and Forwarded for an untrusted peer (one
        tuple per client address, shared by its connections).

        Returns the text before the host in X-Forwarded-Host, the text between it
        and the host in Forwarded, and the whole block for a request without Host.
        """
        got = self._fwd.get(ip)
        if got is None:
            if len(self._fwd) > _SHARED_ENTRIES:
                self._fwd.clear()
            got = self._fwd[ip] = self._forwarded_lines(ip)
        return got

    def host_lines(
        self, ip: str, fwd: tuple[bytes, bytes, bytes], host: bytes
    ) -> tuple[bytes, bytes, bytes]:
        """(host, its forwarding lines, its Host line) for a client at ``ip``: built once
        per address and Host, and shared by the connections that send them."""
        key = (ip, host)
        got = self._hosts.get(key)
        if got is None:
            if len(self._hosts) > _SHARED_ENTRIES:
                self._hosts.clear()
            xf_start, fwd_start, _ = fwd
            got = self._hosts[key] = (
                host,
                xf_start + host + fwd_start + host + b'"\r\n',
                b"Host: " + host + b"\r\n",
            )
        return got

    def _forwarded_lines(self, ip: str) -> tuple[bytes, bytes, bytes]:
        addr = ip.encode()
        node = b'"[' + addr + b']"' if b":" in addr else addr
        scheme = self.scheme
        xff = b"X-Forwarded-For: " + addr + b"\r\nX-Forwarded-Proto: " + scheme + b"\r\n"
        return (
            xff + b"X-Forwarded-Host: ",
            b"\r\nForwarded: for=" + node + b";proto=" + scheme + b';host="',
            xff + b"Forwarded: for=" + node + b";proto=" + scheme + b"\r\n",
        )

    def forwarded_trusted(  # noqa: PLR0917 - hot-ish path; keywords cost a dict
        self, ip: str, xff: bytes, xfp: bytes, xfh: bytes, forwarded: bytes, host: bytes
    ) -> bytes:
        """X-Forwarded-* and Forwarded extended with this hop, for a trusted peer."""
        addr = ip.encode()
        node = b'"[' + addr + b']"' if b":" in addr else addr
        out = [b"X-Forwarded-For: ", xff + b", " + addr if xff else addr, b"\r\n"]
        out += [b"X-Forwarded-Proto: ", xfp or self.scheme, b"\r\n"]
        if xfh or host:
            out += [b"X-Forwarded-Host: ", xfh or host, b"\r\n"]
        element = b"for=" + node + b";proto=" + self.scheme
        if host:
            element += b';host="' + host + b'"'
        out += [b"Forwarded: ", forwarded + b", " + element if forwarded else element, b"\r\n"]
        return b"".join(out)

    def endpoints(self) -> frozenset[Endpoint]:
        """Every endpoint of this runtime."""
        return frozenset(e for u in self.upstreams.values() for e in u.endpoints)

    def close(self, keep: frozenset[Endpoint] = frozenset()) -> None:
        """Close this runtime's idle upstream connections, but those of ``keep``
        (endpoints that a newer runtime carries on)."""
        for upstream in self.upstreams.values():
            upstream.close(keep)


def _request_header_kinds(config: Config) -> dict[bytes, int]:
    """The request headers the data plane acts on, by lowercase name.

    Beyond :data:`~meshgate.gateway.http.REQ_HEADER_KINDS` and the request id header:
    the identity headers any route's auth sets (``X-User-Id``, ``X-Consumer``) are
    never taken from a client, on any route; and every one of these names spelled with
    ``_`` for ``-`` is dropped, since CGI-style upstreams read the two as one header.
    """
    kinds = dict(http.REQ_HEADER_KINDS)
    kinds[config.gateway.request_id_header.lower().encode()] = http.REQUEST_ID
    for route in config.routes:
        auth = route.auth
        if auth is None:
            continue
        owned = list(auth.jwt.forward_claims.values()) if auth.jwt is not None else []
        if auth.api_key is not None and auth.api_key.consumer_header:
            owned.append(auth.api_key.consumer_header)
        for header in owned:
            kinds[header.lower().encode()] = http.DROP
    for name in list(kinds):
        for variant in http.underscore_variants(name):
            kinds.setdefault(variant, http.DROP)
    return kinds


def compile_config(config: Config) -> None:
    """Build everything a worker builds from ``config`` and throw it away: key and
    certificate files are read, so that what would fail in a worker fails here, as a
    :class:`~meshgate.errors.ConfigError`."""
    from meshgate.gateway.tls import TlsTerminator, admin_context  # noqa: PLC0415

    Runtime(config, WorkerMetrics()).close()
    if config.gateway.tls is not None:
        TlsTerminator(config.gateway.tls)
    if config.gateway.admin.tls is not None:
        admin_context(config.gateway.admin.tls)
