"""Retries, outlier detection, circuit breaking and balancing, over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

from tests.helpers import (
    Client,
    Message,
    RawUpstream,
    build_request,
    echo_handler,
    free_port,
    response,
    run_gateway,
)


def config(endpoints: list[str], upstream: str = "", route: str = "", gateway: str = "") -> str:
    eps = ", ".join(repr(e) for e in endpoints)
    return (
        "gateway:\n  listen: 127.0.0.1:0\n  access_log: {enabled: false}\n"
        + "".join(f"  {line}\n" for line in gateway.strip().splitlines())
        + "upstreams:\n  up:\n"
        + f"    endpoints: [{eps}]\n"
        + "".join(f"    {line}\n" for line in upstream.strip().splitlines())
        + "routes:\n  - name: all\n    upstream: up\n"
        + "".join(f"    {line}\n" for line in route.strip().splitlines())
    )


async def close_after_reading(
    req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter
) -> bool:
    return False  # read the whole request, then close without answering


async def test_connect_failure_is_retried_on_another_endpoint() -> None:
    live = await RawUpstream().start()
    dead = f"127.0.0.1:{free_port()}"
    # Round robin keeps sending to the dead endpoint until it is ejected.
    upstream = "balancer: round_robin"
    async with run_gateway(config([dead, live.address], upstream)) as (worker, port):
        client = await Client.connect(port)
        statuses = [(await client.request("GET", f"/{i}")).status for i in range(30)]
        await client.close()
        endpoints = {e.label: e for e in worker.runtime.upstreams["up"].endpoints}
    assert statuses == [200] * 30
    assert len(live.requests) == 30
    # Five consecutive connect failures eject the dead endpoint (passive health).
    assert endpoints[dead].ejected_until > 0
    assert not endpoints[dead].available
    await live.close()


async def test_post_that_reached_the_upstream_is_not_retried() -> None:
    first = await RawUpstream(close_after_reading).start()
    second = await RawUpstream(echo_handler).start()
    # Round robin, so that the first try goes to the failing endpoint.
    async with run_gateway(config([first.address, second.address], "balancer: round_robin")) as (
        _,
        port,
    ):
        client = await Client.connect(port)
        res = await client.request("POST", "/orders", body=b"pay 10 EUR")
        await client.close()
    assert res.status == 502
    assert b"upstream_closed" in res.body
    assert len(first.requests) == 1
    assert second.requests == []
    await first.close()
    await second.close()


async def test_post_with_idempotency_key_is_retried_with_its_body_when_allowed() -> None:
    first = await RawUpstream(close_after_reading).start()
    second = await RawUpstream(echo_handler).start()
    body = os.urandom(40_000)
    upstream = "balancer: round_robin\nretries: {idempotency_key: true}"
    async with run_gateway(config([first.address, second.address], upstream)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("POST", "/orders", [("Idempotency-Key", "k-1")], body)
        await client.close()
    assert res.status == 200
    assert hashlib.sha256(res.body).digest() == hashlib.sha256(body).digest()
    assert hashlib.sha256(first.requests[0].body).digest() == hashlib.sha256(body).digest()
    assert len(second.requests) == 1
    await first.close()
    await second.close()


async def test_idempotency_key_is_not_enough_unless_the_route_allows_it() -> None:
    first = await RawUpstream(close_after_reading).start()
    second = await RawUpstream(echo_handler).start()
    async with run_gateway(config([first.address, second.address], "balancer: round_robin")) as (
        _,
        port,
    ):
        client = await Client.connect(port)
        res = await client.request("POST", "/x", [("Idempotency-Key", "k-2")], b"body")
        await client.close()
    assert res.status == 502
    assert second.requests == []
    await first.close()
    await second.close()


async def test_post_that_never_reached_an_upstream_is_retried() -> None:
    live = await RawUpstream(echo_handler).start()
    dead = f"127.0.0.1:{free_port()}"
    async with run_gateway(config([dead, live.address], "balancer: round_robin")) as (_, port):
        client = await Client.connect(port)
        res = await client.request("POST", "/x", body=b"exactly once")
        await client.close()
    assert res.status == 200
    assert res.body == b"exactly once"
    assert len(live.requests) == 1
    await live.close()


async def test_retryable_status_goes_to_another_endpoint() -> None:
    async def unavailable(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(response(503, b"busy"))

    first = await RawUpstream(unavailable).start()
    second = await RawUpstream().start()
    async with run_gateway(config([first.address, second.address], "balancer: round_robin")) as (
        worker,
        port,
    ):
        client = await Client.connect(port)
        res = await client.request("GET", "/thing")
        await client.close()
        retries = worker.metrics.route("all", "up").retries
    assert res.status == 200
    assert res.body == b"/thing"
    assert len(first.requests) == 1
    assert retries == 1
    await first.close()
    await second.close()


async def test_body_larger_than_the_replay_buffer_is_not_retried() -> None:
    first = await RawUpstream(close_after_reading).start()
    second = await RawUpstream(echo_handler).start()
    upstream = "balancer: round_robin\nretries: {idempotency_key: true, buffer: 1KiB}"
    async with run_gateway(config([first.address, second.address], upstream)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("PUT", "/big", body=b"x" * 5000)
        await client.close()
    assert res.status == 502
    assert second.requests == []
    await first.close()
    await second.close()


async def test_per_try_timeout_moves_on_to_another_endpoint() -> None:
    async def slow(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    first = await RawUpstream(slow).start()
    second = await RawUpstream().start()
    upstream = "balancer: round_robin\nretries: {retry_on: [timeout], per_try_timeout: 300ms}"
    async with run_gateway(config([first.address, second.address], upstream)) as (_, port):
        client = await Client.connect(port)
        started = time.monotonic()
        res = await client.request("GET", "/slow")
        took = time.monotonic() - started
        await client.close()
    assert res.status == 200
    assert 0.3 <= took < 2.0
    await first.close()
    await second.close()


async def test_retries_stay_within_the_budget_when_every_endpoint_fails() -> None:
    async def fail(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(response(503, b"down"))

    ups = [await RawUpstream(fail).start() for _ in range(3)]
    # No outlier detection: every endpoint stays in rotation, and every try fails.
    upstream = (
        "health: {passive: null}\n"
        "retries: {attempts: 3, backoff_base: 1ms, backoff_max: 2ms,"
        " budget: {ratio: 0.2, min_per_second: 5}}"
    )
    sent = 300
    async with run_gateway(config([u.address for u in ups], upstream)) as (worker, port):
        clients = [await Client.connect(port) for _ in range(10)]
        started = time.monotonic()

        async def run(client: Client, n: int) -> list[int]:
            return [(await client.request("GET", "/")).status for _ in range(n)]

        results = await asyncio.gather(*(run(c, sent // 10) for c in clients))
        seconds = time.monotonic() - started
        for c in clients:
            await c.close()
        exhausted = worker.metrics.route("all", "up").budget_exhausted
    assert all(s == 503 for statuses in results for s in statuses)
    tries = sum(len(u.requests) for u in ups)
    retries = tries - sent
    # The budget: 20 % of requests, 5 a second, and its initial cap of 10.
    assert retries <= 0.2 * sent + 5 * (seconds + 0.2) + 10, (retries, seconds)
    assert retries > 0
    assert exhausted > 0
    for u in ups:
        await u.close()


async def test_circuit_breaker_opens_then_closes_after_half_open_trials() -> None:
    healthy = False

    async def flaky(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(response(200 if healthy else 500, b"x"))

    up = await RawUpstream(flaky).start()
    upstream = (
        "retries: {attempts: 0}\n"
        "circuit_breaker: {failure_ratio: 0.5, window: 5s, min_requests: 4,"
        " open_for: 500ms, half_open_requests: 2}"
    )
    async with run_gateway(config([up.address], upstream)) as (_, port):
        client = await Client.connect(port)
        first = [(await client.request("GET", "/")).status for _ in range(4)]
        blocked = await client.request("GET", "/")
        assert first == [500] * 4
        assert blocked.status == 503
        assert b"circuit_open" in blocked.body
        assert blocked.header("Retry-After") == "1"
        assert len(up.requests) == 4  # the open circuit kept the fifth away
        healthy = True
        await asyncio.sleep(0.6)
        after = [(await client.request("GET", "/")).status for _ in range(5)]
        await client.close()
    assert after == [200] * 5
    await up.close()


async def test_sticky_cookie_keeps_a_client_on_one_endpoint() -> None:
    ups = [await RawUpstream().start() for _ in range(3)]
    async with run_gateway(
        config([u.address for u in ups], "balancer: sticky\nsticky: {cookie: sid}")
    ) as (_, port):
        client = await Client.connect(port)
        first = await client.request("GET", "/a")
        cookie = first.header("Set-Cookie")
        assert cookie is not None
        assert cookie.startswith("sid=")
        assert "HttpOnly" in cookie
        value = cookie.split(";")[0]
        for _ in range(20):
            again = await client.request("GET", "/b", [("Cookie", f"other=1; {value}")])
            assert again.header("Set-Cookie") is None
        await client.close()
    served = [len(u.requests) for u in ups]
    assert sorted(served) == [0, 0, 21]
    for u in ups:
        await u.close()


async def test_hash_by_header_sends_a_key_to_one_endpoint() -> None:
    ups = [await RawUpstream().start() for _ in range(3)]
    async with run_gateway(
        config([u.address for u in ups], "balancer: hash\nhash: {header: X-User}")
    ) as (_, port):
        client = await Client.connect(port)
        for user in ("ann", "bob", "cyd", "dan"):
            for _ in range(5):
                await client.request("GET", f"/{user}", [("X-User", user)])
        await client.close()
    for u in ups:
        users = {r.target for r in u.requests}
        for user in users:
            assert sum(1 for r in u.requests if r.target == user) == 5
    assert sum(len(u.requests) for u in ups) == 20
    for u in ups:
        await u.close()


async def test_pipelined_requests_keep_their_own_retry_state() -> None:
    async def first_fails(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(response(503 if req.target == "/1" else 200, req.target.encode()))

    bad = await RawUpstream(first_fails).start()
    good = await RawUpstream().start()
    async with run_gateway(config([bad.address, good.address], "balancer: round_robin")) as (
        _,
        port,
    ):
        client = await Client.connect(port)
        await client.send(build_request("GET", "/1") + build_request("GET", "/2"))
        bodies = [(await client.read()).body for _ in range(2)]
        await client.close()
    assert bodies == [b"/1", b"/2"]
    await bad.close()
    await good.close()
