"""An attack corpus over real sockets: request smuggling, path traversal past an
auth policy, oversized heads and bodies, and slow clients.

For every case the attacker gets the right status (or the connection closed),
nothing ambiguous reaches the upstream, and a legitimate client on another
connection is served meanwhile. Framing follows RFC 9112 (sections 2.2, 5, 6, 7).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from meshgate.gateway.filters.auth import hash_api_key
from tests.helpers import (
    Client,
    Message,
    RawUpstream,
    build_request,
    echo_handler,
    gateway_yaml,
    run_gateway,
)

ROUTE = "  - {name: all, upstream: up}\n"
# What a mis-framed body would turn into if a parser read it as the next request.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
KEY = "k-3f9a-admin-key"


async def served_meanwhile(port: int, target: str = "/fine") -> None:
    """A legitimate client on its own connection gets its answer."""
    good = await Client.connect(port)
    res = await good.request("GET", target)
    assert res.status == 200, res.body
    assert res.body == target.encode()
    await good.close()


async def refused_with(client: Client, status: int) -> Message:
    """The attacker's response: ``status``, and the connection closed after it."""
    res = await client.read()
    assert res.status == status, res.body
    assert res.header("Connection") == "close"
    assert await client.closed()
    return res


# ---------------------------------------------------------------------------- smuggling

POST = b"POST / HTTP/1.1\r\nHost: x\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"

