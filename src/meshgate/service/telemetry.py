"""OpenTelemetry traces of a service: the SDK, its instrumentations, and where spans go.

Each :class:`~meshgate.service.Service` has a :class:`Telemetry` (``service.telemetry``),
started when its app starts. Tracing is **on** when an OTLP endpoint is known, read as
the OpenTelemetry SDKs read it: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as is),
else ``OTEL_EXPORTER_OTLP_ENDPOINT`` with ``/v1/traces`` appended (``meshgate up`` sets
it for every process). Then:

- every request gets a SERVER span (:meth:`Telemetry.server_context`, started by the
  service's middleware), named and tagged with its route template (``http.route``),
  its parent taken from ``traceparent``. It is made with the SDK's tracer here rather
  than by the ASGI instrumentation, which cost four times as much per request (about
  110 µs against 25 µs in-process: it collects a dozen attributes by scanning the
  headers for each, sets them twice, and records two histograms); FastAPI's own
  server spans are turned off (:func:`fastapi_options`), as they would be a second;
- every SQL statement of the service's database gets a CLIENT span (the SQLAlchemy
  instrumentation): the statement as sent, with its placeholders, never the values
  bound to them;
- cache calls get spans (:mod:`meshgate.data.cache`), and calls through
  :meth:`Service.client` a CLIENT span each (:mod:`meshgate.service.client`) with
  ``traceparent`` sent on;
- ``meshgate serve`` also makes the service's tracer provider the process's, so that
  the code's own spans (``trace.get_tracer(...)``) and its httpx calls (the httpx
  instrumentation) land in the same traces.

Sampling is parent-based: a request whose ``traceparent`` says sampled is traced, one
that says not sampled is not, and a new trace is sampled with the ratio
``Service(trace_ratio=...)``, else ``OTEL_TRACES_SAMPLER_ARG``, else
:data:`DEFAULT_RATIO`. A CLIENT span that starts a trace (a registry heartbeat, a
query outside any request) is never sampled: it would be a trace of one span. Spans
are exported in batches (``BatchSpanProcessor``) by a thread, as OTLP/HTTP protobuf,
with the headers of ``OTEL_EXPORTER_OTLP_HEADERS``.

A request whose answer turns out to be a 5xx is *not* kept when its trace was not
sampled: the decision is made when the trace starts (head sampling), before the
outcome is known, and a service cannot take it back for spans its callees have
already dropped. The gateway traces every 5xx it answers (``tracing.errors``), so
the failing request's gateway spans are there; to keep whole traces of errors, sample
everything and let a collector with tail sampling choose.

**Off** (no endpoint, ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``): no
provider, no exporter, no span is made. The trace context still passes through: a
request's ``traceparent`` is what its log lines show and what its calls send on
(unchanged), and a request without one gets a trace id of its own, not sampled.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from meshgate.config.secrets import mask_url
from meshgate.service.context import TraceContext

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from starlette.types import Scope

    from meshgate.data import Cache, Database
    from meshgate.service.app import Service

__all__ = ["DEFAULT_RATIO", "Telemetry", "TraceSettings", "trace_settings"]

log = logging.getLogger("meshgate.service.telemetry")

DEFAULT_RATIO = 0.01
"""The share of new traces sampled when nothing says otherwise (the gateway's too)."""

QUIET_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})
"""Probes and scrapes: they come all the time and say nothing about a request."""
_TRACE_HEADERS = (b"traceparent", b"tracestate", b"baggage")
_TRUE = frozenset({"1", "true", "yes", "on"})
_SDK_LOGGERS = (
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace",
)
"""The SDK's loggers that say, per batch or per span, that the collector is away."""
_INSTRUMENTATIONS = ("opentelemetry.instrumentation.sqlalchemy",)
_DISTRIBUTIONS = {
    "opentelemetry.sdk": "opentelemetry-sdk",
    "opentelemetry.exporter.otlp.proto.http": "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry.instrumentation.sqlalchemy": "opentelemetry-instrumentation-sqlalchemy",
    "opentelemetry.instrumentation.httpx": "opentelemetry-instrumentation-httpx",
    "opentelemetry.instrumentation": "opentelemetry-instrumentation",
}


@dataclass(frozen=True, slots=True)
class TraceSettings:
    """Where a service's spans go and how many: what :func:`trace_settings` read."""

    endpoint: str | None
    """The URL spans are posted to (``.../v1/traces``); None: tracing is off."""
    ratio: float
    """The share of new traces that are sampled."""
    off: str = ""
    """Why tracing is off (empty when it is on)."""


