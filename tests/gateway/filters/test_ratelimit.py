"""Rate limiting (GCRA) over real sockets: counted in the worker, and in a real Redis.

Clients connect from different loopback addresses (127.0.0.1, 127.0.0.2, ...) to be
different client IPs. Every Redis key a test writes lives under a prefix unique to it
and is deleted at teardown.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
import trustme
from prometheus_client import CollectorRegistry, generate_latest

from meshgate.config import loads
from meshgate.errors import ConfigError
from meshgate.gateway.filters import ratelimit
from meshgate.gateway.filters.auth import hash_api_key
from meshgate.gateway.filters.ratelimit import _SCRIPT_SHA, RateLimitFilter
from meshgate.gateway.metrics import GatewayCollector, merge_snapshots
from meshgate.gateway.worker import Worker
from tests.gateway.test_resp import acl_user, redis_front, user_url
from tests.helpers import Client, Message, RawUpstream, free_port, gateway_yaml, run_gateway

REDIS_URL = "redis://127.0.0.1:6379/0"

POLICY = '"meshgate";q=3;w=1'
"""``rate: 5/s, burst: 2``: 3 requests at once, refilled within 1 s."""

_RATELIMIT_RE = re.compile(r'^"meshgate";r=(?P<r>\d+);t=(?P<t>\d+)$')


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.services)])
def backend(request: pytest.FixtureRequest) -> str:
    """Where the limit counts: the rate_limit keys that select it (appended to a mapping)."""
    if request.param == "local":
        return ""
    prefix = request.getfixturevalue("redis_prefix")
    return f", redis: '{REDIS_URL}', key_prefix: '{prefix}'"


@pytest.fixture(autouse=True)
async def _fresh_process_state() -> AsyncIterator[None]:
    """Close the pipelined Redis clients a test opened and forget local counts. In a
    worker process one client per URL lives as long as the process and its one event
    loop, and local counts carry over reloads; each test has its own loop and
    gateway, so a client left over would hold a connection of a closed loop, and
    counts left over (until the old runtime is collected) would leak into the next
    test's route of the same name and settings."""
    ratelimit._LOCAL.clear()
    yield
    for client in ratelimit._CLIENTS.values():
        client.close()
    ratelimit._CLIENTS.clear()
    ratelimit._LOCAL.clear()


def limited_route(by: str = "ip", extra: str = "", *, rate: str = "5/s", burst: int = 2) -> str:
    return (
        f"  - {{name: api, upstream: up, "
        f"rate_limit: {{rate: '{rate}', burst: {burst}, by: '{by}'{extra}}}}}\n"
    )


async def connect_from(port: int, ip: str) -> Client:
    """A client connection from the loopback address ``ip`` (any of 127.0.0.0/8)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0))
    return Client(reader, writer)


def rate_limit_filter(worker: Worker, route: str = "api") -> RateLimitFilter:
    """The rate-limit filter the worker built for ``route``."""
    match = next(r for r in worker.runtime.router.routes if r.name == route)
    chain = match.target.chain  # type: ignore[attr-defined]
    return next(f for f in chain.filters if isinstance(f, RateLimitFilter))


def ratelimit_header(res: Message) -> tuple[int, int]:
    """``r`` (remaining) and ``t`` (seconds until full) of the RateLimit header."""
    value = res.header("RateLimit")
    assert value is not None, res.headers
    found = _RATELIMIT_RE.match(value)
    assert found is not None, value
    return int(found["r"]), int(found["t"])


def remaining(res: Message) -> int:
    return ratelimit_header(res)[0]


async def statuses(
    client: Client, count: int, headers: list[tuple[str, str]] | None = None
) -> list[int]:
    return [(await client.request("GET", "/", headers)).status for _ in range(count)]


def metric(worker: Worker, name: str, route: str = "api") -> float:
    """``name{route=...}`` as /metrics would show it for this one worker (0 if absent)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(lambda: merge_snapshots([worker.snapshot()])))
    pattern = re.compile(rf'^{name}{{route="{route}"}} (\S+)$', re.MULTILINE)
    found = pattern.search(generate_latest(registry).decode())
    return float(found[1]) if found else 0.0


# ---------------------------------------------------------------------------- exactness