SMUGGLING = [
    # Content-Length and Transfer-Encoding together (RFC 9112 6.1, 6.3): a classic
    # CL.TE and TE.CL desync.
    pytest.param(
        POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        id="cl-then-te",
    ),
    pytest.param(
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n" + SMUGGLED,
        id="te-then-cl",
    ),
    # Two different lengths (RFC 9112 6.3 item 5).
    pytest.param(POST + b"Content-Length: 0\r\nContent-Length: 37\r\n\r\n" + SMUGGLED, id="two-cl"),
    # A length that is not 1*DIGIT.
    pytest.param(POST + b"Content-Length: +5\r\n\r\nhello" + SMUGGLED, id="cl-plus-sign"),
    pytest.param(POST + b"Content-Length: -5\r\n\r\nhello" + SMUGGLED, id="cl-minus-sign"),
    pytest.param(POST + b"Content-Length: 5 5\r\n\r\nhello" + SMUGGLED, id="cl-inner-space"),
    pytest.param(POST + b"Content-Length: 0x5\r\n\r\nhello" + SMUGGLED, id="cl-hex"),
    pytest.param(POST + b"Content-Length : 5\r\n\r\nhello" + SMUGGLED, id="cl-space-before-colon"),
    # Transfer-Encoding whose final coding is not chunked, or chunked twice
    # (RFC 9112 6.1: chunked MUST NOT be applied more than once; 6.3 item 4: 400).
    pytest.param(
        POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED, id="te-xchunked"
    ),
    pytest.param(
        POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
        id="te-chunked-identity",
    ),
    pytest.param(
        POST
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        + SMUGGLED,
        id="te-chunked-two-lines",
    ),
    pytest.param(
        POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        id="te-chunked-chunked",
    ),
    pytest.param(
        POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        id="te-space-before-colon",
    ),
    pytest.param(POST + b"Transfer-Encoding: identity\r\n\r\n" + SMUGGLED, id="te-identity-only"),
    # Malformed chunks (RFC 9112 7.1: chunk-size = 1*HEXDIG, then CRLF).
    pytest.param(CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n" + SMUGGLED, id="chunk-size-zz"),
    pytest.param(CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n" + SMUGGLED, id="chunk-size-0x"),
    pytest.param(CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n" + SMUGGLED, id="chunk-size-negative"),
    pytest.param(
        CHUNKED + b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n" + SMUGGLED, id="chunk-size-overflow"
    ),
    pytest.param(CHUNKED + b"5\r\nhello0\r\n\r\n" + SMUGGLED, id="chunk-missing-crlf"),
    pytest.param(CHUNKED + b"5\nhello\r\n0\r\n\r\n" + SMUGGLED, id="chunk-size-bare-lf"),
    # Header lines (RFC 9112 5.2: obs-fold is refused; 2.2: bare CR is refused).
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", id="obs-fold-space"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n", id="obs-fold-tab"),
    pytest.param(
        CHUNKED.replace(b"chunked\r\n", b"chunked\r\n identity\r\n") + b"0\r\n\r\n",
        id="obs-fold-transfer-encoding",
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", id="bare-cr-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX\rA: a\r\n\r\n", id="bare-cr-in-name"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\nb\r\n\r\n", id="bare-lf-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\nX-A: a\r\n\r\n", id="bare-lf-ends-header"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", id="nul-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-\x00A: a\r\n\r\n", id="nul-in-name"),
    pytest.param(b"GET / HTTP/1.1\nHost: x\r\n\r\n", id="request-line-bare-lf"),
    pytest.param(b"GET / HTTP/1.1\r\n Host: x\r\n\r\n", id="space-before-first-header"),
    pytest.param(b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", id="nul-in-target"),
    # RFC 9112 3.2: a request with more than one Host line MUST get 400.
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", id="two-hosts"),
]


@pytest.mark.parametrize("raw", SMUGGLING)
async def test_ambiguous_framing_is_400_and_never_forwarded(raw: bytes) -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (worker, port):
        bad = await Client.connect(port)
        await bad.send(raw)
        await served_meanwhile(port)
        res = await refused_with(bad, 400)
        assert json.loads(res.body)["error"] in ("bad_request", "bad_host")
        await bad.close()
        await served_meanwhile(port, "/after")
        assert not worker.inflight
    # Neither the ambiguous request nor what it carried reached the upstream.
    assert [r.target for r in up.requests] == ["/fine", "/after"]
    await up.close()


async def test_transfer_encoding_in_http10_closes_the_connection() -> None:
    # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing;
    # the server closes the connection after it, even when asked to keep it alive.
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        bad = await Client.connect(port)
        await bad.send(
            b"POST /one HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + SMUGGLED
        )
        await served_meanwhile(port)
        res = await bad.read()
        assert res.status in (200, 400)
        assert await bad.closed(timeout=2)
        await bad.close()
    assert "/smuggled" not in [r.target for r in up.requests]
    await up.close()


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"GET /old\r\n\r\n", id="http-0.9"),
        pytest.param(b"GET /old HTTP/0.9\r\nHost: x\r\n\r\n", id="http-0.9-with-version"),
        pytest.param(b"GET /old HTTP/2.0\r\nHost: x\r\n\r\n", id="http-2.0-as-text"),
        pytest.param(
            b"GET /old HTTP/2.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
            id="http-2.0-keep-alive",
        ),
    ],
)
async def test_other_http_versions_are_505_and_never_forwarded(raw: bytes) -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        bad = await Client.connect(port)
        await bad.send(raw + SMUGGLED)
        res = await refused_with(bad, 505)
        assert json.loads(res.body)["error"] == "http_version_not_supported"
        await bad.close()
        await served_meanwhile(port)
    assert [r.target for r in up.requests] == ["/fine"]
    await up.close()


async def test_upgrade_refused_by_upstream_does_not_forward_what_followed() -> None:
    # Bytes after an Upgrade request are only tunnelled once the upstream agreed
    # (101); a 200 instead must not let them through as a second request.
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        bad = await Client.connect(port)
        await bad.send(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            + SMUGGLED
        )
        await served_meanwhile(port)
        res = await bad.read()
        assert res.status == 200
        assert res.body == b"/ws"
        assert await bad.closed()
        await bad.close()
    assert sorted(r.target for r in up.requests) == ["/fine", "/ws"]
    await up.close()


# ---------------------------------------------------------------------------- traversal

TRAVERSALS = [
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin",
    "/public/.%2e/admin",
    "/public/%2e./admin",
    "/public/./../admin",
    "/public/x/../../admin",
    "//admin",
    "/./admin",
    "/%61dmin",
    "/%2e/admin",
    "/public/../admin/../admin",
]


def traversal_config(public: RawUpstream, admin: RawUpstream) -> str:
    doc = {
        "gateway": {"listen": "127.0.0.1:0", "access_log": {"enabled": False}},
        "upstreams": {
            "pub": {"endpoints": [public.address]},
            "adm": {"endpoints": [admin.address]},
        },
        "consumers": {"ops": {"api_keys": [hash_api_key(KEY)]}},
        "routes": [
            {"name": "public", "upstream": "pub", "match": {"path_prefix": "/public"}},
            {
                "name": "admin",
                "upstream": "adm",
                "match": {"path_prefix": "/admin"},
                "auth": {"api_key": {}},
            },
        ],
    }
    return json.dumps(doc)


@pytest.mark.parametrize("target", TRAVERSALS)
async def test_traversal_meets_the_admin_policy(target: str) -> None:
    public = await RawUpstream().start()
    admin = await RawUpstream().start()
    async with run_gateway(traversal_config(public, admin)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", target)
        assert res.status == 401, res.body
        body = json.loads(res.body)
        assert body["route"] == "admin"
        # With the key, the admin upstream gets the canonical path, not the raw one.
        res = await client.request("GET", target, [("X-API-Key", KEY)])
        assert res.status == 200
        assert res.body == b"/admin"
        good = await Client.connect(port)
        assert (await good.request("GET", "/public/page")).body == b"/public/page"
        await good.close()
        await client.close()
    assert [r.target for r in public.requests] == ["/public/page"]
    assert [r.target for r in admin.requests] == ["/admin"]
    assert admin.requests[0].header("X-Consumer") == "ops"
    await public.close()
    await admin.close()


@pytest.mark.parametrize(
    "target",
    ["/public/%2", "/public/%zz/../../admin", "/public/%00/../admin", "http://x/admin", "admin"],
)
async def test_malformed_targets_are_400_and_reach_no_upstream(target: str) -> None:
    public = await RawUpstream().start()
    admin = await RawUpstream().start()
    async with run_gateway(traversal_config(public, admin)) as (_, port):
        client = await Client.connect(port)
        await client.send(build_request("GET", target))
        await refused_with(client, 400)
        await client.close()
    assert public.requests == []
    assert admin.requests == []
    await public.close()
    await admin.close()


# ---------------------------------------------------------------------------- size limits

LIMITS = (
    "limits: {max_header_bytes: 8KiB, max_headers: 50, max_url_bytes: 2KiB, max_body_bytes: 1KiB}"
)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(build_request("GET", "/", [("X-Big", "a" * 9000)]), 431, id="huge-header"),
        pytest.param(
            build_request("GET", "/", [(f"X-H{i}", "v") for i in range(51)]),
            431,
            id="too-many-headers",
        ),
        pytest.param(build_request("GET", "/" + "a" * 4000), 414, id="long-uri"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * 20_000,
            431,
            id="head-that-never-ends",
        ),
    ],
)
async def test_oversized_heads_are_refused(raw: bytes, status: int) -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE, LIMITS)) as (_, port):
        bad = await Client.connect(port)
        await bad.send(raw)
        await served_meanwhile(port)
        await refused_with(bad, status)
        await bad.close()
    assert [r.target for r in up.requests] == ["/fine"]
    await up.close()