def trace_settings(
    ratio: float | None = None, env: Mapping[str, str] | None = None
) -> TraceSettings:
    """The trace settings of a service from the standard OpenTelemetry variables.

    ``ratio`` (the service's own setting) wins over ``OTEL_TRACES_SAMPLER_ARG``; a
    ratio that is not a number from 0 to 1 is refused with a warning naming it, and
    the default used.
    """
    environ = os.environ if env is None else env
    if ratio is None:
        raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        ratio = DEFAULT_RATIO
        if raw:
            try:
                ratio = float(raw)
            except ValueError:
                ratio = -1.0
            if not 0.0 <= ratio <= 1.0:
                log.warning(
                    "OTEL_TRACES_SAMPLER_ARG=%r is not a ratio from 0 to 1; sampling %g instead",
                    raw,
                    DEFAULT_RATIO,
                )
                ratio = DEFAULT_RATIO
    elif not 0.0 <= ratio <= 1.0:
        raise ValueError(f"trace_ratio must be from 0 to 1, got {ratio!r}")
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return TraceSettings(None, ratio, "OTEL_SDK_DISABLED is set")
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter == "none":
        return TraceSettings(None, ratio, "OTEL_TRACES_EXPORTER is none")
    if exporter != "otlp":
        log.warning(
            "OTEL_TRACES_EXPORTER=%r: meshgate services export with otlp (HTTP) only; "
            "traces are off",
            exporter,
        )
        return TraceSettings(None, ratio, f"OTEL_TRACES_EXPORTER is {exporter!r}")
    direct = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if direct:
        return TraceSettings(direct, ratio)
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base:
        return TraceSettings(base.rstrip("/") + "/v1/traces", ratio)
    return TraceSettings(None, ratio, "no OTEL_EXPORTER_OTLP_ENDPOINT")


def fastapi_options() -> dict[str, Any]:
    """Keyword arguments for ``FastAPI(...)`` that turn its own server spans off: from
    0.16x FastAPI makes them itself once a tracer provider is set (``meshgate serve``
    sets one), and they would be a second SERVER span around the service's."""
    return dict(_FASTAPI_OPTIONS)


