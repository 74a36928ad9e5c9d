"""The services' span exporter: what it encodes is what the official OTLP messages
decode, field by field, and it posts them to a real HTTP receiver."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from meshgate.service._exporter import FastSpanExporter, encode_spans
from tests.helpers import Message, RawUpstream, response


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def _spans() -> list[ReadableSpan]:
    keep = _Keep()
    provider = TracerProvider(resource=Resource.create({"service.name": "users", "n": 3}))
    provider.add_span_processor(SimpleSpanProcessor(keep))
    tracer = provider.get_tracer("meshgate.service", "1.0")
    with tracer.start_as_current_span("GET /users/{id}", kind=SpanKind.SERVER) as server:
        server.set_attribute("http.route", "/users/{id}")
        server.set_attribute("http.response.status_code", 200)
        server.set_attribute("ratio", 0.5)
        server.set_attribute("ok", True)
        server.set_attribute("tags", ["a", "b"])
        with tracer.start_as_current_span("SELECT users", kind=SpanKind.CLIENT) as query:
            query.set_attribute("db.statement", "SELECT * FROM users WHERE id = ?")
            query.add_event("retry", {"attempt": 2})
            query.set_status(Status(StatusCode.ERROR, "deadlock"))
        other = tracer.start_span("linked", links=[Link(server.get_span_context(), {"why": "x"})])
        other.end()
    return keep.spans


def test_what_it_encodes_decodes_as_the_spans_it_was_given() -> None:
    spans = _spans()
    message = ExportTraceServiceRequest()
    message.ParseFromString(encode_spans(spans))
    (resource_spans,) = message.resource_spans
    resource = {kv.key: kv.value for kv in resource_spans.resource.attributes}
    assert resource["service.name"].string_value == "users"
    assert resource["n"].int_value == 3
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("meshgate.service", "1.0")
    decoded = {s.name: s for s in scope_spans.spans}
    for span in spans:
        got = decoded[span.name]
        assert got.trace_id == span.context.trace_id.to_bytes(16, "big")
        assert got.span_id == span.context.span_id.to_bytes(8, "big")
        parent = span.parent
        assert got.parent_span_id == (parent.span_id.to_bytes(8, "big") if parent else b"")
        assert (got.start_time_unix_nano, got.end_time_unix_nano) == (
            span.start_time,
            span.end_time,
        )
    server = decoded["GET /users/{id}"]
    assert server.kind == 2
    attrs = {kv.key: kv.value for kv in server.attributes}
    assert attrs["http.route"].string_value == "/users/{id}"
    assert attrs["http.response.status_code"].int_value == 200
    assert attrs["ratio"].double_value == 0.5
    assert attrs["ok"].bool_value is True
    assert [v.string_value for v in attrs["tags"].array_value.values] == ["a", "b"]
    query = decoded["SELECT users"]
    assert query.kind == 3
    assert (query.status.code, query.status.message) == (2, "deadlock")
    (event,) = query.events
    assert event.name == "retry"
    assert event.attributes[0].value.int_value == 2
    (link,) = decoded["linked"].links
    assert link.span_id == server.span_id
    assert decoded["linked"].kind == 1  # INTERNAL


async def test_it_posts_to_the_collector_and_counts_what_is_lost() -> None:
    bodies: list[bytes] = []

    async def collector(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert req.header("Authorization") == "Bearer t"
        assert req.target == "/v1/traces"
        bodies.append(req.body)
        w.write(response(200, b""))

    up = await RawUpstream(collector).start()
    exporter = FastSpanExporter(f"http://{up.address}/v1/traces", {"Authorization": "Bearer t"})
    spans = _spans()
    result = await asyncio.to_thread(exporter.export, spans)
    assert result is SpanExportResult.SUCCESS
    assert exporter.exported == len(spans)
    message = ExportTraceServiceRequest()
    message.ParseFromString(bodies[0])
    assert len(message.resource_spans[0].scope_spans[0].spans) == len(spans)
    await up.close()
    down = FastSpanExporter(f"http://{up.address}/v1/traces", {})
    assert await asyncio.to_thread(down.export, spans) is SpanExportResult.FAILURE
    assert down.dropped == len(spans)
    exporter.shutdown()
