"""Reloading a worker's configuration: what carries over and what does not."""

from __future__ import annotations

import asyncio
import gc
import weakref

from meshgate.config import loads
from meshgate.gateway.runtime import Runtime
from tests.helpers import Client, Message, RawUpstream, response, run_gateway


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


async def test_reloads_keep_no_old_configuration_alive() -> None:
    up = await RawUpstream().start()
    async with run_gateway(doc([up.address])) as (worker, port):
        client = await Client.connect(port)
        assert (await client.request("GET", "/")).status == 200
        old: list[weakref.ref[Runtime]] = []
        for i in range(50):
            old.append(weakref.ref(worker.runtime))
            # The upstream changes every time, its endpoint (and pooled connection) stays.
            worker.apply(loads(doc([up.address], read=f"{10 + i}s")))
            assert (await client.request("GET", "/")).status == 200
        await client.close()
        gc.collect()
        alive = [ref for ref in old if ref() is not None]
        assert alive == [], f"{len(alive)} of 50 replaced configurations still in memory"
    assert up.connections == 1


async def test_endpoint_removed_mid_request_closes_its_connection_after_it() -> None:
    release = asyncio.Event()

    async def slow(req: Message, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await release.wait()
        w.write(response(200, b"late"))

    b = await RawUpstream(slow).start()
    async with run_gateway(doc([b.address])) as (worker, port):
        client = await Client.connect(port)
        pending = asyncio.ensure_future(client.request("GET", "/"))
        while not b.requests:
            await asyncio.sleep(0.01)
        a = await RawUpstream().start()
        worker.apply(loads(doc([a.address])))
        assert b.open == 1  # in use: the request finishes on the old configuration
        release.set()
        assert (await pending).body == b"late"
        # Then the connection to the removed endpoint closes, not pooled for ever.
        await asyncio.wait_for(b.closed.wait(), 5)
        assert b.open == 0
        assert (await client.request("GET", "/")).status == 200
        await client.close()
    assert len(a.requests) == 1
