"""The admin API, served by the supervisor on its own (loopback) listener.

Every endpoint requires ``Authorization: Bearer <token>``, or the session cookie
of the dashboard (``/ui``), whose login page takes the token. When no token is
configured one is generated and written to a file only its owner can read.

It also serves observability (:mod:`meshgate.observability`): the OTLP receiver
processes export to, the query API, the dashboard and Prometheus HTTP SD.
"""

from __future__ import annotations

import hmac
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from meshgate.config.loader import loads
from meshgate.config.secrets import public_dump
from meshgate.errors import PROBLEM_MEDIA_TYPE, ConfigError, problem_document
from meshgate.gateway.metrics import GatewayCollector
from meshgate.gateway.tokens import AdminToken
from meshgate.observability.auth import AdminAuth
from meshgate.observability.mount import create_admin_router
from meshgate.observability.prometheus import GatewayTarget
from meshgate.observability.store import TelemetryStore
from meshgate.registry.api import create_router
from meshgate.registry.metrics import RegistryMetrics

if TYPE_CHECKING:
    from meshgate.config import Config
    from meshgate.registry.store import Registry

__all__ = ["AdminBackend", "AdminToken", "create_admin_app", "install_problems"]

log = logging.getLogger("meshgate.admin")


class AdminBackend(Protocol):
    """What the admin API asks of the gateway it manages (the supervisor)."""

    @property
    def config(self) -> Config:
        """The configuration in effect."""
        ...

    @property
    def admin_port(self) -> int:
        """The admin listener's port (0 before it listens)."""
        ...

    def status(self) -> dict[str, Any]:
        """``GET /status``."""
        ...

    async def metrics(self) -> dict[str, Any]:
        """Every worker's metrics, merged."""
        ...

    async def apply(self, text: str) -> dict[str, Any]:
        """Validate a configuration and swap it in (``POST /config``)."""
        ...

    async def reload_file(self) -> dict[str, Any]:
        """Re-read the configuration file and apply it (``POST /reload``)."""
        ...

    async def upstreams(self) -> dict[str, Any]:
        """Every upstream's state (``GET /upstreams``)."""
        ...

    def set_drained(self, upstream: str, label: str, drained: bool) -> None:
        """Take an endpoint out of rotation, or put it back."""
        ...


async def _body_text(request: Request) -> str:
    """The request body as text (a configuration in YAML or JSON)."""
    # Module level on purpose: FastAPI resolves the string annotations of the
    # endpoints against module globals, where a closure-local dependency is invisible.
    body = await request.body()
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "the configuration must be UTF-8 YAML or JSON") from None


def _bearer(request: Request) -> bytes:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip().encode() if scheme.lower() == "bearer" else b""


def _gateway_target(supervisor: AdminBackend) -> GatewayTarget | None:
    """Where Prometheus reaches the admin listener's /metrics."""
    admin = supervisor.config.gateway.admin
    if not supervisor.admin_port:
        return None
    host = admin.listen.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return GatewayTarget(
        f"{host}:{supervisor.admin_port}", "https" if admin.tls is not None else "http"
    )


def _refused(status: int, code: str, detail: str, **members: Any) -> JSONResponse:
    """An RFC 9457 problem of the admin API; ``ok: false`` kept for older clients."""
    body = problem_document(status, code, detail, ok=False, **members)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)


def _outcome(result: dict[str, Any]) -> JSONResponse:
    """A configuration change's result: as is when it applied, else a 400 problem
    whose ``detail`` is the reason (the old configuration keeps serving)."""
    if result.get("ok"):
        return JSONResponse(result)
    members = {k: v for k, v in result.items() if k not in ("ok", "error")}
    detail = str(result.get("error") or "the configuration was not applied")
    return _refused(400, "invalid_config", detail, **members)


def install_problems(app: FastAPI) -> None:
    """Answer every error of a control-plane app with an RFC 9457 problem: HTTP
    exceptions (401 without the token, 404, 405), invalid requests (422) and
    anything unhandled (500, its traceback logged, nothing of it in the answer)."""

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101 - registered for it
        status = exc.status_code
        if status == 404 and "route" not in request.scope:
            detail = f"no admin endpoint {request.method} {request.url.path}"
        else:
            detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
        code = _CODES.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "_")
        body = problem_document(status, code, detail, instance=request.url.path)
        return JSONResponse(
            body, status_code=status, headers=exc.headers, media_type=PROBLEM_MEDIA_TYPE
        )

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)  # noqa: S101 - registered for it
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
        body = problem_document(
            422, "validation_failed", detail, instance=request.url.path, errors=errors
        )
        return JSONResponse(body, status_code=422, media_type=PROBLEM_MEDIA_TYPE)

    async def unhandled(request: Request, exc: Exception) -> Response:
        log.error("admin API %s %s failed", request.method, request.url.path, exc_info=exc)
        body = problem_document(
            500,
            "internal_error",
            "an unexpected error occurred in the admin API; it was logged",
            instance=request.url.path,
        )
        return JSONResponse(body, status_code=500, media_type=PROBLEM_MEDIA_TYPE)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unhandled)


