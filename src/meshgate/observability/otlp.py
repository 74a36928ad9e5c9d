"""Decoding OTLP/HTTP export requests (traces, logs, metrics) into the collector's model.

Both encodings of the OTLP specification are read: binary protobuf
(``application/x-protobuf``) and JSON (``application/json``, where trace and span
ids are hex strings rather than the base64 of the generic protobuf JSON mapping),
optionally compressed with gzip or deflate. Unknown fields are ignored, as the
specification requires of receivers.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Iterator
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

from meshgate.observability.errors import OtlpDecodeError, UnsupportedMediaTypeError
from meshgate.observability.model import LogRecord, Span, SpanEvent, level_of

__all__ = [
    "JSON",
    "PROTOBUF",
    "MetricPoint",
    "decode_logs",
    "decode_metrics",
    "decode_traces",
    "encode_response",
    "encode_status",
    "media_type",
    "read_body",
]

PROTOBUF = "application/x-protobuf"
JSON = "application/json"

_KINDS = ("internal", "internal", "server", "client", "producer", "consumer")
"""By ``Span.SpanKind`` value; 0 (unspecified) reads as internal."""
_STATUS = ("unset", "ok", "error")
_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})
_SPAN_OVERHEAD = 200
"""Bytes a decoded span costs beyond its encoded size (objects, dicts), roughly."""
_LOG_OVERHEAD = 160
_MAX_DEPTH = 16
"""How deep nested attribute values are followed (deeper ones are shown as text)."""

_Request = TypeVar("_Request", bound=Message)


def media_type(content_type: str | None) -> str:
    """``PROTOBUF`` or ``JSON`` for a request's Content-Type.

    Raises:
        UnsupportedMediaTypeError: it is neither.
    """
    base = (content_type or "").partition(";")[0].strip().lower()
    if base in (PROTOBUF, "application/protobuf"):
        return PROTOBUF
    if base == JSON:
        return JSON
    raise UnsupportedMediaTypeError(
        f"Content-Type {content_type or '(none)'!r} is not OTLP/HTTP; send "
        f"{PROTOBUF} (OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf) or {JSON} (http/json)"
    )


def read_body(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """``body`` decompressed as ``content_encoding`` says, at most ``limit`` bytes.

    Raises:
        UnsupportedMediaTypeError: an encoding other than gzip, deflate or identity.
        OtlpDecodeError: the compressed data is corrupt or inflates past ``limit``.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {content_encoding!r} is not supported; use gzip or none"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise OtlpDecodeError(f"the {encoding} body is corrupt: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise OtlpDecodeError(f"the body inflates past {limit} bytes; send smaller batches")
    return data


def _hex_ids_to_base64(value: Any, depth: int = 0) -> Any:
    """OTLP JSON writes ids as hex; the protobuf JSON parser wants base64 for bytes."""
    if depth > 64:
        raise OtlpDecodeError("the JSON body is nested too deeply")
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in _ID_KEYS and isinstance(item, str):
                try:
                    raw = bytes.fromhex(item)
                except ValueError:
                    raise OtlpDecodeError(
                        f"{key} {item!r} is not hex; OTLP JSON writes ids as hex strings"
                    ) from None
                out[key] = base64.b64encode(raw).decode()
            else:
                out[key] = _hex_ids_to_base64(item, depth + 1)
        return out
    if isinstance(value, list):
        return [_hex_ids_to_base64(item, depth + 1) for item in value]
    return value


