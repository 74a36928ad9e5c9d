"""Request traces from the gateway: W3C trace context in, compact span records on the
hot path, OTLP/HTTP (protobuf) export from a thread.

The OpenTelemetry SDK costs tens of microseconds per span, more than the gateway spends
on a whole request, so the data plane does not use it. For each request it either
continues the client's trace (``traceparent``, ``tracestate``) or starts one, decides
whether to sample it (parent-based: a sampled parent is always followed; otherwise the
route's ratio), and forwards a ``traceparent`` naming its upstream span. When a sampled
request (or, with ``errors``, any 5xx) ends, it appends one tuple to
:attr:`Tracer.records`; every worker tick hands the batch to the exporter thread,
which encodes an ``ExportTraceServiceRequest`` by hand (the parts that never change per
route are encoded once) and posts it to the collector.

Each request gives two spans: a SERVER span for the whole exchange, and a CLIENT span
for the upstream part (the last try), with the route, upstream, endpoint, status and
retries, and the split between gateway and upstream time as attributes.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import queue
import random
import socket
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from meshgate.config.model import TracingSettings
    from meshgate.gateway.server import Exchange

__all__ = ["SpanRecord", "Tracer", "parse_traceparent", "resolve_endpoint"]

log = logging.getLogger("meshgate.gateway.tracing")

_HEX = frozenset(b"0123456789abcdef")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16

SpanRecord = tuple[Any, ...]
"""(trace id, server span id, parent span id, upstream span id, tracestate, start,
end, upstream start, upstream end, method, path, status, route name, upstream name,
endpoint label, retries, client address, request id, why it was cut off): ids as hex
bytes, times from ``perf_counter``."""


def resolve_endpoint(settings: TracingSettings, env: Mapping[str, str] | None = None) -> str | None:
    """The URL spans are posted to, or None when tracing is off.

    ``settings.endpoint`` first, then ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as
    is, as the OpenTelemetry specification says), then ``OTEL_EXPORTER_OTLP_ENDPOINT``
    (with ``/v1/traces`` appended).
    """
    if not settings.enabled:
        return None
    environ = os.environ if env is None else env
    if settings.endpoint:
        return settings.endpoint.rstrip("/") + "/v1/traces"
    direct = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if direct:
        return direct
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if base:
        return base.rstrip("/") + "/v1/traces"
    return None


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, bool] | None:
    """``(trace id, parent span id, sampled)`` of a W3C ``traceparent``; None if it is
    not valid (then the request starts a trace of its own)."""
    value = value.strip()
    if len(value) < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version = value[:2]
    if version == b"ff" or (version == b"00" and len(value) != 55):
        return None  # a future version may add fields, never version 00
    if len(value) > 55 and value[55:56] != b"-":
        return None
    trace_id = value[3:35]
    span_id = value[36:52]
    flags = value[53:55]
    for part in (version, trace_id, span_id, flags):
        if not _HEX.issuperset(part):
            return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


# ---------------------------------------------------------------------------- protobuf

_I64 = struct.Struct("<Q")


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


def _len(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _fixed64(field: int, value: int) -> bytes:
    return _varint(field << 3 | 1) + _I64.pack(value)


_F64 = struct.Struct("<d")


def _kv_message(key: str, value: str | int | float | bool) -> bytes:
    """A ``KeyValue`` with its ``AnyValue``."""
    if isinstance(value, bool):
        any_value = _varint(2 << 3) + _varint(int(value))
    elif isinstance(value, int):
        any_value = _varint(3 << 3) + _varint(value & 0xFFFFFFFFFFFFFFFF)
    elif isinstance(value, float):
        any_value = _varint(4 << 3 | 1) + _F64.pack(value)
    else:
        any_value = _len(1, value.encode())
    return _len(1, key.encode()) + _len(2, any_value)


def _kv(key: str, value: str | int | float | bool) -> bytes:
    """An attribute, as a ``Span.attributes`` item (field 9)."""
    return _len(9, _kv_message(key, value))


_SERVER, _CLIENT = 2, 3
_STATUS_ERROR = _len(15, _varint(3 << 3) + _varint(2))


@dataclass(frozen=True, slots=True)
class _RouteParts:
    """What every span of one route shares, encoded once."""

    server_name: dict[bytes, bytes]
    client_name: dict[bytes, bytes]
    server_attrs: bytes
    client_attrs: bytes


class _Encoder:
    """Encodes span records as an OTLP ``ExportTraceServiceRequest``."""

    def __init__(self, service_name: str, instance: str) -> None:
        resource = b"".join(
            _len(1, _kv_message(key, value))  # Resource.attributes is field 1
            for key, value in (
                ("service.name", service_name),
                ("service.instance.id", instance),
                ("telemetry.sdk.name", "meshgate"),
                ("telemetry.sdk.language", "python"),
            )
        )
        self._resource = _len(1, resource)
        self._scope = _len(1, _len(1, b"meshgate.gateway"))
        self._routes: dict[tuple[str, str], _RouteParts] = {}

    def _route(self, route: str, upstream: str) -> _RouteParts:
        parts = self._routes.get((route, upstream))
        if parts is None:
            common = _kv("meshgate.route", route) if route else b""
            parts = self._routes[(route, upstream)] = _RouteParts(
                {},
                {},
                common + (_kv("http.route", route) if route else b""),
                common
                + (
                    _kv("meshgate.upstream", upstream) + _kv("peer.service", upstream)
                    if upstream
                    else b""
                ),
            )
        return parts

    @staticmethod
    def _name(cache: dict[bytes, bytes], method: bytes, target: str) -> bytes:
        name = cache.get(method)
        if name is None:
            text = method.decode("latin-1") + (" " + target if target else "")
            name = cache[method] = _len(5, text.encode())
        return name

    def span_bytes(self, rec: SpanRecord, offset: float) -> list[bytes]:
        """The encoded ``Span`` messages (as ScopeSpans.spans items) of one record."""
        (
            trace_hex, span_hex, parent_hex, up_hex, state, start, end, up_start, up_end,
            method, path, status, route, upstream, endpoint, retries, client, rid, aborted,
        ) = rec  # fmt: skip
        parts = self._route(route, upstream)
        trace_id = _len(1, bytes.fromhex(trace_hex.decode()))
        state_field = _len(3, state) if state else b""
        failed = status >= 500 or bool(aborted)
        server = [
            trace_id,
            _len(2, bytes.fromhex(span_hex.decode())),
            state_field,
            _len(4, bytes.fromhex(parent_hex.decode())) if parent_hex else b"",
            self._name(parts.server_name, method, route),
            _varint(6 << 3) + _varint(_SERVER),
            _fixed64(7, int((start + offset) * 1e9)),
            _fixed64(8, int((end + offset) * 1e9)),
            parts.server_attrs,
            _kv("http.request.method", method.decode("latin-1")),
            _kv("url.path", path.decode("latin-1")),
            _kv("http.response.status_code", status),
            _kv("client.address", client),
            _kv("meshgate.request_id", rid.decode("latin-1")),
        ]
        upstream_time = (up_end or end) - up_start if up_start else 0.0
        gateway_ms = max(0.0, (end - start - upstream_time) * 1000)
        server.append(_kv("meshgate.gateway.duration_ms", round(gateway_ms, 3)))
        if upstream_time:
            server.append(_kv("meshgate.upstream.duration_ms", round(upstream_time * 1000, 3)))
        if retries:
            server.append(_kv("meshgate.retries", retries))
        if aborted:
            server.append(_kv("meshgate.aborted", aborted))
        if failed:
            server.append(_STATUS_ERROR)
        out = [_len(2, b"".join(server))]
        if up_start and up_hex:
            host, _, port = endpoint.rpartition(":")
            client_span = [
                trace_id,
                _len(2, bytes.fromhex(up_hex.decode())),
                state_field,
                _len(4, bytes.fromhex(span_hex.decode())),
                self._name(parts.client_name, method, upstream),
                _varint(6 << 3) + _varint(_CLIENT),
                _fixed64(7, int((up_start + offset) * 1e9)),
                _fixed64(8, int(((up_end or end) + offset) * 1e9)),
                parts.client_attrs,
                _kv("http.request.method", method.decode("latin-1")),
                _kv("http.response.status_code", status),
                _kv("server.address", host.strip("[]")),
            ]
            if port.isdigit():
                client_span.append(_kv("server.port", int(port)))
            if retries:
                client_span.append(_kv("http.request.resend_count", retries))
            if status >= 400 or aborted:
                client_span.append(_STATUS_ERROR)
            out.append(_len(2, b"".join(client_span)))
        return out

    def request(self, records: list[SpanRecord], offset: float) -> bytes:
        spans = [s for rec in records for s in self.span_bytes(rec, offset)]
        scope_spans = _len(2, self._scope + b"".join(spans))
        return _len(1, self._resource + scope_spans)


# ---------------------------------------------------------------------------- tracer


def _span_count(records: list[SpanRecord]) -> int:
    """Spans in ``records``: two for a request that reached an upstream, else one."""
    return sum(2 if rec[7] and rec[3] else 1 for rec in records)


class Tracer:
    """One worker's tracing: sampling decisions, span records, and the exporter thread.

    ``begin`` runs for every request once it is routed and returns the trace context
    lines to forward; ``end`` for every request that is sampled or failed.
    """

    def __init__(self, settings: TracingSettings, url: str, *, worker: int = 0) -> None:
        self.settings = settings
        self.url = url
        self.errors = settings.errors
        seed = random.getrandbits(64)
        self._seed = seed
        self._count = 0
        self._prefix = os.urandom(8).hex().encode()
        # The span id an unsampled request names as its upstream span: never recorded,
        # so one per worker will do, and forwarding it costs one join.
        self._unsampled = b"-" + os.urandom(8).hex().encode() + b"-00\r\n"
        self.records: list[SpanRecord] = []
        self.exported = 0
        self.dropped = 0
        self.failures = 0
        instance = f"{socket.gethostname()}:{os.getpid()}:{worker}"
        self._encoder = _Encoder(settings.service_name, instance)
        self._queue: queue.Queue[tuple[float, list[SpanRecord]] | None] = queue.Queue(
            maxsize=max(1, settings.max_queue // 64)
        )
        self._headers = {
            "Content-Type": "application/x-protobuf",
            **settings.headers,
        }
        self._thread = threading.Thread(target=self._run, name="meshgate-tracing", daemon=True)
        self._thread.start()

    # -- hot path ------------------------------------------------------------

    def _ids(self) -> tuple[bytes, bytes]:
        count = self._count = self._count + 1
        value = self._seed ^ (count << 1)
        return b"%016x" % (value & 0xFFFFFFFFFFFFFFFF), b"%016x" % (
            (value ^ 1) & 0xFFFFFFFFFFFFFFFF
        )

    def begin(self, ex: Exchange, parent: bytes, state: bytes, ratio: float) -> bytes:
        """Decide ``ex``'s sampling and return the ``traceparent`` (and ``tracestate``)
        lines to send upstream."""
        parsed = parse_traceparent(parent) if parent else None
        if parsed is not None:
            trace_id, parent_span, sampled = parsed
            ex.parent_span = parent_span
        else:
            trace_id = b""
            sampled = random.random() < ratio  # noqa: S311 - sampling, not secrecy
        tail = b"tracestate: " + state + b"\r\n" if state else b""
        if state:
            ex.tracestate = state
        if not sampled:
            if not trace_id:
                rid = ex.request_id
                # Our own request ids are 32 hex digits, unique: the trace id for free.
                trace_id = rid if len(rid) == 32 and _HEX.issuperset(rid) else self.new_trace_id()
            ex.trace_id = trace_id
            return b"traceparent: 00-" + trace_id + self._unsampled + tail
        if not trace_id:
            trace_id = self.new_trace_id()
        ex.trace_id = trace_id
        ex.sampled = True
        server, upstream = self._ids()
        ex.span_id = server
        ex.up_span = upstream
        return b"traceparent: 00-" + trace_id + b"-" + upstream + b"-01\r\n" + tail

    def new_trace_id(self) -> bytes:
        count = self._count = self._count + 1
        return self._prefix + b"%016x" % ((self._seed + count) & 0xFFFFFFFFFFFFFFFF)

    def end(self, ex: Exchange, end: float, upstream: str, endpoint: str, client: str) -> None:
        """Record ``ex`` (sampled, or failed with ``errors`` on)."""
        span = ex.span_id
        up_span = ex.up_span
        if not span:
            span, up_span = self._ids()
        route = ex.route
        self.records.append(
            (
                ex.trace_id,
                span,
                ex.parent_span,
                up_span,
                ex.tracestate,
                ex.t_start,
                end,
                ex.t_up,
                ex.t_up_end,
                ex.method,
                ex.url.split(b"?", 1)[0],
                ex.status,
                route.name if route is not None else "",
                upstream,
                endpoint,
                ex.attempts,
                client,
                ex.request_id,
                ex.aborted,
            )
        )

    # -- export ----------------------------------------------------------------

    def flush(self) -> None:
        """Hand the records gathered so far to the exporter (every worker tick)."""
        records = self.records
        if not records:
            return
        self.records = []
        offset = time.time() - time.perf_counter()
        try:
            self._queue.put_nowait((offset, records))
        except queue.Full:
            self.dropped += _span_count(records)

    def close(self) -> None:
        """Export what is left (for a moment) and stop the exporter thread."""
        self.flush()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1)
        self._thread.join(timeout=3)

    def stats(self) -> dict[str, int]:
        return {"exported": self.exported, "dropped": self.dropped, "failures": self.failures}

    def _post(self, conn: http.client.HTTPConnection, path: str, body: bytes) -> int:
        conn.request("POST", path, body, self._headers)
        response = conn.getresponse()
        response.read()
        return response.status

    def _lost(self, records: list[SpanRecord], why: str) -> None:
        count = _span_count(records)
        self.failures += 1
        self.dropped += count
        log.warning("could not export %d spans to %s: %s", count, self.url, why)

    def _connection(self) -> http.client.HTTPConnection:
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or "127.0.0.1"
        if parts.scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=5)
        return http.client.HTTPConnection(host, port, timeout=5)

    def _run(self) -> None:
        path = urlsplit(self.url).path or "/v1/traces"
        conn: http.client.HTTPConnection | None = None
        while True:
            item = self._queue.get()
            if item is None:
                break
            offset, records = item
            # Batches queued meanwhile leave in the same request.
            with contextlib.suppress(queue.Empty):
                while len(records) < 2048:
                    more = self._queue.get_nowait()
                    if more is None:
                        self._queue.put(None)
                        break
                    records = records + more[1]
            try:
                body = self._encoder.request(records, offset)
            except Exception:  # a bug must not stop the thread: drop the batch
                log.exception("could not encode %d records", len(records))
                self.dropped += _span_count(records)
                continue
            for attempt in (1, 2):
                try:
                    if conn is None:
                        conn = self._connection()
                    status = self._post(conn, path, body)
                except (OSError, http.client.HTTPException) as exc:
                    if conn is not None:
                        conn.close()
                    conn = None
                    if attempt == 2:
                        self._lost(records, str(exc))
                    continue
                if status < 300:
                    self.exported += _span_count(records)
                else:
                    self._lost(records, f"the collector answered {status}")
                break
        if conn is not None:
            conn.close()
