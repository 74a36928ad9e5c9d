"""Worker metrics: snapshots, their merge across workers, and the Prometheus text."""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from meshgate.gateway.metrics import GatewayCollector, WorkerMetrics, merge_snapshots

GAUGES = {"connections": 0}


def exposition(data: dict[str, Any]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(lambda: data))
    return generate_latest(registry).decode()


def samples(text: str, name: str) -> dict[str, float]:
    """``{route: value}`` of the samples of ``name`` (labelled by route only)."""
    pattern = re.compile(rf'^{name}{{route="([^"]*)"}} (\S+)$', re.MULTILINE)
    return {route: float(value) for route, value in pattern.findall(text)}


def worker(**counts: dict[tuple[str, str], int]) -> WorkerMetrics:
    """A worker's metrics with counters set: ``rate_limited={(route, upstream): n}``."""
    metrics = WorkerMetrics()
    for field, by_route in counts.items():
        for (route, upstream), count in by_route.items():
            setattr(metrics.route(route, upstream), field, count)
    return metrics


def test_rate_limit_counters_are_summed_by_route_across_workers_and_upstreams() -> None:
    one = worker(
        rate_limited={("api", "a"): 2, ("web", "w"): 1},
        rate_limit_redis_errors={("api", "a"): 4},
    )
    # The same route once served by another upstream (before a reload) adds up.
    two = worker(rate_limited={("api", "a"): 3, ("api", "b"): 5})
    text = exposition(merge_snapshots([one.snapshot(GAUGES), two.snapshot(GAUGES)]))

    assert samples(text, "meshgate_gateway_rate_limited_total") == {"api": 10, "web": 1}
    assert samples(text, "meshgate_gateway_rate_limit_redis_errors_total") == {"api": 4}
    assert "# TYPE meshgate_gateway_rate_limited_total counter" in text
    assert "# TYPE meshgate_gateway_rate_limit_redis_errors_total counter" in text


def test_rate_limit_counters_of_a_replaced_worker_stay_in_the_sum() -> None:
    """What the supervisor does when a worker is restarted: its last counts are kept
    (only their "routes"), merged into the retired sum, and added to the live ones."""
    old = worker(rate_limited={("api", "a"): 7}, rate_limit_redis_errors={("api", "a"): 2})
    retired = [{"routes": merge_snapshots([old.snapshot(GAUGES)])["routes"]}]
    retired = [{"routes": merge_snapshots([*retired])["routes"]}]  # a second restart
    new = worker(rate_limited={("api", "a"): 1})
    text = exposition(merge_snapshots([*retired, new.snapshot(GAUGES)]))

    assert samples(text, "meshgate_gateway_rate_limited_total") == {"api": 8}
    assert samples(text, "meshgate_gateway_rate_limit_redis_errors_total") == {"api": 2}


def test_no_rate_limit_samples_without_events() -> None:
    text = exposition(merge_snapshots([worker(retries={("api", "a"): 1}).snapshot(GAUGES)]))
    assert samples(text, "meshgate_gateway_rate_limited_total") == {}
    assert samples(text, "meshgate_gateway_rate_limit_redis_errors_total") == {}
