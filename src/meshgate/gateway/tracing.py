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
retries as attributes; the CLIENT span's duration is the upstream's time, the rest of
the SERVER span the gateway's.
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
from binascii import unhexlify
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from meshgate._otlp import env_headers

if TYPE_CHECKING:
    from meshgate.config.model import TracingSettings
    from meshgate.gateway.exchange import Exchange

__all__ = [
    "SpanRecord",
    "Tracer",
    "parse_traceparent",
    "resolve_endpoint",
    "resolve_headers",
    "resource_attributes",
]

_random = random.random

log = logging.getLogger("meshgate.gateway.tracing")

_HEX = frozenset(b"0123456789abcdef")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16

SpanRecord = tuple["Exchange", float, str]
"""(the finished exchange, its end as a ``perf_counter`` time, the label of the endpoint
its last try used): the exporter thread reads the rest from the exchange, which nothing
changes once it has finished."""


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


def resolve_headers(
    settings: TracingSettings, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The headers sent with every export: ``OTEL_EXPORTER_OTLP_TRACES_HEADERS`` or
    ``OTEL_EXPORTER_OTLP_HEADERS`` (``key=value,key2=value2``, values percent-encoded,
    as the OpenTelemetry specification says), then ``settings.headers`` (which win)."""
    headers = env_headers(os.environ if env is None else env)
    headers.update(settings.headers)
    return headers


def resource_attributes(
    settings: TracingSettings, worker: int, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The resource of the gateway's spans: ``OTEL_RESOURCE_ATTRIBUTES`` (``k=v,...``,
    percent-encoded), then ``service.name`` (``OTEL_SERVICE_NAME`` when the
    configuration keeps the default name) and ``service.instance.id`` (host, pid and
    worker unless the variables set one), as the OpenTelemetry SDKs read them."""
    environ = os.environ if env is None else env
    out: dict[str, str] = {}
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, eq, value = item.partition("=")
        if eq and key.strip():
            out[unquote(key.strip())] = unquote(value.strip())
    name = settings.service_name
    if name == "meshgate-gateway":
        name = environ.get("OTEL_SERVICE_NAME") or out.get("service.name") or name
    out["service.name"] = name
    instance = out.get("service.instance.id") or f"{socket.gethostname()}:{os.getpid()}"
    out["service.instance.id"] = f"{instance}:{worker}"  # one per worker process
    out["telemetry.sdk.name"] = "meshgate"
    out["telemetry.sdk.language"] = "python"
    return out


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


def _ld(n: int) -> bytes:
    """A length prefix (varint): one byte for the short fields that are the rule."""
    return _BYTE[n] if n < 128 else _varint(n)


_BYTE = [bytes((i,)) for i in range(128)]
_Q = struct.Struct("<Q").pack
_TRACE_ID = b"\x0a\x10"  # field 1, 16 bytes
_SPAN_ID = b"\x12\x08"  # field 2, 8 bytes
_PARENT_ID = b"\x22\x08"  # field 4, 8 bytes
_START = b"\x39"  # field 7, fixed64
_END = b"\x41"  # field 8, fixed64
_KIND_SERVER = b"\x30\x02"  # field 6 = SERVER
_KIND_CLIENT = b"\x30\x03"  # field 6 = CLIENT
_STATUS_ERROR = _len(15, _varint(3 << 3) + _varint(2))
_SPAN = b"\x12"  # ScopeSpans.spans, field 2
_IDS = struct.Struct("<2s16s2s8s").pack  # trace id and span id with their tags
_TIMES = struct.Struct("<3sQ1sQ").pack  # kind, then start and end with their tags
_SERVER_TIMES = _KIND_SERVER + _START
_CLIENT_TIMES = _KIND_CLIENT + _START


class _Attr:
    """One attribute key, its encoded prefix computed once."""

    __slots__ = ("key",)

    def __init__(self, name: str) -> None:
        self.key = _len(1, name.encode())

    def text(self, value: bytes) -> bytes:
        any_value = b"\x0a" + _ld(len(value)) + value
        body = self.key + b"\x12" + _ld(len(any_value)) + any_value
        return b"\x4a" + _ld(len(body)) + body

    def integer(self, value: int) -> bytes:
        any_value = b"\x18" + (
            _BYTE[value] if 0 <= value < 128 else _varint(value & 0xFFFFFFFFFFFFFFFF)
        )
        body = self.key + b"\x12" + _ld(len(any_value)) + any_value
        return b"\x4a" + _ld(len(body)) + body

    def number(self, value: float) -> bytes:
        body = self.key + b"\x12\x09\x21" + _F64.pack(value)
        return b"\x4a" + _ld(len(body)) + body


_METHOD = _Attr("http.request.method")
_PATH = _Attr("url.path")
_STATUS = _Attr("http.response.status_code")
_CLIENT_ADDRESS = _Attr("client.address")
_REQUEST_ID = _Attr("meshgate.request_id")
_RETRIES = _Attr("meshgate.retries")
_ABORTED = _Attr("meshgate.aborted")
_RESEND = _Attr("http.request.resend_count")
_SERVER_ADDRESS = _Attr("server.address")
_SERVER_PORT = _Attr("server.port")


@dataclass(frozen=True, slots=True)
class _RouteParts:
    """What every span of one route shares, encoded once."""

    server_name: dict[bytes, bytes]
    client_name: dict[bytes, bytes]
    server_attrs: bytes
    client_attrs: bytes


class _Encoder:
    """Encodes span records as an OTLP ``ExportTraceServiceRequest``.

    Written for speed (it runs once per traced request): whatever a route, method,
    status, client or endpoint share is encoded once and cached; a record costs a few
    joins of pre-encoded pieces.
    """

    def __init__(self, resource_attributes: Mapping[str, str]) -> None:
        resource = b"".join(
            _len(1, _kv_message(key, value))  # Resource.attributes is field 1
            for key, value in resource_attributes.items()
        )
        self._resource = _len(1, resource)
        self._scope = _len(1, _len(1, b"meshgate.gateway"))
        self._routes: dict[tuple[str, str], _RouteParts] = {}
        self._common: dict[tuple[bytes, int], bytes] = {}  # (method, status) attributes
        self._clients: dict[str, bytes] = {}
        self._paths: dict[bytes, bytes] = {}
        self._endpoints: dict[str, bytes] = {}

    def _route(self, route: str, upstream: str) -> _RouteParts:
        parts = self._routes.get((route, upstream))
        if parts is None:
            common = _kv("meshgate.route", route) if route else b""
            if upstream:
                client = common + _kv("meshgate.upstream", upstream) + _kv("peer.service", upstream)
            else:
                client = common
            parts = self._routes[(route, upstream)] = _RouteParts(
                {}, {}, common + (_kv("http.route", route) if route else b""), client
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
        ex, end, endpoint = rec
        trace_hex = ex.trace_id
        up_hex = ex.up_span
        if up_hex:
            up_id = unhexlify(up_hex)
            # The server span's id is the upstream span's with its lowest bit flipped
            # (upstream span ids all share that bit, so no two spans collide).
            span_id = up_id[:7] + bytes((up_id[7] ^ 1,))
        else:
            # A failed request that was not sampled: its spans get ids of their own.
            span_id, up_id = os.urandom(8), os.urandom(8)
        parent_hex = ex.parent_span
        state = ex.tracestate
        start = ex.t_start
        up_start = ex.t_up
        up_end = ex.t_up_end
        method = ex.method
        path = ex.url.split(b"?", 1)[0]
        status = ex.status
        compiled = ex.route
        route = compiled.name if compiled is not None else ""
        upstream = compiled.upstream.name if compiled is not None else ""
        retries = ex.attempts
        client = ex.client.peer_ip
        rid = ex.request_id
        aborted = ex.aborted
        parts = self._routes.get((route, upstream)) or self._route(route, upstream)
        trace_id = unhexlify(trace_hex)
        common = self._common.get((method, status))
        if common is None:
            common = self._common[(method, status)] = _METHOD.text(method) + _STATUS.integer(status)
        path_attr = self._paths.get(path)
        if path_attr is None:
            if len(self._paths) > 4096:
                self._paths.clear()  # bounded, however many paths there are
            path_attr = self._paths[path] = _PATH.text(path)
        client_attr = self._clients.get(client)
        if client_attr is None:
            if len(self._clients) > 4096:
                self._clients.clear()  # bounded, however many clients there are
            client_attr = self._clients[client] = _CLIENT_ADDRESS.text(client.encode())
        # The fields of a span in one pack each: ids, then kind and times.
        extra = b""
        if state or parent_hex:
            extra = (b"\x1a" + _ld(len(state)) + state if state else b"") + (
                _PARENT_ID + unhexlify(parent_hex) if parent_hex else b""
            )
        tail = b""
        if rid != trace_hex or retries or aborted or status >= 500:
            tail = self._server_tail(rid, trace_hex, retries, aborted, status)
        body = b"".join(
            (
                _IDS(_TRACE_ID, trace_id, _SPAN_ID, span_id),
                extra,
                parts.server_name.get(method) or self._name(parts.server_name, method, route),
                _TIMES(_SERVER_TIMES, int((start + offset) * 1e9), _END, int((end + offset) * 1e9)),
                parts.server_attrs,
                common,
                path_attr,
                client_attr,
                tail,
            )
        )
        n = len(body)
        out = [_SPAN + (_BYTE[n] if n < 128 else _varint(n)) + body]
        if up_start:
            if state:
                extra = b"\x1a" + _ld(len(state)) + state
            body = b"".join(
                (
                    _IDS(_TRACE_ID, trace_id, _SPAN_ID, up_id),
                    extra if state else b"",
                    _PARENT_ID,
                    span_id,
                    parts.client_name.get(method)
                    or self._name(parts.client_name, method, upstream),
                    _TIMES(
                        _CLIENT_TIMES,
                        int((up_start + offset) * 1e9),
                        _END,
                        int(((up_end or end) + offset) * 1e9),
                    ),
                    parts.client_attrs,
                    common,
                    self._endpoints.get(endpoint) or self._endpoint(endpoint),
                    _RESEND.integer(retries) if retries else b"",
                    _STATUS_ERROR if status >= 400 or aborted else b"",
                )
            )
            n = len(body)
            out.append(_SPAN + (_BYTE[n] if n < 128 else _varint(n)) + body)
        return out

    @staticmethod
    def _server_tail(
        rid: bytes, trace_hex: bytes, retries: int, aborted: str, status: int
    ) -> bytes:
        tail = []
        if rid != trace_hex:
            # A request id of the client's own (the gateway's ids are the trace ids).
            tail.append(_REQUEST_ID.text(rid))
        if retries:
            tail.append(_RETRIES.integer(retries))
        if aborted:
            tail.append(_ABORTED.text(aborted.encode()))
        if status >= 500 or aborted:
            tail.append(_STATUS_ERROR)
        return b"".join(tail)

    def _endpoint(self, endpoint: str) -> bytes:
        out = self._endpoints.get(endpoint)
        if out is None:
            host, _, port = endpoint.rpartition(":")
            out = _SERVER_ADDRESS.text(host.strip("[]").encode())
            if port.isdigit():
                out += _SERVER_PORT.integer(int(port))
            if len(self._endpoints) > 4096:
                self._endpoints.clear()
            self._endpoints[endpoint] = out
        return out

    def request(self, records: list[SpanRecord], offset: float) -> bytes:
        spans = [s for rec in records for s in self.span_bytes(rec, offset)]
        scope_spans = _len(2, self._scope + b"".join(spans))
        return _len(1, self._resource + scope_spans)


# ---------------------------------------------------------------------------- tracer


def _span_count(records: list[SpanRecord]) -> int:
    """Spans in ``records``: two for a request that reached an upstream, else one."""
    return sum(2 if rec[0].t_up else 1 for rec in records)


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
        # The worker's request id prefix: ids it made are trace ids as they are.
        self.rid_prefix = b"-"
        # The span id an unsampled request names as its upstream span: never recorded,
        # so one per worker will do, and forwarding it costs one join.
        self._unsampled = b"-" + os.urandom(8).hex().encode() + b"-00\r\n"
        self.records: list[SpanRecord] = []
        self.exported = 0
        self.dropped = 0
        self.failures = 0
        self._encoder = _Encoder(resource_attributes(settings, worker))
        self._queue: queue.Queue[tuple[float, list[SpanRecord]] | None] = queue.Queue(
            maxsize=max(1, settings.max_queue // 64)
        )
        self._headers = {"Content-Type": "application/x-protobuf", **resolve_headers(settings)}
        self._thread = threading.Thread(target=self._run, name="meshgate-tracing", daemon=True)
        self._thread.start()

    # -- hot path ------------------------------------------------------------

    def _span_hex(self) -> bytes:
        """A new span id, hex (the upstream span's; the server span's is derived)."""
        count = self._count = self._count + 1
        return b"%016x" % ((self._seed ^ (count << 1)) & 0xFFFFFFFFFFFFFFFF)

    def begin(self, ex: Exchange, parent: bytes, state: bytes, ratio: float) -> bytes:
        """Decide ``ex``'s sampling and return the ``traceparent`` (and ``tracestate``)
        lines to send upstream. Sets ``ex.trace_id``, ``ex.sampled`` and ``ex.up_span``
        (the upstream span's id, named as the parent upstream; empty if not sampled)."""
        if parent:
            return self._continue(ex, parent, state, ratio)
        # No parent: a new trace; a tracestate without a traceparent means nothing
        # (W3C trace context 3.3) and is dropped.
        if _random() >= ratio:
            rid = ex.request_id
            # Our own request ids are 32 hex digits, unique: the trace id for free.
            trace_id = ex.trace_id = (
                rid if len(rid) == 32 and rid.startswith(self.rid_prefix) else self.new_trace_id()
            )
            ex.sampled = False
            ex.up_span = b""
            return b"traceparent: 00-" + trace_id + self._unsampled
        return self._sample(ex, self.new_trace_id(), b"")

    def _continue(self, ex: Exchange, parent: bytes, state: bytes, ratio: float) -> bytes:
        parsed = parse_traceparent(parent)
        if parsed is None:
            ex.trace_id = b""
            ex.sampled = False
            ex.up_span = b""
            return self.begin(ex, b"", b"", ratio)
        trace_id, ex.parent_span, sampled = parsed
        tail = b""
        if state:
            ex.tracestate = state
            tail = b"tracestate: " + state + b"\r\n"
        if not sampled:
            ex.trace_id = trace_id
            ex.sampled = False
            ex.up_span = b""
            return b"traceparent: 00-" + trace_id + self._unsampled + tail
        return self._sample(ex, trace_id, tail)

    def _sample(self, ex: Exchange, trace_id: bytes, tail: bytes) -> bytes:
        ex.trace_id = trace_id
        ex.sampled = True
        upstream = ex.up_span = self._span_hex()
        return b"traceparent: 00-" + trace_id + b"-" + upstream + b"-01\r\n" + tail

    def new_trace_id(self) -> bytes:
        count = self._count = self._count + 1
        return self._prefix + b"%016x" % ((self._seed + count) & 0xFFFFFFFFFFFFFFFF)

    def end(self, ex: Exchange, end: float, endpoint: str) -> None:
        """Record ``ex`` (sampled, or failed with ``errors`` on)."""
        self.records.append((ex, end, endpoint))

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
