"""Client address allow and deny lists over real sockets.

Clients connect from different loopback addresses (any of 127.0.0.0/8 on Linux) to be
different peers; X-Forwarded-For counts only from a trusted proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import pytest

from meshgate.config import loads
from meshgate.errors import ConfigError
from meshgate.gateway.worker import Worker, listen_socket
from tests.helpers import Client, Message, RawUpstream, gateway_yaml, run_gateway


def ip_route(settings: str) -> str:
    return f"  - {{name: api, upstream: up, ip: {settings}}}\n"


async def connect_from(port: int, ip: str) -> Client:
    """A client connection from the loopback address ``ip``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0))
    return Client(reader, writer)


def assert_forbidden(res: Message, address: str) -> None:
    assert res.status == 403
    body = json.loads(res.body)
    assert body["error"] == "forbidden_address"
    assert address in body["detail"]
    assert body["route"] == "api"
    assert res.header("X-Request-ID") == body["request_id"]


@pytest.mark.parametrize(
    ("settings", "allowed"),
    [
        ("{deny: [127.0.0.0/8]}", False),
        ("{deny: [127.0.0.1/32]}", False),
        ("{deny: [10.0.0.0/8, '::1/128']}", True),
        ("{allow: [10.0.0.0/8]}", False),
        ("{allow: [10.0.0.0/8, 127.0.0.0/24]}", True),
        ("{allow: ['::/0']}", False),  # an IPv4 peer is not in an IPv6 range
        # The deny list is checked first: deny wins over allow.
        ("{allow: [127.0.0.0/8], deny: [127.0.0.1/32]}", False),
        ("{}", True),  # no lists: everyone
    ],
)
async def test_peer_address_against_the_lists(settings: str, allowed: bool) -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ip_route(settings))) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/items")
        # The connection stays usable after a refusal.
        again = await client.request("GET", "/items")
        await client.close()
    if allowed:
        assert (res.status, again.status) == (200, 200)
        assert len(up.requests) == 2
    else:
        assert_forbidden(res, "127.0.0.1")
        assert_forbidden(again, "127.0.0.1")
        assert up.requests == []
    await up.close()


async def test_each_peer_is_judged_by_its_own_address() -> None:
    up = await RawUpstream().start()
    route = ip_route("{allow: [127.0.0.0/8], deny: [127.0.0.2/32]}")
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        one = await connect_from(port, "127.0.0.1")
        two = await connect_from(port, "127.0.0.2")
        three = await connect_from(port, "127.0.0.3")
        assert (await one.request("GET", "/")).status == 200
        assert_forbidden(await two.request("GET", "/"), "127.0.0.2")
        assert (await three.request("GET", "/")).status == 200
        for client in (one, two, three):
            await client.close()
    assert len(up.requests) == 2
    await up.close()


async def test_refused_request_with_body_never_reaches_the_upstream() -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, ip_route("{deny: [127.0.0.0/8]}"))
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        res = await client.request("POST", "/upload", body=b"x" * 100_000)
        await client.close()
    assert_forbidden(res, "127.0.0.1")
    assert up.requests == []
    assert up.connections == 0
    await up.close()


@contextlib.asynccontextmanager
async def run_dual_stack_gateway(config_text: str) -> AsyncIterator[int]:
    """Like run_gateway, but listening on ``[::]``: IPv4 clients arrive as IPv4-mapped
    IPv6 peers (``::ffff:127.0.0.1``), as on a gateway configured with ``listen: '[::]:80'``."""
    if not socket.has_ipv6:
        pytest.skip("this host has no IPv6 support")
    worker = Worker(loads(config_text, "test.yaml"))
    try:
        sock = listen_socket("::", 0, reuse_port=False)
    except OSError as exc:
        pytest.skip(f"cannot listen on [::]: {exc}")
    await worker.serve(sock)
    try:
        yield sock.getsockname()[1]
    finally:
        await worker.drain(1.0)


@pytest.mark.parametrize(
    ("settings", "trusted"),
    [
        ("{deny: [127.0.0.0/8]}", ""),
        ("{allow: [10.0.0.0/8]}", ""),
        # A spoofed X-Forwarded-For must not count: the peer is not a trusted proxy.
        ("{allow: [203.0.113.0/24], forwarded: true}", "trusted_proxies: [10.0.0.0/8]"),
    ],
)
async def test_ipv4_client_of_a_dual_stack_listener_is_judged_by_its_ipv4_address(
    settings: str, trusted: str
) -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, ip_route(settings), trusted)
    async with run_dual_stack_gateway(config) as port:
        client = await Client.connect(port)  # over IPv4, to 127.0.0.1
        res = await client.request("GET", "/", [("X-Forwarded-For", "203.0.113.9")])
        await client.close()
    assert res.status == 403, res.body
    assert json.loads(res.body)["error"] == "forbidden_address"
    assert up.requests == []
    await up.close()


async def test_ipv4_proxy_of_a_dual_stack_listener_is_trusted() -> None:
    up = await RawUpstream().start()
    config = gateway_yaml(
        {"up": [up.address]},
        ip_route("{allow: [203.0.113.0/24], forwarded: true}"),
        "trusted_proxies: [127.0.0.0/8]",
    )
    async with run_dual_stack_gateway(config) as port:
        client = await Client.connect(port)
        res = await client.request("GET", "/", [("X-Forwarded-For", "203.0.113.9")])
        await client.close()
    assert res.status == 200, res.body
    await up.close()