async def test_body_over_the_limit_by_content_length_is_413_before_any_upstream() -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE, LIMITS)) as (_, port):
        bad = await Client.connect(port)
        # Only the head: the answer must not wait for a body it will refuse anyway.
        await bad.send(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\n\r\n")
        res = await refused_with(bad, 413)
        assert json.loads(res.body)["error"] == "body_too_large"
        await bad.close()
        assert up.connections == 0
        # Exactly at the limit is fine.
        client = await Client.connect(port)
        assert (await client.request("POST", "/ok", body=b"x" * 1024)).status == 200
        await client.close()
    assert [r.target for r in up.requests] == ["/ok"]
    await up.close()


async def test_chunked_body_growing_past_the_limit_is_413() -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE, LIMITS)) as (worker, port):
        bad = await Client.connect(port)
        await bad.send(build_request("POST", "/grow", [("Transfer-Encoding", "chunked")]))
        await bad.send(b"200\r\n" + b"a" * 512 + b"\r\n")
        await asyncio.sleep(0.05)
        await bad.send(b"200\r\n" + b"b" * 512 + b"\r\n")
        await asyncio.sleep(0.05)
        await served_meanwhile(port)
        await bad.send(b"200\r\n" + b"c" * 512 + b"\r\n0\r\n\r\n")
        try:
            res = await bad.read()
        except (EOFError, ConnectionError):
            pass  # acceptable only once a response had started; none can have here
        else:
            assert res.status == 413
        assert await bad.closed()
        await bad.close()
        assert not worker.inflight
    # The upstream may have seen the start of it, never a complete request.
    assert [r.target for r in up.requests] == ["/fine"]
    await up.close()


