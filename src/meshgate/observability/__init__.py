"""Observability: the control plane's embedded OTLP collector, its query API and
dashboard, and Prometheus service discovery, rules and dashboards.

- :class:`TelemetryStore` keeps recent traces, logs and metrics in bounded memory;
- :func:`create_otlp_router` receives OTLP/HTTP exports into it (``/v1/traces``,
  ``/v1/logs``, ``/v1/metrics``);
- :func:`create_observability_router` serves queries over it
  (``/v1/observability/...``);
- :func:`create_dashboard_router` serves the dashboard (``/ui``);
- :func:`create_prometheus_router` serves Prometheus HTTP service discovery from
  the registry (``/v1/prometheus/targets``); :data:`RULES` and
  :data:`GRAFANA_DASHBOARD` are the shipped rules and dashboard;
- :func:`create_admin_router` is all of it, as the admin listener mounts it.

The reference is docs/observability.md.
"""

from meshgate.observability.api import create_observability_router, create_otlp_router
from meshgate.observability.auth import AdminAuth
from meshgate.observability.dashboard import DashboardPage, create_dashboard_router
from meshgate.observability.errors import (
    ObservabilityError,
    OtlpDecodeError,
    QueryError,
    UnsupportedMediaTypeError,
)
from meshgate.observability.model import LogRecord, MetricSeries, Span, SpanEvent
from meshgate.observability.mount import create_admin_router
from meshgate.observability.prometheus import (
    GRAFANA_DASHBOARD,
    RULES,
    GatewayTarget,
    create_prometheus_router,
    scrape_configs,
)
from meshgate.observability.store import StoreLimits, TelemetryStore, TraceSummary

__all__ = [
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
]