def _parse(message: _Request, body: bytes, kind: str) -> _Request:
    if kind == PROTOBUF:
        try:
            message.ParseFromString(body)
        except DecodeError as exc:
            raise OtlpDecodeError(f"the body is not a valid OTLP protobuf message: {exc}") from None
        return message
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise OtlpDecodeError(f"the body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise OtlpDecodeError("the body must be a JSON object (an OTLP export request)")
    try:
        json_format.ParseDict(_hex_ids_to_base64(document), message, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise OtlpDecodeError(f"the JSON body is not an OTLP export request: {exc}") from None
    return message


def _value(value: AnyValue, depth: int = 0) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        if depth >= _MAX_DEPTH:
            return "[...]"
        return [_value(v, depth + 1) for v in value.array_value.values]
    if which == "kvlist_value":
        if depth >= _MAX_DEPTH:
            return "{...}"
        return _attributes(value.kvlist_value.values, depth + 1)
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return getattr(value, which)


def _attributes(pairs: Any, depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pair: KeyValue
    for pair in pairs:
        out[pair.key] = _value(pair.value, depth)
    return out


def _id(raw: bytes, length: int, what: str) -> str:
    if not raw:
        return ""
    if len(raw) != length:
        raise OtlpDecodeError(f"a {what} is {len(raw)} bytes long; it must be {length}")
    return binascii.hexlify(raw).decode()


def _identity(resource: dict[str, Any]) -> tuple[str, str]:
    service = resource.get("service.name")
    instance = resource.get("service.instance.id")
    return (
        service if isinstance(service, str) and service else "unknown_service",
        instance if isinstance(instance, str) else "",
    )


def decode_traces(body: bytes, kind: str) -> list[Span]:
    """The spans of an ``ExportTraceServiceRequest`` encoded as ``kind``.

    Raises:
        OtlpDecodeError: the body is not such a request, or an id has the wrong length.
    """
    request = _parse(ExportTraceServiceRequest(), body, kind)
    spans: list[Span] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service, instance = _identity(resource)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                trace_id = _id(span.trace_id, 16, "trace_id")
                span_id = _id(span.span_id, 8, "span_id")
                if not trace_id or not span_id:
                    raise OtlpDecodeError(
                        f"span {span.name!r} has no trace_id or span_id; both are required"
                    )
                kind_value = span.kind if 0 <= span.kind < len(_KINDS) else 0
                code = span.status.code if 0 <= span.status.code < len(_STATUS) else 0
                spans.append(
                    Span(
                        trace_id=trace_id,
                        span_id=span_id,
                        parent_id=_id(span.parent_span_id, 8, "parent_span_id"),
                        name=span.name,
                        kind=_KINDS[kind_value],
                        service=service,
                        instance=instance,
                        start_ns=span.start_time_unix_nano,
                        end_ns=max(span.end_time_unix_nano, span.start_time_unix_nano),
                        status=_STATUS[code],
                        status_message=span.status.message,
                        attributes=_attributes(span.attributes),
                        events=tuple(
                            SpanEvent(e.name, e.time_unix_nano, _attributes(e.attributes))
                            for e in span.events
                        ),
                        links=tuple(
                            (_id(link.trace_id, 16, "link trace_id"), _id(link.span_id, 8, "link"))
                            for link in span.links
                        ),
                        scope=scope,
                        resource=resource,
                        size=span.ByteSize() + _SPAN_OVERHEAD,
                    )
                )
    return spans


def _body(value: AnyValue) -> Any:
    decoded = _value(value)
    return "" if decoded is None else decoded


def decode_logs(body: bytes, kind: str) -> list[LogRecord]:
    """The log records of an ``ExportLogsServiceRequest`` encoded as ``kind``.

    Raises:
        OtlpDecodeError: the body is not such a request, or an id has the wrong length.
    """
    request = _parse(ExportLogsServiceRequest(), body, kind)
    records: list[LogRecord] = []
    for resource_logs in request.resource_logs:
        resource = _attributes(resource_logs.resource.attributes)
        service, instance = _identity(resource)
        for scope_logs in resource_logs.scope_logs:
            scope = scope_logs.scope.name
            records.extend(
                LogRecord(
                    time_ns=record.time_unix_nano or record.observed_time_unix_nano,
                    service=service,
                    instance=instance,
                    level=level_of(record.severity_number, record.severity_text),
                    severity_text=record.severity_text,
                    body=_body(record.body),
                    attributes=_attributes(record.attributes),
                    trace_id=_id(record.trace_id, 16, "trace_id"),
                    span_id=_id(record.span_id, 8, "span_id"),
                    scope=scope,
                    size=record.ByteSize() + _LOG_OVERHEAD,
                )
                for record in scope_logs.log_records
            )
    return records


MetricPoint = tuple[str, str, str, str, str, dict[str, Any], bool, int, Any]
"""(name, kind, unit, description, service, attributes, monotonic, time_ns, value)."""


def _points(metric: Metric) -> Iterator[tuple[str, bool, dict[str, Any], int, Any]]:
    which = metric.WhichOneof("data")
    if which in {"gauge", "sum"}:
        monotonic = which == "sum" and metric.sum.is_monotonic
        data = metric.gauge.data_points if which == "gauge" else metric.sum.data_points
        for point in data:
            number = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
            yield which, monotonic, _attributes(point.attributes), point.time_unix_nano, number
    elif which == "histogram":
        for h in metric.histogram.data_points:
            value = {
                "count": h.count,
                "sum": h.sum,
                "bounds": list(h.explicit_bounds),
                "counts": list(h.bucket_counts),
            }
            yield "histogram", True, _attributes(h.attributes), h.time_unix_nano, value
    elif which == "exponential_histogram":
        for e in metric.exponential_histogram.data_points:
            value = {"count": e.count, "sum": e.sum, "scale": e.scale, "zero_count": e.zero_count}
            yield "exponential_histogram", True, _attributes(e.attributes), e.time_unix_nano, value
    elif which == "summary":
        for s in metric.summary.data_points:
            value = {
                "count": s.count,
                "sum": s.sum,
                "quantiles": {str(q.quantile): q.value for q in s.quantile_values},
            }
            yield "summary", False, _attributes(s.attributes), s.time_unix_nano, value


def decode_metrics(body: bytes, kind: str) -> list[MetricPoint]:
    """The data points of an ``ExportMetricsServiceRequest`` encoded as ``kind``.

    Raises:
        OtlpDecodeError: the body is not such a request.
    """
    request = _parse(ExportMetricsServiceRequest(), body, kind)
    points: list[MetricPoint] = []
    for resource_metrics in request.resource_metrics:
        resource = _attributes(resource_metrics.resource.attributes)
        service, _ = _identity(resource)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for which, monotonic, attributes, time_ns, value in _points(metric):
                    points.append(
                        (
                            metric.name,
                            which,
                            metric.unit,
                            metric.description,
                            service,
                            attributes,
                            monotonic,
                            time_ns,
                            value,
                        )
                    )
    return points


_RESPONSES: dict[str, type[Message]] = {
    "traces": ExportTraceServiceResponse,
    "logs": ExportLogsServiceResponse,
    "metrics": ExportMetricsServiceResponse,
}


def encode_response(signal: str, kind: str, rejected: int = 0, message: str = "") -> bytes:
    """The success answer to an export of ``signal`` (``traces``, ``logs``, ``metrics``),
    encoded as ``kind``; ``rejected`` items are reported as a partial success."""
    response = _RESPONSES[signal]()
    if rejected:
        field = {"traces": "rejected_spans", "logs": "rejected_log_records"}.get(
            signal, "rejected_data_points"
        )
        partial = response.partial_success  # type: ignore[attr-defined]
        setattr(partial, field, rejected)
        partial.error_message = message
    if kind == PROTOBUF:
        return response.SerializeToString()
    return json.dumps(json_format.MessageToDict(response)).encode()


def encode_status(code: int, message: str, kind: str) -> bytes:
    """A ``google.rpc.Status`` (the body of an OTLP/HTTP error answer) encoded as ``kind``.

    Encoded by hand: two fields, and the googleapis protos are not a dependency."""
    if kind != PROTOBUF:
        return json.dumps({"code": code, "message": message}).encode()
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
