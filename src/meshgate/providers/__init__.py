"""Providers: where the endpoints of service upstreams come from.

The data plane never knows which: a provider yields, each time something changes, the
whole set of instances of every service it knows (``{service: ((host, port, weight),
...)}``), and the gateway's supervisor hands each service upstream its set. The embedded
registry is one (:class:`~meshgate.providers.registry.RegistryProvider`); Kubernetes
EndpointSlices or DNS fit the same :class:`Provider` contract.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

__all__ = ["EndpointSpec", "Provider", "ServiceEndpoints"]

EndpointSpec = tuple[str, int, int]
"""An endpoint as providers state it: host, port, weight (1 to 1000)."""

ServiceEndpoints = Mapping[str, tuple[EndpointSpec, ...]]
"""Every service a provider knows, with its endpoints (sorted)."""


class Provider(Protocol):
    """A source of service endpoints."""

    name: str
    """Its name, in logs and status (``registry``, ``kubernetes``...)."""

    def watch(self) -> AsyncIterator[ServiceEndpoints]:
        """The services' endpoints now, then again after every change; runs until
        cancelled. A provider that loses its source keeps quiet (the last set stays)
        and retries; it never yields an empty set because of an outage."""
        ...
