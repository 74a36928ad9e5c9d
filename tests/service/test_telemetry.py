"""Traces of a service: settings from the environment, the server span of a request,
spans of its queries and cache calls in the same trace, sampling, the trace context
passing through while tracing is off, a missing SDK, and real OTLP export."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from meshgate.data import Cache, Database
from meshgate.service import Service, current_trace
from meshgate.service.telemetry import (
    DEFAULT_RATIO,
    TraceSettings,
    _OncePerMinute,
    trace_settings,
)
from meshgate.service.testing import capture_logs, capture_spans, in_process
from tests.otlp import receiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{PARENT}-01"
ORDER_ID = 4242
SECRET_NAME = "Widget SECRET"

orders = sa.Table(
    "orders",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(50)),
)


@pytest.fixture(autouse=True)
def _no_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the shell says, tests choose where spans go."""
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_SERVICE_NAME",
        "MESHGATE_SYSTEM",
    ):
        monkeypatch.delenv(name, raising=False)


def make_service(tmp_path: Path, **options: Any) -> Service:
    database = Database(f"sqlite:///{tmp_path / 'orders.db'}", name="orders")
    cache = Cache("memory://", name="orders")
    service = Service("orders", database=database, cache=cache, **options)
    app = service.app
    log = logging.getLogger("shop.orders")

    @service.on_startup
    async def _schema() -> None:
        await database.create_all(orders.metadata)
        async with database.session() as session:
            await session.execute(sa.insert(orders).values(id=ORDER_ID, name=SECRET_NAME))

    @app.get("/orders/{order_id}")
    async def get_order(order_id: int) -> dict[str, Any]:
        async def load() -> dict[str, Any]:
            log.info("loading order %d", order_id)
            async with database.session() as session:
                row = (
                    await session.execute(sa.select(orders).where(orders.c.id == order_id))
                ).first()
            return {"id": order_id, "name": row.name if row else None}

        return await cache.get_or_load(f"order:{order_id}", load)

    @app.get("/context")
    async def context() -> dict[str, Any]:
        found = current_trace.get()
        return {"trace_id": found and found.trace_id, "span_id": found and found.span_id}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("the order book is on fire")

    return service


def by_name(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {[s.name for s in spans]}"
    return found[0]


def hex_span(span: ReadableSpan) -> str:
    return f"{span.context.span_id:016x}"


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("env", "ratio", "expected"),
    [
        ({}, None, TraceSettings(None, DEFAULT_RATIO, "no OTEL_EXPORTER_OTLP_ENDPOINT")),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"},
            None,
            TraceSettings("http://c:4318/v1/traces", DEFAULT_RATIO),
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/custom",
                "OTEL_TRACES_SAMPLER_ARG": "0.25",
            },
            None,
            TraceSettings("http://t:9/custom", 0.25),
        ),
        (  # the service's own ratio wins
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
            0.5,
            TraceSettings("http://c:4318/v1/traces", 0.5),
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"},
            None,
            TraceSettings(None, DEFAULT_RATIO, "OTEL_SDK_DISABLED is set"),
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"},
            None,
            TraceSettings(None, DEFAULT_RATIO, "OTEL_TRACES_EXPORTER is none"),
        ),
    ],
)
def test_settings_come_from_the_standard_variables(
    env: dict[str, str], ratio: float | None, expected: TraceSettings
) -> None:
    assert trace_settings(ratio, env) == expected


@pytest.mark.parametrize("raw", ["half", "1.5", "-0.1", "nan"])
def test_a_ratio_that_is_not_one_is_refused_naming_it(
    raw: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "meshgate.service.telemetry"):
        settings = trace_settings(None, {"OTEL_TRACES_SAMPLER_ARG": raw})
    assert settings.ratio == DEFAULT_RATIO
    assert f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not a ratio from 0 to 1" in caplog.text


def test_a_service_ratio_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="trace_ratio must be from 0 to 1, got 2"):
        Service("orders", trace_ratio=2)


# ---------------------------------------------------------------------------- spans


