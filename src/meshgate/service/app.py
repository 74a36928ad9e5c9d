"""``Service``: a FastAPI app that is a good citizen of a meshgate system.

``Service("users", database=Database(url))`` gives ``service.app``, a FastAPI app
with:

- ``/health/live`` (the process answers) and ``/health/ready`` (its own
  dependencies answer: database, cache and any check added with
  :meth:`Service.add_check`; 503 naming the one that is down, or while draining;
  see :mod:`meshgate.service.readiness`);
- a database that names its migrations checked before the service starts: at
  their head revision, or migrated when ``migrate`` is on, or a clear refusal;
- ``/metrics`` in the Prometheus format (requests, latency, in flight, and the
  data layer's and the service clients' metrics);
- the request's id (``X-Request-ID``), W3C trace context (``traceparent``),
  deadline and calling service taken from each request and made available to the
  code handling it and to :meth:`Service.client` calls it makes;
- OpenTelemetry traces (a server span per request, spans of its queries, cache and
  service calls) exported as OTLP when an endpoint is set
  (:mod:`meshgate.service.telemetry`);
- every error answered as an RFC 9457 problem (``application/problem+json``, see
  :mod:`meshgate.service.problems`), documented in its OpenAPI: a 503 naming the
  database or cache that went away mid-request, a 504 when the caller's deadline
  has passed, a 500 for anything unhandled (its traceback logged with the request
  id), and the validation errors, 404s and 405s of FastAPI;
- an access log line per request (:mod:`meshgate.service.middleware`);
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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
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
from starlette.types import ASGIApp

from meshgate.errors import MeshgateError
from meshgate.service import logs, problems
from meshgate.service.context import current_caller
from meshgate.service.errors import ServiceStartupError
from meshgate.service.middleware import ServiceMiddleware
from meshgate.service.problems import ProblemError
from meshgate.service.readiness import Check, prepare_database, run_checks
from meshgate.service.telemetry import Telemetry, fastapi_options

if TYPE_CHECKING:
    from meshgate.data import Cache, Database
    from meshgate.events import Events
    from meshgate.service.client import ServiceClient

__all__ = ["Check", "Service"]

log = logging.getLogger("meshgate.service")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


class _ServiceApp(FastAPI):
    """FastAPI, with the service's middleware outside all others (FastAPI's error
    middleware included: see :mod:`meshgate.service.middleware`), and an OpenAPI
    document whose errors are problems (:func:`meshgate.service.problems.document`)."""

    service: Service

    def build_middleware_stack(self) -> ASGIApp:
        # Built when the app gets its first message (the lifespan's startup): the
        # tracer provider is made then, not when the module is imported.
        self.service.telemetry.start()
        return ServiceMiddleware(super().build_middleware_stack(), self.service)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = problems.document(super().openapi())
        return self.openapi_schema


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
        migrate: bool | None = None,
        trace_ratio: float | None = None,
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
            migrate: when the database names its ``migrations`` and is not at their
                head when the service starts, upgrade it (True) or refuse to start
                (False); None: ``MESHGATE_MIGRATE`` (``1``, ``true``, ``yes``), else False.
            trace_ratio: the share of new traces (requests without a sampled or
                unsampled ``traceparent``) that are traced, from 0 to 1; None:
                ``OTEL_TRACES_SAMPLER_ARG``, else 0.01. Traces are exported when
                ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (see
                :mod:`meshgate.service.telemetry`).
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
        if migrate is None:
            migrate = (_env("MESHGATE_MIGRATE") or "").lower() in ("1", "true", "yes")
        self.migrate = migrate
        self._prepared = False
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
        self.telemetry = Telemetry(self, ratio=trace_ratio)
        """Its traces (see :mod:`meshgate.service.telemetry`)."""
        self.metrics = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "meshgate_service_requests",
            "Requests handled, by method, route template and status code.",
            ["service", "method", "route", "code"],
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
        app = _ServiceApp(
            title=name,
            version=version,
            lifespan=self._lifespan,
            responses=problems.DEFAULT_RESPONSES,
            **fastapi_options(),
        )
        app.service = self
        app.state.service = self
        self.app: FastAPI = app
        self._add_routes()
        problems.install(self.app, log)

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
            options.setdefault("telemetry", self.telemetry)
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
        ready, outcome = await run_checks(self.checks)
        self._ready_gauge.labels(self.name).set(1 if ready and not self.draining else 0)
        return ready, outcome

    async def prepare(self) -> None:
        """What must hold before the service starts (once; the startup runs it): its
        database at the head of its migrations, or migrated when ``migrate`` is on.

        Raises:
            ServiceStartupError: it may not start, saying why and what to do.
        """
        if self._prepared:
            return
        if self.database is not None:
            await prepare_database(self.name, self.database, migrate=self.migrate)
            if self.migrate:
                await self._migrate_events()
        self._prepared = True

    async def _migrate_events(self) -> None:
        """With ``migrate`` on, the event tables (outbox, inbox, sagas) of a service
        that uses events are brought to their head too, as ``meshgate db upgrade``
        does: a service that lost its database starts again with all of them."""
        from meshgate.events.service import attached  # noqa: PLC0415 - only if used

        events = attached(self)
        if events is None or self.database is None:
            return
        from meshgate.data.errors import DataError  # noqa: PLC0415
        from meshgate.events import migrations  # noqa: PLC0415

        try:
            await asyncio.to_thread(migrations.upgrade, self.database, prefix=events.tables.prefix)
        except DataError as exc:
            raise ServiceStartupError(
                f"{self.name} cannot start: migrating the event tables of database "
                f"{self.database.name!r} failed: {exc}"
            ) from None

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
            # pools, queries and cache, the clients' calls, retries, breakers and
            # budgets, and the process (CPU, memory, file descriptors).
            body = generate_latest(self.metrics) + generate_latest(REGISTRY)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

    # -- lifecycle

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await self.prepare()
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
        said = ""
        while True:
            ok, checks = await self.readiness()
            if ok:
                break
            failing = "; ".join(f"{n}: {c.get('error')}" for n, c in checks.items() if not c["ok"])
            if failing != said:  # once per reason, not once per check
                log.info("%s not ready yet (%s); registering once it is", self.name, failing)
                said = failing
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
        # When the registry cannot be reached, start() returns and keeps trying in
        # the background: "registered" is said once it has succeeded.
        await heartbeater.wait_registered()
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

        Raises:
            ServiceStartupError: the service may not start (see :meth:`prepare`);
                raised before it listens.
        """
        await self.prepare()
        self.telemetry.own_process()
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
        logs.set_instance(os.environ.get("MESHGATE_INSTANCE") or self.instance_id())
        config = uvicorn.Config(
            self.app,
            log_level=log_level,
            # uvicorn's records go to the root logger, JSON once configure_logging ran;
            # its default configuration would give them handlers and a format of
            # their own. The access log is the SDK's (meshgate.access).
            log_config=None,
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
                raise ProblemError(
                    401,
                    f"only the services {', '.join(sorted(allowed))} may call this; "
                    "the request carries no service identity",
                    code="identity_required",
                )
            if caller not in allowed:
                raise ProblemError(
                    403,
                    f"service {caller!r} may not call this; only {', '.join(sorted(allowed))} may",
                    code="caller_forbidden",
                )
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
