"""Compiling a configuration into the runtime snapshot."""

from __future__ import annotations

import pytest

from meshgate.config import loads
from meshgate.gateway.metrics import WorkerMetrics
from meshgate.gateway.runtime import Runtime


@pytest.mark.parametrize(
    ("route_timeouts", "expected"),
    [
        ("", (2.0, 30.0, None)),
        ("timeouts: {read: 5s}", (2.0, 5.0, None)),
        ("timeouts: {total: 1m}", (2.0, 30.0, 60.0)),
        ("timeouts: {connect: 250ms, read: 1s, total: 2s}", (0.25, 1.0, 2.0)),
    ],
)
def test_route_timeouts_override_the_upstream_field_by_field(
    route_timeouts: str, expected: tuple[float, float, float | None]
) -> None:
    config = loads(
        "upstreams:\n"
        "  up: {endpoints: ['127.0.0.1:9'], timeouts: {connect: 2s, read: 30s}}\n"
        "routes:\n"
        f"  - {{name: r, upstream: up, {route_timeouts}}}\n"
    )
    route = Runtime(config, WorkerMetrics()).router.routes[0].target
    assert (route.connect_timeout, route.read_timeout, route.total_timeout) == expected  # type: ignore[union-attr]
