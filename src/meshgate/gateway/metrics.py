"""Gateway metrics: cheap counters in each worker, merged and rendered by the supervisor.

The hot path only increments plain integers in :class:`RouteStats` (no locks, no
label lookups); the admin listener asks every worker for a :meth:`snapshot`
when scraped and merges them, so that the numbers are exact across workers.
Counters live per worker for its whole life: a reload keeps them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["BUCKETS", "GatewayCollector", "RouteStats", "WorkerMetrics", "merge_snapshots"]

BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Latency histogram bounds, in seconds."""

_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_COUNTERS = ("aborted", "retries", "budget_exhausted", "rate_limited", "rate_limit_redis_errors")
"""The plain counters of a route entry, summed when snapshots merge."""


class RouteStats:
    """Requests and latencies of one route and upstream, in one worker."""

    __slots__ = (
        "aborted",
        "budget_exhausted",
        "by_class",
        "duration_buckets",
        "duration_sum",
        "gateway_buckets",
        "gateway_sum",
        "rate_limit_redis_errors",
        "rate_limited",
        "retries",
        "upstream_buckets",
        "upstream_sum",
    )

    def __init__(self) -> None:
        self.by_class = [0, 0, 0, 0, 0, 0]
        self.duration_buckets = [0] * (len(BUCKETS) + 1)
        self.duration_sum = 0.0
        self.gateway_buckets = [0] * (len(BUCKETS) + 1)
        self.gateway_sum = 0.0
        self.upstream_buckets = [0] * (len(BUCKETS) + 1)
        self.upstream_sum = 0.0
        self.aborted = 0
        self.retries = 0
        self.budget_exhausted = 0
        self.rate_limited = 0
        """Requests refused with 429 by the route's rate limit."""
        self.rate_limit_redis_errors = 0
        """Times the route's rate limit could not ask Redis (on_redis_error decided)."""

    def observe(self, status: int, total: float, upstream: float) -> None:
        """Count one finished exchange: its status and where its time went."""
        self.by_class[status // 100 if 100 <= status < 600 else 5] += 1
        self.duration_buckets[bisect_left(BUCKETS, total)] += 1
        self.duration_sum += total
        gateway = total - upstream
        if gateway < 0.0:
            gateway = 0.0
        self.gateway_buckets[bisect_left(BUCKETS, gateway)] += 1
        self.gateway_sum += gateway
        if upstream:
            self.upstream_buckets[bisect_left(BUCKETS, upstream)] += 1
            self.upstream_sum += upstream

    def snapshot(self) -> dict[str, Any]:
        return {
            "by_class": list(self.by_class),
            "duration_buckets": list(self.duration_buckets),
            "duration_sum": self.duration_sum,
            "gateway_buckets": list(self.gateway_buckets),
            "gateway_sum": self.gateway_sum,
            "upstream_buckets": list(self.upstream_buckets),
            "upstream_sum": self.upstream_sum,
            "aborted": self.aborted,
            "retries": self.retries,
            "budget_exhausted": self.budget_exhausted,
            "rate_limited": self.rate_limited,
            "rate_limit_redis_errors": self.rate_limit_redis_errors,
        }


class WorkerMetrics:
    """All of one worker's metrics; route stats survive config reloads."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], RouteStats] = {}

    def route(self, route: str, upstream: str) -> RouteStats:
        """The stats object for ``route`` served by ``upstream`` (created on first use)."""
        key = (route, upstream)
        stats = self._routes.get(key)
        if stats is None:
            stats = self._routes[key] = RouteStats()
        return stats

    def snapshot(self, gauges: Mapping[str, Any]) -> dict[str, Any]:
        """Plain data that crosses the process boundary to the supervisor."""
        return {
            "routes": [
                {"route": r, "upstream": u, **s.snapshot()} for (r, u), s in self._routes.items()
            ],
            **gauges,
        }


def _add(into: list[Any], values: Iterable[Any]) -> None:
    for i, v in enumerate(values):
        into[i] += v


def merge_snapshots(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One snapshot summing every worker's."""
    routes: dict[tuple[str, str], dict[str, Any]] = {}
    connections = 0
    upstreams: dict[tuple[str, str], dict[str, int]] = {}
    spans = {"exported": 0, "dropped": 0, "failures": 0}
    circuits: dict[str, int] = {}  # upstream: 1 if a worker's breaker is open
    for snap in snapshots:
        connections += snap.get("connections", 0)
        for key, value in (snap.get("tracing") or {}).items():
            spans[key] = spans.get(key, 0) + value
        for entry in snap.get("routes", ()):
            key = (entry["route"], entry["upstream"])
            merged = routes.get(key)
            if merged is None:
                routes[key] = {k: (list(v) if isinstance(v, list) else v) for k, v in entry.items()}
                continue
            for field in ("by_class", "duration_buckets", "gateway_buckets", "upstream_buckets"):
                _add(merged[field], entry[field])
            merged["duration_sum"] += entry["duration_sum"]
            merged["gateway_sum"] += entry["gateway_sum"]
            merged["upstream_sum"] += entry["upstream_sum"]
            for counter in _COUNTERS:
                merged[counter] += entry[counter]
        for name, up in snap.get("upstreams", {}).items():
            state = up.get("circuit")
            if state is not None:
                seen = circuits.setdefault(name, 0)
                circuits[name] = max(seen, 1 if state == "open" else 0)
            for label, ep in up["endpoints"].items():
                slot = upstreams.setdefault((name, label), {"open": 0, "idle": 0, "discarded": 0})
                slot["open"] += ep["open"]
                slot["idle"] += ep["idle"]
                slot["discarded"] += ep.get("discarded", 0)
    return {
        "routes": list(routes.values()),
        "connections": connections,
        "upstream_connections": upstreams,
        "spans": spans,
        "circuits": circuits,
    }


def _histogram(
    name: str, doc: str, entries: list[dict[str, Any]], field: str
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["route", "upstream"])
    for entry in entries:
        counts = entry[f"{field}_buckets"]
        cumulative = 0
        buckets = []
        for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric(
            [entry["route"], entry["upstream"]], buckets, sum_value=entry[f"{field}_sum"]
        )
    return family


def _per_route(
    entries: list[dict[str, Any]], field: str, name: str, doc: str
) -> CounterMetricFamily:
    """A counter by route alone: the sum over the upstreams the route has had."""
    totals: dict[str, int] = {}
    for entry in entries:
        count = entry[field]
        if count:
            totals[entry["route"]] = totals.get(entry["route"], 0) + count
    family = CounterMetricFamily(name, doc, labels=["route"])
    for route, count in sorted(totals.items()):
        family.add_metric([route], count)
    return family


class GatewayCollector(Collector):
    """Renders a merged snapshot (from a callable) as Prometheus metric families."""

    def __init__(self, snapshot: Any) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        data = self._snapshot()
        routes = data["routes"]
        requests = CounterMetricFamily(
            "meshgate_gateway_requests",
            "Requests answered, by route, upstream and status class.",
            labels=["route", "upstream", "code"],
        )
        for entry in routes:
            for i, cls in enumerate(_CLASSES, start=1):
                count = entry["by_class"][i]
                if count:
                    requests.add_metric([entry["route"], entry["upstream"], cls], count)
        yield requests
        aborted = CounterMetricFamily(
            "meshgate_gateway_aborted",
            "Responses cut off after their head was sent: the upstream failed or timed out "
            "mid-response, or the client went away. They are also counted in requests.",
            labels=["route", "upstream"],
        )
        for entry in routes:
            if entry["aborted"]:
                aborted.add_metric([entry["route"], entry["upstream"]], entry["aborted"])
        yield aborted
        retries = CounterMetricFamily(
            "meshgate_gateway_retries",
            "Requests tried again on another endpoint.",
            labels=["route", "upstream"],
        )
        exhausted = CounterMetricFamily(
            "meshgate_gateway_retry_budget_exhausted",
            "Retries not made because the upstream's retry budget was spent.",
            labels=["route", "upstream"],
        )
        for entry in routes:
            labels = [entry["route"], entry["upstream"]]
            if entry["retries"]:
                retries.add_metric(labels, entry["retries"])
            if entry["budget_exhausted"]:
                exhausted.add_metric(labels, entry["budget_exhausted"])
        yield retries
        yield exhausted
        yield _per_route(
            routes,
            "rate_limited",
            "meshgate_gateway_rate_limited",
            "Requests refused (429) by the route's rate limit.",
        )
        yield _per_route(
            routes,
            "rate_limit_redis_errors",
            "meshgate_gateway_rate_limit_redis_errors",
            "Rate-limit decisions Redis could not make (unreachable, too slow, an error); "
            "the route's on_redis_error let these requests through or refused them (503).",
        )
        yield _histogram(
            "meshgate_gateway_request_duration_seconds",
            "Time from a request's first byte to its response's last, per request.",
            routes,
            "duration",
        )
        yield _histogram(
            "meshgate_gateway_processing_duration_seconds",
            "Time spent in the gateway itself per request (total minus upstream time).",
            routes,
            "gateway",
        )
        yield _histogram(
            "meshgate_gateway_upstream_duration_seconds",
            "Time from sending a request upstream to its response's last byte.",
            [e for e in routes if e["upstream"]],
            "upstream",
        )
        conns = GaugeMetricFamily("meshgate_gateway_client_connections", "Open client connections.")
        conns.add_metric([], data["connections"])
        yield conns
        up = GaugeMetricFamily(
            "meshgate_gateway_upstream_connections",
            "Open connections to upstream endpoints, by state.",
            labels=["upstream", "endpoint", "state"],
        )
        for (name, label), counts in sorted(data["upstream_connections"].items()):
            up.add_metric([name, label, "active"], counts["open"] - counts["idle"])
            up.add_metric([name, label, "idle"], counts["idle"])
        yield up
        discarded = CounterMetricFamily(
            "meshgate_gateway_upstream_connections_discarded",
            "Upstream connections closed instead of reused because the upstream sent bytes "
            "no request asked for (after a complete response, or while idle): it and the "
            "gateway disagree on where a message ends.",
            labels=["upstream", "endpoint"],
        )
        for (name, label), counts in sorted(data["upstream_connections"].items()):
            if counts.get("discarded"):
                discarded.add_metric([name, label], counts["discarded"])
        yield discarded
        breakers = GaugeMetricFamily(
            "meshgate_gateway_breaker_open",
            "1 while an upstream's circuit breaker is open in any worker (requests get "
            "503 circuit_open), else 0; only upstreams with a breaker.",
            labels=["upstream"],
        )
        for name, value in sorted((data.get("circuits") or {}).items()):
            breakers.add_metric([name], value)
        yield breakers
        spans = data.get("spans") or {}
        exported = CounterMetricFamily(
            "meshgate_gateway_spans_exported",
            "Trace spans the workers sent to the collector.",
        )
        exported.add_metric([], spans.get("exported", 0))
        yield exported
        dropped = CounterMetricFamily(
            "meshgate_gateway_spans_dropped",
            "Trace spans lost: the export queue was full or the collector did not take them.",
        )
        dropped.add_metric([], spans.get("dropped", 0))
        yield dropped
        yield from data.get("extra", ())