async def test_one_trace_holds_the_request_its_cache_call_and_its_query(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    spans = capture_spans(service)
    async with in_process(service) as client:
        first = await client.get(
            f"/orders/{ORDER_ID}", headers={"traceparent": SAMPLED, "X-Request-ID": "r-1"}
        )
        assert first.json() == {"id": ORDER_ID, "name": SECRET_NAME}
        startup = len(spans.get_finished_spans())
        await client.get(f"/orders/{ORDER_ID}", headers={"traceparent": SAMPLED})
        await client.get("/health/ready")
        await client.get("/metrics")
    finished = spans.get_finished_spans()
    first_request, second_request = finished[:startup], finished[startup:]

    server = by_name(first_request, "GET /orders/{order_id}")
    assert server.kind is SpanKind.SERVER
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None
    assert f"{server.parent.span_id:016x}" == PARENT
    assert server.attributes is not None
    assert (
        dict(server.attributes).items()
        >= {
            "http.request.method": "GET",
            "http.route": "/orders/{order_id}",
            "url.path": f"/orders/{ORDER_ID}",
            "http.response.status_code": 200,
            "meshgate.request_id": "r-1",
        }.items()
    )
    assert server.resource.attributes["service.name"] == "orders"

    cache = by_name(first_request, "cache get_or_load orders")
    assert cache.parent is not None
    assert cache.parent.span_id == server.context.span_id
    assert cache.attributes is not None
    assert cache.attributes["meshgate.cache.outcome"] == "miss"
    assert cache.attributes["meshgate.cache.backend"] == "memory"

    # The query ran in the loader: a child of the cache call (with the BEGIN the data
    # layer sends SQLite), the statement without the value it was bound to.
    queries = [s for s in first_request if s.kind is SpanKind.CLIENT]
    assert [q.name.split()[0] for q in queries] == ["BEGIN", "SELECT"]
    query = queries[1]
    assert all(q.parent is not None and q.parent.span_id == cache.context.span_id for q in queries)
    assert query.attributes is not None
    assert query.attributes["db.system"] == "sqlite"
    statement = str(query.attributes["db.statement"])
    assert statement.startswith("SELECT orders.id, orders.name")
    assert "?" in statement
    assert str(ORDER_ID) not in statement
    assert SECRET_NAME not in statement

    # The second is a hit: no query; the probe and the scrape make no span at all.
    names = [s.name for s in second_request]
    assert names == ["cache get_or_load orders", "GET /orders/{order_id}"]
    hit = second_request[0].attributes
    assert hit is not None
    assert hit["meshgate.cache.outcome"] == "hit"


async def test_logs_of_a_request_carry_its_server_span(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    spans = capture_spans(service)
    with capture_logs() as records:
        async with in_process(service) as client:
            await client.get(f"/orders/{ORDER_ID}", headers={"traceparent": SAMPLED})
    server = by_name(spans.get_finished_spans(), "GET /orders/{order_id}")
    loading = next(r for r in records if r["message"] == f"loading order {ORDER_ID}")
    access = next(r for r in records if r["logger"] == "meshgate.access")
    assert loading["trace_id"] == access["trace_id"] == TRACE_ID
    # The loader runs inside the cache call's span; the access line inside the server's.
    assert access["span_id"] == hex_span(server)
    cache = by_name(spans.get_finished_spans(), "cache get_or_load orders")
    assert loading["span_id"] == hex_span(cache)


async def test_an_unhandled_error_is_an_error_span_with_its_exception(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    spans = capture_spans(service)
    async with in_process(service) as client:
        answer = await client.get("/boom", headers={"traceparent": SAMPLED})
    assert answer.status_code == 500
    server = by_name(spans.get_finished_spans(), "GET /boom")
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 500
    (event,) = server.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.message"] == "the order book is on fire"


async def test_a_404_keeps_the_method_alone_as_its_name(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    spans = capture_spans(service)
    async with in_process(service) as client:
        await client.get("/nowhere/42", headers={"traceparent": SAMPLED})
    (server,) = spans.get_finished_spans()
    assert server.name == "GET"
    assert server.attributes is not None
    assert "http.route" not in server.attributes


# ---------------------------------------------------------------------------- sampling


async def test_an_unsampled_parent_is_followed_and_the_ids_still_reach_the_code(
    tmp_path: Path,
) -> None:
    service = make_service(tmp_path)
    spans = capture_spans(service)
    async with in_process(service) as client:
        given = await client.get("/context", headers={"traceparent": SAMPLED[:-2] + "00"})
    assert spans.get_finished_spans() == ()
    assert given.json()["trace_id"] == TRACE_ID
    assert given.json()["span_id"] != PARENT  # a span of its own, not recorded


@pytest.mark.parametrize(("ratio", "recorded"), [(0.0, 0), (1.0, 1)])
async def test_a_new_trace_is_sampled_with_the_ratio(
    tmp_path: Path, ratio: float, recorded: int
) -> None:
    service = make_service(tmp_path)
    spans = capture_spans(service)
    service.telemetry.use_exporter(spans, ratio=ratio)
    async with in_process(service) as client:
        given = await client.get("/context")
    assert len(spans.get_finished_spans()) == recorded
    assert len(given.json()["trace_id"]) == 32  # sampled or not, the request has a trace


async def test_off_the_callers_context_passes_through(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    async with in_process(service) as client:
        given = await client.get("/context", headers={"traceparent": SAMPLED})
        new = await client.get("/context")
    assert not service.telemetry.enabled
    assert service.telemetry.settings == TraceSettings(
        None, DEFAULT_RATIO, "no OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    # The caller's span, unchanged: calls made here name it as their parent.
    assert given.json() == {"trace_id": TRACE_ID, "span_id": PARENT}
    assert len(new.json()["trace_id"]) == 32


# ---------------------------------------------------------------------------- setup


async def test_a_missing_sdk_turns_tracing_off_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    # An import of a module mapped to None fails, as for a package not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    service = make_service(tmp_path)
    with capture_logs("meshgate.service.telemetry") as records:
        async with in_process(service) as client:
            answer = await client.get("/context", headers={"traceparent": SAMPLED})
    assert answer.status_code == 200
    assert not service.telemetry.enabled
    (line,) = [r for r in records if r["level"] == "warning"]
    assert line["message"] == (
        "orders: traces are off: opentelemetry-sdk is not installed (meshgate needs it for "
        "them); pip install opentelemetry-sdk"
    )
    assert "exception" not in line


async def test_spans_are_exported_as_otlp_with_the_resource_and_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with receiver() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20tok-1")
        monkeypatch.setenv("MESHGATE_SYSTEM", "shop")
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=orders-1")
        service = make_service(tmp_path)
        async with in_process(service) as client:
            await client.get(f"/orders/{ORDER_ID}", headers={"traceparent": SAMPLED})
        # The service flushed its spans as it stopped.
        spans = collector.wait_for("the request's spans", lambda s: len(s) >= 3, timeout=10)
    assert {s.name for s in spans} >= {"GET /orders/{order_id}", "cache get_or_load orders"}
    assert {s.trace_id for s in spans} == {TRACE_ID}
    assert set(collector.paths) == {"/v1/traces"}
    assert collector.headers[0]["authorization"] == "Bearer tok-1"
    assert collector.headers[0]["content-type"] == "application/x-protobuf"
    resource = spans[0].resource
    assert resource["service.name"] == "orders"
    assert resource["service.namespace"] == "shop"
    assert resource["service.instance.id"] == "orders-1"  # the environment's wins
    assert resource["service.version"] == "0.0.0"


_PROCESS_WIDE = """
import asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from meshgate.service import Service
from meshgate.service.testing import in_process

# A process-wide provider, as meshgate serve sets one: FastAPI (from 0.16x) makes
# server spans with it unless told not to.
spans = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)
service = Service("orders")
service.telemetry.use_exporter(spans)

@service.app.get("/a")
async def a() -> dict[str, str]:
    return {}

async def main() -> None:
    async with in_process(service) as client:
        await client.get("/a", headers={"traceparent": "SAMPLED"})

asyncio.run(main())
print("|".join(f"{s.kind.name}:{s.name}" for s in spans.get_finished_spans()))
"""


def test_one_server_span_per_request_when_the_provider_is_the_process_s() -> None:
    ran = subprocess.run(
        [sys.executable, "-c", _PROCESS_WIDE.replace("SAMPLED", SAMPLED)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")},
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().split("|") == ["SERVER:GET /a"]


_HTTPX = """
import asyncio
import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from meshgate.service import Service
from meshgate.service.testing import in_process, serving, use_endpoints

spans = InMemorySpanExporter()
users = Service("users")

@users.app.get("/u")
async def u() -> dict[str, str]:
    return {}

web = Service("web")
web.telemetry.use_exporter(spans)
web.telemetry.own_process()  # what Service.serve does

async def main() -> None:
    async with serving(users) as address:
        client = use_endpoints(web, "users", [address])

        @web.app.get("/page")
        async def page() -> None:
            await client.get("/u")  # the service client's span only
            async with httpx.AsyncClient() as raw:
                await raw.get(f"http://{address}/u")  # the httpx instrumentation's

        async with in_process(web) as http:
            await http.get("/page", headers={"traceparent": "SAMPLED"})
        async with httpx.AsyncClient() as raw:
            await raw.get(f"http://{address}/u")  # outside any request: no trace

asyncio.run(main())
server = next(s for s in spans.get_finished_spans() if s.kind.name == "SERVER")
for s in spans.get_finished_spans():
    if s.kind.name == "CLIENT":
        parent = "server" if s.parent and s.parent.span_id == server.context.span_id else "other"
        print(f"{s.name}|{parent}")
"""


def test_httpx_calls_of_the_code_are_client_spans_once_the_process_is_the_service_s() -> None:
    ran = subprocess.run(
        [sys.executable, "-c", _HTTPX.replace("SAMPLED", SAMPLED)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")},
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["GET users|server", "GET|server"]


def test_the_sdk_says_that_the_collector_is_away_once_a_minute() -> None:
    quiet = _OncePerMinute()

    def record(message: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("opentelemetry.sdk", level, "", 0, message, None, None)

    assert quiet.filter(record("Failed to export span batch code: 404"))
    assert not quiet.filter(record("Failed to export span batch code: 404"))
    assert not quiet.filter(record("Failed to export span batch code: 404"))
    assert quiet.filter(record("Queue full, dropping span."))  # another message
    assert quiet.filter(record("exporting", logging.DEBUG))  # below WARNING: all of them
    # A minute later, the next one says how many were held back.
    quiet._last = {key: moment - 61 for key, moment in quiet._last.items()}
    later = record("Failed to export span batch code: 404")
    assert quiet.filter(later)
    assert later.getMessage() == (
        "Failed to export span batch code: 404 (2 more like it in the last minute)"
    )
