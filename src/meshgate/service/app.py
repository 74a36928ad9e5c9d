"""``Service``: a FastAPI app that is a good citizen of a meshgate system.

``Service("users", database=Database(url))`` gives ``service.app``, a FastAPI app
with:

- ``/health/live`` (the process answers) and ``/health/ready`` (its own
  dependencies answer: database, cache and any check added with
  :meth:`Service.add_check`; 503 naming the one that is down, or while draining);
- ``/metrics`` in the Prometheus format (requests, latency, in flight, and the
  data layer's metrics);
- the request's id (``X-Request-ID``), W3C trace context (``traceparent``),
  deadline and calling service taken from each request and made available to the
  code handling it and to :meth:`Service.client` calls it makes;
- a 503 with a clear body when the database or cache goes away mid-request, and
  a 504 when the caller's deadline has passed;
- registration in the registry once ready, heartbeats, and on SIGTERM: leave the
  registry, wait for the gateways to stop sending, finish what is in flight, exit
  (:meth:`Service.serve`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from meshgate.errors import MeshgateError
from meshgate.service.context import (
    DEADLINE_HEADER,
    TraceContext,
    current_caller,
    current_deadline,
    current_request_id,
    current_trace,
    parse_deadline,
)
from meshgate.service.identity import IDENTITY_HEADER, IdentityError, verify_identity

if TYPE_CHECKING:
    from meshgate.data import Cache, Database
    from meshgate.events import Events
    from meshgate.service.client import ServiceClient

__all__ = ["Check", "Service"]

log = logging.getLogger("meshgate.service")

Check = Callable[[], Awaitable[object]]
"""A readiness check: returns (anything) when the dependency answers, raises when not."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_CHECK_TIMEOUT = 2.0
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def _json_error(status: int, error: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status)


