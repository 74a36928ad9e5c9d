"""The OTLP/HTTP receiver fed by the real OpenTelemetry exporters, and the query API,
served by uvicorn on loopback."""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx
from google.rpc.status_pb2 import Status
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExportResult

from tests.observability.conftest import AUTH, TOKEN, Collector
from tests.observability.otel import System, shop_trace
from tests.observability.test_otlp import TRACE_JSON


async def export_spans(collector: Collector, system: System, **options: object) -> None:
    exporter = OTLPSpanExporter(
        endpoint=f"{collector.url}/v1/traces", headers=AUTH, timeout=10, **options
    )
    try:
        result = await asyncio.to_thread(exporter.export, system.spans.get_finished_spans())
    finally:
        exporter.shutdown()
    system.spans.clear()
    assert result is SpanExportResult.SUCCESS


async def test_spans_exported_by_the_sdk_are_listed_and_shown_as_a_tree(
    collector: Collector, api: httpx.AsyncClient, system: System
) -> None:
    slow = shop_trace(system, orders_ms=300, fail_users=True)
    fast = shop_trace(system, orders_ms=5)
    await export_spans(collector, system)
    listed = (await api.get("/traces")).json()["traces"]
    assert [t["trace_id"] for t in listed] == [fast, slow]
    assert listed[1]["root_name"] == "GET /api/orders"
    assert listed[1]["services"] == ["gateway", "orders", "users"]
    assert listed[1]["error"] is True
    slow_only = (await api.get("/traces", params={"slow": "200ms"})).json()["traces"]
    assert [t["trace_id"] for t in slow_only] == [slow]
    errors = (await api.get("/traces", params={"errors": "true", "service": "users"})).json()
    assert [t["trace_id"] for t in errors["traces"]] == [slow]
    assert (await api.get("/traces", params={"limit": "1"})).json()["traces"][0]["trace_id"] == (
        fast
    )
    tree = (await api.get(f"/traces/{slow.upper()}")).json()
    assert tree["trace_id"] == slow
    assert tree["spans"][0]["name"] == "GET /api/orders"
    assert tree["spans"][0]["children"][0]["children"][0]["service"] == "orders"


async def test_gzip_protobuf_exports_are_read(
    collector: Collector, api: httpx.AsyncClient, system: System
) -> None:
    trace_id = shop_trace(system)
    await export_spans(collector, system, compression=Compression.Gzip)
    assert (await api.get(f"/traces/{trace_id}")).status_code == 200


