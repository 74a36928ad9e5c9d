"""Load balancers: each picks the endpoint for the next request.

One contract: ``pick(exchange, candidates) -> Endpoint | None``, where ``candidates``
are the endpoints that may take traffic now (available, and not already tried by
this exchange); None only when there are none. A balancer is built once per
configuration from its upstream and keeps its own state; adding one means adding a
class here and an entry in :data:`BALANCERS`.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Callable, Sequence
from random import random
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from meshgate.config.model import UpstreamSettings
    from meshgate.gateway.contract import FilterExchange
    from meshgate.gateway.upstream.pool import Endpoint

__all__ = [
    "BALANCERS",
    "Balancer",
    "ConsistentHash",
    "LeastRequest",
    "RoundRobin",
    "Sticky",
    "WeightedRoundRobin",
    "endpoint_id",
]


class Balancer(Protocol):
    """Picks an endpoint for a request."""

    def pick(self, exchange: FilterExchange, candidates: Sequence[Endpoint]) -> Endpoint | None:
        """The endpoint to use, from ``candidates``; None if there are none."""
        ...


def endpoint_id(label: str) -> str:
    """A short, stable, opaque id for an endpoint (what sticky cookies carry)."""
    return hashlib.blake2s(label.encode(), digest_size=6).hexdigest()


class LeastRequest:
    """Power of two choices: of two random candidates, the one with the lower cost,
    where cost = EWMA of its latency x (requests in flight + 1) / its weight.

    Cheap (two random draws), and it steers load away from slow or busy endpoints
    without the herding of "always the least loaded". Without passive health checks,
    recent consecutive failures count as four requests in flight each, so that a
    failing endpoint that answers fast does not draw traffic; with them, the outlier
    detector ejects it instead (steering away would keep it from ever being ejected).
    """

    __slots__ = ("_penalty",)

    def __init__(self, settings: UpstreamSettings, endpoints: Sequence[Endpoint]) -> None:
        self._penalty = 4 if settings.health.passive is None else 0

    def pick(self, exchange: FilterExchange, candidates: Sequence[Endpoint]) -> Endpoint | None:
        n = len(candidates)
        if n < 2:
            return candidates[0] if n else None
        i = int(random() * n)  # noqa: S311 - load spreading, not security
        j = int(random() * (n - 1))  # noqa: S311
        if j >= i:
            j += 1
        a = candidates[i]
        b = candidates[j]
        # The 0.1 ms floor keeps a new endpoint (no latency measured yet: tried first,
        # so that it gets measured) from escaping the weight of its load.
        penalty = self._penalty
        cost_a = (a.ewma + 0.0001) * (a.inflight + 1 + penalty * a.failures) * b.weight
        cost_b = (b.ewma + 0.0001) * (b.inflight + 1 + penalty * b.failures) * a.weight
        return a if cost_a <= cost_b else b


class RoundRobin:
    """Each candidate in turn."""

    __slots__ = ("_next",)

    def __init__(self, settings: UpstreamSettings, endpoints: Sequence[Endpoint]) -> None:
        self._next = 0

    def pick(self, exchange: FilterExchange, candidates: Sequence[Endpoint]) -> Endpoint | None:
        n = len(candidates)
        if not n:
            return None
        i = self._next % n
        self._next = i + 1
        return candidates[i]


class WeightedRoundRobin:
    """Smooth weighted round robin (as nginx): an endpoint of weight 3 gets 3 of every
    ``sum(weights)`` requests, spread out rather than in bursts."""

    __slots__ = ("_current",)

    def __init__(self, settings: UpstreamSettings, endpoints: Sequence[Endpoint]) -> None:
        self._current: dict[str, int] = {e.label: 0 for e in endpoints}

    def pick(self, exchange: FilterExchange, candidates: Sequence[Endpoint]) -> Endpoint | None:
        best: Endpoint | None = None
        total = 0
        current = self._current
        for endpoint in candidates:
            value = current[endpoint.label] + endpoint.weight
            current[endpoint.label] = value
            total += endpoint.weight
            if best is None or value > current[best.label]:
                best = endpoint
        if best is not None:
            current[best.label] -= total
        return best


_VNODES = 160  # points per unit of weight on the ring


class ConsistentHash:
    """A hash ring (160 points per endpoint and unit of weight): a key keeps its
    endpoint while that endpoint is available, and when one joins or leaves only
    about 1/n of the keys move. Requests without a key go by least request."""

    __slots__ = (
        "_client_ip",
        "_cookie",
        "_endpoints",
        "_fallback",
        "_header",
        "_owners",
        "_points",
    )

    def __init__(self, settings: UpstreamSettings, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)  # the ring's owners index into these
        hashing = settings.hash
        self._header = hashing.header.lower().encode() if hashing and hashing.header else None
        self._cookie = hashing.cookie.encode() if hashing and hashing.cookie else None
        self._client_ip = bool(hashing and hashing.client_ip)
        ring = sorted(
            (_point(f"{endpoint.label}#{v}".encode()), index)
            for index, endpoint in enumerate(endpoints)
            for v in range(_VNODES * endpoint.weight)
        )
        self._points = [p for p, _ in ring]
        self._owners = [i for _, i in ring]
        self._fallback = LeastRequest(settings, endpoints)

    def key(self, exchange: FilterExchange) -> bytes | None:
        """The bytes hashed for ``exchange``, or None when the request has none."""
        if self._client_ip:
            return exchange.client.peer_ip.encode()
        headers = exchange.headers
        if self._header is not None:
            for name, value in headers:
                if name.lower() == self._header:
                    return value
            return None
        if self._cookie is not None:
            return cookie_value(headers, self._cookie)
        return None

    def pick(self, exchange: FilterExchange, candidates: Sequence[Endpoint]) -> Endpoint | None:
        if not candidates:
            return None
        key = self.key(exchange)
        if not key:
            return self._fallback.pick(exchange, candidates)
        endpoints = self._endpoints
        allowed = set(map(id, candidates))
        points = self._points
        owners = self._owners
        start = bisect_left(points, _point(key))
        size = len(points)
        # Walk the ring from the key's point to the first allowed endpoint.
        for step in range(size):
            endpoint = endpoints[owners[(start + step) % size]]
            if id(endpoint) in allowed:
                return endpoint
        return candidates[0]  # pragma: no cover - every candidate is on the ring


def _point(data: bytes) -> int:
    """A position on the hash ring (64 bits of BLAKE2b: even, unlike CRC32)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Sticky:
    """Sticky sessions: a cookie names the endpoint that served the client, and later
    requests carrying it go there while it is available. Without a usable cookie the
    request goes by least request, and the response sets the cookie."""

    __slots__ = ("_by_id", "_cookie", "_fallback", "_refresh", "set_cookie")

    def __init__(self, settings: UpstreamSettings, endpoints: Sequence[Endpoint]) -> None:
        sticky = settings.sticky
        name = sticky.cookie if sticky else "meshgate_sticky"
        self._cookie = name.encode()
        self._by_id = {endpoint_id(e.label).encode(): e for e in endpoints}
        self._fallback = LeastRequest(settings, endpoints)
        attrs = "; Path=/; HttpOnly; SameSite=Lax"
        # A cookie with a lifetime is sent again with every response, so that an
        # active session does not lose its endpoint when the first cookie expires.
        self._refresh = bool(sticky and sticky.max_age is not None)
        if sticky and sticky.max_age is not None:
            attrs += f"; Max-Age={int(sticky.max_age)}"
        # The Set-Cookie line for each endpoint, built once.
        self.set_cookie = {
            id(e): f"Set-Cookie: {name}={endpoint_id(e.label)}{attrs}\r\n".encode()
            for e in endpoints
        }

    def pick(self, exchange: FilterExchange, candidates: Sequence[Endpoint]) -> Endpoint | None:
        value = cookie_value(exchange.headers, self._cookie)
        if value is not None:
            endpoint = self._by_id.get(value)
            if endpoint is not None and endpoint in candidates:
                if self._refresh:
                    exchange.set_cookie = self.set_cookie[id(endpoint)]
                return endpoint
        endpoint = self._fallback.pick(exchange, candidates)
        if endpoint is not None:
            exchange.set_cookie = self.set_cookie[id(endpoint)]
        return endpoint


def cookie_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the request's Cookie headers, or None."""
    for header, value in headers:
        if header.lower() != b"cookie":
            continue
        for part in value.split(b";"):
            key, sep, found = part.partition(b"=")
            if sep and key.strip() == name:
                return found.strip().strip(b'"')
    return None


BALANCERS: dict[str, Callable[[UpstreamSettings, Sequence[Endpoint]], Balancer]] = {
    "least_request": LeastRequest,
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "hash": ConsistentHash,
    "sticky": Sticky,
}
