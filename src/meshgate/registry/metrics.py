"""Prometheus metrics of a registry, read from it when scraped.

- ``meshgate_registry_instances{service}`` (gauge): the instances registered now; a
  service that had instances and has none left reports 0 (rather than vanishing),
  so that an alert on it fires;
- ``meshgate_registry_evictions_total`` (counter): instances this registry (with
  Redis: this node's reaper) evicted because they missed their TTL.

The registry is async and a Prometheus collector is not, so a scrape first reads
the registry (:meth:`RegistryMetrics.read`), then renders that reading::

    metrics = RegistryMetrics(registry)            # once
    ...
    scraped = CollectorRegistry(auto_describe=False)
    scraped.register(await metrics.read())         # at each scrape
    body = generate_latest(scraped)
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshgate.registry.errors import RegistryError
from meshgate.registry.store import Registry

__all__ = ["RegistryMetrics"]

log = logging.getLogger("meshgate.registry")


class _Reading(Collector):
    """The registry's numbers at one scrape."""

    def __init__(self, instances: dict[str, int] | None, evictions: int) -> None:
        self.instances = instances
        self.evictions = evictions

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(
            "meshgate_registry_instances",
            "Instances registered now, by service.",
            labels=["service"],
        )
        for service, count in sorted((self.instances or {}).items()):
            gauge.add_metric([service], count)
        evictions = CounterMetricFamily(
            "meshgate_registry_evictions",
            "Instances evicted because no heartbeat came within their TTL.",
        )
        evictions.add_metric([], self.evictions)
        return [gauge, evictions]


class RegistryMetrics:
    """The metrics of one registry; make it once, :meth:`read` it at every scrape."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._seen: set[str] = set()

    async def read(self) -> Collector:
        """The registry's numbers now. A registry that cannot be read (Redis down)
        gives no instance counts (rather than zeros it does not know), only its
        evictions."""
        instances: dict[str, int] | None
        try:
            snapshot = await self.registry.snapshot()
        except RegistryError as exc:
            log.debug("registry metrics: cannot read the registry: %s", exc)
            instances = None
        else:
            counts = Counter(instance.service for instance in snapshot.instances)
            self._seen.update(counts)
            instances = {service: counts.get(service, 0) for service in self._seen}
        return _Reading(instances, self.registry.evictions)
