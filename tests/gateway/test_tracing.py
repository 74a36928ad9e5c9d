"""Traces from the gateway: trace context in and out, sampling, and the OTLP spans the
collector receives (decoded with the OpenTelemetry protobuf definitions)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from meshgate.config import loads
from meshgate.gateway.tracing import (
    parse_traceparent,
    resolve_endpoint,
    resolve_headers,
    resource_attributes,
)
from tests.helpers import Client, Message, RawUpstream, gateway_yaml, response, run_gateway

ROUTE = "  - {name: api, upstream: up}\n"
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (PARENT, (b"4bf92f3577b34da6a3ce929d0e0e4736", b"00f067aa0ba902b7", True)),
        (PARENT[:-2] + "00", (b"4bf92f3577b34da6a3ce929d0e0e4736", b"00f067aa0ba902b7", False)),
        (PARENT[:-2] + "03", (b"4bf92f3577b34da6a3ce929d0e0e4736", b"00f067aa0ba902b7", True)),
        # a future version may carry more fields
        (
            "01" + PARENT[2:] + "-extra",
            (b"4bf92f3577b34da6a3ce929d0e0e4736", b"00f067aa0ba902b7", True),
        ),
        ("ff" + PARENT[2:], None),
        (PARENT + "-extra", None),  # version 00 has exactly four fields
        (PARENT.upper(), None),
        ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x", None),
        ("garbage", None),
        ("-", None),
    ],
)
def test_parse_traceparent(value: str, parsed: tuple[bytes, bytes, bool] | None) -> None:
    assert parse_traceparent(value.encode()) == parsed


def test_the_endpoint_comes_from_the_config_or_the_standard_variables() -> None:
    def settings(extra: str = "") -> Any:
        return loads(gateway_yaml({"up": ["127.0.0.1:1"]}, ROUTE, extra)).gateway.tracing

    assert resolve_endpoint(settings(), {}) is None
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}
    assert resolve_endpoint(settings(), env) == "http://c:4318/v1/traces"
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://t:9/custom"
    assert resolve_endpoint(settings(), env) == "http://t:9/custom"
    own = settings("tracing: {endpoint: 'http://own:4318'}")
    assert resolve_endpoint(own, env) == "http://own:4318/v1/traces"
    off = settings("tracing: {enabled: false, endpoint: 'http://own:4318'}")
    assert resolve_endpoint(off, env) is None


def test_export_headers_come_from_the_standard_variables_and_the_config() -> None:
    settings = loads(
        gateway_yaml({"up": ["127.0.0.1:1"]}, ROUTE, "tracing: {headers: {X-Own: mine}}")
    ).gateway.tracing
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20t0ken, X-Own=theirs,bad"}
    assert resolve_headers(settings, env) == {"Authorization": "Bearer t0ken", "X-Own": "mine"}
    env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] = "X-Traces=1"
    assert resolve_headers(settings, env) == {"X-Traces": "1", "X-Own": "mine"}


def test_the_resource_follows_the_standard_variables() -> None:
    settings = loads(gateway_yaml({"up": ["127.0.0.1:1"]}, ROUTE)).gateway.tracing
    env = {
        "OTEL_SERVICE_NAME": "edge",
        "OTEL_RESOURCE_ATTRIBUTES": "service.namespace=shop,service.instance.id=gw%201",
    }
    attrs = resource_attributes(settings, 2, env)
    assert attrs["service.name"] == "edge"
    assert attrs["service.namespace"] == "shop"
    assert attrs["service.instance.id"] == "gw 1:2"
    named = loads(gateway_yaml({"up": ["127.0.0.1:1"]}, ROUTE, "tracing: {service_name: own}"))
    assert resource_attributes(named.gateway.tracing, 0, env)["service.name"] == "own"
    plain = resource_attributes(settings, 0, {})
    assert plain["service.name"] == "meshgate-gateway"
    assert plain["service.instance.id"].endswith(":0")


class Collector:
    """An OTLP/HTTP trace receiver that keeps what it was sent."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.upstream = RawUpstream(self._handle)

    async def _handle(self, req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert req.target == "/v1/traces"
        assert req.header("Content-Type") == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(req.body)
        self.requests.append(message)
        w.write(response(200, b""))

    async def start(self) -> Collector:
        await self.upstream.start()
        return self

    def spans(self) -> list[Any]:
        return [
            span
            for req in self.requests
            for rs in req.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    async def wait(self, count: int) -> list[Any]:
        async with asyncio.timeout(10):
            while len(self.spans()) < count:
                await asyncio.sleep(0.02)
        return self.spans()


def tracing(collector: Collector, extra: str = "") -> str:
    return f"tracing: {{endpoint: 'http://{collector.upstream.address}'{extra}}}"


def attrs(span: Any) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


async def test_a_sampled_request_gives_a_server_and_a_client_span_in_the_callers_trace() -> None:
    up = await RawUpstream().start()
    collector = await Collector().start()
    config = gateway_yaml({"up": [up.address]}, ROUTE, tracing(collector, ", ratio: 0"))
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/items?q=secret", [("traceparent", PARENT)])
        assert res.status == 200
        spans = await collector.wait(2)
    server, upstream_span = sorted(spans, key=lambda s: s.kind)
    trace_id = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
    assert server.trace_id == upstream_span.trace_id == trace_id
    assert server.parent_span_id == bytes.fromhex("00f067aa0ba902b7")
    assert upstream_span.parent_span_id == server.span_id
    assert server.kind == 2  # SERVER
    assert upstream_span.kind == 3  # CLIENT
    assert server.name == "GET api"
    assert upstream_span.name == "GET up"
    assert server.start_time_unix_nano <= upstream_span.start_time_unix_nano
    assert upstream_span.end_time_unix_nano <= server.end_time_unix_nano
    a = attrs(server)
    assert a["url.path"] == "/items"  # never the query
    assert a["http.response.status_code"] == 200
    assert a["meshgate.route"] == "api"
    # The trace came from the client, so the gateway's request id is an attribute.
    assert a["meshgate.request_id"] == res.header("X-Request-ID")
    # The split between gateway and upstream time: the client span is the upstream's.
    upstream_time = upstream_span.end_time_unix_nano - upstream_span.start_time_unix_nano
    assert 0 < upstream_time <= server.end_time_unix_nano - server.start_time_unix_nano
    c = attrs(upstream_span)
    assert c["peer.service"] == "up"
    assert c["server.address"] == "127.0.0.1"
    assert c["server.port"] == up.port
    # The upstream continues the trace under the gateway's client span.
    (seen,) = up.requests
    expected = f"00-{trace_id.hex()}-{upstream_span.span_id.hex()}-01"
    assert seen.all("traceparent") == [expected]
    resource = {
        kv.key: kv.value.string_value
        for kv in collector.requests[0].resource_spans[0].resource.attributes
    }
    assert resource["service.name"] == "meshgate-gateway"


async def test_unsampled_requests_propagate_an_unsampled_context_and_record_nothing() -> None:
    up = await RawUpstream().start()
    collector = await Collector().start()
    config = gateway_yaml({"up": [up.address]}, ROUTE, tracing(collector, ", ratio: 0"))
    async with run_gateway(config) as (worker, port):
        client = await Client.connect(port)
        for _ in range(5):
            assert (await client.request("GET", "/a")).status == 200
        res = await client.request("GET", "/b", [("traceparent", PARENT[:-2] + "00")])
        assert res.status == 200
        assert worker.tracer is not None
        worker.tracer.flush()
        await asyncio.sleep(0.2)  # give an (unwanted) export the chance to arrive
    assert collector.spans() == []
    first = up.requests[0].header("traceparent") or ""
    assert first.endswith("-00")
    # Our own request id is the trace id: logs and traces meet without a lookup.
    assert first.split("-")[1] == up.requests[0].header("X-Request-ID")
    assert (up.requests[-1].header("traceparent") or "").split("-")[1] == PARENT.split("-")[1]


async def test_errors_are_traced_whatever_the_ratio() -> None:
    async def failing(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(response(503, b"down"))

    up = await RawUpstream(failing).start()
    collector = await Collector().start()
    config = gateway_yaml({"up": [up.address]}, ROUTE, tracing(collector, ", ratio: 0"))
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        assert (await client.request("GET", "/x")).status == 503
        spans = await collector.wait(2)
    server = next(s for s in spans if s.kind == 2)
    assert server.status.code == 2  # ERROR
    assert attrs(server)["http.response.status_code"] == 503


async def test_a_route_ratio_overrides_the_gateways() -> None:
    up = await RawUpstream().start()
    collector = await Collector().start()
    routes = (
        "  - {name: all, upstream: up, match: {path_prefix: /all}, tracing: {ratio: 1}}\n"
        "  - {name: none, upstream: up}\n"
    )
    config = gateway_yaml({"up": [up.address]}, routes, tracing(collector, ", ratio: 0"))
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        for _ in range(3):
            await client.request("GET", "/all/x")
            await client.request("GET", "/other")
        spans = await collector.wait(6)
    assert {attrs(s)["meshgate.route"] for s in spans} == {"all"}


async def test_without_tracing_the_trace_context_passes_through() -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (worker, port):
        assert worker.tracer is None
        client = await Client.connect(port)
        await client.request("GET", "/", [("traceparent", PARENT), ("tracestate", "k=v")])
    assert up.requests[0].all("traceparent") == [PARENT]
    assert up.requests[0].all("tracestate") == ["k=v"]


async def test_tracestate_is_kept_and_a_collector_outage_is_counted() -> None:
    up = await RawUpstream().start()
    collector = await Collector().start()
    address = collector.upstream.address
    await collector.upstream.close()  # nobody listens there now
    config = gateway_yaml(
        {"up": [up.address]}, ROUTE, f"tracing: {{endpoint: 'http://{address}', ratio: 1}}"
    )
    async with run_gateway(config) as (worker, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/", [("traceparent", PARENT), ("tracestate", "k=v")])
        assert res.status == 200  # tracing never fails a request
        tracer = worker.tracer
        assert tracer is not None
        tracer.flush()
        async with asyncio.timeout(10):
            while not tracer.dropped:
                await asyncio.sleep(0.02)
        snapshot = json.dumps(worker.snapshot())
        assert '"dropped": 2' in snapshot
    assert up.requests[0].all("tracestate") == ["k=v"]