_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}


def create_admin_app(
    supervisor: AdminBackend,
    token: AdminToken,
    *,
    registry: Registry | None = None,
    registry_token: AdminToken | None = None,
    telemetry: TelemetryStore | None = None,
) -> FastAPI:
    """The admin API for ``supervisor``, requiring ``token``; with ``registry``, also
    the registry API (``/v1/registry``), which takes ``registry_token`` as well; and
    observability over ``telemetry`` (a new store when None; ``app.state.telemetry``)."""
    expected = token.value.encode()
    authorized = AdminAuth(token.value)

    app = FastAPI(
        title="meshgate admin", version="1", docs_url=None, redoc_url=None, openapi_url=None
    )
    install_problems(app)
    admin = APIRouter(dependencies=[Depends(authorized)])

    @admin.get("/status")
    async def status() -> dict[str, Any]:
        return supervisor.status()

    registry_metrics = RegistryMetrics(registry) if registry is not None else None

    @admin.get("/metrics")
    async def metrics() -> PlainTextResponse:
        data = await supervisor.metrics()
        families = CollectorRegistry(auto_describe=False)
        families.register(GatewayCollector(lambda: data))
        if registry_metrics is not None:
            families.register(await registry_metrics.read())
        return PlainTextResponse(generate_latest(families), media_type=CONTENT_TYPE_LATEST)

    @admin.get("/config")
    async def config() -> dict[str, Any]:
        # Every secret-typed field masked (tokens, URL passwords, credentials that
        # header rules add), whatever the value looks like.
        shown: dict[str, Any] = public_dump(supervisor.config)
        return shown

    @admin.post("/config/validate")
    async def validate(text: Annotated[str, Depends(_body_text)]) -> JSONResponse:
        try:
            loads(text, "request body")
        except ConfigError as exc:
            return _refused(400, "invalid_config", str(exc), issues=[str(i) for i in exc.issues])
        return JSONResponse({"ok": True})

    @admin.post("/config")
    async def apply(text: Annotated[str, Depends(_body_text)]) -> JSONResponse:
        return _outcome(await supervisor.apply(text))

    @admin.post("/reload")
    async def reload() -> JSONResponse:
        return _outcome(await supervisor.reload_file())

    @admin.get("/upstreams")
    async def upstreams() -> dict[str, Any]:
        return await supervisor.upstreams()

    def _endpoint_change(upstream: str, endpoint: str, drained: bool) -> JSONResponse:
        try:
            supervisor.set_drained(upstream, endpoint, drained)
        except KeyError:
            known = {
                name: [str(e.address) for e in up.endpoints]
                for name, up in supervisor.config.upstreams.items()
            }
            return _refused(
                404,
                "no_such_endpoint",
                f"no endpoint {endpoint!r} in upstream {upstream!r}; known endpoints: {known}",
            )
        return JSONResponse(
            {"ok": True, "upstream": upstream, "endpoint": endpoint, "drained": drained}
        )

    @admin.post("/upstreams/{upstream}/endpoints/{endpoint}/drain")
    async def drain(upstream: str, endpoint: str) -> JSONResponse:
        """Take an endpoint out of rotation; requests in flight on it finish."""
        return _endpoint_change(upstream, endpoint, True)

    @admin.post("/upstreams/{upstream}/endpoints/{endpoint}/enable")
    async def enable(upstream: str, endpoint: str) -> JSONResponse:
        """Put a drained endpoint back into rotation."""
        return _endpoint_change(upstream, endpoint, False)

    app.include_router(admin)
    exporters: Any = authorized
    if registry is not None:
        service_token = registry_token.value.encode() if registry_token is not None else expected

        def registry_authorized(request: Request) -> None:
            if authorized.session_allows(request):
                return  # the dashboard reads instances
            given = _bearer(request)
            # Both comparisons always run: the time taken tells nothing.
            admin_ok = hmac.compare_digest(given, expected)
            service_ok = hmac.compare_digest(given, service_token)
            if not (admin_ok or service_ok):
                raise HTTPException(
                    status_code=401,
                    detail="missing or wrong registry token; send 'Authorization: Bearer "
                    "<token>' with the token from the registry token file "
                    "(MESHGATE_REGISTRY_TOKEN for services)",
                    headers={"WWW-Authenticate": 'Bearer realm="meshgate-registry"'},
                )

        app.include_router(create_router(registry, registry_authorized))
        exporters = registry_authorized
    app.state.telemetry = telemetry if telemetry is not None else TelemetryStore()
    app.include_router(
        create_admin_router(
            app.state.telemetry,
            authorized,
            exporters=exporters,
            registry=registry,
            gateway=lambda: _gateway_target(supervisor),
        )
    )
    return app