async def test_burst_plus_one_pass_then_429(backend: str) -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, limited_route(extra=backend))
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        # Back to back, well within one emission interval (200 ms): no refill between.
        replies = [await client.request("GET", f"/{i}") for i in range(10)]
        await client.close()

    assert [r.status for r in replies] == [200] * 3 + [429] * 7
    assert len(up.requests) == 3
    passed, refused = replies[:3], replies[3:]
    for res in passed:
        assert res.header("RateLimit-Policy") == POLICY
        assert 0 < ratelimit_header(res)[1] <= 1
    assert [remaining(r) for r in passed] == [2, 1, 0]
    for res in refused:
        assert res.header("RateLimit-Policy") == POLICY
        assert remaining(res) == 0
        retry_after = res.header("Retry-After")
        assert retry_after is not None
        assert int(retry_after) >= 1
        body = json.loads(res.body)
        assert body["error"] == "rate_limited"
        assert body["route"] == "api"
        assert res.header("X-Request-ID") is not None
        assert res.header("Content-Type") == "application/problem+json"
    await up.close()


async def test_one_more_passes_after_one_emission_interval(backend: str) -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, limited_route(extra=backend))
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        assert await statuses(client, 5) == [200, 200, 200, 429, 429]
        # GCRA refills one request every 1/rate = 200 ms, not the whole burst at once.
        await asyncio.sleep(0.25)
        res = await client.request("GET", "/")
        assert res.status == 200
        assert remaining(res) == 0
        assert (await client.request("GET", "/")).status == 429
        await client.close()
    assert len(up.requests) == 4
    await up.close()


async def test_refusals_are_counted_per_route_in_metrics(backend: str) -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, limited_route(extra=backend))
    async with run_gateway(config) as (worker, port):
        assert metric(worker, "meshgate_gateway_rate_limited_total") == 0
        client = await Client.connect(port)
        assert await statuses(client, 7) == [200] * 3 + [429] * 4
        await client.close()
        assert metric(worker, "meshgate_gateway_rate_limited_total") == 4
        assert metric(worker, "meshgate_gateway_rate_limit_redis_errors_total") == 0
    await up.close()


# ---------------------------------------------------------------------------- keys


async def test_by_header_counts_each_value_apart(backend: str) -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, limited_route("header:X-User", backend))
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        alice, bob = [("X-User", "alice")], [("x-user", "bob")]
        assert await statuses(client, 4, alice) == [200, 200, 200, 429]
        assert await statuses(client, 4, bob) == [200, 200, 200, 429]
        # Requests without the header share one bucket of their own.
        assert await statuses(client, 4) == [200, 200, 200, 429]
        assert await statuses(client, 1, alice) == [429]
        # The same value from another address is the same bucket.
        other = await connect_from(port, "127.0.0.2")
        assert await statuses(other, 1, bob) == [429]
        await client.close()
        await other.close()
    assert len(up.requests) == 9
    await up.close()


async def test_by_route_shares_one_bucket_across_clients(backend: str) -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, limited_route("route", backend))
    async with run_gateway(config) as (_, port):
        clients = [await connect_from(port, f"127.0.0.{i}") for i in (1, 2, 3)]
        got = [(await c.request("GET", "/")).status for c in clients]
        got += [(await c.request("GET", "/")).status for c in clients]
        for client in clients:
            await client.close()
    assert got == [200, 200, 200, 429, 429, 429]
    await up.close()


async def test_by_ip_counts_each_client_address_apart(backend: str) -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, limited_route("ip", backend))
    async with run_gateway(config) as (_, port):
        first = await connect_from(port, "127.0.0.1")
        second = await connect_from(port, "127.0.0.2")
        again = await connect_from(port, "127.0.0.1")  # another connection, same address
        assert await statuses(first, 3) == [200, 200, 200]
        assert await statuses(again, 1) == [429]
        assert await statuses(second, 4) == [200, 200, 200, 429]
        for client in (first, second, again):
            await client.close()
    await up.close()


async def test_by_ip_uses_forwarded_address_from_trusted_proxy(backend: str) -> None:
    up = await RawUpstream().start()
    config = gateway_yaml(
        {"up": [up.address]}, limited_route("ip", backend), "trusted_proxies: [127.0.0.0/8]"
    )
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        one = [("X-Forwarded-For", "203.0.113.1")]
        two = [("X-Forwarded-For", "203.0.113.2, 127.0.0.5")]  # the rightmost untrusted hop
        assert await statuses(client, 4, one) == [200, 200, 200, 429]
        assert await statuses(client, 4, two) == [200, 200, 200, 429]
        await client.close()
    await up.close()


KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789"}


def consumer_config(upstream: str, backend: str) -> str:
    route = (
        "  - name: api\n"
        "    upstream: up\n"
        "    auth: {api_key: {}, anonymous: true}\n"
        f"    rate_limit: {{rate: '5/s', burst: 2, by: consumer{backend}}}\n"
    )
    consumers = "".join(
        f"  {name}: {{api_keys: ['{hash_api_key(key)}']}}\n" for name, key in KEYS.items()
    )
    return gateway_yaml({"up": [upstream]}, route) + f"consumers:\n{consumers}"


async def test_by_consumer_counts_each_consumer_and_falls_back_to_ip(backend: str) -> None:
    up = await RawUpstream().start()
    async with run_gateway(consumer_config(up.address, backend)) as (_, port):
        home = await connect_from(port, "127.0.0.1")
        away = await connect_from(port, "127.0.0.2")
        alice = [("X-API-Key", KEYS["alice"])]
        bob = [("X-API-Key", KEYS["bob"])]
        # A consumer's bucket follows it from address to address.
        assert await statuses(home, 2, alice) == [200, 200]
        assert await statuses(away, 2, alice) == [200, 429]
        assert await statuses(home, 4, bob) == [200, 200, 200, 429]
        # Without credentials the client's address is the key, apart from consumers'.
        assert await statuses(home, 4) == [200, 200, 200, 429]
        assert await statuses(away, 4) == [200, 200, 200, 429]
        for client in (home, away):
            await client.close()
    assert [r.header("X-Consumer") for r in up.requests[:3]] == ["alice", "alice", "alice"]
    assert len(up.requests) == 12
    await up.close()


# ---------------------------------------------------------------------------- redis


@pytest.mark.services
async def test_redis_keys_are_hash_tagged_and_expire(redis_prefix: str) -> None:
    import redis.asyncio as redis

    up = await RawUpstream().start()
    extra = f", redis: '{REDIS_URL}', key_prefix: '{redis_prefix}'"
    config = gateway_yaml({"up": [up.address]}, limited_route(extra=extra))
    async with run_gateway(config) as (worker, port):
        client = await Client.connect(port)
        assert await statuses(client, 4) == [200, 200, 200, 429]
        await client.close()
        assert rate_limit_filter(worker).redis_errors == 0
    store = redis.Redis.from_url(REDIS_URL)
    try:
        key = f"{{{redis_prefix}:rl:api:ip:127.0.0.1}}"
        assert [k.decode() async for k in store.scan_iter(match=f"{{{redis_prefix}:*")] == [key]
        # The bucket is full again 600 ms after the first request: the key goes with it.
        assert 0 < await store.pttl(key) <= 601
    finally:
        await store.aclose()
    await up.close()


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_redis_unreachable(on_error: str) -> None:
    up = await RawUpstream().start()
    extra = f", redis: 'redis://127.0.0.1:{free_port()}/0', on_redis_error: {on_error}"
    config = gateway_yaml({"up": [up.address]}, limited_route(extra=extra))
    async with run_gateway(config) as (worker, port):
        limiter = rate_limit_filter(worker)
        assert limiter.redis_errors == 0
        client = await Client.connect(port)
        replies = [await client.request("GET", f"/{i}") for i in range(5)]
        await client.close()
        assert limiter.redis_errors == 5
        assert metric(worker, "meshgate_gateway_rate_limit_redis_errors_total") == 5
        assert metric(worker, "meshgate_gateway_rate_limited_total") == 0

    if on_error == "open":
        # More than the burst allows: nothing is counted while Redis is away.
        assert [r.status for r in replies] == [200] * 5
        assert len(up.requests) == 5
        assert all(r.header("RateLimit") is None for r in replies)
    else:
        assert [r.status for r in replies] == [503] * 5
        assert up.requests == []
        for res in replies:
            assert json.loads(res.body)["error"] == "rate_limiter_unavailable"
            assert res.header("Retry-After") == "1"
    await up.close()