# ---------------------------------------------------------------------------- slow clients

SLOW = "header_timeout: 1s\nbody_timeout: 1s"


async def test_slowloris_head_gets_408_while_others_are_served() -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE, SLOW)) as (worker, port):
        slow = await Client.connect(port)
        started = time.monotonic()
        await slow.send(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Drip: ")

        async def drip() -> None:
            # One byte every 0.3 s keeps the connection busy but never ends the head.
            try:
                while True:
                    await asyncio.sleep(0.3)
                    await slow.send(b"a")
            except (ConnectionError, RuntimeError):
                return

        dripping = asyncio.create_task(drip())
        for i in range(6):
            await served_meanwhile(port, f"/normal/{i}")
            await asyncio.sleep(0.2)
        try:
            res = await slow.read(timeout=3)
        except (EOFError, ConnectionError):
            pass  # closed without a response also stops the attack
        else:
            assert res.status == 408
        elapsed = time.monotonic() - started
        assert await slow.closed()
        dripping.cancel()
        await slow.close()
        assert 1.0 <= elapsed <= 2.5, elapsed
        assert not worker.inflight
    assert [r.target for r in up.requests] == [f"/normal/{i}" for i in range(6)]
    await up.close()


async def test_stalled_body_gets_408_while_others_are_served() -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE, SLOW)) as (worker, port):
        slow = await Client.connect(port)
        started = time.monotonic()
        await slow.send(
            b"POST /stall HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"h" * 50
        )
        for i in range(5):
            await served_meanwhile(port, f"/normal/{i}")
            await asyncio.sleep(0.2)
        res = await slow.read(timeout=3)
        elapsed = time.monotonic() - started
        assert res.status == 408
        assert json.loads(res.body)["error"] == "request_timeout"
        assert await slow.closed()
        await slow.close()
        assert 1.0 <= elapsed <= 2.5, elapsed
        assert not worker.inflight
    # The half body never became a request upstream.
    assert [r.target for r in up.requests] == [f"/normal/{i}" for i in range(5)]
    await up.close()


# ---------------------------------------------------------------------------- all at once


