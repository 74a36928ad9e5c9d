"""Load balancers: each picks the endpoint for the next request.

One contract: ``pick(exchange) -> Endpoint | None`` (None when no endpoint can
take traffic). A balancer is built once per configuration from the upstream's
endpoints and keeps its own cursor state; adding a balancer means adding one
class here and one entry in :data:`BALANCERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from meshgate.gateway.upstream.pool import Endpoint

__all__ = ["BALANCERS", "Balancer", "RoundRobin", "WeightedRoundRobin"]


class Balancer(Protocol):
    """Picks an endpoint for a request."""

    def pick(self, exchange: object) -> Endpoint | None:
        """The endpoint to use, or None if none is available."""
        ...


class RoundRobin:
    """Each available endpoint in turn."""

    __slots__ = ("_endpoints", "_next")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        self._next = 0

    def pick(self, exchange: object) -> Endpoint | None:
        endpoints = self._endpoints
        count = len(endpoints)
        for _ in range(count):
            i = self._next
            self._next = i + 1 if i + 1 < count else 0
            endpoint = endpoints[i]
            if endpoint.available:
                return endpoint
        return None


class WeightedRoundRobin:
    """Smooth weighted round robin (as nginx): an endpoint of weight 3 gets 3 of every
    ``sum(weights)`` requests, spread out rather than in bursts."""

    __slots__ = ("_current", "_endpoints", "_weights")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        self._weights = tuple(e.weight for e in endpoints)
        self._current = [0] * len(endpoints)

    def pick(self, exchange: object) -> Endpoint | None:
        best = -1
        total = 0
        current = self._current
        for i, endpoint in enumerate(self._endpoints):
            if not endpoint.available:
                continue
            weight = self._weights[i]
            current[i] += weight
            total += weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return self._endpoints[best]


BALANCERS: dict[str, Callable[[Sequence[Endpoint]], Balancer]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
}