@pytest.mark.services
async def test_redis_mode_is_shared_between_workers(redis_prefix: str) -> None:
    """Two workers (two gateway nodes, as far as Redis can tell) count in one bucket."""
    up = await RawUpstream().start()
    extra = f", redis: '{REDIS_URL}', key_prefix: '{redis_prefix}'"
    config = gateway_yaml({"up": [up.address]}, limited_route("route", extra))
    async with run_gateway(config) as (_, first), run_gateway(config) as (_, second):
        a = await Client.connect(first)
        b = await Client.connect(second)
        got = [(await c.request("GET", "/")).status for c in (a, b, a, b, a, b)]
        await a.close()
        await b.close()
    assert got == [200, 200, 200, 429, 429, 429]
    await up.close()


@pytest.mark.services
async def test_a_flushed_script_cache_fails_no_request(redis_prefix: str) -> None:
    """After a Redis restart (here SCRIPT FLUSH) EVALSHA answers NOSCRIPT: each such
    request goes again with the whole script, and EVALSHA carries on after it."""
    import redis.asyncio as redis

    up = await RawUpstream().start()
    # Failing closed: a request that fails shows as a 503. 1/m: no refill during the test.
    extra = f", redis: '{REDIS_URL}', key_prefix: '{redis_prefix}', on_redis_error: closed"
    config = gateway_yaml({"up": [up.address]}, limited_route("header:X-User", extra, rate="1/m"))
    store = redis.Redis.from_url(REDIS_URL)
    try:
        async with run_gateway(config) as (worker, port):
            first = await Client.connect(port)
            assert await statuses(first, 1, [("X-User", "a")]) == [200]
            await store.script_flush()
            # Five at once: their EVALSHAs are on the wire together, all answered NOSCRIPT.
            clients = [await Client.connect(port) for _ in range(5)]
            replies = await asyncio.gather(
                *(c.request("GET", "/", [("X-User", "b")]) for c in clients)
            )
            assert sorted(r.status for r in replies) == [200] * 3 + [429] * 2
            assert sorted(remaining(r) for r in replies) == [0, 0, 0, 1, 2]
            assert await store.script_exists(_SCRIPT_SHA.decode()) == [True]
            # Back to EVALSHA: the last command on the gateway's connection.
            assert await statuses(first, 1, [("X-User", "c")]) == [200]
            protocol = ratelimit._CLIENTS[REDIS_URL]._protocol
            assert protocol is not None
            assert protocol.transport is not None
            host, port_, *_ = protocol.transport.get_extra_info("sockname")
            laddr = f"{host}:{port_}"
            mine = [c for c in await store.client_list() if c["addr"] == laddr]
            assert [c["cmd"] for c in mine] == ["evalsha"]
            # And again after another flush.
            await store.script_flush()
            assert await statuses(first, 4, [("X-User", "d")]) == [200, 200, 200, 429]
            for client in (first, *clients):
                await client.close()
            assert rate_limit_filter(worker).redis_errors == 0
            assert metric(worker, "meshgate_gateway_rate_limit_redis_errors_total") == 0
    finally:
        await store.aclose()
    await up.close()


@pytest.mark.services
async def test_redis_url_with_an_acl_user_authenticates_as_that_user(redis_prefix: str) -> None:
    import redis.asyncio as redis

    up = await RawUpstream().start()
    # The user may only touch this test's keys: a request run as anyone else fails.
    with acl_user(keys=f"{{{redis_prefix}:*") as (name, password):
        url = user_url(name, password)
        extra = f", redis: '{url}', key_prefix: '{redis_prefix}', on_redis_error: closed"
        config = gateway_yaml({"up": [up.address]}, limited_route(extra=extra))
        store = redis.Redis.from_url(REDIS_URL)
        try:
            async with run_gateway(config) as (worker, port):
                client = await Client.connect(port)
                assert await statuses(client, 4) == [200, 200, 200, 429]
                await client.close()
                assert rate_limit_filter(worker).redis_errors == 0
                users = [c["user"] for c in await store.client_list()]
                assert name in users
        finally:
            await store.aclose()
    await up.close()