async def test_worker_survives_the_whole_corpus_at_once() -> None:
    up = await RawUpstream().start()
    # keepalive_timeout: a case the gateway wrongly keeps open still ends promptly.
    config = gateway_yaml(
        {"up": [up.address]}, ROUTE, LIMITS + "\n" + SLOW + "\nkeepalive_timeout: 1s"
    )
    payloads = [raw for case in SMUGGLING for raw in case.values if isinstance(raw, bytes)]
    payloads += [
        build_request("GET", "/", [("X-Big", "a" * 9000)]),
        build_request("GET", "/" + "a" * 4000),
        b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n",
        b"GET /slow HTTP/1.1\r\nHost: x\r\n",
        b"POST /stall HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf",
    ]
    async with run_gateway(config) as (worker, port):

        async def attack(raw: bytes) -> None:
            client = await Client.connect(port)
            try:
                await client.send(raw)
                # Whatever the answer, the gateway ends these connections (the
                # statuses are checked case by case above).
                await client.closed(timeout=5)
            finally:
                await client.close()

        attacks = asyncio.gather(*(attack(raw) for raw in payloads))
        await served_meanwhile(port, "/meanwhile")
        await attacks
        # Fresh connection, normal request, after everything.
        client = await Client.connect(port)
        assert (await client.request("GET", "/again")).status == 200
        await client.close()
        assert not worker.inflight
        # Every connection is gone: none is left half-parsed or paused.
        async with asyncio.timeout(2):
            while worker.connections:
                await asyncio.sleep(0.05)
    assert "/smuggled" not in [r.target for r in up.requests]
    await up.close()


# ---------------------------------------------------------------------------- chunk extensions


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(lambda n: b"5;" + b"e" * n + b"\r\nhello\r\n0\r\n\r\n", id="one-extension"),
        pytest.param(
            lambda n: (
                b"".join(b"1;" + b"e" * 1000 + b"\r\nx\r\n" for _ in range(n // 1000))
                + b"0\r\n\r\n"
            ),
            id="many-extensions",
        ),
        pytest.param(lambda n: b"0\r\nX-T: " + b"t" * n + b"\r\n\r\n", id="trailer"),
    ],
)
async def test_chunk_extensions_and_trailers_are_bounded(tail: Any) -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE, LIMITS)) as (worker, port):
        bad = await Client.connect(port)
        await bad.send(build_request("POST", "/ext", [("Transfer-Encoding", "chunked")]))
        data = tail(2 << 20)  # 2 MiB of extension bytes, the body limit being 1 KiB
        try:
            for at in range(0, len(data), 65536):
                await bad.send(data[at : at + 65536])
        except ConnectionError:
            pass  # the gateway may have closed its side by now; it answered first
        res = await bad.read()
        assert res.status in (400, 413), res.body
        assert json.loads(res.body)["error"] in ("bad_chunk", "body_too_large")
        assert await bad.closed()
        await served_meanwhile(port)
        assert not worker.inflight
    assert [r.target for r in up.requests] == ["/fine"]


async def test_small_chunk_extensions_pass_and_are_not_forwarded() -> None:
    up = await RawUpstream(echo_handler).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE)) as (_, port):
        client = await Client.connect(port)
        await client.send(build_request("POST", "/ext", [("Transfer-Encoding", "chunked")]))
        await client.send(b"5;name=value;x\r\nhello\r\n6;a=b\r\n world\r\n0\r\n\r\n")
        res = await client.read()
        assert res.status == 200
        assert res.body == b"hello world"


# ---------------------------------------------------------------------------- lingering close


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
            431,
            id="head-too-large",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4194304\r\n\r\n" + b"b" * (4 << 20),
            413,
            id="body-too-large",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"10000\r\n" + b"c" * 65536 + b"\r\n" for _ in range(64)),
            413,
            id="chunked-body-too-large",
        ),
    ],
)
async def test_a_client_still_sending_gets_the_answer_not_a_reset(raw: bytes, status: int) -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, ROUTE, LIMITS)) as (_, port):
        client = await Client.connect(port)
        # Everything is written before anything is read, as a simple client does.
        await client.send(raw)
        res = await client.read()
        assert res.status == status, res.body
        assert res.header("Connection") == "close"
        assert await client.closed()
    assert up.requests == []
