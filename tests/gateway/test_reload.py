"""Reloading a worker's configuration: what carries over and what does not."""

from __future__ import annotations

import asyncio

from meshgate.config import loads
from tests.helpers import Client, RawUpstream, run_gateway


def doc(endpoints: list[str], extra_route: bool = False, read: str = "60s") -> str:
    eps = ", ".join(repr(e) for e in endpoints)
    text = (
        "gateway: {listen: '127.0.0.1:0', access_log: {enabled: false}}\n"
        f"upstreams:\n  up: {{endpoints: [{eps}], timeouts: {{read: {read}}}}}\n"
        "routes:\n  - {name: all, upstream: up}\n"
    )
    if extra_route:
        text += "  - {name: extra, upstream: up, match: {path_prefix: /extra}}\n"
    return text


async def test_unchanged_upstream_keeps_its_pool_and_state() -> None:
    up = await RawUpstream().start()
    async with run_gateway(doc([up.address])) as (worker, port):
        client = await Client.connect(port)
        for _ in range(5):
            assert (await client.request("GET", "/")).status == 200
        before = worker.runtime.upstreams["up"]
        worker.apply(loads(doc([up.address], extra_route=True)))
        assert worker.runtime.upstreams["up"] is before
        for _ in range(5):
            assert (await client.request("GET", "/extra/x")).status == 200
        await client.close()
    assert up.connections == 1
    assert [r.target for r in up.requests][-1] == "/extra/x"


async def test_changed_upstream_carries_its_endpoints_connections_and_drain() -> None:
    a = await RawUpstream().start()
    b = await RawUpstream().start()
    async with run_gateway(doc([a.address, b.address])) as (worker, port):
        client = await Client.connect(port)
        worker.set_endpoint_state("up", b.address, "drained", True)
        for _ in range(5):
            assert (await client.request("GET", "/")).status == 200
        old = worker.runtime.upstreams["up"]
        kept = old.endpoint(a.address)
        worker.apply(loads(doc([a.address, b.address], read="5s")))
        new = worker.runtime.upstreams["up"]
        assert new is not old
        assert new.endpoint(a.address) is kept
        assert new.endpoint(b.address).drained  # type: ignore[union-attr]
        for _ in range(5):
            assert (await client.request("GET", "/")).status == 200
        await client.close()
    assert a.connections == 1
    assert len(a.requests) == 10
    assert b.requests == []


async def test_removed_endpoint_loses_its_idle_connections() -> None:
    a = await RawUpstream().start()
    b = await RawUpstream().start()
    rr = doc([a.address, b.address]).replace("timeouts:", "balancer: round_robin, timeouts:")
    async with run_gateway(rr) as (worker, port):
        client = await Client.connect(port)
        for _ in range(20):
            await client.request("GET", "/")
        assert b.open == 1  # pooled
        worker.apply(loads(doc([a.address])))
        await asyncio.wait_for(b.closed.wait(), 5)
        assert b.open == 0
        await client.close()


async def test_drained_endpoint_gets_no_new_requests() -> None:
    a = await RawUpstream().start()
    b = await RawUpstream().start()
    async with run_gateway(doc([a.address, b.address])) as (worker, port):
        worker.set_endpoint_state("up", a.address, "drained", True)
        client = await Client.connect(port)
        for _ in range(10):
            await client.request("GET", "/")
        worker.set_endpoint_state("up", a.address, "drained", False)
        worker.set_endpoint_state("up", b.address, "drained", True)
        for _ in range(10):
            await client.request("GET", "/")
        await client.close()
    assert len(a.requests) == 10
    assert len(b.requests) == 10
