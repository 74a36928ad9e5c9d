"""Prometheus metrics of the data layer, made once per registry.

Several :class:`~meshgate.data.Database` or :class:`~meshgate.data.Cache` objects
may share a registry (the global one by default): the metric objects are made
for the first one and shared, each object reporting under its own ``database`` or
``cache`` label. Pool gauges are read from the live pools when the registry is
scraped, so they cost nothing between scrapes.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "QUERY_BUCKETS",
    "CacheMetrics",
    "DatabaseMetrics",
    "PoolStats",
    "cache_metrics",
    "database_metrics",
]

QUERY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Query latency histogram bounds, in seconds."""


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A connection pool's numbers at one moment."""

    size: int
    """Connections the pool keeps (``pool_size``)."""
    checked_out: int
    """Connections in use by sessions now."""
    idle: int
    """Open connections waiting in the pool."""
    overflow: int
    """Connections open beyond ``pool_size`` (at most ``max_overflow``)."""


class _HasPool(Protocol):
    @property
    def name(self) -> str: ...

    def pool_stats(self) -> PoolStats: ...


class _PoolCollector(Collector):
    """Reads the pools of the live databases of one registry when it is scraped."""

    def __init__(self) -> None:
        self.databases: weakref.WeakSet[_HasPool] = weakref.WeakSet()

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, list[int]] = {}
        for db in list(self.databases):
            stats = db.pool_stats()
            row = totals.setdefault(db.name, [0, 0, 0, 0])
            row[0] += stats.size
            row[1] += stats.checked_out
            row[2] += stats.idle
            row[3] += stats.overflow
        families = list(self._families())
        for name, row in sorted(totals.items()):
            for family, value in zip(families, row, strict=True):
                family.add_metric([name], value)
        return families

    @staticmethod
    def _families() -> Iterator[GaugeMetricFamily]:
        labels = ["database"]
        yield GaugeMetricFamily(
            "meshgate_db_pool_size", "Connections the pool keeps (pool_size).", labels=labels
        )
        yield GaugeMetricFamily(
            "meshgate_db_pool_checked_out", "Connections in use by sessions.", labels=labels
        )
        yield GaugeMetricFamily(
            "meshgate_db_pool_idle", "Open connections waiting in the pool.", labels=labels
        )
        yield GaugeMetricFamily(
            "meshgate_db_pool_overflow",
            "Connections open beyond pool_size (at most max_overflow).",
            labels=labels,
        )


class DatabaseMetrics:
    """The database metrics of one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.query_duration = Histogram(
            "meshgate_db_query_duration_seconds",
            "Time from sending a statement to having its result, by statement kind.",
            ["database", "kind"],
            buckets=QUERY_BUCKETS,
            registry=registry,
        )
        self.slow_queries = Counter(
            "meshgate_db_slow_queries",
            "Statements slower than the database's slow_query threshold.",
            ["database", "kind"],
            registry=registry,
        )
        self.errors = Counter(
            "meshgate_db_errors",
            "Failed statements and connection attempts, by error class "
            "(unavailable, timeout, integrity, other).",
            ["database", "error"],
            registry=registry,
        )
        self.pools = _PoolCollector()
        registry.register(self.pools)


class CacheMetrics:
    """The cache metrics of one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["cache"]
        self.hits = Counter(
            "meshgate_cache_hits", "Lookups that found a value.", labels, registry=registry
        )
        self.misses = Counter(
            "meshgate_cache_misses", "Lookups that found nothing.", labels, registry=registry
        )
        self.loads = Counter(
            "meshgate_cache_loads",
            "Loader calls of get_or_load, by reason: miss (this caller won the load), "
            "lock_wait (another process held the load lock too long), degraded (the "
            "cache failed).",
            ["cache", "reason"],
            registry=registry,
        )
        self.coalesced = Counter(
            "meshgate_cache_coalesced",
            "get_or_load calls answered by another caller's load instead of their own, "
            "by scope: local (same process) or remote (another process, through Redis).",
            ["cache", "scope"],
            registry=registry,
        )
        self.errors = Counter(
            "meshgate_cache_errors",
            "Failed cache operations, by operation (get, set, delete, lock, decode).",
            ["cache", "operation"],
            registry=registry,
        )


_lock = threading.Lock()
_database: weakref.WeakKeyDictionary[CollectorRegistry, DatabaseMetrics] = (
    weakref.WeakKeyDictionary()
)
_cache: weakref.WeakKeyDictionary[CollectorRegistry, CacheMetrics] = weakref.WeakKeyDictionary()


def database_metrics(registry: CollectorRegistry | None) -> DatabaseMetrics:
    """The database metrics of ``registry`` (the global registry for None), made on first use."""
    registry = REGISTRY if registry is None else registry
    with _lock:
        metrics = _database.get(registry)
        if metrics is None:
            metrics = _database[registry] = DatabaseMetrics(registry)
        return metrics


def cache_metrics(registry: CollectorRegistry | None) -> CacheMetrics:
    """The cache metrics of ``registry`` (the global registry for None), made on first use."""
    registry = REGISTRY if registry is None else registry
    with _lock:
        metrics = _cache.get(registry)
        if metrics is None:
            metrics = _cache[registry] = CacheMetrics(registry)
        return metrics
