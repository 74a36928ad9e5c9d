"""A real OTLP/HTTP trace receiver for tests: an HTTP server on a loopback port, in a
thread of the test process, that decodes what exporters post to ``/v1/traces`` with
the OpenTelemetry protobuf definitions and keeps every span with its resource.

Processes started by a test (``meshgate up``, ``meshgate serve``) export to it like
to any collector: point ``OTEL_EXPORTER_OTLP_ENDPOINT`` at :attr:`Receiver.url`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = ["Received", "Receiver", "receiver"]

_KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class Received:
    """One span as the receiver decoded it."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status: int
    """``Status.code``: 0 unset, 1 ok, 2 error."""
    events: tuple[str, ...] = field(default=())

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", ""))


class Receiver:
    """Keeps what it receives; answers like a collector (an empty export response)."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.take(self.path, dict(self.headers.items()), body)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The base URL (``OTEL_EXPORTER_OTLP_ENDPOINT``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def take(self, path: str, headers: dict[str, str], body: bytes) -> None:
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        found = [
            Received(
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent_id=span.parent_span_id.hex(),
                name=span.name,
                kind=_KINDS.get(span.kind, "unspecified"),
                attributes={a.key: _value(a.value) for a in span.attributes},
                resource={a.key: _value(a.value) for a in resource_spans.resource.attributes},
                status=span.status.code,
                events=tuple(e.name for e in span.events),
            )
            for resource_spans in message.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        with self._lock:
            self.paths.append(path)
            self.headers.append({k.lower(): v for k, v in headers.items()})
            self.spans.extend(found)

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.spans)

    def wait_for(
        self, what: str, check: Callable[[list[Received]], bool], timeout: float = 30.0
    ) -> list[Received]:
        """Every span received, once ``check`` holds for them (polled, with a deadline:
        exporters send in batches, every few seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.received()
            if check(spans):
                return spans
            if time.monotonic() > deadline:
                shown = "\n".join(f"  {s.service}: {s.kind} {s.name}" for s in spans[-40:])
                raise AssertionError(f"no {what} within {timeout:g} s; received:\n{shown}")
            time.sleep(0.05)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@contextmanager
def receiver() -> Iterator[Receiver]:
    """A running :class:`Receiver`, stopped at the end."""
    found = Receiver().start()
    try:
        yield found
    finally:
        found.stop()
