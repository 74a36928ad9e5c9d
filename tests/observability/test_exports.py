"""The curated public API of meshgate.observability."""

from __future__ import annotations

from pathlib import Path

import meshgate.observability
from meshgate.errors import MeshgateError


def test_exported_members() -> None:
    assert set(meshgate.observability.__all__) == {
        "GRAFANA_DASHBOARD",
        "RULES",
        "AdminAuth",
        "DashboardPage",
        "GatewayTarget",
        "LogRecord",
        "MetricSeries",
        "ObservabilityError",
        "OtlpDecodeError",
        "QueryError",
        "Span",
        "SpanEvent",
        "StoreLimits",
        "TelemetryStore",
        "TraceSummary",
        "UnsupportedMediaTypeError",
        "create_admin_router",
        "create_dashboard_router",
        "create_observability_router",
        "create_otlp_router",
        "create_prometheus_router",
        "scrape_configs",
    }
    for name in meshgate.observability.__all__:
        member = getattr(meshgate.observability, name)
        if isinstance(member, Path):
            assert member.is_file(), name  # shipped in the package
        else:
            assert member.__module__.startswith("meshgate.observability"), name
    assert "docs/observability.md" in (meshgate.observability.__doc__ or "")


def test_errors_are_meshgate_errors_with_docstrings() -> None:
    from meshgate.observability import errors

    for name in errors.__all__:
        error = getattr(errors, name)
        assert issubclass(error, MeshgateError)
        assert error.__doc__
