"""Service upstreams in one worker: endpoints that the registry's instances provide,
changed while the worker serves (the supervisor sends them; see tests/e2e)."""

from __future__ import annotations

import asyncio
import json

from meshgate.config import loads
from tests.helpers import Client, Message, RawUpstream, response, run_gateway


def doc(read: str = "10s", balancer: str = "round_robin") -> str:
    return (
        "gateway: {listen: '127.0.0.1:0', access_log: {enabled: false}}\n"
        f"upstreams:\n  users: {{service: users, balancer: {balancer}, "
        f"timeouts: {{read: {read}}}}}\n"
        "routes:\n  - {name: users, service: users, match: {path_prefix: /users}}\n"
        "  - {name: orders, service: orders, match: {path_prefix: /orders}}\n"
    )


def spec(up: RawUpstream) -> tuple[str, int, int]:
    return ("127.0.0.1", up.port, 1)


async def test_a_service_without_instances_is_503_naming_it() -> None:
    async with run_gateway(doc()) as (_, port):
        client = await Client.connect(port)
        for target, service in (("/users/1", "users"), ("/orders/1", "orders")):
            res = await client.request("GET", target)
            assert res.status == 503
            body = json.loads(res.body)
            assert body["error"] == "no_endpoint"
            assert body["detail"] == f"no instance of service {service!r} is registered"
        await client.close()


async def test_instances_take_traffic_as_they_come_and_go() -> None:
    a = await RawUpstream().start()
    b = await RawUpstream().start()
    async with run_gateway(doc()) as (worker, port):
        client = await Client.connect(port)
        worker.set_endpoints("users", [spec(a)])
        assert (await client.request("GET", "/users/1")).status == 200
        worker.set_endpoints("users", [spec(a), spec(b)])
        for i in range(10):
            assert (await client.request("GET", f"/users/{i}")).status == 200
        assert len(a.requests) == 6
        assert len(b.requests) == 5
        pooled = a.open
        worker.set_endpoints("users", [spec(b)])
        for i in range(4):
            assert (await client.request("GET", f"/users/b{i}")).status == 200
        assert len(b.requests) == 9
        # The instance that went has its pooled connections closed.
        assert pooled == 1
        await asyncio.wait_for(a.closed.wait(), 5)
        worker.set_endpoints("users", [])
        assert (await client.request("GET", "/users/x")).status == 503
        await client.close()


async def test_an_instance_that_goes_finishes_its_requests_first() -> None:
    release = asyncio.Event()

    async def slow(req: Message, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await release.wait()
        w.write(response(200, b"finished"))

    a = await RawUpstream(slow).start()
    b = await RawUpstream().start()
    async with run_gateway(doc()) as (worker, port):
        worker.set_endpoints("users", [spec(a)])
        client = await Client.connect(port)
        pending = asyncio.ensure_future(client.request("GET", "/users/slow"))
        while not a.requests:
            await asyncio.sleep(0.01)
        worker.set_endpoints("users", [spec(b)])  # deregistered: drained, not cut off
        other = await Client.connect(port)
        assert (await other.request("GET", "/users/next")).status == 200
        release.set()
        res = await pending
        assert (res.status, res.body) == (200, b"finished")
        await asyncio.wait_for(a.closed.wait(), 5)
        await client.close()
        await other.close()
    assert [r.target for r in b.requests] == ["/users/next"]


async def test_instances_outlive_a_reload() -> None:
    a = await RawUpstream().start()
    async with run_gateway(doc()) as (worker, port):
        worker.set_endpoints("users", [spec(a)])
        client = await Client.connect(port)
        assert (await client.request("GET", "/users/1")).status == 200
        # A changed upstream (new read timeout), and an unchanged one.
        worker.apply(loads(doc(read="20s")))
        assert (await client.request("GET", "/users/2")).status == 200
        worker.apply(loads(doc(read="20s").replace("/orders", "/o")))
        assert (await client.request("GET", "/users/3")).status == 200
        await client.close()
    assert a.connections == 1  # the pooled connection carried over both reloads


async def test_endpoints_for_a_static_or_unknown_upstream_are_ignored() -> None:
    a = await RawUpstream().start()
    text = doc() + "  - {name: static, upstream: fixed, match: {path_prefix: /fixed}}\n"
    text = text.replace("upstreams:\n", f"upstreams:\n  fixed: {{endpoints: ['{a.address}']}}\n")
    async with run_gateway(text) as (worker, port):
        worker.set_endpoints("fixed", [("127.0.0.1", 9, 1)])
        worker.set_endpoints("nope", [("127.0.0.1", 9, 1)])
        client = await Client.connect(port)
        assert (await client.request("GET", "/fixed")).status == 200
        await client.close()