FORWARDED = "{allow: [203.0.113.0/24], forwarded: true}"


@pytest.mark.parametrize(
    ("xff", "status"),
    [
        ("203.0.113.9", 200),
        ("198.51.100.1", 403),
        # The rightmost address that is not a trusted proxy is the client.
        ("198.51.100.1, 203.0.113.9", 200),
        ("203.0.113.9, 198.51.100.1", 403),
        ("203.0.113.9, 127.0.0.8", 200),  # a trusted proxy's own hop is skipped
        ("not-an-address", 403),  # a malformed list is not believed: the peer counts
        (None, 403),  # no header: the peer, 127.0.0.1, is not allowed
    ],
)
async def test_forwarded_address_from_trusted_proxy_decides(xff: str | None, status: int) -> None:
    up = await RawUpstream().start()
    config = gateway_yaml(
        {"up": [up.address]}, ip_route(FORWARDED), "trusted_proxies: [127.0.0.0/8]"
    )
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        headers = [("X-Forwarded-For", xff)] if xff is not None else []
        res = await client.request("GET", "/", headers)
        await client.close()
    assert res.status == status, res.body
    assert len(up.requests) == (1 if status == 200 else 0)
    await up.close()


async def test_forwarded_address_split_over_several_header_lines() -> None:
    up = await RawUpstream().start()
    config = gateway_yaml(
        {"up": [up.address]}, ip_route(FORWARDED), "trusted_proxies: [127.0.0.0/8]"
    )
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        allowed = await client.request(
            "GET", "/", [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.9")]
        )
        refused = await client.request(
            "GET", "/", [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-For", "198.51.100.1")]
        )
        await client.close()
    assert allowed.status == 200
    assert_forbidden(refused, "198.51.100.1")
    await up.close()


@pytest.mark.parametrize(
    ("trusted", "settings"),
    [
        ("", FORWARDED),  # nobody is trusted
        ("trusted_proxies: [10.0.0.0/8]", FORWARDED),  # the peer is not among them
        # Trusted, but the route looks at the peer itself.
        ("trusted_proxies: [127.0.0.0/8]", "{allow: [203.0.113.0/24]}"),
    ],
)
async def test_spoofed_forwarded_address_is_ignored(trusted: str, settings: str) -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, ip_route(settings), trusted)
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/", [("X-Forwarded-For", "203.0.113.9")])
        await client.close()
    assert_forbidden(res, "127.0.0.1")
    assert up.requests == []
    await up.close()


async def test_spoofed_forwarded_address_cannot_escape_a_deny() -> None:
    up = await RawUpstream().start()
    route = ip_route("{deny: [127.0.0.0/8], forwarded: true}")
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/", [("X-Forwarded-For", "203.0.113.9")])
        await client.close()
    assert_forbidden(res, "127.0.0.1")
    await up.close()


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("settings", "path"),
    [
        ("{allow: [not-a-network]}", "routes[0].ip.allow[0]"),
        ("{deny: [10.0.0.1/8]}", "routes[0].ip.deny[0]"),  # host bits set
        ("{deny: [300.0.0.0/8]}", "routes[0].ip.deny[0]"),
        ("{allow: [10.0.0.0/8], block: [1.2.3.4/32]}", "routes[0].ip.block"),
    ],
)
def test_invalid_lists_are_config_errors(settings: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(gateway_yaml({"up": ["127.0.0.1:9"]}, ip_route(settings)))
    assert any(i.path == path for i in info.value.issues), str(info.value)


def test_a_single_range_may_be_written_without_a_list() -> None:
    route = "  - {name: api, upstream: up, ip: {allow: 10.0.0.0/8, deny: 10.1.0.0/16}}\n"
    settings = loads(gateway_yaml({"up": ["127.0.0.1:9"]}, route)).routes[0].ip
    assert settings is not None
    assert [str(n) for n in settings.allow] == ["10.0.0.0/8"]
    assert [str(n) for n in settings.deny] == ["10.1.0.0/16"]


@pytest.mark.parametrize(
    "xff",
    [
        "::ffff:10.1.2.3",
        "::FFFF:10.1.2.3",
        "::ffff:a01:203",
        "[::ffff:10.1.2.3]",
        "[::ffff:10.1.2.3]:443",
        "10.1.2.3:51234",
        "0:0:0:0:0:ffff:10.1.2.3",
    ],
)
async def test_ipv4_rules_hold_for_every_spelling_of_an_ipv4_client(xff: str) -> None:
    up = await RawUpstream().start()
    route = ip_route("{deny: [10.0.0.0/8], forwarded: true}")
    config = gateway_yaml({"up": [up.address]}, route, "trusted_proxies: [127.0.0.0/8]")
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/", [("X-Forwarded-For", xff)])
        await client.close()
    assert_forbidden(res, "10.1.2.3")
    assert up.requests == []
    await up.close()


async def test_an_ipv4_mapped_trusted_proxy_hop_is_skipped_like_its_ipv4_form() -> None:
    up = await RawUpstream().start()
    route = ip_route("{allow: [203.0.113.0/24], forwarded: true}")
    config = gateway_yaml({"up": [up.address]}, route, "trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]")
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        res = await client.request(
            "GET", "/", [("X-Forwarded-For", "203.0.113.9, ::ffff:10.0.0.7")]
        )
        await client.close()
    assert res.status == 200, res.body
    await up.close()
