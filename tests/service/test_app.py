"""Service: health, readiness, metrics, context propagation, identity, errors, drain."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from pathlib import Path

import httpx
from fastapi import Depends
from prometheus_client.parser import text_string_to_metric_families

from meshgate.data import Cache, Database
from meshgate.data.errors import CacheUnavailableError, DatabaseUnavailableError
from meshgate.service import (
    IdentitySigner,
    Service,
    ServiceClient,
    ServiceUnavailableError,
    current_caller,
    current_request_id,
    current_trace,
    remaining,
)
from meshgate.service.context import DEADLINE_HEADER
from meshgate.service.identity import IDENTITY_HEADER
from meshgate.service.testing import capture_logs, in_process

SECRET = "s" * 40


def make_service(**options: object) -> Service:
    service = Service("orders", secret=SECRET, **options)  # type: ignore[arg-type]
    app = service.app

    @app.get("/context")
    async def context() -> dict[str, object]:
        trace = current_trace.get()
        return {
            "request_id": current_request_id.get(),
            "trace_id": trace.trace_id if trace else None,
            "caller": current_caller.get(),
            "remaining": remaining(),
        }

    @app.get("/db-down")
    async def db_down() -> None:
        raise DatabaseUnavailableError("database 'orders' (postgresql://db/orders) is unreachable")

    @app.get("/cache-down")
    async def cache_down() -> None:
        raise CacheUnavailableError("cache 'orders' (redis://cache:6379/0) is unreachable")

    @app.get("/only-web")
    async def only_web(caller: str = Depends(service.caller_in("web"))) -> dict[str, str]:
        return {"caller": caller}

    return service


async def test_live_and_ready() -> None:
    service = make_service()
    async with in_process(service) as client:
        live = await client.get("/health/live")
        ready = await client.get("/health/ready")
    assert live.json() == {"status": "live", "service": "orders"}
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


async def test_ready_names_the_failing_dependency() -> None:
    service = make_service()

    async def broker() -> None:
        raise ConnectionRefusedError("broker at 127.0.0.1:5672 refused the connection")

    async def fine() -> None:
        return None

    service.add_check("broker", broker)
    service.add_check("search", fine)
    async with in_process(service) as client:
        ready = await client.get("/health/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["broker"] == {
        "ok": False,
        "error": "broker at 127.0.0.1:5672 refused the connection",
    }
    assert body["checks"]["search"]["ok"] is True


async def test_metrics_count_requests_by_route_template() -> None:
    service = make_service()
    async with in_process(service) as client:
        for _ in range(3):
            await client.get("/context")
        await client.get("/nowhere")
        text = (await client.get("/metrics")).text
    # ``code``, the label name the gateway uses too; services count exact codes.
    assert (
        'meshgate_service_requests_total{code="200",method="GET",route="/context",'
        'service="orders"} 3.0' in text
    )
    assert 'code="404",method="GET",route="(unmatched)",service="orders"} 1.0' in text
    assert "meshgate_service_request_duration_seconds_bucket" in text
    assert "process_cpu_seconds_total" in text


async def test_request_id_and_trace_are_propagated() -> None:
    service = make_service()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with in_process(service) as client:
        given = await client.get(
            "/context",
            headers={
                "X-Request-ID": "req-123",
                "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
            },
        )
        generated = await client.get("/context")
    assert given.headers["x-request-id"] == "req-123"
    assert given.json()["request_id"] == "req-123"
    assert given.json()["trace_id"] == trace_id
    new_id = generated.headers["x-request-id"]
    assert len(new_id) == 32
    assert generated.json()["request_id"] == new_id
    assert generated.json()["trace_id"] not in (None, trace_id)


async def test_deadline_is_visible_and_enforced() -> None:
    service = make_service()
    async with in_process(service) as client:
        fine = await client.get("/context", headers={DEADLINE_HEADER: "1500"})
        late = await client.get("/context", headers={DEADLINE_HEADER: "0"})
    assert 1.0 < fine.json()["remaining"] <= 1.5
    assert late.status_code == 504
    assert late.headers["content-type"] == "application/problem+json"
    assert late.json()["error"] == "deadline_exceeded"
    assert late.json()["type"] == "https://meshgate.dev/problems/deadline_exceeded"


async def test_service_identity() -> None:
    service = make_service()
    web = IdentitySigner("web", SECRET).token("orders")
    billing = IdentitySigner("billing", SECRET).token("orders")
    for_other = IdentitySigner("web", SECRET).token("payments")
    forged = IdentitySigner("web", "f" * 40).token("orders")
    async with in_process(service) as client:
        ok = await client.get("/only-web", headers={IDENTITY_HEADER: web})
        none = await client.get("/only-web")
        wrong_caller = await client.get("/only-web", headers={IDENTITY_HEADER: billing})
        wrong_audience = await client.get("/context", headers={IDENTITY_HEADER: for_other})
        bad_signature = await client.get("/context", headers={IDENTITY_HEADER: forged})
        caller = await client.get("/context", headers={IDENTITY_HEADER: billing})
    assert ok.json() == {"caller": "web"}
    assert none.status_code == 401
    assert "no service identity" in none.json()["detail"]
    assert none.json()["error"] == "identity_required"
    assert wrong_caller.status_code == 403
    assert wrong_caller.json()["error"] == "caller_forbidden"
    assert wrong_caller.headers["content-type"] == "application/problem+json"
    assert wrong_audience.status_code == 401
    assert "not addressed to 'orders'" in wrong_audience.json()["detail"]
    assert bad_signature.status_code == 401
    assert bad_signature.json()["error"] == "invalid_identity"
    assert bad_signature.headers["content-type"] == "application/problem+json"
    assert caller.json()["caller"] == "billing"


async def test_identity_without_a_secret_is_refused_clearly() -> None:
    service = Service("orders")
    token = IdentitySigner("web", SECRET).token("orders")
    async with in_process(service) as client:
        response = await client.get("/health/live", headers={IDENTITY_HEADER: token})
    assert response.status_code == 401
    assert "MESHGATE_SERVICE_SECRET" in response.json()["detail"]
    assert response.json()["error"] == "identity_not_configured"


async def test_dependency_outage_is_a_503_naming_it() -> None:
    service = make_service()
    with capture_logs("meshgate.service") as records:
        async with in_process(service) as client:
            db = await client.get("/db-down", headers={"X-Request-ID": "r-db"})
            cache = await client.get("/cache-down")
    assert db.status_code == 503
    assert db.headers["content-type"] == "application/problem+json"
    assert db.json() == {
        "type": "https://meshgate.dev/problems/dependency_unavailable",
        "title": "Dependency unavailable",
        "status": 503,
        "detail": "database 'orders' (postgresql://db/orders) is unreachable",
        "instance": "/db-down",
        "error": "dependency_unavailable",
        "request_id": "r-db",
        "dependency": "database",
    }
    assert cache.status_code == 503
    assert cache.json()["dependency"] == "cache"
    logged = [r for r in records if "unreachable" in r["message"]]
    assert logged[0]["request_id"] == "r-db"
    assert logged[0]["level"] == "warning"


async def test_drain_leaves_ready_and_keeps_serving() -> None:
    service = make_service(deregister_delay=0.05)
    async with in_process(service) as client:
        await service.drain()
        ready = await client.get("/health/ready")
        served = await client.get("/context")
    assert ready.status_code == 503
    assert ready.json()["status"] == "draining"
    assert served.status_code == 200


async def test_startup_and_shutdown_hooks_run_in_order() -> None:
    service = Service("orders")
    events: list[str] = []

    @service.on_startup
    async def up() -> None:
        events.append("up")

    @service.on_shutdown
    async def down() -> None:
        events.append("down")

    async with in_process(service) as client:
        assert (await client.get("/health/live")).status_code == 200
        assert events == ["up"]
    assert events == ["up", "down"]


async def test_drain_lets_in_flight_requests_finish() -> None:
    """A request in flight when the drain starts finishes (SIGTERM: tests/e2e)."""
    from meshgate.service.testing import serving

    service = Service("slow", deregister_delay=0.2)

    @service.app.get("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(0.5)
        return {"done": True}

    async with serving(service) as address, httpx.AsyncClient() as client:
        pending = asyncio.ensure_future(client.get(f"http://{address}/slow"))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        server_exit = asyncio.ensure_future(service.drain())
        response = await pending
        await server_exit
    assert response.json() == {"done": True}
    assert time.monotonic() - started >= 0.2  # the drain waited the deregister delay


async def test_every_meshgate_metric_follows_the_prometheus_naming_rules(tmp_path: Path) -> None:
    """Base units (seconds, not milliseconds), ``_total`` on counters and only there, no
    word twice in a row (the old ``meshgate_gateway_gateway_seconds``)."""
    database = Database(f"sqlite:///{tmp_path / 'names.db'}", name="names")
    cache = Cache("memory://", name="names")
    service = Service("names", database=database, cache=cache)
    calls = ServiceClient("nowhere", endpoints=[], caller="names")

    @service.app.get("/work")
    async def work() -> None:
        await cache.get_or_load("k", database.ping)
        with contextlib.suppress(ServiceUnavailableError):
            await calls.get("/x")

    try:
        async with in_process(service) as client:
            await client.get("/work")
            text = (await client.get("/metrics")).text
    finally:
        await calls.close()
    families = [f for f in text_string_to_metric_families(text) if f.name.startswith("meshgate_")]
    names = {f.name for f in families}
    assert {
        "meshgate_service_requests",
        "meshgate_service_request_duration_seconds",
        "meshgate_db_query_duration_seconds",
        "meshgate_cache_hits",
        "meshgate_client_requests",
        "meshgate_client_retries",
        "meshgate_client_breaker_open",
        "meshgate_client_retry_budget_tokens",
    } <= names
    for family in families:
        words = family.name.split("_")
        assert re.fullmatch(r"meshgate(_[a-z0-9]+)+", family.name), family.name
        assert all(a != b for a, b in itertools.pairwise(words)), f"doubled word: {family.name}"
        assert not {"ms", "millis", "milliseconds", "minutes", "kb", "mb"} & set(words), family.name
        samples = {s.name for s in family.samples}
        if family.type == "counter":
            assert samples <= {f"{family.name}_total", f"{family.name}_created"}, samples
        else:
            assert not family.name.endswith("_total"), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
