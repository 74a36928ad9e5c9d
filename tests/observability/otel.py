"""Real OpenTelemetry SDK data for the collector's tests: spans made by SDK tracers of
several services (one provider each, as separate processes would have), encoded
by the SDK's own OTLP encoders, and a shop-like trace shape to derive maps from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from opentelemetry import trace as trace_api
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

MS = 1_000_000


@dataclass
class System:
    """Tracers and loggers of several services, all exporting into memory."""

    spans: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    logs: InMemoryLogRecordExporter = field(default_factory=InMemoryLogRecordExporter)
    _tracers: dict[tuple[str, str], trace_api.Tracer] = field(default_factory=dict)
    _providers: list[TracerProvider] = field(default_factory=list)
    _log_providers: dict[tuple[str, str], LoggerProvider] = field(default_factory=dict)
    instance_ids: dict[tuple[str, str], str] = field(default_factory=dict)
    """``service.instance.id`` of (service, instance) when not ``service-instance``: the
    registry's instance id, as a process started by meshgate up reports it."""

    def tracer(self, service: str, instance: str = "1") -> trace_api.Tracer:
        key = (service, instance)
        if key not in self._tracers:
            instance_id = self.instance_ids.get(key, f"{service}-{instance}")
            resource = Resource.create(
                {"service.name": service, "service.instance.id": instance_id}
            )
            provider = TracerProvider(resource=resource)
            provider.add_span_processor(SimpleSpanProcessor(self.spans))
            self._providers.append(provider)
            self._tracers[key] = provider.get_tracer("tests.observability")
        return self._tracers[key]

    def log(self, service: str, level: str, body: str, instance: str = "1") -> None:
        """Emit a log record of ``service`` through the SDK's logs API, in the current
        span's context (so it carries its trace id when there is one)."""
        key = (service, instance)
        if key not in self._log_providers:
            resource = Resource.create(
                {"service.name": service, "service.instance.id": f"{service}-{instance}"}
            )
            provider = LoggerProvider(resource=resource)
            provider.add_log_record_processor(SimpleLogRecordProcessor(self.logs))
            self._log_providers[key] = provider
        severity = getattr(SeverityNumber, level.upper())
        self._log_providers[key].get_logger("tests.observability").emit(
            severity_number=severity, severity_text=level.upper(), body=body
        )

    def trace_payload(self) -> bytes:
        """Every finished span as one OTLP protobuf ExportTraceServiceRequest; clears them."""
        data = encode_spans(self.spans.get_finished_spans()).SerializeToString()
        self.spans.clear()
        return data

    def logs_payload(self) -> bytes:
        data = encode_logs(self.logs.get_finished_logs()).SerializeToString()
        self.logs.clear()
        return data

    def close(self) -> None:
        for provider in self._providers:
            provider.shutdown()
        for log_provider in self._log_providers.values():
            log_provider.shutdown()


def span(
    system: System,
    service: str,
    name: str,
    start_ns: int,
    duration_ms: float,
    *,
    parent: trace_api.Span | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, str | int] | None = None,
    error: bool = False,
    instance: str = "1",
) -> trace_api.Span:
    """A finished span of ``service`` with exact times, child of ``parent``."""
    context = trace_api.set_span_in_context(parent) if parent is not None else None
    made = system.tracer(service, instance).start_span(
        name, context=context, kind=kind, attributes=attributes, start_time=start_ns
    )
    if error:
        made.set_status(Status(StatusCode.ERROR, "failed"))
    made.end(end_time=start_ns + int(duration_ms * MS))
    return made


def shop_trace(
    system: System,
    start_ns: int | None = None,
    *,
    orders_ms: float = 40.0,
    fail_users: bool = False,
    instance: str = "1",
) -> str:
    """gateway -> orders -> (postgresql, users), as the shop makes them; its trace id.

    gateway: a server span and a client span per upstream call; orders: a server
    span, a database client span (no child: the database sends no spans) and a
    client span to users; users: a server span (failing with ``fail_users``)."""
    t0 = time.time_ns() - 200 * MS if start_ns is None else start_ns
    total = orders_ms + 10
    root = span(system, "gateway", "GET /api/orders", t0, total, kind=SpanKind.SERVER)
    up = span(
        system,
        "gateway",
        "upstream orders",
        t0 + 1 * MS,
        total - 2,
        parent=root,
        kind=SpanKind.CLIENT,
        attributes={"server.address": "127.0.0.1"},
    )
    orders = span(
        system,
        "orders",
        "GET /orders",
        t0 + 2 * MS,
        orders_ms,
        parent=up,
        kind=SpanKind.SERVER,
        attributes={"http.response.status_code": 500 if fail_users else 200},
        error=fail_users,
        instance=instance,
    )
    span(
        system,
        "orders",
        "SELECT orders",
        t0 + 3 * MS,
        orders_ms / 2,
        parent=orders,
        kind=SpanKind.CLIENT,
        attributes={"db.system": "postgresql", "db.statement": "SELECT * FROM orders"},
        instance=instance,
    )
    call = span(
        system,
        "orders",
        "GET users",
        t0 + 4 * MS + int(orders_ms / 2 * MS),
        orders_ms / 4,
        parent=orders,
        kind=SpanKind.CLIENT,
        attributes={"peer.service": "users"},
        error=fail_users,
        instance=instance,
    )
    span(
        system,
        "users",
        "GET /users/{id}",
        t0 + 5 * MS + int(orders_ms / 2 * MS),
        orders_ms / 8,
        parent=call,
        kind=SpanKind.SERVER,
        error=fail_users,
    )
    return format(root.get_span_context().trace_id, "032x")