@pytest.mark.services
async def test_rediss_url_counts_over_tls(redis_prefix: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    up = await RawUpstream().start()
    async with redis_front(tls=server_context) as address:
        url = f"rediss://{address}/0?ssl_ca_certs={quote(str(ca_file))}"
        extra = f", redis: '{url}', key_prefix: '{redis_prefix}', on_redis_error: closed"
        config = gateway_yaml({"up": [up.address]}, limited_route(extra=extra))
        try:
            async with run_gateway(config) as (worker, port):
                client = await Client.connect(port)
                assert await statuses(client, 4) == [200, 200, 200, 429]
                await client.close()
                assert rate_limit_filter(worker).redis_errors == 0
        finally:
            await up.close()


# ---------------------------------------------------------------------------- reload


ROUTE = "  - {name: api, upstream: up, rate_limit: {rate: '1/m', burst: 2}}\n"
"""No refill while a test runs: what a reload keeps or drops shows plainly."""


@pytest.mark.parametrize(
    ("routes", "upstream_extra", "kept"),
    [
        pytest.param(ROUTE, "", True, id="unchanged"),
        pytest.param(
            "  - {name: other, upstream: up, match: {path_prefix: /other}}\n" + ROUTE,
            "",
            True,
            id="route-added",
        ),
        pytest.param(ROUTE, ", timeouts: {read: 7s}", True, id="upstream-changed"),
        pytest.param(ROUTE.replace("burst: 2", "burst: 3"), "", False, id="burst-changed"),
        pytest.param(ROUTE.replace("'1/m'", "'60/h'"), "", True, id="same-rate-other-unit"),
        pytest.param(ROUTE.replace("name: api", "name: api2"), "", False, id="renamed"),
    ],
)
async def test_local_counts_survive_a_reload_that_keeps_the_route(
    routes: str, upstream_extra: str, kept: bool
) -> None:
    up = await RawUpstream().start()
    before = gateway_yaml({"up": [up.address]}, ROUTE)
    after = gateway_yaml({"up": [up.address]}, routes).replace(
        f"endpoints: ['{up.address}']}}", f"endpoints: ['{up.address}']{upstream_extra}}}"
    )
    async with run_gateway(before) as (worker, port):
        client = await Client.connect(port)
        assert await statuses(client, 4) == [200, 200, 200, 429]
        old = rate_limit_filter(worker)
        worker.apply(loads(after, "test.yaml"))
        new = rate_limit_filter(worker, "api2" if "api2" in routes else "api")
        assert new is not old
        assert await statuses(client, 1) == ([429] if kept else [200])
        await client.close()
        # The route's refusals are never counted down by a reload.
        assert metric(worker, "meshgate_gateway_rate_limited_total") == (2 if kept else 1)
    await up.close()


async def test_local_counts_of_routes_gone_are_forgotten() -> None:
    up = await RawUpstream().start()
    before = gateway_yaml({"up": [up.address]}, ROUTE)
    after = gateway_yaml({"up": [up.address]}, ROUTE.replace("burst: 2", "burst: 1"))
    async with run_gateway(before) as (worker, port):
        client = await Client.connect(port)
        assert await statuses(client, 1) == [200]
        await client.close()
        worker.apply(loads(after, "test.yaml"))
        gc.collect()  # the old runtime, once nothing serves with it any more
        current = rate_limit_filter(worker).settings
        assert list(ratelimit._LOCAL) == [("api", current)]
    await up.close()


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("settings", "path", "fragment"),
    [
        ("{rate: fast}", "routes[0].rate_limit.rate", "write it like '100/s'"),
        ("{rate: 0/s}", "routes[0].rate_limit.rate", "above zero"),
        ("{rate: 5/s, burst: -1}", "routes[0].rate_limit.burst", ""),
        ("{rate: 5/s, by: cookie}", "routes[0].rate_limit.by", "header:<Name>"),
        ("{rate: 5/s, by: 'header:Bad Name'}", "routes[0].rate_limit.by", "header:<Name>"),
        ("{rate: 5/s, redis: 'http://x'}", "routes[0].rate_limit.redis", "redis://host:port"),
        ("{rate: 5/s, on_redis_error: maybe}", "routes[0].rate_limit.on_redis_error", ""),
    ],
)
def test_invalid_settings_are_config_errors(settings: str, path: str, fragment: str) -> None:
    route = f"  - {{name: api, upstream: up, rate_limit: {settings}}}\n"
    with pytest.raises(ConfigError) as info:
        loads(gateway_yaml({"up": ["127.0.0.1:9"]}, route))
    assert any(i.path == path and fragment in i.message for i in info.value.issues), str(info.value)
