"""The data plane over real sockets: proxying, HTTP semantics, streaming, errors."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from meshgate.config import loads
from meshgate.errors import ConfigError
from tests.helpers import (
    Client,
    Message,
    RawUpstream,
    build_request,
    echo_handler,
    gateway_yaml,
    response,
    run_gateway,
)

ROUTE = "  - {name: all, upstream: up}\n"


async def test_forwards_request_and_response() -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/hello?x=1")
        assert res.status == 200
        assert res.body == b"/hello?x=1"
        assert res.header("Via") == "1.1 meshgate"
        assert res.header("X-Request-ID") is not None
        await client.close()
    await up.close()


async def test_keep_alive_reuses_upstream_connections() -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        clients = [await Client.connect(port) for _ in range(4)]
        for _ in range(25):
            for client in clients:
                assert (await client.request("GET", "/x")).status == 200
        for client in clients:
            await client.close()
    # 100 requests over 4 client connections, one at a time: one upstream connection.
    assert len(up.requests) == 100
    assert up.connections == 1
    await up.close()


async def test_request_headers_hop_by_hop_removed_and_forwarding_added() -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        res = await client.request(
            "GET",
            "/",
            [
                ("Connection", "keep-alive, X-Secret-Hop"),
                ("X-Secret-Hop", "drop me"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Trailer", "X-T"),
                ("Proxy-Authorization", "Basic abc"),
                ("Proxy-Foo", "bar"),
                ("Upgrade", "h2c"),
                ("X-Forwarded-For", "6.6.6.6"),
                ("Forwarded", "for=6.6.6.6"),
                ("X-Custom", "kept"),
            ],
            host="api.example.test:8443",
        )
        assert res.status == 200
        await client.close()
    seen = up.requests[0]
    for name in (
        "Connection",
        "X-Secret-Hop",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Proxy-Authorization",
        "Proxy-Foo",
        "Upgrade",
    ):
        assert seen.header(name) is None, name
    assert seen.header("X-Custom") == "kept"
    assert seen.header("Host") == "api.example.test:8443"
    # An untrusted peer's forwarding headers are replaced, not extended.
    assert seen.all("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == "api.example.test:8443"
    assert seen.all("Forwarded") == ['for=127.0.0.1;proto=http;host="api.example.test:8443"']
    assert seen.header("Via") == "1.1 meshgate"
    assert seen.header("X-Request-ID") == res.header("X-Request-ID")
    await up.close()


async def test_trusted_proxy_forwarding_headers_are_extended() -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, ROUTE, "trusted_proxies: [127.0.0.0/8]")
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        await client.request(
            "GET",
            "/",
            [
                ("X-Forwarded-For", "203.0.113.7"),
                ("X-Forwarded-Proto", "https"),
                ("Forwarded", "for=203.0.113.7;proto=https"),
            ],
            host="shop.test",
        )
        await client.close()
    seen = up.requests[0]
    assert seen.header("X-Forwarded-For") == "203.0.113.7, 127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "https"
    assert seen.header("Forwarded") == (
        'for=203.0.113.7;proto=https, for=127.0.0.1;proto=http;host="shop.test"'
    )
    await up.close()


@pytest.mark.parametrize(
    ("sent", "passed"),
    [
        ("abc-123", True),
        ("x" * 201, False),  # too long: replaced
        ("has space", False),  # not a visible token: replaced
    ],
)
async def test_request_id_passed_through_or_generated(sent: str, passed: bool) -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/", [("X-Request-ID", sent)])
        await client.close()
    got = up.requests[0].header("X-Request-ID")
    assert got == res.header("X-Request-ID")
    assert (got == sent) is passed
    if not passed:
        assert got is not None
        assert len(got) == 32
    await up.close()


async def test_response_hop_by_hop_headers_removed() -> None:
    async def handler(req: Message, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(
            response(
                200,
                b"hi",
                [
                    ("Connection", "keep-alive, X-Internal"),
                    ("X-Internal", "secret"),
                    ("Keep-Alive", "timeout=5"),
                    ("Proxy-Authenticate", "Basic"),
                    ("Set-Cookie", "a=1"),
                    ("Set-Cookie", "b=2"),
                ],
            )
        )

    up = await RawUpstream(handler).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/")
        await client.close()
    assert res.header("X-Internal") is None
    assert res.header("Keep-Alive") is None
    assert res.header("Proxy-Authenticate") is None
    assert res.header("Connection") is None
    assert res.all("Set-Cookie") == ["a=1", "b=2"]
    await up.close()


@pytest.mark.parametrize("size", [0, 1, 100_000, 5_000_000])
async def test_request_body_content_length_streams_intact(size: int) -> None:
    up = await RawUpstream(echo_handler).start()
    body = os.urandom(size)
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("POST", "/echo", body=body)
        await client.close()
    assert res.status == 200
    assert hashlib.sha256(res.body).digest() == hashlib.sha256(body).digest()
    await up.close()


async def test_chunked_request_and_response_bodies() -> None:
    async def chunked_echo(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(req.body), 70_000):
            part = req.body[i : i + 70_000]
            w.write(b"%x\r\n%s\r\n" % (len(part), part))
            await w.drain()
        w.write(b"0\r\n\r\n")

    up = await RawUpstream(chunked_echo).start()
    body = os.urandom(3_000_000)
    wire = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 99_999]), body[i : i + 99_999])
        for i in range(0, len(body), 99_999)
    )
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        await client.send(
            build_request("POST", "/c", [("Transfer-Encoding", "chunked")]) + wire + b"0\r\n\r\n"
        )
        res = await client.read()
        assert res.header("Transfer-Encoding") == "chunked"
        assert hashlib.sha256(res.body).digest() == hashlib.sha256(body).digest()
        # The connection stays usable after a chunked exchange.
        again = await client.request("POST", "/c", body=b"second")
        assert again.body == b"second"
        await client.close()
    assert up.requests[0].header("Transfer-Encoding") == "chunked"
    await up.close()


async def test_large_response_is_streamed_not_buffered() -> None:
    size = 64 * 1024 * 1024
    block = os.urandom(1 << 20)

    async def big(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            w.write(block)
            await w.drain()

    up = await RawUpstream(big).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (worker, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(build_request("GET", "/big"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Content-Length: %d" % size in head
        # Read slowly at first: the gateway must apply backpressure rather than
        # buffer the upstream's 64 MiB.
        await asyncio.sleep(0.5)
        conn = next(iter(worker.connections))
        assert conn.transport.get_write_buffer_size() < 8 * 1024 * 1024
        digest = hashlib.sha256()
        received = 0
        while received < size:
            chunk = await reader.read(1 << 20)
            assert chunk
            digest.update(chunk)
            received += len(chunk)
        assert digest.digest() == hashlib.sha256(block * (size // len(block))).digest()
        writer.close()
    await up.close()


async def test_pipelined_requests_answered_in_order() -> None:
    async def slow_first(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if req.target == "/1":
            await asyncio.sleep(0.2)
        w.write(response(200, req.target.encode()))

    up = await RawUpstream(slow_first).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        await client.send(
            build_request("GET", "/1")
            + build_request("POST", "/2", body=b"two")
            + build_request("GET", "/3")
        )
        bodies = [(await client.read()).body for _ in range(3)]
        assert bodies == [b"/1", b"/2", b"/3"]
        await client.close()
    await up.close()


async def test_http10_client_gets_close_delimited_or_keep_alive() -> None:
    async def chunky(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(response(200, b"chunked body", chunked=req.target == "/chunked"))

    up = await RawUpstream(chunky).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        # HTTP/1.0 with keep-alive and a Content-Length response: stays open.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /plain HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Connection: keep-alive" in head
        assert await reader.readexactly(12) == b"chunked body"
        # A chunked upstream response cannot be chunked to HTTP/1.0: it ends by close.
        writer.write(b"GET /chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        rest = await reader.read()
        assert b"Transfer-Encoding" not in rest
        assert b"Connection: close" in rest
        assert rest.endswith(b"\r\n\r\nchunked body")
        writer.close()
    # The HTTP/1.0 request was forwarded as HTTP/1.1 and the pooled connection reused.
    assert up.connections == 1
    await up.close()


async def test_head_and_no_body_statuses_keep_connection_usable() -> None:
    async def handler(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if req.method == "HEAD":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        elif req.target == "/204":
            w.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif req.target == "/304":
            w.write(b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n')
        else:
            w.write(response(200, b"after"))

    up = await RawUpstream(handler).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(build_request("HEAD", "/h"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Content-Length: 1234" in head
        for target in ("/204", "/304"):
            writer.write(build_request("GET", target))
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"Transfer-Encoding" not in head
        writer.write(build_request("GET", "/after"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert await reader.readexactly(5) == b"after"
        writer.close()
    assert up.connections == 1
    await up.close()


async def test_expect_100_continue_answered_by_gateway() -> None:
    up = await RawUpstream(echo_handler).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(5) == b"hello"
        writer.close()
    assert up.requests[0].header("Expect") is None
    await up.close()


async def test_no_route_is_json_404() -> None:
    up = await RawUpstream().start()
    routes = "  - {name: api, upstream: up, match: {path_prefix: /api}}\n"
    async with run_gateway(gateway_yaml({"up": [up.address]}, routes)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/other")
        assert res.status == 404
        assert res.header("Content-Type") == "application/problem+json"
        assert b'"error":"no_route"' in res.body
        assert b"GET /other" in res.body
        # The connection keeps serving.
        assert (await client.request("GET", "/api/x")).status == 200
        await client.close()
    await up.close()


async def test_upstream_down_is_502_naming_route_and_upstream() -> None:
    from tests.helpers import free_port

    dead = f"127.0.0.1:{free_port()}"
    async with run_gateway(gateway_yaml({"up": [dead]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/")
        assert res.status == 502
        assert b'"route":"all"' in res.body
        assert b'"upstream":"up"' in res.body
        assert b"cannot connect to" in res.body
        assert b"Traceback" not in res.body
        await client.close()


async def test_upstream_read_timeout_is_504() -> None:
    async def never(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    up = await RawUpstream(never).start()
    config = gateway_yaml({"up": [up.address]}, ROUTE).replace(
        f"{{endpoints: ['{up.address}']}}",
        f"{{endpoints: ['{up.address}'], timeouts: {{read: 300ms}}}}",
    )
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        started = asyncio.get_running_loop().time()
        res = await client.request("GET", "/slow")
        elapsed = asyncio.get_running_loop().time() - started
        assert res.status == 504
        assert b"upstream_timeout" in res.body
        assert 0.25 < elapsed < 1.5
        await client.close()
    await up.close()


async def test_total_timeout_cuts_a_streaming_response() -> None:
    async def dribble(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(100):
            w.write(b"x")
            await w.drain()
            await asyncio.sleep(0.05)

    up = await RawUpstream(dribble).start()
    routes = "  - {name: all, upstream: up, timeouts: {total: 400ms, read: 5s}}\n"
    async with run_gateway(gateway_yaml({"up": [up.address]}, routes)) as (_, port):
        client = await Client.connect(port)
        await client.send(build_request("GET", "/"))
        with pytest.raises(EOFError):
            await client.read(timeout=3)
        await client.close()
    await up.close()


async def test_upstream_dying_mid_response_closes_client_connection() -> None:
    async def die(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        await w.drain()
        return False  # close the connection with 99 000 bytes missing

    up = await RawUpstream(die).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        await client.send(build_request("GET", "/"))
        with pytest.raises((EOFError, ConnectionError)):
            await client.read()
        await client.close()
    await up.close()


async def test_upstream_dying_mid_chunked_response_never_sends_last_chunk() -> None:
    async def die(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        return False

    up = await RawUpstream(die).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(build_request("GET", "/"))
        try:
            data = await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:
            data = b""
        assert not data.endswith(b"0\r\n\r\n")
        writer.close()
    await up.close()


async def test_close_delimited_upstream_response_is_rechunked() -> None:
    async def old(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close")
        await w.drain()
        return False

    up = await RawUpstream(old).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/")
        assert res.body == b"until close"
        assert res.header("Transfer-Encoding") == "chunked"
        assert (await client.request("GET", "/")).body == b"until close"
        await client.close()
    await up.close()


async def test_client_abort_closes_the_upstream_exchange() -> None:
    started = asyncio.Event()

    async def slow(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        started.set()
        await r.read()  # returns when the gateway closes this connection

    up = await RawUpstream(slow).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (worker, port):
        client = await Client.connect(port)
        await client.send(build_request("GET", "/"))
        await asyncio.wait_for(started.wait(), 5)
        assert up.open == 1
        client.writer.transport.abort()
        await asyncio.wait_for(up.closed.wait(), 5)
        assert up.open == 0
        assert not worker.inflight
    await up.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["garbage", "dup-cl", "cl-and-te", "space-in-name", "bad-host", "no-host", "bad-chunk"],
)
async def test_malformed_request_gets_400_and_worker_keeps_serving(raw: bytes) -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        bad = await Client.connect(port)
        good = await Client.connect(port)
        await bad.send(raw)
        res = await bad.read()
        assert res.status == 400
        assert res.header("Connection") == "close"
        assert await bad.closed()
        await bad.close()
        assert (await good.request("GET", "/fine")).status == 200
        await good.close()
    # Nothing ambiguous reached the upstream.
    assert [r.target for r in up.requests] == ["/fine"]
    await up.close()


async def test_oversized_head_gets_431() -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, ROUTE, "limits: {max_header_bytes: 4KiB}")
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/", [("X-Big", "a" * 5000)])
        assert res.status == 431
        await client.close()
        client = await Client.connect(port)
        res = await client.request("GET", "/", [(f"X-H{i}", "v") for i in range(150)])
        assert res.status == 431
        await client.close()
        client = await Client.connect(port)
        res = await client.request("GET", "/" + "a" * 9000)
        assert res.status in (414, 431)
        await client.close()
    assert up.requests == []
    await up.close()


async def test_connection_limit_queues_then_503() -> None:
    release = asyncio.Event()

    async def hold(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await release.wait()
        w.write(response(200, b"done"))

    up = await RawUpstream(hold).start()
    config = gateway_yaml({"up": [up.address]}, ROUTE).replace(
        f"{{endpoints: ['{up.address}']}}",
        f"{{endpoints: ['{up.address}'], max_connections: 1, timeouts: {{connect: 300ms}}}}",
    )
    async with run_gateway(config) as (_, port):
        first = await Client.connect(port)
        await first.send(build_request("GET", "/1"))
        await asyncio.sleep(0.1)
        second = await Client.connect(port)
        res = await second.request("GET", "/2")
        assert res.status == 503
        assert b"upstream_saturated" in res.body
        # Queued requests are served when a connection frees up in time.
        third = await Client.connect(port)
        await third.send(build_request("GET", "/3"))
        await asyncio.sleep(0.05)
        release.set()
        assert (await first.read()).body == b"done"
        assert (await third.read()).body == b"done"
        for c in (first, second, third):
            await c.close()
    assert up.connections == 1
    await up.close()


async def test_stale_pooled_connection_is_retried_for_idempotent_requests() -> None:
    async def once(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(200, b"ok", [("Connection", "keep-alive")]))
        await w.drain()
        return False  # close the kept-alive connection right after answering

    up = await RawUpstream(once).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        for _ in range(5):
            assert (await client.request("GET", "/")).status == 200
        await client.close()
    await up.close()


async def test_weighted_round_robin_spreads_by_weight() -> None:
    ups = [await RawUpstream().start() for _ in range(2)]
    config = (
        "gateway: {listen: '127.0.0.1:0', access_log: {enabled: false}}\n"
        "upstreams:\n  up:\n    balancer: weighted_round_robin\n    endpoints:\n"
        f"      - {{address: '{ups[0].address}', weight: 3}}\n"
        f"      - {{address: '{ups[1].address}', weight: 1}}\n"
        "routes:\n" + ROUTE
    )
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        for _ in range(40):
            await client.request("GET", "/")
        await client.close()
    assert (len(ups[0].requests), len(ups[1].requests)) == (30, 10)
    for up in ups:
        await up.close()


async def test_routing_strip_prefix_rewrite_and_host_rewrite() -> None:
    up = await RawUpstream().start()
    routes = (
        "  - name: users\n    upstream: up\n    match: {path_prefix: /api/users}\n"
        "    strip_prefix: true\n"
        "  - name: orders\n    upstream: up\n    match: {path_regex: '/orders/(?P<id>[0-9]+)'}\n"
        "    rewrite: /v2/order/{id}\n    host_rewrite: orders.internal\n"
        "  - name: raw\n    upstream: up\n    match: {path_prefix: /raw}\n"
        "    preserve_host: false\n"
    )
    async with run_gateway(gateway_yaml({"up": [up.address]}, routes)) as (_, port):
        client = await Client.connect(port)
        assert (await client.request("GET", "/api/users/7?q=1")).body == b"/7?q=1"
        assert (await client.request("GET", "/api/users")).body == b"/"
        assert (await client.request("GET", "/orders/42?x")).body == b"/v2/order/42?x"
        assert (await client.request("GET", "/raw/x")).body == b"/raw/x"
        # Dot segments are resolved before matching and forwarding.
        assert (await client.request("GET", "/api/x/../users/%2e%2e/users/9")).body == b"/9"
        await client.close()
    hosts = [r.header("Host") for r in up.requests]
    assert hosts[2] == "orders.internal"
    assert hosts[3] == up.address
    assert hosts[0] == "example.test"
    await up.close()


async def test_websocket_is_tunnelled() -> None:
    import websockets

    async def echo(ws: websockets.ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with websockets.serve(echo, "127.0.0.1", 0, max_size=None) as server:
        port_up = next(iter(server.sockets)).getsockname()[1]
        config = gateway_yaml({"up": [f"127.0.0.1:{port_up}"]}, ROUTE)
        async with run_gateway(config) as (worker, port):
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as ws:
                for i in range(20):
                    text = f"message {i}" * (i + 1)
                    await ws.send(text)
                    assert await ws.recv() == text
                big = os.urandom(2_000_000)
                await ws.send(big)
                assert await ws.recv() == big
            assert not worker.inflight


async def test_upstream_request_id_is_replaced_not_duplicated() -> None:
    async def echo_id(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(response(200, b"ok", [("X-Request-ID", "from-upstream"), ("X-Other", "1")]))

    up = await RawUpstream(echo_id).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/", [("X-Request-ID", "mine-1")])
        await client.close()
    assert res.all("X-Request-ID") == ["mine-1"]
    assert res.header("X-Other") == "1"
    await up.close()


async def test_transfer_codings_before_chunked_are_forwarded() -> None:
    up = await RawUpstream(echo_handler).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        await client.send(
            build_request("POST", "/", [("Transfer-Encoding", "gzip, chunked")])
            + b"4\r\nabcd\r\n0\r\n\r\n"
        )
        res = await client.read()
        await client.close()
    assert res.body == b"abcd"
    assert up.requests[0].header("Transfer-Encoding") == "gzip, chunked"
    await up.close()


async def test_host_with_trailing_dot_routes_like_without() -> None:
    up = await RawUpstream().start()
    routes = "  - {name: api, upstream: up, match: {host: api.example.com}}\n"
    async with run_gateway(gateway_yaml({"up": [up.address]}, routes)) as (_, port):
        client = await Client.connect(port)
        assert (await client.request("GET", "/", host="api.example.com.:8080")).status == 200
        assert (await client.request("GET", "/", host="other.example.com")).status == 404
        await client.close()
    await up.close()


@pytest.mark.parametrize(
    ("mode", "status", "seen"),
    [("reject", 400, None), ("keep", 200, "/files/a%2Fb"), ("decode", 200, "/files/a/b")],
)
async def test_encoded_slashes_follow_the_configuration(
    mode: str, status: int, seen: str | None
) -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, ROUTE, f"encoded_slashes: {mode}")
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/files/a%2fb")
        assert res.status == status
        if seen is not None:
            assert res.body == seen.encode()
        await client.close()
    assert [r.target for r in up.requests] == ([seen] if seen else [])
    await up.close()


async def test_the_old_slash_setting_names_its_replacement() -> None:
    with pytest.raises(ConfigError) as info:
        loads(gateway_yaml({"up": ["127.0.0.1:1"]}, ROUTE, "decode_encoded_slashes: true"))
    assert "write 'encoded_slashes: decode'" in str(info.value)


async def test_response_cut_mid_stream_is_counted_as_aborted() -> None:
    async def die(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await w.drain()
        return False

    up = await RawUpstream(die).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (worker, port):
        client = await Client.connect(port)
        await client.send(build_request("GET", "/"))
        assert await client.closed()
        await client.close()
        snap = worker.snapshot()
    (entry,) = [r for r in snap["routes"] if r["route"] == "all"]
    assert entry["aborted"] == 1
    assert entry["by_class"][2] == 1  # the status the client saw: 200
    await up.close()
