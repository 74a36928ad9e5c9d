"""The collector's HTTP surface, as two FastAPI routers for the admin listener.

- :func:`create_otlp_router`: the OTLP/HTTP receiver (``POST /v1/traces``,
  ``/v1/logs``, ``/v1/metrics``) that processes export to; answers as the OTLP
  specification says (the response message, or a ``google.rpc.Status`` with 400,
  in the request's encoding);
- :func:`create_observability_router`: queries (``/v1/observability/...``) for
  ``meshgate traces`` and the dashboard; errors are RFC 9457 problem documents.

Both take an ``authorize`` dependency that raises ``HTTPException(401)`` itself, as
the registry's router does. Decoding runs in a worker thread: a large batch must
not stall the control plane's event loop.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from meshgate.gateway.errors import PROBLEM_TYPE
from meshgate.observability.errors import (
    OtlpDecodeError,
    QueryError,
    UnsupportedMediaTypeError,
)
from meshgate.observability.model import LEVELS, level_of
from meshgate.observability.otlp import (
    decode_logs,
    decode_metrics,
    decode_traces,
    encode_response,
    encode_status,
    media_type,
    read_body,
)
from meshgate.observability.query import (
    parse_duration,
    parse_since,
    service_map,
    service_red,
    waterfall,
)
from meshgate.observability.store import TelemetryStore

__all__ = [
    "MAX_EXPORT_BYTES",
    "PREFIX",
    "create_observability_router",
    "create_otlp_router",
    "problem",
]

PREFIX = "/v1/observability"
"""Where the query API is served on the admin listener."""
MAX_EXPORT_BYTES = 16 * 1024 * 1024
"""The largest OTLP export body accepted (after decompression), in bytes."""
_MAX_WINDOW = 24 * 3600.0
_TRACE_ID_RE = re.compile(r"[0-9a-fA-F]{32}")
_INVALID_ARGUMENT = 3  # google.rpc.Code

Authorize = Callable[..., Any]


def problem(status: int, code: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document (``application/problem+json``)."""
    return JSONResponse(
        {
            "type": PROBLEM_TYPE + code,
            "title": title,
            "status": status,
            "detail": detail,
            "error": code,
            **extra,
        },
        status_code=status,
        media_type="application/problem+json",
    )


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The raw body, or None when it is longer than ``limit`` (reading stops there)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            return None
    return bytes(chunks)


def create_otlp_router(
    store: TelemetryStore, authorize: Authorize, *, max_body: int = MAX_EXPORT_BYTES
) -> APIRouter:
    """The OTLP/HTTP receiver for ``store``: point ``OTEL_EXPORTER_OTLP_ENDPOINT`` at the
    admin listener, with ``OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20<token>``."""
    router = APIRouter(dependencies=[Depends(authorize)])

    async def receive(request: Request, signal: str) -> Response:
        try:
            kind = media_type(request.headers.get("content-type"))
        except UnsupportedMediaTypeError as exc:
            return Response(
                encode_status(_INVALID_ARGUMENT, str(exc), "application/json"),
                status_code=415,
                media_type="application/json",
            )
        raw = await _read_limited(request, max_body)
        if raw is None:
            message = f"the export is larger than {max_body} bytes; send smaller batches"
            return Response(
                encode_status(_INVALID_ARGUMENT, message, kind), status_code=413, media_type=kind
            )
        encoding = request.headers.get("content-encoding")
        try:
            kept, total = await asyncio.to_thread(_ingest, store, signal, raw, encoding, kind)
        except UnsupportedMediaTypeError as exc:
            return Response(
                encode_status(_INVALID_ARGUMENT, str(exc), kind), status_code=415, media_type=kind
            )
        except OtlpDecodeError as exc:
            return Response(
                encode_status(_INVALID_ARGUMENT, str(exc), kind), status_code=400, media_type=kind
            )
        rejected = total - kept
        message = "duplicates or over a trace's span limit" if rejected else ""
        return Response(encode_response(signal, kind, rejected, message), media_type=kind)

    @router.post("/v1/traces")
    async def traces(request: Request) -> Response:
        """OTLP/HTTP trace export (ExportTraceServiceRequest)."""
        return await receive(request, "traces")

    @router.post("/v1/logs")
    async def logs(request: Request) -> Response:
        """OTLP/HTTP log export (ExportLogsServiceRequest)."""
        return await receive(request, "logs")

    @router.post("/v1/metrics")
    async def metrics(request: Request) -> Response:
        """OTLP/HTTP metric export (ExportMetricsServiceRequest)."""
        return await receive(request, "metrics")

    return router


def _ingest(
    store: TelemetryStore, signal: str, raw: bytes, encoding: str | None, kind: str
) -> tuple[int, int]:
    """Decode and keep one export; (items kept, items received)."""
    body = read_body(raw, encoding, MAX_EXPORT_BYTES)
    if signal == "traces":
        spans = decode_traces(body, kind)
        return store.add_spans(spans), len(spans)
    if signal == "logs":
        records = decode_logs(body, kind)
        return store.add_logs(records), len(records)
    points = decode_metrics(body, kind)
    return store.add_metric_points(points), len(points)


def _window(value: str, parameter: str = "window") -> float:
    seconds = parse_duration(value, parameter)
    if not 0 < seconds <= _MAX_WINDOW:
        raise QueryError(parameter, value, "must be more than 0 and at most 24h")
    return seconds


