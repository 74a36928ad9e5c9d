"""The service's outermost middleware: what every request of a service goes through.

Per request, in this order: its id, trace (the SERVER span of
:meth:`~meshgate.service.telemetry.Telemetry.server_context`, or the caller's context
as it came while tracing is off), deadline and calling service into context
(:mod:`meshgate.service.context`); the refusals that need no handler (a bad identity
token, a deadline already past); then the app (FastAPI's own middleware and the
handlers). On the way out: ``X-Request-ID`` on the response, the route template and
status on the server span, the request metrics, the access log line (inside the
span, so that it carries its ids), and for an error nothing handled, a problem (500)
and its traceback logged as one record with the request id.

It sits outside FastAPI's ``ServerErrorMiddleware`` (see ``_ServiceApp`` in
:mod:`meshgate.service.app`), so that even an error of a middleware added later by
the service is logged with the request's id, and answered as a problem.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshgate.service.context import (
    DEADLINE_HEADER,
    current_caller,
    current_deadline,
    current_request_id,
    parse_deadline,
)
from meshgate.service.identity import IDENTITY_HEADER, IdentityError, verify_identity
from meshgate.service.problems import internal_detail, problem_response
from meshgate.service.telemetry import QUIET_PATHS

if TYPE_CHECKING:
    from starlette.responses import Response

    from meshgate.service.app import Service

__all__ = ["ACCESS_LOGGER", "ServiceMiddleware"]

ACCESS_LOGGER = "meshgate.access"
"""The logger of the access log: one INFO record per request (DEBUG for the health
and metrics endpoints, which probes and scrapers call all the time)."""

log = logging.getLogger("meshgate.service")
access = logging.getLogger(ACCESS_LOGGER)

_DEADLINE_KEY = DEADLINE_HEADER.lower().encode()
_IDENTITY_KEY = IDENTITY_HEADER.lower().encode()


class ServiceMiddleware:
    """See the module documentation."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    def _refusal(
        self, scope: Scope, identity: bytes | None, deadline: float | None
    ) -> tuple[Response | None, str | None]:
        """The answer given without running the app, if any, and the verified caller."""
        service = self.service
        caller: str | None = None
        if identity is not None:
            if service.secret is None:
                return problem_response(
                    scope,
                    401,
                    f"{service.name} has no MESHGATE_SERVICE_SECRET to verify the calling "
                    "service's identity; give every service of the system the same secret",
                    code="identity_not_configured",
                ), None
            try:
                caller = verify_identity(
                    identity.decode("latin-1"), audience=service.name, secret=service.secret
                )
            except IdentityError as exc:
                return problem_response(scope, 401, str(exc), code="invalid_identity"), None
        if deadline is not None and deadline <= time.monotonic():
            return problem_response(
                scope,
                504,
                "the caller's deadline passed before the request arrived",
                code="deadline_exceeded",
            ), caller
        return None, caller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        service = self.service
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.lower(), value)
        request_id = (headers.get(b"x-request-id") or b"").decode("latin-1")[:200] or None
        if request_id is None:
            request_id = os.urandom(16).hex()
        telemetry = service.telemetry
        trace_context, server_span = telemetry.server_context(scope, headers, request_id)
        trace_token = otel_context.attach(trace_context)
        deadline = parse_deadline(headers.get(_DEADLINE_KEY, b"").decode("latin-1"))
        id_token = current_request_id.set(request_id)
        deadline_token = current_deadline.set(deadline)
        refusal, caller = self._refusal(scope, headers.get(_IDENTITY_KEY), deadline)
        caller_token = current_caller.set(caller)
        status = 500
        started_response = False
        rid = request_id.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = message["status"]
                started_response = True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
                if server_span is not None:
                    telemetry.answered(server_span, scope, status)
            await send(message)

        started = time.perf_counter()
        service.inflight += 1
        gauge = service._inflight.labels(service.name)
        gauge.inc()
        try:
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # FastAPI's ServerErrorMiddleware has answered (the SDK's handler: a
            # problem) and re-raised, for servers to log: logged here instead, once,
            # with the request's id, and not raised again to be logged twice.
            if server_span is not None and server_span.is_recording():
                server_span.record_exception(exc)
            log.exception(
                "unhandled error in %s %s",
                scope.get("method", ""),
                scope.get("path", ""),
                extra={"method": scope.get("method", ""), "path": scope.get("path", "")},
            )
            if not started_response:
                answer = problem_response(scope, 500, internal_detail(), code="internal_error")
                await answer(scope, receive, send_with_id)
        finally:
            service.inflight -= 1
            gauge.dec()
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "(unmatched)"
            method = scope.get("method", "")
            service._requests.labels(service.name, method, template, str(status)).inc()
            service._latency.labels(service.name, method, template).observe(elapsed)
            path = scope.get("path", "")
            level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
            if access.isEnabledFor(level):
                millis = round(elapsed * 1000, 2)
                access.log(
                    level,
                    "%s %s %d %.1f ms",
                    method,
                    path,
                    status,
                    millis,
                    extra={
                        "method": method,
                        "path": path,
                        "route": template,
                        "status": status,
                        "duration_ms": millis,
                    },
                )
            current_caller.reset(caller_token)
            current_deadline.reset(deadline_token)
            current_request_id.reset(id_token)
            if server_span is not None:
                server_span.end()
            otel_context.detach(trace_token)