_FASTAPI_OPTIONS: dict[str, Any] = (
    {"telemetry": {"tracing": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


class _Sampler:
    """``ParentBased(TraceIdRatioBased(ratio))``, except that a CLIENT span without a
    parent is dropped (see the module documentation). Built on first use of the SDK."""

    def __init__(self, ratio: float) -> None:
        from opentelemetry.sdk.trace.sampling import (  # noqa: PLC0415
            Decision,
            ParentBased,
            SamplingResult,
            TraceIdRatioBased,
        )

        self._inner = ParentBased(TraceIdRatioBased(ratio))
        self._drop = SamplingResult(Decision.DROP)

    def should_sample(  # noqa: PLR0917 - the SDK calls samplers with positional arguments
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> Any:
        if (
            kind is trace.SpanKind.CLIENT
            and not trace.get_current_span(parent_context).get_span_context().is_valid
        ):
            return self._drop
        return self._inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        inner = self._inner.get_description()  # type: ignore[no-untyped-call]
        return f"MeshgateSampler{{{inner}}}"


class _OncePerMinute(logging.Filter):
    """Lets a message of the SDK through once a minute (with how many were held back):
    a collector that is down would otherwise give a line per batch, or per span."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = f"{record.name}:{record.msg}"
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -60.0) < 60.0:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like it in the last minute)"
        return True


_filter = _OncePerMinute()
_process_lock = threading.Lock()
_instrumented: set[str] = set()
"""What this process instruments once, for every service in it (``httpx``)."""
_engines: weakref.WeakSet[Any] = weakref.WeakSet()
"""The SQLAlchemy engines given spans already (by whichever service came first)."""


def _quiet_sdk_logs() -> None:
    for name in _SDK_LOGGERS:
        logger = logging.getLogger(name)
        if _filter not in logger.filters:
            logger.addFilter(_filter)


def _missing(exc: ImportError) -> str:
    name = exc.name or ""
    for module, dist in _DISTRIBUTIONS.items():
        if name == module or name.startswith(module + "."):
            return dist
    return name or str(exc)


def quiet_http() -> AbstractContextManager[object]:
    """A context in which the httpx instrumentation makes no span of its own: the
    service client's calls have theirs (with retries and breaker state)."""
    if "httpx" not in _instrumented:
        return nullcontext()
    from opentelemetry.instrumentation.utils import suppress_http_instrumentation  # noqa: PLC0415

    return suppress_http_instrumentation()


class Telemetry:
    """The traces of one service: made with the service, started with its app (the
    first time its middleware stack is built), flushed when it stops.

    ``tracer`` is the service's tracer: a no-op one until started, and while
    tracing is off.
    """

    def __init__(self, service: Service, *, ratio: float | None = None) -> None:
        if ratio is not None and not 0.0 <= ratio <= 1.0:
            raise ValueError(f"trace_ratio must be from 0 to 1, got {ratio!r}")
        self._service = weakref.ref(service)
        self.ratio = ratio
        """The service's own sampling ratio (``Service(trace_ratio=...)``), or None."""
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.provider: TracerProvider | None = None
        """The SDK's tracer provider, once started with tracing on."""
        self.settings: TraceSettings | None = None
        """What it was started with."""
        self._exporter: SpanExporter | None = None
        self._exporter_ratio = 1.0
        self._process_wide = False
        self._started = False

    @property
    def enabled(self) -> bool:
        """Whether spans are made and exported."""
        return self.provider is not None

    def use_exporter(self, exporter: SpanExporter, *, ratio: float = 1.0) -> None:
        """Send spans to ``exporter`` as each ends (tests: an ``InMemorySpanExporter``),
        sampling ``ratio`` of new traces, whatever the environment says. Call it
        before the service starts."""
        if self._started:
            raise RuntimeError(f"{self._name()} has started: give its exporter before that")
        self._exporter = exporter
        self._exporter_ratio = ratio

    def own_process(self) -> None:
        """Make this service's tracer provider the process's when it starts (what
        ``Service.serve`` does): the code's own tracers and its httpx calls use it."""
        self._process_wide = True

    def _name(self) -> str:
        service = self._service()
        return service.name if service is not None else "the service"

    # -- requests

    def server_context(
        self, scope: Scope, headers: Mapping[bytes, bytes], request_id: str
    ) -> tuple[otel_context.Context, trace.Span | None]:
        """The trace context a request runs in, and its SERVER span (None when tracing
        is off, or for a probe): the span's parent is the caller's ``traceparent``.
        Off, the caller's context itself, or a new trace, not sampled."""
        carrier = {k.decode(): headers[k].decode("latin-1") for k in _TRACE_HEADERS if k in headers}
        parent = propagate.extract(carrier) if carrier else otel_context.Context()
        if self.provider is None or scope.get("path") in QUIET_PATHS:
            if trace.get_current_span(parent).get_span_context().is_valid:
                return parent, None
            new = TraceContext(os.urandom(16).hex(), os.urandom(8).hex(), sampled=False)
            return trace.set_span_in_context(new.span(), parent), None
        method = scope.get("method") or "HTTP"
        # Named by the method alone until the router has matched a route template: the
        # raw path would make a name per user id.
        span = self.tracer.start_span(method, context=parent, kind=trace.SpanKind.SERVER)
        if span.is_recording():
            attributes: dict[str, str | int] = {
                "http.request.method": method,
                "url.path": scope.get("path", ""),
                "url.scheme": scope.get("scheme", "http"),
                "meshgate.request_id": request_id,
            }
            server = scope.get("server")
            if server:
                attributes["server.address"] = server[0]
                if server[1] is not None:
                    attributes["server.port"] = server[1]
            client = scope.get("client")
            if client:
                attributes["client.address"] = client[0]
            agent = headers.get(b"user-agent")
            if agent:
                attributes["user_agent.original"] = agent.decode("latin-1")
            span.set_attributes(attributes)
        return trace.set_span_in_context(span, parent), span

    @staticmethod
    def answered(span: trace.Span, scope: Scope, status: int) -> None:
        """The response started: the route template the router matched (the span's
        name and ``http.route``; none for a 404, which keeps the method alone) and
        the status (a 5xx is an error)."""
        if not span.is_recording():
            return
        template = getattr(scope.get("route"), "path", None)
        if template:
            span.update_name(f"{scope.get('method') or 'HTTP'} {template}")
            span.set_attribute("http.route", template)
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_attribute("error.type", str(status))
            span.set_status(trace.Status(trace.StatusCode.ERROR))

    # -- starting

    def start(self) -> None:
        """Read the settings, and with tracing on build the provider and give spans to
        the service's database and cache. Once; a missing package turns tracing off
        with one line naming it."""
        if self._started:
            return
        self._started = True
        service = self._service()
        if service is None:  # pragma: no cover - the service owns its telemetry
            return
        if self._exporter is not None:
            settings = TraceSettings("(test exporter)", self._exporter_ratio)
        else:
            settings = trace_settings(self.ratio)
        self.settings = settings
        if settings.endpoint is None:
            log.debug("%s: traces are off (%s)", service.name, settings.off)
            return
        # The stable HTTP conventions (http.request.method, url.path, ...), as the
        # gateway's spans have them; read once per process, before any instrumentation.
        os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
        try:
            provider = self._provider(service, settings)
        except ImportError as exc:
            dist = _missing(exc)
            log.warning(
                "%s: traces are off: %s is not installed (meshgate needs it for them); "
                "pip install %s",
                service.name,
                dist,
                dist,
            )
            self.settings = TraceSettings(None, settings.ratio, f"{dist} is not installed")
            return
        self.provider = provider
        self.tracer = provider.get_tracer("meshgate.service")
        if service.database is not None:
            self.instrument_database(service.database)
        if service.cache is not None:
            self.instrument_cache(service.cache)
        if self._process_wide:
            self._take_process()
        service.on_shutdown(self.flush)
        shown = mask_url(settings.endpoint)
        log.info(
            "%s: traces to %s, sampling %g %% of new traces (parent-based)",
            service.name,
            shown,
            settings.ratio * 100,
        )

    def _provider(self, service: Service, settings: TraceSettings) -> TracerProvider:
        # The instrumentations are imported now, so that a missing one turns tracing
        # off here rather than failing the first request.
        for module in _INSTRUMENTATIONS:
            importlib.import_module(module)
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
            BatchSpanProcessor,
            SimpleSpanProcessor,
        )

        attributes: dict[str, str] = {
            "service.name": service.name,
            "service.version": service.version,
            "service.instance.id": service.instance_id(),
        }
        system = os.environ.get("MESHGATE_SYSTEM")
        if system:
            attributes["service.namespace"] = system
        # What the environment says (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES: meshgate
        # up names the system and the instance there) wins over what the code knows.
        resource = Resource.create(attributes).merge(OTELResourceDetector().detect())
        provider = TracerProvider(
            resource=resource,
            sampler=_Sampler(settings.ratio),  # type: ignore[arg-type]
        )
        _quiet_sdk_logs()
        if self._exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(self._exporter))
        else:
            from meshgate.service._exporter import FastSpanExporter  # noqa: PLC0415

            assert settings.endpoint is not None  # noqa: S101 - checked by start()
            provider.add_span_processor(BatchSpanProcessor(FastSpanExporter(settings.endpoint)))
        return provider

    def _take_process(self) -> None:
        assert self.provider is not None  # noqa: S101 - called once built
        with _process_lock:
            if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
                trace.set_tracer_provider(self.provider)
            if "httpx" not in _instrumented:
                try:
                    from opentelemetry.instrumentation.httpx import (  # noqa: PLC0415
                        HTTPXClientInstrumentor,
                    )
                except ImportError as exc:
                    dist = _missing(exc)
                    log.warning(
                        "%s: httpx calls of its own get no spans: %s is not installed; "
                        "pip install %s",
                        self._name(),
                        dist,
                        dist,
                    )
                    return
                HTTPXClientInstrumentor().instrument(tracer_provider=self.provider)
                _instrumented.add("httpx")

    def instrument_database(self, database: Database) -> None:
        """Give every statement of ``database`` a CLIENT span (the service's own
        database is given them when it starts; call it for any other)."""
        if self.provider is None:
            return
        engine = database.engine.sync_engine
        if engine in _engines:
            return
        from opentelemetry import metrics  # noqa: PLC0415
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer  # noqa: PLC0415

        usage = (
            metrics.NoOpMeterProvider()
            .get_meter("meshgate.data")
            .create_up_down_counter("db.client.connections.usage")
        )
        # No SQL comment (commenter off): the statement is the one the application
        # wrote, with its placeholders; bound values are never recorded.
        EngineTracer(  # type: ignore[no-untyped-call]
            self.provider.get_tracer("meshgate.data.database"),
            engine,
            usage,
            enable_commenter=False,
        )
        _engines.add(engine)

    def instrument_cache(self, cache: Cache) -> None:
        """Send the spans of ``cache`` to this service's traces."""
        if self.provider is not None:
            cache.tracer = self.provider.get_tracer("meshgate.data.cache")

    # -- stopping

    async def flush(self, timeout: float = 5.0) -> None:
        """Export the spans that ended (at most ``timeout`` seconds); the service stops
        after its requests in flight, so their spans are among them.

        The provider itself is shut down when the process exits (the SDK does it):
        the same service may start again within a process (tests), and its app's
        middleware keeps the tracer it was built with."""
        provider = self.provider
        if provider is not None:
            await asyncio.to_thread(provider.force_flush, int(timeout * 1000))
