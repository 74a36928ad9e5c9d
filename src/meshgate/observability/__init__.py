"""Observability: the control plane's embedded OTLP collector, its query API and
dashboard, and Prometheus service discovery, rules and dashboards.

- :class:`TelemetryStore` keeps recent traces, logs and metrics in bounded memory;
- :func:`create_otlp_router` receives OTLP/HTTP exports into it (``/v1/traces``,
  ``/v1/logs``, ``/v1/metrics``);
- :func:`create_observability_router` serves queries over it
  (``/v1/observability/...``);
- :func:`create_dashboard_router` serves the dashboard (``/ui``);
- :func:`create_prometheus_router` serves Prometheus HTTP service discovery from
  the registry (``/v1/prometheus/targets``).

The reference is docs/observability.md.
"""

from meshgate.observability.errors import (
    ObservabilityError,
    OtlpDecodeError,
    QueryError,
    UnsupportedMediaTypeError,
)
from meshgate.observability.model import LogRecord, MetricSeries, Span, SpanEvent
from meshgate.observability.store import StoreLimits, TelemetryStore, TraceSummary

__all__ = [
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
]