async def test_json_exports_are_answered_in_json(
    collector: Collector, api: httpx.AsyncClient
) -> None:
    async with httpx.AsyncClient(base_url=collector.url, headers=AUTH) as http:
        res = await http.post(
            "/v1/traces",
            content=gzip.compress(json.dumps(TRACE_JSON).encode()),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == "application/json"
    assert res.json() == {}
    found = (await api.get("/traces", params={"service": "my.service"})).json()["traces"]
    assert [t["trace_id"] for t in found] == ["5b8efff798038103d269b633813fc60c"]


async def test_logs_exported_by_the_sdk_are_filtered(
    collector: Collector, api: httpx.AsyncClient, system: System
) -> None:
    tracer = system.tracer("orders")
    with tracer.start_as_current_span("checkout") as current:
        system.log("orders", "error", "payment refused")
        system.log("orders", "info", "order kept")
    system.log("users", "warn", "slow lookup")
    exporter = OTLPLogExporter(endpoint=f"{collector.url}/v1/logs", headers=AUTH, timeout=10)
    try:
        result = await asyncio.to_thread(exporter.export, system.logs.get_finished_logs())
    finally:
        exporter.shutdown()
    assert result is LogRecordExportResult.SUCCESS
    trace_id = format(current.get_span_context().trace_id, "032x")
    bodies = lambda res: [r["body"] for r in res.json()["logs"]]  # noqa: E731
    assert bodies(await api.get("/logs")) == ["slow lookup", "order kept", "payment refused"]
    assert bodies(await api.get("/logs", params={"level": "warning"})) == [
        "slow lookup",
        "payment refused",
    ]
    assert bodies(await api.get("/logs", params={"trace_id": trace_id})) == [
        "order kept",
        "payment refused",
    ]
    assert bodies(await api.get("/logs", params={"service": "users"})) == ["slow lookup"]
    assert bodies(await api.get("/logs", params={"q": "REFUSED"})) == ["payment refused"]


async def test_metrics_exported_by_the_sdk_are_kept_as_series(
    collector: Collector, api: httpx.AsyncClient
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(
        resource=Resource.create({"service.name": "orders"}), metric_readers=[reader]
    )
    meter = provider.get_meter("tests")
    meter.create_counter("orders.placed").add(3, {"region": "eu"})
    meter.create_histogram("orders.value").record(12.5)
    data = reader.get_metrics_data()
    provider.shutdown()
    assert data is not None
    exporter = OTLPMetricExporter(endpoint=f"{collector.url}/v1/metrics", headers=AUTH, timeout=10)
    try:
        result = await asyncio.to_thread(exporter.export, data)
    finally:
        exporter.shutdown()
    assert result is MetricExportResult.SUCCESS
    series = (await api.get("/metrics", params={"service": "orders"})).json()["series"]
    by_name = {s["name"]: s for s in series}
    assert by_name["orders.placed"]["points"][0]["value"] == 3
    assert by_name["orders.placed"]["attributes"] == {"region": "eu"}
    assert by_name["orders.value"]["points"][0]["value"]["sum"] == 12.5


async def test_receiver_errors_are_otlp_status_messages(collector: Collector) -> None:
    async with httpx.AsyncClient(base_url=collector.url, headers=AUTH) as http:
        bad = await http.post(
            "/v1/traces", content=b"\xff\xff", headers={"Content-Type": "application/x-protobuf"}
        )
        assert bad.status_code == 400
        assert bad.headers["content-type"] == "application/x-protobuf"
        status = Status.FromString(bad.content)
        assert status.code == 3
        assert "not a valid OTLP protobuf message" in status.message
        wrong_type = await http.post(
            "/v1/logs", content=b"x", headers={"Content-Type": "text/plain"}
        )
        assert wrong_type.status_code == 415
        assert "OTEL_EXPORTER_OTLP_PROTOCOL" in wrong_type.json()["message"]
        brotli = await http.post(
            "/v1/logs",
            content=b"x",
            headers={"Content-Type": "application/json", "Content-Encoding": "br"},
        )
        assert brotli.status_code == 415
        big = await http.post(
            "/v1/metrics",
            content=b"x" * (16 * 1024 * 1024 + 1),
            headers={"Content-Type": "application/json"},
        )
        assert big.status_code == 413
        assert "send smaller batches" in big.json()["message"]
    async with httpx.AsyncClient(base_url=collector.url) as anonymous:
        res = await anonymous.post(
            "/v1/traces", content=b"", headers={"Content-Type": "application/json"}
        )
        assert res.status_code == 401
        res = await anonymous.get(
            "/v1/observability/traces", headers={"Authorization": f"Bearer x{TOKEN}"}
        )
        assert res.status_code == 401


async def test_bad_queries_are_problem_documents_naming_the_parameter(
    api: httpx.AsyncClient,
) -> None:
    cases = [
        ("/traces", {"slow": "fast"}, "slow"),
        ("/traces", {"limit": "0"}, "limit"),
        ("/traces", {"errors": "maybe"}, "errors"),
        ("/traces", {"since": "yesterday"}, "since"),
        ("/traces/xyz", {}, "trace_id"),
        ("/logs", {"level": "loud"}, "level"),
        ("/logs", {"trace_id": "12"}, "trace_id"),
        ("/services", {"window": "0s"}, "window"),
        ("/services", {"window": "1h", "step": "1s"}, "step"),
        ("/map", {"window": "2d"}, "window"),
        ("/metrics", {"limit": "many"}, "limit"),
    ]
    for path, params, parameter in cases:
        res = await api.get(path, params=params)
        assert res.status_code == 400, (path, params, res.text)
        assert res.headers["content-type"] == "application/problem+json"
        body = res.json()
        assert (body["error"], body["parameter"], body["status"]) == ("bad_query", parameter, 400)
        assert repr(params.get(parameter, "xyz")) in body["detail"]
    missing = await api.get("/traces/" + "ab" * 16)
    assert missing.status_code == 404
    assert missing.json()["error"] == "trace_not_found"
    assert missing.json()["type"] == "https://meshgate.dev/problems/trace_not_found"


async def test_services_map_and_stats_from_exported_spans(
    collector: Collector, api: httpx.AsyncClient, system: System
) -> None:
    assert (await api.get("/stats")).json()["version"] == 0
    for _ in range(3):
        shop_trace(system)
    await export_spans(collector, system)
    services = (await api.get("/services", params={"window": "1m", "step": "10s"})).json()
    red = {s["service"]: s for s in services["services"]}
    assert red["orders"]["requests"] == 3
    assert len(red["orders"]["series"]) == 6
    assert services["known"] == ["gateway", "orders", "users"]
    one = (await api.get("/services", params={"service": "users"})).json()["services"]
    assert [s["service"] for s in one] == ["users"]
    edges = (await api.get("/map", params={"window": "1m"})).json()["edges"]
    assert {(e["caller"], e["callee"], e["requests"]) for e in edges} == {
        ("gateway", "orders", 3),
        ("orders", "users", 3),
        ("orders", "postgresql", 3),
    }
    stats = (await api.get("/stats")).json()
    assert (stats["traces"], stats["spans"], stats["version"]) == (3, 18, 1)
