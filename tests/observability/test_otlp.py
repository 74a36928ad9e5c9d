"""Decoding OTLP/HTTP export requests, protobuf (from the real SDK) and JSON (as the
OTLP specification writes it)."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from meshgate.observability.errors import OtlpDecodeError, UnsupportedMediaTypeError
from meshgate.observability.otlp import (
    JSON,
    PROTOBUF,
    decode_logs,
    decode_metrics,
    decode_traces,
    encode_response,
    encode_status,
    media_type,
    read_body,
)
from tests.observability.otel import System, shop_trace

# The example of the OTLP specification (examples/trace.json), trimmed.
TRACE_JSON = {
    "resourceSpans": [
        {
            "resource": {
                "attributes": [
                    {"key": "service.name", "value": {"stringValue": "my.service"}},
                    {"key": "service.instance.id", "value": {"stringValue": "i-1"}},
                ]
            },
            "scopeSpans": [
                {
                    "scope": {"name": "my.library", "version": "1.0.0"},
                    "spans": [
                        {
                            "traceId": "5B8EFFF798038103D269B633813FC60C",
                            "spanId": "EEE19B7EC3C1B174",
                            "parentSpanId": "EEE19B7EC3C1B173",
                            "name": "I'm a server span",
                            "startTimeUnixNano": "1544712660000000000",
                            "endTimeUnixNano": "1544712661000000000",
                            "kind": 2,
                            "attributes": [
                                {"key": "my.span.attr", "value": {"stringValue": "some value"}},
                                {"key": "retries", "value": {"intValue": "2"}},
                                {
                                    "key": "tags",
                                    "value": {
                                        "arrayValue": {
                                            "values": [{"stringValue": "a"}, {"boolValue": True}]
                                        }
                                    },
                                },
                            ],
                            "status": {"code": 2, "message": "boom"},
                            "unknownFieldFromTheFuture": 1,
                        }
                    ],
                }
            ],
        }
    ]
}

LOGS_JSON = {
    "resourceLogs": [
        {
            "resource": {
                "attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]
            },
            "scopeLogs": [
                {
                    "scope": {"name": "my.library"},
                    "logRecords": [
                        {
                            "timeUnixNano": "1544712660300000000",
                            "severityNumber": 10,
                            "severityText": "Information",
                            "traceId": "5B8EFFF798038103D269B633813FC60C",
                            "spanId": "EEE19B7EC3C1B174",
                            "body": {"stringValue": "Example log record"},
                        }
                    ],
                }
            ],
        }
    ]
}

METRICS_JSON = {
    "resourceMetrics": [
        {
            "resource": {
                "attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]
            },
            "scopeMetrics": [
                {
                    "metrics": [
                        {
                            "name": "my.counter",
                            "unit": "1",
                            "sum": {
                                "aggregationTemporality": 1,
                                "isMonotonic": True,
                                "dataPoints": [
                                    {
                                        "asDouble": 5,
                                        "timeUnixNano": "1544712660300000000",
                                        "attributes": [{"key": "k", "value": {"stringValue": "v"}}],
                                    }
                                ],
                            },
                        },
                        {
                            "name": "my.histogram",
                            "histogram": {
                                "aggregationTemporality": 1,
                                "dataPoints": [
                                    {
                                        "timeUnixNano": "1544712660300000000",
                                        "count": 2,
                                        "sum": 2,
                                        "bucketCounts": [1, 1],
                                        "explicitBounds": [1],
                                    }
                                ],
                            },
                        },
                        {
                            "name": "my.gauge",
                            "gauge": {"dataPoints": [{"asInt": "7", "timeUnixNano": "1"}]},
                        },
                    ]
                }
            ],
        }
    ]
}


def test_spans_made_by_the_sdk_decode_with_their_services_and_tree(system: System) -> None:
    trace_id = shop_trace(system)
    spans = decode_traces(system.trace_payload(), PROTOBUF)
    assert len(spans) == 6
    assert {s.trace_id for s in spans} == {trace_id}
    by_name = {s.name: s for s in spans}
    root = by_name["GET /api/orders"]
    assert (root.service, root.kind, root.parent_id) == ("gateway", "server", "")
    assert root.instance == "gateway-1"
    upstream = by_name["upstream orders"]
    assert upstream.parent_id == root.span_id
    assert by_name["GET /orders"].parent_id == upstream.span_id
    assert by_name["SELECT orders"].attributes["db.system"] == "postgresql"
    assert by_name["SELECT orders"].duration_ns == 20_000_000
    assert all(len(s.span_id) == 16 and len(s.trace_id) == 32 for s in spans)
    assert all(s.size > 0 for s in spans)


def test_json_exports_read_hex_ids_ints_as_strings_and_ignore_unknown_fields() -> None:
    (span,) = decode_traces(json.dumps(TRACE_JSON).encode(), JSON)
    assert span.trace_id == "5b8efff798038103d269b633813fc60c"
    assert span.span_id == "eee19b7ec3c1b174"
    assert span.parent_id == "eee19b7ec3c1b173"
    assert (span.service, span.instance, span.scope) == ("my.service", "i-1", "my.library")
    assert (span.kind, span.status, span.status_message) == ("server", "error", "boom")
    assert span.duration_ns == 1_000_000_000
    assert span.attributes == {"my.span.attr": "some value", "retries": 2, "tags": ["a", True]}
    assert span.error


def test_json_logs_and_metrics_decode() -> None:
    (record,) = decode_logs(json.dumps(LOGS_JSON).encode(), JSON)
    assert (record.level, record.body, record.trace_id) == (
        "info",
        "Example log record",
        "5b8efff798038103d269b633813fc60c",
    )
    points = decode_metrics(json.dumps(METRICS_JSON).encode(), JSON)
    assert [(p[0], p[1], p[8]) for p in points] == [
        ("my.counter", "sum", 5.0),
        ("my.histogram", "histogram", {"count": 2, "sum": 2.0, "bounds": [1.0], "counts": [1, 1]}),
        ("my.gauge", "gauge", 7),
    ]
    assert points[0][5] == {"k": "v"}
    assert points[0][6] is True


def test_logs_made_by_the_sdk_keep_level_and_trace(system: System) -> None:
    tracer = system.tracer("orders")
    with tracer.start_as_current_span("work") as current:
        system.log("orders", "warn", "stock low for sku-1")
    system.log("orders", "debug", "outside a span")
    records = decode_logs(system.logs_payload(), PROTOBUF)
    assert [(r.level, r.body, r.service) for r in records] == [
        ("warn", "stock low for sku-1", "orders"),
        ("debug", "outside a span", "orders"),
    ]
    assert records[0].trace_id == format(current.get_span_context().trace_id, "032x")
    assert records[1].trace_id == ""


@pytest.mark.parametrize(
    ("body", "kind", "message"),
    [
        (b"\xff\xff\xff", PROTOBUF, "not a valid OTLP protobuf"),
        (b"{", JSON, "not JSON"),
        (b"[]", JSON, "must be a JSON object"),
        (b'{"resourceSpans": 3}', JSON, "not an OTLP export request"),
        (
            json.dumps(
                {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz", "spanId": "a"}]}]}]}
            ).encode(),
            JSON,
            "traceId 'zz' is not hex",
        ),
        (
            json.dumps(
                {
                    "resourceSpans": [
                        {"scopeSpans": [{"spans": [{"traceId": "abcd", "spanId": "00" * 8}]}]}
                    ]
                }
            ).encode(),
            JSON,
            "trace_id is 2 bytes long; it must be 16",
        ),
        (
            json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "x"}]}]}]}).encode(),
            JSON,
            "span 'x' has no trace_id or span_id",
        ),
    ],
)
def test_bad_trace_bodies_say_what_is_wrong(body: bytes, kind: str, message: str) -> None:
    with pytest.raises(OtlpDecodeError, match=message):
        decode_traces(body, kind)


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        ("application/x-protobuf", PROTOBUF),
        ("application/protobuf", PROTOBUF),
        ("application/json; charset=utf-8", JSON),
        ("Application/JSON", JSON),
    ],
)
def test_content_types(header: str, kind: str) -> None:
    assert media_type(header) == kind


@pytest.mark.parametrize("header", [None, "text/plain", "application/grpc"])
def test_other_content_types_are_refused_naming_the_protocol_setting(header: str | None) -> None:
    with pytest.raises(UnsupportedMediaTypeError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        media_type(header)


def test_compressed_bodies_inflate_within_the_limit() -> None:
    data = b"x" * 1000
    assert read_body(gzip.compress(data), "gzip", 1000) == data
    assert read_body(zlib.compress(data), "deflate", 1000) == data
    assert read_body(data, None, 10_000) == data
    with pytest.raises(OtlpDecodeError, match="inflates past 999 bytes"):
        read_body(gzip.compress(data), "gzip", 999)
    with pytest.raises(OtlpDecodeError, match="corrupt"):
        read_body(b"not gzip", "gzip", 1000)
    with pytest.raises(UnsupportedMediaTypeError, match="'br'"):
        read_body(data, "br", 1000)


def test_answers_are_real_otlp_messages() -> None:
    response = ExportTraceServiceResponse.FromString(
        encode_response("traces", PROTOBUF, rejected=3, message="over the limit")
    )
    assert response.partial_success.rejected_spans == 3
    assert response.partial_success.error_message == "over the limit"
    assert ExportTraceServiceResponse.FromString(encode_response("traces", PROTOBUF)) == (
        ExportTraceServiceResponse()
    )
    assert json.loads(encode_response("logs", JSON)) == {}
    status = Status.FromString(encode_status(3, "bad body " + "é" * 100, PROTOBUF))
    assert (status.code, status.message) == (3, "bad body " + "é" * 100)
    assert json.loads(encode_status(3, "bad", JSON)) == {"code": 3, "message": "bad"}