class Service:
    """One service: its FastAPI app, dependencies, registration and clients."""

    def __init__(
        self,
        name: str,
        *,
        version: str = "0.0.0",
        database: Database | None = None,
        cache: Cache | None = None,
        registry: str | None = None,
        registry_token: str | None = None,
        secret: str | None = None,
        zone: str | None = None,
        metadata: dict[str, str] | None = None,
        ttl: float = 10.0,
        drain_timeout: float = 10.0,
        deregister_delay: float = 1.0,
    ) -> None:
        """
        Args:
            name: the service's name in the registry (``users``).
            version: reported in the registry and the OpenAPI document.
            database: its database; checked by ``/health/ready``, closed on exit.
            cache: its cache; checked by ``/health/ready``, closed on exit.
            registry: the registry's URL (``MESHGATE_REGISTRY_URL``); without
                one the service does not register.
            registry_token: the registry's bearer token (``MESHGATE_REGISTRY_TOKEN``).
            secret: the shared secret of service identity tokens
                (``MESHGATE_SERVICE_SECRET``); without one, calls carry no identity.
            zone: where the instance runs (``MESHGATE_ZONE``), for the registry.
            metadata: extra registry metadata.
            ttl: the registration's time to live; heartbeats come every third of it.
            drain_timeout: how long requests in flight may take to finish on exit.
            deregister_delay: how long to keep serving after leaving the registry,
                so that gateways and clients stop sending before the listener closes.
        """
        if not _NAME_RE.match(name):
            raise MeshgateError(
                f"service name {name!r} is not valid; use letters, digits, '.', '_' and '-'"
            )
        self.name = name
        self.version = version
        self.database = database
        self.cache = cache
        self.registry_url = registry or _env("MESHGATE_REGISTRY_URL")
        self.registry_token = registry_token or _env("MESHGATE_REGISTRY_TOKEN")
        self.secret = secret or _env("MESHGATE_SERVICE_SECRET")
        self.zone = zone if zone is not None else (_env("MESHGATE_ZONE") or "")
        self.metadata = dict(metadata or {})
        self.ttl = ttl
        self.drain_timeout = drain_timeout
        self.deregister_delay = deregister_delay
        self.checks: dict[str, Check] = {}
        # check(), not ping(): a check passes by returning and fails by raising
        # the reason, which /health/ready shows.
        if database is not None:
            self.checks["database"] = database.check
        if cache is not None:
            self.checks["cache"] = cache.check
        self.address: str | None = None  # host:port once serving
        self.draining = False
        self.inflight = 0
        self._clients: dict[str, ServiceClient] = {}
        self._registration: Any = None
        self._startup: list[Callable[[], Awaitable[None]]] = []
        self._shutdown: list[Callable[[], Awaitable[None]]] = []
        self.metrics = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "meshgate_service_requests",
            "Requests handled, by method, route template and status.",
            ["service", "method", "route", "status"],
            registry=self.metrics,
        )
        self._latency = Histogram(
            "meshgate_service_request_duration_seconds",
            "Time to handle a request, by method and route template.",
            ["service", "method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.metrics,
        )
        self._inflight = Gauge(
            "meshgate_service_requests_in_flight",
            "Requests being handled.",
            ["service"],
            registry=self.metrics,
        )
        self._ready_gauge = Gauge(
            "meshgate_service_ready",
            "1 when the last readiness check passed.",
            ["service"],
            registry=self.metrics,
        )
        self.app = FastAPI(title=name, version=version, lifespan=self._lifespan)
        self.app.state.service = self
        self._add_routes()
        self._add_error_handlers()
        self.app.add_middleware(_ContextMiddleware, service=self)

    # -- configuration

    def add_check(self, name: str, check: Check) -> None:
        """Make ``/health/ready`` also depend on ``check`` (a broker, another store)."""
        self.checks[name] = check

    def on_startup(self, func: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Run ``func`` when the service starts, before it registers (a decorator)."""
        self._startup.append(func)
        return func

    def on_shutdown(self, func: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Run ``func`` when the service stops, after requests in flight finished."""
        self._shutdown.append(func)
        return func

    def client(self, service: str, **options: Any) -> ServiceClient:
        """A client for calling ``service`` (discovered through the registry); one
        per service name, shared, closed when this service stops."""
        from meshgate.service.client import ServiceClient  # noqa: PLC0415

        existing = self._clients.get(service)
        if existing is None:
            existing = ServiceClient(
                service,
                registry=self.registry_url,
                registry_token=self.registry_token,
                caller=self.name,
                secret=self.secret,
                **options,
            )
            self._clients[service] = existing
        return existing

    # -- events (the integration is meshgate.events.service; this is only its door)

    @property
    def events(self) -> Events:
        """This service's events: publish through the outbox in a transaction
        (``await service.events.publish(session, topic, payload, key=...)``), handle
        with :meth:`on`, run sagas. Made on first use; started and stopped with the
        service; its readiness detail is under the ``events`` check. docs/events.md."""
        from meshgate.events.service import events_of  # noqa: PLC0415 - optional part

        return events_of(self)

    def on(self, topic: str, *, group: str | None = None, **options: Any) -> Any:
        """Declare a handler of ``topic`` for consumer ``group`` (default: this
        service's name), applied once per event: see :meth:`Events.on`."""
        return self.events.on(topic, group=group, **options)

    # -- health

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Run every check at once; (all passed, each check's outcome)."""

        async def run(check: Check) -> dict[str, Any]:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(_CHECK_TIMEOUT):
                    answer = await check()
            except TimeoutError:
                return {"ok": False, "error": f"no answer within {_CHECK_TIMEOUT:g}s"}
            except Exception as exc:  # noqa: BLE001 - any failure is "not ready", with its reason
                return {"ok": False, "error": str(exc) or type(exc).__name__}
            outcome: dict[str, Any] = {
                "ok": True,
                "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            }
            if isinstance(answer, dict):  # a check may say more (the events' lag)
                outcome["detail"] = answer
            return outcome

        names = list(self.checks)
        results = await asyncio.gather(*(run(self.checks[n]) for n in names))
        outcome = dict(zip(names, results, strict=True))
        ready = all(r["ok"] for r in results)
        self._ready_gauge.labels(self.name).set(1 if ready and not self.draining else 0)
        return ready, outcome

    def _add_routes(self) -> None:
        app = self.app

        @app.get("/health/live", include_in_schema=False)
        async def live() -> dict[str, str]:
            return {"status": "live", "service": self.name}

        @app.get("/health/ready", include_in_schema=False)
        async def ready() -> JSONResponse:
            ok, checks = await self.readiness()
            if self.draining:
                status = "draining"
            elif ok:
                status = "ready"
            else:
                status = "not_ready"
            body = {"status": status, "service": self.name, "checks": checks}
            return JSONResponse(body, status_code=200 if status == "ready" else 503)

        @app.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            # The service's own metrics, then the process-wide ones: the data layer's
            # pools, queries and cache, and the process (CPU, memory, file descriptors).
            body = generate_latest(self.metrics) + generate_latest(REGISTRY)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

    def _add_error_handlers(self) -> None:
        from meshgate.data.errors import (  # noqa: PLC0415 - optional dependency
            CacheUnavailableError,
            DatabaseUnavailableError,
            DataError,
        )
        from meshgate.service.client import (  # noqa: PLC0415
            DeadlineExceededError,
            ServiceUnavailableError,
        )

        async def data_error(request: Request, exc: Exception) -> JSONResponse:
            assert isinstance(exc, DataError)  # noqa: S101 - registered for DataError only
            if isinstance(exc, DatabaseUnavailableError):
                error, dependency = "dependency_unavailable", "database"
            elif isinstance(exc, CacheUnavailableError):
                error, dependency = "dependency_unavailable", "cache"
            else:
                error, dependency = "data_error", "database"
            log.warning("%s: %s", dependency, exc)
            return _json_error(exc.status, error, str(exc), dependency=dependency)

        async def unavailable(request: Request, exc: Exception) -> JSONResponse:
            log.warning("%s", exc)
            return _json_error(503, "dependency_unavailable", str(exc))

        async def deadline(request: Request, exc: Exception) -> JSONResponse:
            return _json_error(504, "deadline_exceeded", str(exc))

        self.app.add_exception_handler(DataError, data_error)
        self.app.add_exception_handler(ServiceUnavailableError, unavailable)
        self.app.add_exception_handler(DeadlineExceededError, deadline)

    # -- lifecycle

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        for func in self._startup:
            await func()
        registering = asyncio.get_running_loop().create_task(self._register_when_ready())
        try:
            yield
        finally:
            registering.cancel()
            await self.leave_registry()
            for func in self._shutdown:
                try:
                    await func()
                except Exception:
                    log.exception("a shutdown hook of %s failed", self.name)
            for client in self._clients.values():
                await client.close()
            if self.cache is not None:
                await self.cache.close()
            if self.database is not None:
                await self.database.close()

    def instance_id(self) -> str:
        """This instance's id in the registry: the service and its address."""
        address = self.address or "unbound"
        return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{self.name}-{address}")[:63]

    async def _register_when_ready(self) -> None:
        if self.registry_url is None or self.address is None:
            return
        from meshgate.registry.client import Heartbeater, RegistryClient  # noqa: PLC0415
        from meshgate.registry.model import InstanceSpec  # noqa: PLC0415

        delay = 0.05
        while True:
            ok, checks = await self.readiness()
            if ok:
                break
            failing = ", ".join(n for n, c in checks.items() if not c["ok"])
            log.info("%s not ready yet (%s); registering once it is", self.name, failing)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        client = RegistryClient(self.registry_url, self.registry_token)
        spec = InstanceSpec(
            address=self.address,
            version=self.version,
            zone=self.zone,
            metadata=self.metadata,
            ttl=self.ttl,
        )
        heartbeater = Heartbeater(client, self.name, self.instance_id(), spec)
        self._registration = (client, heartbeater)
        await heartbeater.start()
        log.info("%s registered as %s at %s", self.name, self.instance_id(), self.address)

    async def leave_registry(self) -> None:
        """Deregister (once); requests keep being served."""
        registration, self._registration = self._registration, None
        if registration is None:
            return
        client, heartbeater = registration
        try:
            await heartbeater.stop()
        except MeshgateError as exc:
            log.warning("could not deregister %s: %s", self.instance_id(), exc)
        finally:
            await client.close()

    async def drain(self) -> None:
        """Leave the registry, then give gateways and clients time to notice: the
        first half of a graceful stop (the server then finishes what is in flight)."""
        if self.draining:
            return
        self.draining = True
        self._ready_gauge.labels(self.name).set(0)
        await self.leave_registry()
        await asyncio.sleep(self.deregister_delay)

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        advertise: str | None = None,
        log_level: str = "warning",
    ) -> None:
        """Serve until SIGTERM or SIGINT, then drain (see :meth:`drain`) and stop.

        ``advertise`` is the address registered (default: the bound one, or
        ``MESHGATE_ADVERTISE_ADDRESS``).
        """
        if sock is None:
            sock = socket.create_server((host, port), reuse_port=False)
        server = self.server(sock, advertise=advertise, log_level=log_level)
        await server.serve([sock])

    def server(
        self, sock: socket.socket, *, advertise: str | None = None, log_level: str = "warning"
    ) -> uvicorn.Server:
        """The uvicorn server :meth:`serve` runs on ``sock`` (for embedding: call its
        ``serve([sock])``; its ``handle_exit`` drains like SIGTERM)."""
        bound = sock.getsockname()
        self.address = advertise or _env("MESHGATE_ADVERTISE_ADDRESS") or f"{bound[0]}:{bound[1]}"
        config = uvicorn.Config(
            self.app,
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=int(self.drain_timeout) or 1,
            loop="none",
            lifespan="on",
        )
        return _DrainingServer(config, self)

    def caller_in(self, *services: str) -> Callable[[], Awaitable[str]]:
        """A FastAPI dependency that admits only calls from ``services`` (proved by
        their identity token) and gives the caller's name::

            @app.delete("/users/{id}")
            async def delete(id: int, caller: str = Depends(service.caller_in("web"))): ...
        """
        allowed = frozenset(services)

        async def dependency() -> str:
            caller = current_caller.get()
            if caller is None:
                raise HTTPException(
                    401,
                    f"only the services {', '.join(sorted(allowed))} may call this; "
                    "the request carries no service identity",
                )
            if caller not in allowed:
                raise HTTPException(403, f"service {caller!r} may not call this")
            return caller

        return dependency


class _DrainingServer(uvicorn.Server):
    """uvicorn, with a drain (see :meth:`Service.drain`) before the listener closes
    on the first stop signal; a second one stops at once."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._drain is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._drain = asyncio.get_running_loop().create_task(self.service.drain())
        self._drain.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("draining failed: %s", task.exception())
        self.should_exit = True


class _ContextMiddleware:
    """Per request: id, trace, deadline and caller into context; metrics; refusals."""

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], service: Service
    ) -> None:
        self.app = app
        self.service = service

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
        parent = TraceContext.parse(headers.get(b"traceparent", b"").decode("latin-1"))
        trace = parent.child() if parent is not None else TraceContext.new()
        deadline = parse_deadline(headers.get(DEADLINE_HEADER.lower().encode(), b"").decode())
        tokens = [
            current_request_id.set(request_id),
            current_trace.set(trace),
            current_deadline.set(deadline),
        ]
        caller: str | None = None
        refusal: JSONResponse | None = None
        identity = headers.get(IDENTITY_HEADER.lower().encode())
        if identity is not None:
            if service.secret is None:
                refusal = _json_error(
                    401,
                    "identity_not_configured",
                    f"{service.name} has no MESHGATE_SERVICE_SECRET to verify the "
                    "calling service's identity",
                )
            else:
                try:
                    caller = verify_identity(
                        identity.decode("latin-1"), audience=service.name, secret=service.secret
                    )
                except IdentityError as exc:
                    refusal = _json_error(401, "invalid_identity", str(exc))
        caller_token = current_caller.set(caller)
        if refusal is None and deadline is not None and deadline <= time.monotonic():
            refusal = _json_error(
                504, "deadline_exceeded", "the caller's deadline passed before the request arrived"
            )
        status = 500
        rid = request_id.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
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
        finally:
            service.inflight -= 1
            gauge.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or "(unmatched)"
            method = scope.get("method", "")
            service._requests.labels(service.name, method, template, str(status)).inc()
            service._latency.labels(service.name, method, template).observe(
                time.perf_counter() - started
            )
            current_caller.reset(caller_token)
            current_deadline.reset(tokens[2])  # type: ignore[arg-type]
            current_trace.reset(tokens[1])  # type: ignore[arg-type]
            current_request_id.reset(tokens[0])  # type: ignore[arg-type]
