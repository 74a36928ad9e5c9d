"""ServiceClient against real services on loopback: balancing, retries, deadlines,
breaker, identity, trace propagation, its spans and its metrics."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest
from fastapi import Depends, Request, Response
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY, CollectorRegistry

from meshgate.config.model import CircuitBreakerSettings
from meshgate.service import (
    DeadlineExceededError,
    NoRegistryError,
    Service,
    ServiceClient,
    ServiceUnavailableError,
    current_caller,
    remaining,
)
from meshgate.service.testing import capture_spans, in_process, serving, use_endpoints

SECRET = "k" * 40


def closed_port() -> str:
    """An address where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


class Fleet:
    """Instances of a ``users`` service that count what they receive."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.fail: set[str] = set()  # instance names answering 503
        self.delay: dict[str, float] = {}  # instance name -> seconds before answering
        self.seen: list[dict[str, str | float | None]] = []

    def instance(self, name: str) -> Service:
        service = Service("users", secret=SECRET)

        @service.app.api_route("/echo", methods=["GET", "POST", "PUT"])
        async def echo(request: Request, response: Response) -> dict[str, object]:
            self.hits[name] += 1
            await asyncio.sleep(self.delay.get(name, 0.0))
            self.seen.append(
                {
                    "caller": current_caller.get(),
                    "traceparent": request.headers.get("traceparent"),
                    "request_id": request.headers.get("x-request-id"),
                    "remaining": remaining(),
                    "body": (await request.body()).decode(),
                }
            )
            if name in self.fail:
                response.status_code = 503
            return {"instance": name}

        @service.app.get("/slow")
        async def slow() -> dict[str, str]:
            await asyncio.sleep(1.0)
            return {"instance": name}

        @service.app.get("/private")
        async def private(caller: str = Depends(service.caller_in("web"))) -> dict[str, str]:
            return {"caller": caller}

        return service


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[Fleet, list[str]]]:
    fleet = Fleet()
    async with AsyncExitStack() as stack:
        addresses = [
            await stack.enter_async_context(serving(fleet.instance(name)))
            for name in ("a", "b", "c")
        ]
        yield fleet, addresses


async def test_slow_instances_get_less_traffic(fleet: tuple[Fleet, list[str]]) -> None:
    instances, addresses = fleet
    instances.delay = {"c": 0.05}
    client = ServiceClient("users", endpoints=addresses)
    try:
        for _ in range(10):
            batch = await asyncio.gather(*(client.get("/echo") for _ in range(6)))
            assert all(r.status_code == 200 for r in batch)
    finally:
        await client.close()
    assert set(instances.hits) == {"a", "b", "c"}
    assert instances.hits["c"] < min(instances.hits["a"], instances.hits["b"])


async def test_a_dead_instance_is_skipped_for_any_method(fleet: tuple[Fleet, list[str]]) -> None:
    instances, addresses = fleet
    client = ServiceClient("users", endpoints=[closed_port(), *addresses[:1]])
    try:
        for _ in range(10):
            response = await client.post("/echo", content=b"order-1")
            assert response.status_code == 200
    finally:
        await client.close()
    assert instances.hits["a"] == 10
    assert all(seen["body"] == "order-1" for seen in instances.seen)


async def test_idempotent_calls_retry_on_503_but_posts_do_not(
    fleet: tuple[Fleet, list[str]],
) -> None:
    instances, addresses = fleet
    instances.fail = {"a"}
    client = ServiceClient("users", endpoints=addresses[:2], retries_per_second=100)
    try:
        gets = [await client.get("/echo") for _ in range(20)]
        assert all(r.status_code == 200 for r in gets)
        before = instances.hits["a"] + instances.hits["b"]
        posts = [await client.post("/echo", content=b"x") for _ in range(20)]
    finally:
        await client.close()
    # Each POST reached exactly one instance: 503 from a is answered as is.
    assert instances.hits["a"] + instances.hits["b"] - before == 20
    assert {r.status_code for r in posts} <= {200, 503}


async def test_a_post_with_an_idempotency_key_is_retried(
    fleet: tuple[Fleet, list[str]],
) -> None:
    instances, addresses = fleet
    instances.fail = {"a"}
    client = ServiceClient("users", endpoints=addresses[:2], retries_per_second=100)
    try:
        results = [
            await client.post("/echo", content=b"pay", headers={"Idempotency-Key": f"k{i}"})
            for i in range(10)
        ]
    finally:
        await client.close()
    assert all(r.status_code == 200 for r in results)
    assert all(r.json() == {"instance": "b"} for r in results)


async def test_timeout_and_deadline(fleet: tuple[Fleet, list[str]]) -> None:
    instances, addresses = fleet
    client = ServiceClient("users", endpoints=addresses[:1], timeout=0.3)
    try:
        with pytest.raises(DeadlineExceededError, match="did not answer in time"):
            await client.get("/slow")
        await client.get("/echo", timeout=1.5)
    finally:
        await client.close()
    told = instances.seen[-1]["remaining"]
    assert isinstance(told, float)
    assert 1.0 < told <= 1.5


async def test_the_callers_deadline_bounds_the_call(fleet: tuple[Fleet, list[str]]) -> None:
    """A service handling a request with 300 ms left gives its own call no more."""
    _, addresses = fleet
    web = Service("web", secret=SECRET)
    users = use_endpoints(web, "users", addresses[:1])

    @web.app.get("/page")
    async def page() -> dict[str, str]:
        await users.get("/slow")  # 1 s: longer than the caller allows
        return {"never": "reached"}

    async with in_process(web) as client:
        response = await client.get("/page", headers={"X-Meshgate-Deadline-Ms": "300"})
    assert response.status_code == 504
    assert response.json()["error"] == "deadline_exceeded"


async def test_identity_and_trace_reach_the_callee(fleet: tuple[Fleet, list[str]]) -> None:
    instances, addresses = fleet
    web = Service("web", secret=SECRET)
    users = use_endpoints(web, "users", addresses[:1])

    @web.app.get("/page")
    async def page() -> dict[str, object]:
        private = await users.get("/private")
        await users.get("/echo")
        return {"private": private.json()}

    trace_id = "0af7651916cd43dd8448eb211c80319c"
    async with in_process(web) as client:
        response = await client.get(
            "/page",
            headers={
                "traceparent": f"00-{trace_id}-b7ad6b7169203331-01",
                "X-Request-ID": "page-1",
            },
        )
    assert response.json() == {"private": {"caller": "web"}}
    seen = instances.seen[-1]
    assert seen["caller"] == "web"
    assert seen["request_id"] == "page-1"
    traceparent = seen["traceparent"]
    assert isinstance(traceparent, str)
    assert traceparent.split("-")[1] == trace_id


async def test_no_identity_without_a_secret(fleet: tuple[Fleet, list[str]]) -> None:
    _, addresses = fleet
    client = ServiceClient("users", endpoints=addresses[:1], caller="web")
    try:
        response = await client.get("/private")
    finally:
        await client.close()
    assert response.status_code == 401


async def test_circuit_breaker_opens_and_fails_fast() -> None:
    client = ServiceClient(
        "users",
        endpoints=[closed_port()],
        retries=0,
        circuit_breaker=CircuitBreakerSettings(
            failure_ratio=0.5, min_requests=5, window=10.0, open_for=30.0
        ),
    )
    try:
        for _ in range(5):
            with pytest.raises(ServiceUnavailableError, match="cannot connect"):
                await client.get("/echo")
        with pytest.raises(ServiceUnavailableError, match="circuit breaker is open"):
            await client.get("/echo")
    finally:
        await client.close()


async def test_unknown_service_and_no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHGATE_REGISTRY_URL", raising=False)
    unconfigured = ServiceClient("users")  # made at import time, say: nothing to find yet
    try:
        with pytest.raises(NoRegistryError, match="MESHGATE_REGISTRY_URL") as caught:
            await unconfigured.get("/echo")
        assert "cannot call 'users'" in str(caught.value)
        assert isinstance(caught.value, ServiceUnavailableError)  # a 503 at the boundary
    finally:
        await unconfigured.close()
    client = ServiceClient("users", endpoints=[])
    try:
        with pytest.raises(ServiceUnavailableError, match="no instance of 'users'"):
            await client.get("/echo")
    finally:
        await client.close()


async def test_the_registry_is_resolved_at_the_first_call(
    monkeypatch: pytest.MonkeyPatch, fleet: tuple[Fleet, list[str]]
) -> None:
    """A client made before MESHGATE_REGISTRY_URL is known finds the registry then."""
    from meshgate.registry import MemoryRegistry
    from meshgate.registry.model import InstanceSpec
    from tests.registry.conftest import TOKEN, Server, make_app

    monkeypatch.delenv("MESHGATE_REGISTRY_URL", raising=False)
    client = Service("web").client("users", timeout=2.0)
    _, addresses = fleet
    async with MemoryRegistry() as registry:
        await registry.register("users", "users-a", InstanceSpec(address=addresses[0]))
        server = await Server(make_app(registry)).start()
        monkeypatch.setenv("MESHGATE_REGISTRY_URL", server.url)
        monkeypatch.setenv("MESHGATE_REGISTRY_TOKEN", TOKEN)
        try:
            response = await client.get("/echo")
            assert response.json() == {"instance": "a"}
        finally:
            await client.close()
            await server.stop()


async def test_set_instances_keeps_state_of_those_that_stay(
    fleet: tuple[Fleet, list[str]],
) -> None:
    _, addresses = fleet
    client = ServiceClient("users", endpoints=addresses[:2])
    try:
        await client.get("/echo")
        kept = client.instances[0]
        client.set_instances([addresses[0], addresses[2]])
        assert client.instances[0] is kept
        assert [e.label for e in client.instances] == [addresses[0], addresses[2]]
    finally:
        await client.close()


# ---------------------------------------------------------------------------- traces and metrics

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def client_sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_call_is_one_client_span_the_parent_of_every_try() -> None:
    users = Service("users")
    users_spans = capture_spans(users)
    answers = iter([503, 200])

    @users.app.get("/flaky")
    async def flaky(response: Response) -> dict[str, str]:
        response.status_code = next(answers)
        return {}

    web = Service("web")
    web_spans = capture_spans(web)

    async with serving(users) as address:
        client = use_endpoints(web, "users", [address])

        @web.app.get("/page")
        async def page() -> dict[str, int]:
            return {"status": (await client.get("/flaky")).status_code}

        labels = {"service": "web", "target": "users"}
        calls = client_sample("meshgate_client_requests_total", code="200", **labels)
        retries = client_sample("meshgate_client_retries_total", **labels)
        async with in_process(web) as http:
            answer = await http.get("/page", headers={"traceparent": PARENT})
    assert answer.json() == {"status": 200}

    server = next(s for s in web_spans.get_finished_spans() if s.kind is SpanKind.SERVER)
    (call,) = [s for s in web_spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert call.name == "GET users"
    assert call.parent is not None
    assert call.parent.span_id == server.context.span_id
    host, port = address.rsplit(":", 1)
    assert dict(call.attributes or {}) == {
        "http.request.method": "GET",
        "peer.service": "users",
        "server.address": host,
        "server.port": int(port),
        "meshgate.instance": address,
        "url.full": f"http://{address}/flaky",
        "meshgate.retries": 1,
        "http.request.resend_count": 1,
        "meshgate.breaker.state": "closed",
        "http.response.status_code": 200,
    }
    (failed,) = call.events
    assert failed.name == "try failed"
    assert dict(failed.attributes or {}) == {
        "meshgate.instance": address,
        "meshgate.reason": f"{address}: status 503",
    }
    # Both tries reached users: each is a server span whose parent is the call's.
    tries = [s for s in users_spans.get_finished_spans() if s.name == "GET /flaky"]
    assert [dict(s.attributes or {})["http.response.status_code"] for s in tries] == [503, 200]
    for span in tries:
        assert span.parent is not None
        assert span.parent.span_id == call.context.span_id
        assert span.context.trace_id == call.context.trace_id == int(PARENT.split("-")[1], 16)
    after = client_sample("meshgate_client_requests_total", code="200", **labels)
    assert after - calls == 1
    assert client_sample("meshgate_client_retries_total", **labels) - retries == 1


async def test_a_call_outside_any_request_is_not_a_trace_of_its_own(
    fleet: tuple[Fleet, list[str]],
) -> None:
    instances, addresses = fleet
    web = Service("web")
    spans = capture_spans(web)
    client = use_endpoints(web, "users", addresses[:1])
    async with in_process(web):
        response = await client.get("/echo")
    assert response.status_code == 200
    assert spans.get_finished_spans() == ()
    assert instances.seen[-1]["traceparent"] is None


async def test_off_a_call_passes_the_callers_trace_context_on_unchanged(
    fleet: tuple[Fleet, list[str]],
) -> None:
    instances, addresses = fleet
    web = Service("web")
    users = use_endpoints(web, "users", addresses[:1])

    @web.app.get("/page")
    async def page() -> None:
        await users.get("/echo")

    async with in_process(web) as client:
        await client.get("/page", headers={"traceparent": PARENT})
    assert not web.telemetry.enabled
    assert instances.seen[-1]["traceparent"] == PARENT


async def test_outcomes_breaker_and_budget_are_counted() -> None:
    metrics = CollectorRegistry()
    client = ServiceClient(
        "users",
        endpoints=[closed_port()],
        caller="web",
        retries=1,
        retry_budget=0.0,  # a floor that earns almost nothing back while the test runs
        retries_per_second=0.01,
        circuit_breaker=CircuitBreakerSettings(
            failure_ratio=0.5, min_requests=4, window=10.0, open_for=30.0
        ),
        metrics=metrics,
    )

    def sample(name: str, **labels: str) -> float | None:
        return metrics.get_sample_value(name, {"service": "web", "target": "users", **labels})

    full = sample("meshgate_client_retry_budget_tokens")
    assert sample("meshgate_client_breaker_open") == 0.0
    try:
        for _ in range(2):
            with pytest.raises(ServiceUnavailableError, match="cannot connect"):
                await client.get("/echo")
        with pytest.raises(ServiceUnavailableError, match="circuit breaker is open"):
            await client.get("/echo")
        with pytest.raises(DeadlineExceededError):
            await client.get("/echo", timeout=0)
    finally:
        await client.close()
    assert sample("meshgate_client_requests_total", code="unavailable") == 3.0
    assert sample("meshgate_client_requests_total", code="timeout") == 1.0
    assert sample("meshgate_client_retries_total") == 2.0
    assert sample("meshgate_client_breaker_open") == 1.0
    tokens = sample("meshgate_client_retry_budget_tokens")
    assert full == 2.0
    assert tokens is not None
    assert tokens < 0.5  # two retries spent
