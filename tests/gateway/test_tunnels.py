"""Upgrades, CONNECT and TRACE: a tunnel escapes per-request routing and policies, so
only what a route allows is tunnelled, after the route's filters, and nothing is
buffered without bound while the upstream decides.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from meshgate.config import loads
from meshgate.errors import ConfigError
from meshgate.gateway.filters.auth import hash_api_key
from meshgate.gateway.protocol import ClientConnection
from tests.helpers import Client, Message, RawUpstream, gateway_yaml, response, run_gateway

ROUTE = "  - {name: all, upstream: up}\n"
KEY = "k-3f9a-admin-key"
H2C = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
WEBSOCKET = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


async def switching(
    request: Message, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> bool:
    """An upstream that switches to whatever protocol it is offered (as a careless
    h2c-capable server would), then echoes bytes."""
    offered = request.header("Upgrade")
    if offered is None:
        w.write(response(200, b"plain " + request.target.encode()))
        return True
    w.write(f"HTTP/1.1 101 Switching\r\nConnection: Upgrade\r\nUpgrade: {offered}\r\n\r\n".encode())
    while data := await reader.read(65536):
        w.write(data)
    return False


async def test_h2c_is_never_tunnelled_and_its_headers_never_forwarded() -> None:
    up = await RawUpstream(switching).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        await client.send(H2C + PREFACE)
        res = await client.read()
        # Served as a plain request; the HTTP/2 preface never reaches anyone.
        assert res.status == 200, res.body
        assert res.body == b"plain /ws"
        assert await client.closed()
    (seen,) = up.requests
    for name in ("Upgrade", "HTTP2-Settings", "Connection"):
        assert seen.header(name) is None, name


async def test_upgrades_a_route_does_not_allow_go_on_as_plain_requests() -> None:
    up = await RawUpstream(switching).start()
    route = "  - {name: all, upstream: up, upgrades: []}\n"
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        client = await Client.connect(port)
        await client.send(WEBSOCKET + b"\r\n")
        res = await client.read()
        assert res.status == 200
        assert res.body == b"plain /ws"
    assert up.requests[0].header("Upgrade") is None


async def test_allowed_upgrade_is_tunnelled_with_only_the_allowed_protocol() -> None:
    up = await RawUpstream(switching).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        await client.send(WEBSOCKET.replace(b"websocket", b"h2c, websocket") + b"\r\n")
        res = await client.read()
        assert res.status == 101
        await client.send(b"ping")
        assert await client.reader.readexactly(4) == b"ping"
    assert up.requests[0].header("Upgrade") == "websocket"


async def test_an_upgrade_passes_the_routes_filters_first() -> None:
    up = await RawUpstream(switching).start()
    config = gateway_yaml(
        {"up": [up.address]}, "  - {name: all, upstream: up, auth: {api_key: {}}}\n"
    ).replace("routes:", f"consumers:\n  ops: {{api_keys: ['{hash_api_key(KEY)}']}}\nroutes:")
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        await client.send(WEBSOCKET + b"\r\n" + b"tunnel bytes")
        res = await client.read()
        assert res.status == 401, res.body
        assert await client.closed()
        client = await Client.connect(port)
        await client.send(WEBSOCKET + f"X-API-Key: {KEY}\r\n\r\n".encode())
        assert (await client.read()).status == 101
    assert len(up.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 S\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        b"HTTP/1.1 101 S\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ],
    ids=["other-protocol", "unasked"],
)
async def test_a_switch_the_client_did_not_ask_for_is_502(answer: bytes) -> None:
    async def rogue(request: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(answer)
        return False

    up = await RawUpstream(rogue).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        if b"h2c" in answer:
            await client.send(WEBSOCKET + b"\r\n")
        else:
            await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        res = await client.read()
        assert res.status == 502, res.body
        assert "did not ask for" in json.loads(res.body)["detail"]


@pytest.mark.parametrize("method", ["CONNECT", "TRACE"])
async def test_connect_and_trace_are_405_unless_a_route_lists_them(method: str) -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        # After a CONNECT, what follows would be tunnel bytes: never read.
        tail = b"A" * 1000 if method == "CONNECT" else b""
        await client.send(f"{method} /x HTTP/1.1\r\nHost: x\r\n\r\n".encode() + tail)
        res = await client.read()
        assert res.status == 405, res.body
        assert res.header("Allow") is not None
        assert "TRACE" not in (res.header("Allow") or "")
        if method == "CONNECT":
            assert await client.closed()
    assert up.requests == []


async def test_trace_is_forwarded_on_a_route_that_lists_it() -> None:
    up = await RawUpstream().start()
    route = "  - {name: all, upstream: up, match: {methods: [TRACE]}}\n"
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        client = await Client.connect(port)
        assert (await client.request("TRACE", "/x")).status == 200
    assert [r.method for r in up.requests] == ["TRACE"]


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("{name: a, upstream: up, match: {methods: [CONNECT]}}", "CONNECT is never routed"),
        ("{name: a, upstream: up, upgrades: [h2c]}", "h2c is never tunnelled"),
        ("{name: a, upstream: up, upgrades: ['web socket']}", "is not a protocol name"),
    ],
)
def test_tunnels_that_cannot_be_allowed_are_configuration_errors(route: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(gateway_yaml({"up": ["127.0.0.1:1"]}, f"  - {route}\n"))
    assert message in str(info.value)


async def test_an_allowed_upgrade_with_a_body_is_400() -> None:
    up = await RawUpstream(switching).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        await client.send(WEBSOCKET + b"Content-Length: 5\r\n\r\nhello")
        res = await client.read()
        assert res.status == 400, res.body
        assert "cannot carry a body" in json.loads(res.body)["detail"]
    assert up.requests == []


async def test_a_refused_upgrade_with_a_body_is_sent_with_its_body() -> None:
    async def echo(request: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(200, request.body))
        return True

    up = await RawUpstream(echo).start()
    post = H2C.replace(b"GET /ws", b"POST /ws").replace(
        b"\r\n\r\n", b"\r\nContent-Length: 11\r\n\r\n"
    )
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        # The body arrives in pieces, after the head; it must not hang until a timeout.
        await client.send(post + b"hello")
        await asyncio.sleep(0)
        await client.send(b" world" + PREFACE)
        res = await client.read(timeout=5)
        assert res.status == 200, res.body
        assert res.body == b"hello world"
        assert await client.closed()
    assert [r.body for r in up.requests] == [b"hello world"]


async def test_a_refused_chunked_upgrade_is_400() -> None:
    up = await RawUpstream(switching).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        chunked = H2C.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        await client.send(chunked + b"5\r\nhello\r\n0\r\n\r\n")
        assert (await client.read()).status == 400
    assert up.requests == []


async def test_bytes_before_the_101_are_bounded_then_all_tunnelled() -> None:
    agree = asyncio.Event()
    received = bytearray()

    async def slow(request: Message, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await agree.wait()
        w.write(b"HTTP/1.1 101 S\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        while data := await reader.read(1 << 20):
            received.extend(data)
        return False

    up = await RawUpstream(slow).start()
    total = 32 << 20
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (worker, port):
        client = await Client.connect(port)
        await client.send(WEBSOCKET + b"\r\n")
        client.writer.write(bytes(range(256)) * (total // 256))  # drained by the kernel
        conn: ClientConnection = next(iter(worker.connections))
        async with asyncio.timeout(20):
            while not conn.paused:
                await asyncio.sleep(0.01)
        # Reading stopped: what the worker holds is bounded, the rest waits in the
        # client's buffers.
        held = len(conn.tunnel_pending or b"")
        assert held < 1 << 20
        assert client.writer.transport.get_write_buffer_size() > 0
        agree.set()
        async with asyncio.timeout(30):
            while len(received) < total:
                await asyncio.sleep(0.01)
    assert bytes(received[:512]) == bytes(range(256)) * 2
    assert len(received) == total