def _limit(value: str, cap: int) -> int:
    if not value.isdigit() or not 1 <= int(value) <= cap:
        raise QueryError("limit", value, f"write a whole number from 1 to {cap}")
    return int(value)


def _flag(value: str | None, parameter: str) -> bool:
    if value is None or value.lower() in ("", "false", "0", "no"):
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    raise QueryError(parameter, value, "write true or false")


def _level(value: str) -> str:
    level = level_of(0, value)
    if value.strip().lower() not in (*LEVELS, "warning", "critical", "err"):
        raise QueryError("level", value, f"use one of {', '.join(LEVELS)}")
    return level


class _QueryRoute(APIRoute):
    """Translates a bad query parameter into a 400 problem document at the boundary."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except QueryError as exc:
                return problem(
                    400, "bad_query", "Invalid query parameter", str(exc), parameter=exc.parameter
                )

        return route


def _trace_id(value: str, parameter: str = "trace_id") -> str:
    if not _TRACE_ID_RE.fullmatch(value):
        raise QueryError(parameter, value, "a trace id is 32 hex digits")
    return value.lower()


def create_observability_router(
    store: TelemetryStore, authorize: Authorize, *, prefix: str = PREFIX
) -> APIRouter:
    """Queries over ``store`` under ``prefix`` (docs/observability.md#http-api):

    - ``GET /traces``: summaries, newest first (``service``, ``slow``, ``errors``,
      ``since``, ``until``, ``limit``);
    - ``GET /traces/{trace_id}``: one trace as a tree (404 when it is not kept);
    - ``GET /logs``: records, newest first (``service``, ``level`` and above,
      ``trace_id``, ``q``, ``since``, ``limit``);
    - ``GET /services``: per service RED over ``window`` (with ``step``, series);
    - ``GET /map``: services and the calls between them over ``window``;
    - ``GET /metrics``: received metric series (``service``, ``name`` prefix);
    - ``GET /stats``: what is kept and dropped, and ``version`` to poll for changes.

    A malformed parameter is a 400 problem document naming it (``bad_query``).
    """
    router = APIRouter(prefix=prefix, dependencies=[Depends(authorize)], route_class=_QueryRoute)

    @router.get("/traces")
    async def traces(
        *,
        service: str | None = None,
        slow: str | None = None,
        errors: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: str = "20",
    ) -> Response:
        found = store.find_traces(
            service=service,
            errors=_flag(errors, "errors"),
            min_duration_ns=int(parse_duration(slow, "slow") * 1e9) if slow else None,
            since_ns=parse_since(since, "since") if since else None,
            until_ns=parse_since(until, "until") if until else None,
            limit=_limit(limit, 1000),
        )
        return JSONResponse({"traces": [t.to_json() for t in found]})

    @router.get("/traces/{trace_id}")
    async def one_trace(trace_id: str) -> Response:
        spans = store.trace(_trace_id(trace_id))
        if not spans:
            return problem(
                404,
                "trace_not_found",
                "Trace not found",
                f"no trace {trace_id} is kept: it never arrived, or it is older than what "
                "the collector keeps (see /v1/observability/stats)",
            )
        return JSONResponse(waterfall(spans))

    @router.get("/logs")
    async def logs(
        *,
        service: str | None = None,
        level: str | None = None,
        trace_id: str | None = None,
        q: str | None = None,
        since: str | None = None,
        limit: str = "200",
    ) -> Response:
        records = store.logs(
            service=service,
            level=_level(level) if level else None,
            trace_id=_trace_id(trace_id) if trace_id is not None else None,
            text=q,
            since_ns=parse_since(since, "since") if since else None,
            limit=_limit(limit, 5000),
        )
        return JSONResponse({"logs": [r.to_json() for r in records]})

    @router.get("/services")
    async def services(
        window: str = "5m", step: str | None = None, service: str | None = None
    ) -> Response:
        seconds = _window(window)
        step_s = _window(step, "step") if step else None
        if step and step_s is not None and seconds / step_s > 720:
            raise QueryError("step", step, "at most 720 steps fit in the window")
        now_ns = time.time_ns()
        traces = await asyncio.to_thread(store.traces_since, now_ns - int(seconds * 1e9))
        red = await asyncio.to_thread(
            lambda: service_red(
                traces, window_s=seconds, now_ns=now_ns, step_s=step_s, service=service
            )
        )
        return JSONResponse({"window_s": seconds, "known": store.services(), "services": red})

    @router.get("/map")
    async def system_map(window: str = "5m") -> Response:
        seconds = _window(window)
        now_ns = time.time_ns()
        traces = await asyncio.to_thread(store.traces_since, now_ns - int(seconds * 1e9))
        result = await asyncio.to_thread(
            lambda: service_map(traces, window_s=seconds, now_ns=now_ns)
        )
        return JSONResponse(result)

    @router.get("/metrics")
    async def metrics(
        service: str | None = None, name: str | None = None, limit: str = "500"
    ) -> Response:
        series = store.metric_series(service=service, name=name, limit=_limit(limit, 5000))
        return JSONResponse({"series": [s.to_json() for s in series]})

    @router.get("/stats")
    async def stats() -> Response:
        return JSONResponse(store.stats())

    return router
