"""The registry's HTTP API (``/v1/registry``), served on the gateway's admin listener.

Every route depends on the ``authorize`` callable it is built with, which raises
``HTTPException(401)`` itself. Answers are JSON; errors carry
``{"error": "<code>", "detail": "<what is wrong and the fix>"}`` with a 4xx status,
or 503 (``registry_unavailable``, with ``Retry-After``) when the backend cannot be
reached. Errors are RFC 9457 problems (``application/problem+json``), whose
``error`` and ``detail`` members keep the shape above. See docs/registry.md for the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from meshgate.errors import PROBLEM_MEDIA_TYPE, problem_document
from meshgate.registry.errors import (
    InvalidNameError,
    RegistryClosedError,
    RegistryUnavailableError,
)
from meshgate.registry.model import InstanceSpec, Snapshot, check_name, describe_validation_error
from meshgate.registry.store import Registry, backoff

__all__ = [
    "INDEX_HEADER",
    "MAX_BODY",
    "MAX_WAIT",
    "PREFIX",
    "create_router",
    "format_event",
    "parse_wait",
]

PREFIX = "/v1/registry"
"""Where the API is served, on the gateway's admin listener."""
INDEX_HEADER = "X-Meshgate-Index"
"""The response header that carries the snapshot's index (pass it back as ``?index=``)."""
MAX_WAIT = 300.0
"""The longest a long poll waits, in seconds, whatever ``wait`` asks for."""
DEFAULT_WAIT = 30.0
"""How long a long poll (``?index=`` without ``wait``) waits."""
MAX_BODY = 64 * 1024
"""The largest instance spec accepted, in bytes (metadata is capped at 16 KiB)."""
_RETRY_MS = 1000
_WAIT_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)?")
_WAIT_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


