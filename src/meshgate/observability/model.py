"""The telemetry the collector keeps: spans, log records and metric series.

These are compact, decoded forms of the OTLP messages (ids as lowercase hex,
attributes as plain Python values), built once when a batch is received and
never changed afterwards, so that queries can hand them out without copying.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LEVELS",
    "LogRecord",
    "MetricSeries",
    "Span",
    "SpanEvent",
    "level_of",
]

Attributes = dict[str, Any]

LEVELS: tuple[str, ...] = ("trace", "debug", "info", "warn", "error", "fatal")
"""Log levels from lowest to highest, as OTLP severity numbers group them (1-4 trace,
5-8 debug, 9-12 info, 13-16 warn, 17-20 error, 21-24 fatal)."""

_LEVEL_NAMES = {
    "warning": "warn",
    "critical": "fatal",
    "err": "error",
    "information": "info",
    "notice": "info",
}

_HTTP_STATUS_KEYS = ("http.response.status_code", "http.status_code")


def level_of(severity_number: int, severity_text: str) -> str:
    """The level of a log record: from its severity number when set (1-24), else from
    its severity text (``WARNING`` is ``warn``), else ``info``."""
    if 1 <= severity_number <= 24:
        return LEVELS[(severity_number - 1) // 4]
    text = severity_text.strip().lower()
    text = _LEVEL_NAMES.get(text, text)
    return text if text in LEVELS else "info"


@dataclass(frozen=True, slots=True)
class SpanEvent:
    """Something that happened during a span (an exception, a retry)."""

    name: str
    time_ns: int
    attributes: Attributes


@dataclass(frozen=True, slots=True)
class Span:
    """One operation of a trace, as reported by the process that did it."""

    trace_id: str
    """32 lowercase hex digits."""
    span_id: str
    """16 lowercase hex digits."""
    parent_id: str
    """The parent span's id, or ``""`` for a root span."""
    name: str
    kind: str
    """``internal``, ``server``, ``client``, ``producer`` or ``consumer``."""
    service: str
    """The resource's ``service.name`` (``unknown_service`` when it has none)."""
    instance: str
    """The resource's ``service.instance.id``, or ``""``."""
    start_ns: int
    end_ns: int
    status: str
    """``unset``, ``ok`` or ``error``."""
    status_message: str = ""
    attributes: Attributes = field(default_factory=dict)
    events: tuple[SpanEvent, ...] = ()
    links: tuple[tuple[str, str], ...] = ()
    """(trace id, span id) of each linked span."""
    scope: str = ""
    """The instrumentation scope that made it (``opentelemetry.instrumentation.httpx``)."""
    resource: Attributes = field(default_factory=dict)
    """The resource's attributes, shared by every span of one export."""
    size: int = 0
    """Bytes this span is accounted for in the collector's memory limit."""

    @property
    def duration_ns(self) -> int:
        return max(self.end_ns - self.start_ns, 0)

    @property
    def error(self) -> bool:
        """Whether the span failed: status ``error``, or a server span that answered 5xx."""
        if self.status == "error":
            return True
        if self.kind != "server":
            return False
        for key in _HTTP_STATUS_KEYS:
            code = self.attributes.get(key)
            if isinstance(code, int) and code >= 500:
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        """The span as the HTTP API shows it (times in unix nanoseconds and milliseconds)."""
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_id": self.parent_id or None,
            "name": self.name,
            "kind": self.kind,
            "service": self.service,
            "instance": self.instance or None,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "duration_ms": round(self.duration_ns / 1e6, 3),
            "status": self.status,
            "status_message": self.status_message or None,
            "error": self.error,
            "attributes": self.attributes,
            "events": [
                {"name": e.name, "time_ns": e.time_ns, "attributes": e.attributes}
                for e in self.events
            ],
            "links": [{"trace_id": t, "span_id": s} for t, s in self.links],
            "scope": self.scope or None,
        }


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One log line, with the trace it belongs to when the process knew it."""

    time_ns: int
    """When it happened (its observed time when the producer set no time)."""
    service: str
    instance: str
    level: str
    """One of :data:`LEVELS`."""
    severity_text: str
    body: Any
    """A string for plain lines; a dict or list for structured bodies."""
    attributes: Attributes
    trace_id: str = ""
    span_id: str = ""
    scope: str = ""
    size: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "time_ns": self.time_ns,
            "service": self.service,
            "instance": self.instance or None,
            "level": self.level,
            "severity_text": self.severity_text or None,
            "body": self.body,
            "attributes": self.attributes,
            "trace_id": self.trace_id or None,
            "span_id": self.span_id or None,
            "scope": self.scope or None,
        }


@dataclass(slots=True)
class MetricSeries:
    """The recent points of one metric stream: a metric name, a service and a set of
    attributes. A point is ``(time_ns, value)``: a number for gauges and sums; for
    histograms ``{"count", "sum", "bounds", "counts"}``; for summaries ``{"count",
    "sum", "quantiles"}``."""

    name: str
    kind: str
    """``gauge``, ``sum``, ``histogram``, ``exponential_histogram`` or ``summary``."""
    unit: str
    description: str
    service: str
    attributes: Attributes
    monotonic: bool
    points: deque[tuple[int, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "unit": self.unit or None,
            "description": self.description or None,
            "service": self.service,
            "attributes": self.attributes,
            "monotonic": self.monotonic,
            "points": [{"time_ns": t, "value": v} for t, v in self.points],
        }
