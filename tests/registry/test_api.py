"""The registry's HTTP API, served by uvicorn on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from meshgate.registry import InstanceSpec, MemoryRegistry, RegistryUnavailableError, Snapshot
from meshgate.registry.api import parse_wait
from tests.registry.conftest import TOKEN, Server, make_app

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = {"address": "10.0.0.1:8080", "version": "1.0", "zone": "eu", "ttl": 10}
BASE = "/v1/registry"


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url + BASE, headers=AUTH, timeout=5) as client:
        yield client


@dataclass
class Events:
    """Reads a server-sent event stream."""

    lines: AsyncIterator[str]
    comments: list[str] = field(default_factory=list)

    async def next(self, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
        """The next event: its id and its data."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(timeout):
            async for line in self.lines:
                if line.startswith(":"):
                    self.comments.append(line)
                elif line == "":
                    if "data" in fields:
                        return int(fields["id"]), json.loads(fields["data"])
                    fields = {}
                else:
                    name, _, value = line.partition(": ")
                    fields[name] = value
        raise AssertionError("the stream ended")


@asynccontextmanager
async def events(
    http: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None
) -> AsyncIterator[Events]:
    async with http.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Events(response.aiter_lines())


async def test_register_list_heartbeat_deregister(http: httpx.AsyncClient) -> None:
    response = await http.put("/services/users/instances/a", json=SPEC)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["service"], body["id"], body["address"], body["index"]) == (
        "users",
        "a",
        "10.0.0.1:8080",
        1,
    )
    await http.put("/services/orders/instances/x", json={"address": "10.0.0.9:80"})

    response = await http.get("/services/users")
    assert response.status_code == 200
    assert response.headers["x-meshgate-index"] == "1"
    snapshot = Snapshot.from_json(response.json())
    assert [i.id for i in snapshot.instances] == ["a"]
    assert snapshot.instances[0].zone == "eu"

    response = await http.get("/services")
    assert response.headers["x-meshgate-index"] == "2"
    assert set(response.json()["services"]) == {"users", "orders"}

    response = await http.put("/services/users/instances/a/heartbeat")
    assert response.status_code == 200
    assert response.json()["id"] == "a"

    response = await http.delete("/services/users/instances/a")
    assert response.status_code == 200
    assert response.json()["deregistered"] is True
    response = await http.delete("/services/users/instances/a")
    assert response.status_code == 404
    assert response.json()["error"] == "not_registered"
    # An RFC 9457 problem, as everywhere on the platform (issue 11).
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "https://meshgate.dev/problems/not_registered"
    assert (problem["status"], problem["title"]) == (404, "Not Found")
    assert "is not registered" in problem["detail"]
    assert (problem["service"], problem["id"]) == ("users", "a")


async def test_heartbeat_of_an_unknown_instance_says_register_again(
    http: httpx.AsyncClient,
) -> None:
    response = await http.put("/services/users/instances/ghost/heartbeat")
    assert response.status_code == 404
    body = response.json()
    assert body["error"] == "not_registered"
    assert "PUT /v1/registry/services/users/instances/ghost" in body["detail"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/services/users/instances/a"),
        ("PUT", "/services/users/instances/a/heartbeat"),
        ("DELETE", "/services/users/instances/a"),
        ("GET", "/services"),
        ("GET", "/services/users"),
        ("GET", "/watch"),
        ("GET", "/services/users/watch"),
    ],
)
@pytest.mark.parametrize("token", [None, "wrong-token"])
async def test_every_route_needs_the_token(
    server: Server, registry: MemoryRegistry, method: str, path: str, token: str | None
) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.url + BASE, timeout=5) as client:
        response = await client.request(method, path, headers=headers, json=SPEC)
    assert response.status_code == 401
    assert registry.index == 0