class _RefusedError(Exception):
    """A request the API refuses with a 4xx: carries the status, code and detail."""

    def __init__(self, status: int, error: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.extra = extra


def _error(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        problem_document(status, error, detail, **extra),
        status,
        headers=headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


class _RegistryRoute(APIRoute):
    """Translates the registry's errors into JSON answers at the boundary."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except _RefusedError as exc:
                return _error(exc.status, exc.error, exc.detail, **exc.extra)
            except InvalidNameError as exc:
                return _error(400, "invalid_name", str(exc), field=exc.field)
            except RegistryClosedError as exc:
                return _error(
                    503,
                    "registry_closed",
                    f"{exc}; the gateway is shutting down, retry against another node or "
                    "after it restarted",
                    {"Retry-After": "1"},
                )
            except RegistryUnavailableError as exc:
                return _error(503, "registry_unavailable", str(exc), {"Retry-After": "1"})

        return route


def parse_wait(value: str, cap: float = MAX_WAIT) -> float:
    """Seconds of a ``wait`` parameter (``30s``, ``500ms``, ``2m`` or plain seconds),
    capped at ``cap``; raises ValueError naming the fix."""
    match = _WAIT_RE.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"wait={value!r} is not a duration; give seconds such as 30, 30s, 500ms or 2m"
        )
    return min(float(match[1]) * _WAIT_UNITS[match[2]], cap)


def _parse_index(value: str, where: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise _RefusedError(
            400,
            "invalid_parameter",
            f"{where}={value!r} is not an index; give the non-negative integer of a previous "
            f"answer's {INDEX_HEADER} header (or an event's id)",
            parameter=where,
        )
    return int(value)


def _snapshot_response(snapshot: Snapshot) -> JSONResponse:
    return JSONResponse(snapshot.to_json(), headers={INDEX_HEADER: str(snapshot.index)})


def _not_registered(service: str, instance_id: str) -> JSONResponse:
    return _error(
        404,
        "not_registered",
        f"{service}/{instance_id} is not registered (it never was, was deregistered, or "
        "missed its TTL and was evicted); register it again with "
        f"PUT {PREFIX}/services/{service}/instances/{instance_id}",
        service=service,
        id=instance_id,
    )


async def _read_spec(request: Request) -> InstanceSpec:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise _RefusedError(
                413,
                "body_too_large",
                f"the instance spec is over {MAX_BODY} bytes; keep metadata small (at most 16 KiB)",
            )
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _RefusedError(
            400,
            "invalid_json",
            f"the body is not JSON ({exc}); send an instance spec such as "
            '{"address": "10.0.0.5:8080", "ttl": 10}',
        ) from None
    try:
        return InstanceSpec.model_validate(data)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "(body)" for e in exc.errors()})
        raise _RefusedError(
            400, "invalid_spec", describe_validation_error(exc), fields=fields
        ) from None


async def _until_disconnected(request: Request) -> None:
    """Return when the client goes away (the request has no body left to read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[Snapshot]) -> Snapshot | None:
    """``work``'s result, or None if the client disconnected first: a long poll of a
    client that is gone stops holding a watcher."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (gone, task):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
    if task.done() and not task.cancelled():
        return task.result()
    return None


def create_router(
    registry: Registry,
    authorize: Callable[[Request], None],
    *,
    keepalive: float = 15.0,
    max_wait: float = MAX_WAIT,
) -> APIRouter:
    """The registry API under ``/v1/registry`` for ``registry``; every route depends
    on ``authorize`` (which raises ``HTTPException(401)``).

    ``keepalive`` is the seconds between comment lines on an idle event stream;
    ``max_wait`` caps a long poll's ``wait``.
    """
    router = APIRouter(prefix=PREFIX, dependencies=[Depends(authorize)], route_class=_RegistryRoute)

    @router.put("/services/{service}/instances/{instance_id}")
    async def register(service: str, instance_id: str, request: Request) -> Response:
        """Register (or refresh) an instance; the body is its spec."""
        check_name(service, "service")
        check_name(instance_id, "instance id")
        spec = await _read_spec(request)
        instance = await registry.register(service, instance_id, spec)
        return JSONResponse(
            instance.model_dump(mode="json"), headers={INDEX_HEADER: str(instance.index)}
        )

    @router.put("/services/{service}/instances/{instance_id}/heartbeat")
    async def heartbeat(service: str, instance_id: str) -> Response:
        """Extend the instance's TTL; 404 ``not_registered`` when it must register again."""
        check_name(service, "service")
        check_name(instance_id, "instance id")
        instance = await registry.heartbeat(service, instance_id)
        if instance is None:
            return _not_registered(service, instance_id)
        return JSONResponse(instance.model_dump(mode="json"))

    @router.delete("/services/{service}/instances/{instance_id}")
    async def deregister(service: str, instance_id: str) -> Response:
        """Remove an instance; 404 ``not_registered`` if it was not registered."""
        check_name(service, "service")
        check_name(instance_id, "instance id")
        if not await registry.deregister(service, instance_id):
            return _not_registered(service, instance_id)
        return JSONResponse({"deregistered": True, "service": service, "id": instance_id})

    async def read(
        request: Request, service: str | None, index: str | None, wait: str | None
    ) -> Response:
        if service is not None:
            check_name(service, "service")
        if index is None:
            return _snapshot_response(await registry.snapshot(service))
        after = _parse_index(index, "index")
        try:
            seconds = DEFAULT_WAIT if wait is None else parse_wait(wait, max_wait)
        except ValueError as exc:
            raise _RefusedError(400, "invalid_parameter", str(exc), parameter="wait") from None
        snapshot = await _unless_disconnected(
            request, registry.wait(after, service, min(seconds, max_wait))
        )
        if snapshot is None:  # nobody is listening any more
            return Response(status_code=499)
        return _snapshot_response(snapshot)

    @router.get("/services")
    async def all_services(
        request: Request, index: str | None = None, wait: str | None = None
    ) -> Response:
        """Every instance of every service; with ``index``, a long poll."""
        return await read(request, None, index, wait)

    @router.get("/services/{service}")
    async def one_service(
        request: Request, service: str, index: str | None = None, wait: str | None = None
    ) -> Response:
        """The instances of ``service``; with ``index``, a long poll."""
        return await read(request, service, index, wait)

    async def stream(request: Request, service: str | None, index: str | None) -> Response:
        if service is not None:
            check_name(service, "service")
        last_event_id = request.headers.get("last-event-id")
        after: int | None = None
        # A reconnecting EventSource sends the last id it saw; it wins over the
        # (older) index in the URL it reconnects to.
        if last_event_id:
            after = _parse_index(last_event_id.strip(), "Last-Event-ID")
        elif index is not None:
            after = _parse_index(index, "index")
        if after is None:
            # Fail now with a status rather than inside the stream.
            await registry.snapshot(service)
        return StreamingResponse(
            _events(registry, service, after, keepalive),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.get("/watch")
    async def watch_all(request: Request, index: str | None = None) -> Response:
        """Server-sent events: one per new state of the registry."""
        return await stream(request, None, index)

    @router.get("/services/{service}/watch")
    async def watch_one(request: Request, service: str, index: str | None = None) -> Response:
        """Server-sent events: one per new state of ``service``."""
        return await stream(request, service, index)

    return router


def format_event(snapshot: Snapshot) -> str:
    """One server-sent event: the snapshot's index as its id, its JSON as data."""
    data = json.dumps(snapshot.to_json(), separators=(",", ":"))
    return f"id: {snapshot.index}\ndata: {data}\n\n"


async def _events(
    registry: Registry, service: str | None, index: int | None, keepalive: float
) -> AsyncIterator[str]:
    """The event stream: the current state (unless ``index`` is given), then every
    new state, with a comment line every ``keepalive`` seconds of quiet. Rides out an
    unavailable backend; ends when the registry closes (the client reconnects)."""
    yield f"retry: {_RETRY_MS}\n\n"
    failures = 0
    while True:
        try:
            if index is None:
                snapshot = await registry.snapshot(service)
            else:
                snapshot = await registry.wait(index, service, keepalive)
        except RegistryClosedError:
            return
        except RegistryUnavailableError as exc:
            failures += 1
            reason = " ".join(str(exc).split())  # one line: a comment cannot span lines
            yield f": registry unavailable, retrying: {reason}\n\n"
            await asyncio.sleep(backoff(failures, cap=min(keepalive, 5.0)))
            continue
        failures = 0
        if snapshot.index != index:
            index = snapshot.index
            yield format_event(snapshot)
        else:
            yield ": keep-alive\n\n"