@pytest.mark.parametrize(
    ("body", "error", "parts"),
    [
        (b"{not json", "invalid_json", ["not JSON", '"address"']),
        (b"[1, 2]", "invalid_spec", ["(body)"]),
        (json.dumps({**SPEC, "ttl": 0}).encode(), "invalid_spec", ["ttl: 0 seconds", "between"]),
        (
            json.dumps({"address": "nohost", "weight": 1}).encode(),
            "invalid_spec",
            ["address: 'nohost' is not host:port", "weight: is not a field"],
        ),
    ],
)
async def test_bad_specs_get_400_naming_the_field_and_fix(
    http: httpx.AsyncClient, body: bytes, error: str, parts: list[str]
) -> None:
    response = await http.put("/services/users/instances/a", content=body)
    assert response.status_code == 400
    answer = response.json()
    assert answer["error"] == error
    for part in parts:
        assert part in answer["detail"]


async def test_field_list_of_an_invalid_spec(http: httpx.AsyncClient) -> None:
    response = await http.put("/services/users/instances/a", json={**SPEC, "ttl": 999, "zone": "!"})
    assert response.json()["fields"] == ["ttl", "zone"]


async def test_too_large_a_body_is_refused(http: httpx.AsyncClient) -> None:
    response = await http.put("/services/users/instances/a", content=b" " * 70_000)
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/services/bad!name/instances/a"),
        ("PUT", "/services/users/instances/-a/heartbeat"),
        ("DELETE", "/services/users/instances/a.b%20c"),
        ("GET", "/services/" + "x" * 64),
        ("GET", "/services/bad!/watch"),
    ],
)
async def test_bad_names_get_400(http: httpx.AsyncClient, method: str, path: str) -> None:
    response = await http.request(method, path, json=SPEC)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_name"
    assert "use 1 to 63 letters" in body["detail"]


@pytest.mark.parametrize(
    "query", ["index=-1", "index=abc", "index=1&wait=soon", "index=1&wait=-5s"]
)
async def test_bad_long_poll_parameters_get_400(http: httpx.AsyncClient, query: str) -> None:
    response = await http.get(f"/services/users?{query}")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_parameter"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("30s", 30.0), ("1.5s", 1.5), ("250ms", 0.25), ("2m", 120.0), ("1h", None)],
)
def test_parse_wait(text: str, seconds: float | None) -> None:
    if seconds is None:
        with pytest.raises(ValueError, match="30s, 500ms or 2m"):
            parse_wait(text)
    else:
        assert parse_wait(text) == seconds
    assert parse_wait("10m") == 300.0  # capped


async def test_long_poll_returns_as_soon_as_the_index_passes(
    http: httpx.AsyncClient, registry: MemoryRegistry
) -> None:
    await registry.register("users", "a", InstanceSpec(address="10.0.0.1:80"))
    poll = asyncio.create_task(http.get("/services/users", params={"index": 1, "wait": "10s"}))
    await asyncio.sleep(0.2)
    assert not poll.done()
    # A change of another service does not answer this poll.
    await registry.register("orders", "x", InstanceSpec(address="10.0.0.9:80"))
    await asyncio.sleep(0.1)
    assert not poll.done()
    started = time.monotonic()
    await registry.register("users", "b", InstanceSpec(address="10.0.0.2:80"))
    response = await asyncio.wait_for(poll, 2)
    assert time.monotonic() - started < 0.5
    assert response.headers["x-meshgate-index"] == "3"
    assert [i["id"] for i in response.json()["instances"]] == ["a", "b"]


async def test_long_poll_answers_the_current_state_after_wait(http: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await http.get("/services", params={"index": 0, "wait": "300ms"})
    assert 0.25 < time.monotonic() - started < 2
    assert response.status_code == 200
    assert response.headers["x-meshgate-index"] == "0"


async def test_a_long_poll_stops_waiting_when_its_client_goes_away(
    http: httpx.AsyncClient, registry: MemoryRegistry
) -> None:
    poll = asyncio.create_task(http.get("/services/users", params={"index": 0, "wait": "30s"}))
    async with asyncio.timeout(2):
        while not registry._notifier._waiters:
            await asyncio.sleep(0.01)
    poll.cancel()  # closes the connection
    with pytest.raises(asyncio.CancelledError):
        await poll
    async with asyncio.timeout(2):
        while registry._notifier._waiters:
            await asyncio.sleep(0.01)


async def test_sse_sends_current_state_then_changes_and_keepalives(
    http: httpx.AsyncClient, registry: MemoryRegistry
) -> None:
    async with events(http, "/services/users/watch") as stream:
        index, data = await stream.next()
        assert (index, data["instances"]) == (0, [])
        await registry.register("users", "a", InstanceSpec(address="10.0.0.1:80"))
        index, data = await stream.next()
        assert index == 1
        assert [i["id"] for i in data["instances"]] == ["a"]
        await registry.deregister("users", "a")
        index, data = await stream.next()
        assert (index, data["instances"]) == (2, [])
        # Nothing changes for a while: comments keep the connection alive.
        await asyncio.sleep(0.4)
        await registry.register("users", "b", InstanceSpec(address="10.0.0.2:80"))
        assert (await stream.next())[0] == 3
        assert ": keep-alive" in stream.comments


async def test_sse_with_last_event_id_does_not_miss_changes(
    http: httpx.AsyncClient, registry: MemoryRegistry
) -> None:
    async with events(http, "/watch") as stream:
        last_id, _ = await stream.next()
    assert last_id == 0
    # While the watcher is away: two changes.
    await registry.register("users", "a", InstanceSpec(address="10.0.0.1:80"))
    await registry.register("orders", "x", InstanceSpec(address="10.0.0.2:80"))
    headers = {"Last-Event-ID": str(last_id)}
    async with events(http, "/watch?index=0", headers) as stream:
        index, data = await stream.next()
        assert index == 2
        assert set(data["services"]) == {"users", "orders"}
    # Reconnecting with the latest id: nothing is sent again until the next change.
    async with events(http, "/watch", {"Last-Event-ID": "2"}) as stream:
        waiting = asyncio.create_task(stream.next())
        await asyncio.sleep(0.4)
        assert not waiting.done()
        await registry.deregister("users", "a")
        index, data = await waiting
        assert index == 3
        assert set(data["services"]) == {"orders"}
    # ?index= alone works like Last-Event-ID (for clients that cannot set headers).
    async with events(http, "/services/orders/watch?index=0") as stream:
        assert (await stream.next())[0] == 2


async def test_sse_rejects_a_bad_last_event_id(http: httpx.AsyncClient) -> None:
    response = await http.get("/watch", headers={"Last-Event-ID": "x"})
    assert response.status_code == 400
    assert response.json()["parameter"] == "Last-Event-ID"


class _Unavailable(MemoryRegistry):
    async def snapshot(self, service: str | None = None) -> Snapshot:
        raise RegistryUnavailableError("Redis at redis://db:6379 is unavailable (test)")

    async def wait(self, index: int, service: str | None = None, timeout: float = 30) -> Snapshot:
        raise RegistryUnavailableError("Redis at redis://db:6379 is unavailable (test)")


async def test_unavailable_backend_gets_503_and_streams_ride_it_out() -> None:
    async with _Unavailable() as registry:
        server = await Server(make_app(registry, keepalive=0.3)).start()
        try:
            async with httpx.AsyncClient(base_url=server.url + BASE, headers=AUTH) as http:
                response = await http.get("/services/users")
                assert response.status_code == 503
                assert response.headers["retry-after"] == "1"
                body = response.json()
                assert body["error"] == "registry_unavailable"
                assert "redis://db:6379" in body["detail"]
                async with events(http, "/watch", {"Last-Event-ID": "5"}) as stream:
                    waiting = asyncio.create_task(stream.next(timeout=0.5))
                    with pytest.raises(TimeoutError):
                        await waiting
                    assert any("registry unavailable" in c for c in stream.comments)
        finally:
            await server.stop()


async def test_closed_registry_gets_503(http: httpx.AsyncClient, registry: MemoryRegistry) -> None:
    await registry.close()
    response = await http.put("/services/users/instances/a", json=SPEC)
    assert response.status_code == 503
    assert response.json()["error"] == "registry_closed"
