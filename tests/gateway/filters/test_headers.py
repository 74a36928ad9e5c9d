"""Header policy over real sockets: add (replacing), remove and rename, on the request
the upstream gets and on the response the client gets."""

from __future__ import annotations

import asyncio

import pytest

from meshgate.config import loads
from meshgate.errors import ConfigError
from tests.helpers import Client, Message, RawUpstream, gateway_yaml, response, run_gateway


def headers_route(policy: str) -> str:
    return f"  - {{name: api, upstream: up, headers: {policy}}}\n"


REQUEST_POLICY = (
    "{request: {add: {X-Env: prod, X-Gateway: meshgate}, remove: [X-Debug, Cookie],"
    " rename: {X-Old-Token: X-Token}}}"
)


async def test_request_policy_reaches_the_upstream() -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, headers_route(REQUEST_POLICY))
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        res = await client.request(
            "POST",
            "/orders?x=1",
            [
                ("X-Env", "dev"),  # replaced by the policy's value, not added to
                ("x-env", "staging"),
                ("x-debug", "1"),  # names match whatever their case
                ("Cookie", "session=secret"),
                ("X-Old-Token", "t0k3n: with colon"),
                ("X-Kept", "kept"),
            ],
            body=b"payload",
        )
        await client.close()
    assert res.status == 200
    seen = up.requests[0]
    assert seen.target == "/orders?x=1"
    assert seen.body == b"payload"
    assert seen.all("X-Env") == ["prod"]
    assert seen.all("X-Gateway") == ["meshgate"]
    assert seen.header("X-Debug") is None
    assert seen.header("Cookie") is None
    assert seen.header("X-Old-Token") is None
    assert seen.all("X-Token") == ["t0k3n: with colon"]
    assert seen.header("X-Kept") == "kept"
    # The gateway's own headers are untouched by a policy that does not name them.
    assert seen.header("Host") == "example.test"
    assert seen.header("Via") == "1.1 meshgate"
    assert seen.header("X-Request-ID") == res.header("X-Request-ID")
    assert seen.all("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header("Content-Length") == "7"
    await up.close()


@pytest.mark.parametrize("preserve_host", [True, False])
async def test_request_policy_can_remove_the_gateways_headers(preserve_host: bool) -> None:
    up = await RawUpstream().start()
    route = (
        "  - {name: api, upstream: up, preserve_host: "
        f"{str(preserve_host).lower()}, headers: "
        "{request: {remove: [Via, X-Request-ID, X-Forwarded-For]}}}\n"
    )
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/", [("X-Request-ID", "abc-123")])
        await client.close()
    seen = up.requests[0]
    assert seen.header("Via") is None
    assert seen.header("X-Request-ID") is None
    assert seen.header("X-Forwarded-For") is None
    assert seen.header("Host") == ("example.test" if preserve_host else up.address)
    # The client still gets its request id back.
    assert res.header("X-Request-ID") == "abc-123"
    await up.close()


async def test_request_policy_applies_to_every_request_on_a_connection() -> None:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, headers_route(REQUEST_POLICY))
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        for i in range(3):
            assert (await client.request("GET", f"/{i}", [("X-Debug", str(i))])).status == 200
        await client.close()
    assert [r.header("X-Debug") for r in up.requests] == [None, None, None]
    assert [r.all("X-Env") for r in up.requests] == [["prod"]] * 3
    await up.close()


RESPONSE_POLICY = (
    "{response: {add: {X-Frame-Options: DENY, Strict-Transport-Security: max-age=63072000},"
    " remove: [Server, X-Powered-By], rename: {X-Upstream-Time: X-Time}}}"
)


async def upstream_with_headers(
    req: Message, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    w.write(
        response(
            200,
            b"body stays intact",
            [
                ("Server", "internal/1.2"),
                ("x-powered-by", "framework"),
                ("X-Frame-Options", "SAMEORIGIN"),
                ("X-Upstream-Time", "12ms"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
            ],
        )
    )


async def test_response_policy_reaches_the_client() -> None:
    up = await RawUpstream(upstream_with_headers).start()
    route = headers_route(RESPONSE_POLICY)
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/")
        again = await client.request("GET", "/again")
        await client.close()
    for reply in (res, again):
        assert reply.status == 200
        assert reply.header("Server") is None
        assert reply.header("X-Powered-By") is None
        assert reply.all("X-Frame-Options") == ["DENY"]
        assert reply.all("Strict-Transport-Security") == ["max-age=63072000"]
        assert reply.header("X-Upstream-Time") is None
        assert reply.all("X-Time") == ["12ms"]
        assert reply.all("Set-Cookie") == ["a=1", "b=2"]
        assert reply.header("Content-Length") == "17"
        assert reply.header("Via") == "1.1 meshgate"
        assert reply.header("X-Request-ID") is not None
        assert reply.body == b"body stays intact"
    # The request was not changed by a response-only policy.
    assert up.requests[0].header("Via") == "1.1 meshgate"
    await up.close()


async def test_response_policy_can_remove_the_gateways_headers() -> None:
    up = await RawUpstream().start()
    route = headers_route("{response: {remove: [Via, X-Request-ID]}}")
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/")
        await client.close()
    assert res.status == 200
    assert res.header("Via") is None, res.headers
    assert res.header("X-Request-ID") is None, res.headers
    # Upstream-bound headers are not the response policy's business.
    assert up.requests[0].header("Via") == "1.1 meshgate"
    await up.close()


async def test_response_policy_with_chunked_body() -> None:
    async def chunked(req: Message, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(response(200, b"streamed", [("Server", "x"), ("X-A", "1")], chunked=True))

    up = await RawUpstream(chunked).start()
    route = headers_route("{response: {remove: [Server], rename: {X-A: X-B}}}")
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        client = await Client.connect(port)
        first = await client.request("GET", "/")
        second = await client.request("GET", "/")
        await client.close()
    for res in (first, second):
        assert res.status == 200
        assert res.body == b"streamed"
        assert res.header("Server") is None
        assert res.header("X-B") == "1"
        assert res.header("Transfer-Encoding") == "chunked"
    await up.close()


async def test_response_policy_that_removes_every_upstream_header() -> None:
    async def bare(req: Message, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nX-Only: 1\r\nContent-Length: 2\r\n\r\nhi")

    up = await RawUpstream(bare).start()
    route = headers_route("{response: {remove: [X-Only]}}")
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/")
        assert (await client.request("GET", "/")).status == 200
        await client.close()
    assert res.status == 200
    assert res.body == b"hi"
    assert res.header("X-Only") is None
    await up.close()


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("policy", "path", "fragment"),
    [
        (
            '{request: {add: {X-A: "one\\ntwo"}}}',
            "routes[0].headers.request",
            "'X-A' contains a line break",
        ),
        (
            '{response: {add: {X-A: "one\\r\\nSet-Cookie: injected=1"}}}',
            "routes[0].headers.response",
            "'X-A' contains a line break",
        ),
        (
            "{request: {remove: ['Bad Header']}}",
            "routes[0].headers.request",
            "'Bad Header' is not a valid HTTP header name",
        ),
        (
            "{request: {add: {'X-A:': v}}}",
            "routes[0].headers.request",
            "'X-A:' is not a valid HTTP header name",
        ),
        (
            "{response: {rename: {X-Old: 'X New'}}}",
            "routes[0].headers.response",
            "'X New' is not a valid HTTP header name",
        ),
        (
            "{response: {rename: {'': X-New}}}",
            "routes[0].headers.response",
            "'' is not a valid HTTP header name",
        ),
        ("{request: {drop: [X-A]}}", "routes[0].headers.request.drop", ""),
        (
            "{request: {remove: [Content-Length]}}",
            "routes[0].headers.request",
            "'Content-Length' frames the message",
        ),
        (
            "{response: {add: {Transfer-Encoding: chunked}}}",
            "routes[0].headers.response",
            "'Transfer-Encoding' frames the message",
        ),
        (
            "{response: {rename: {Connection: X-Connection}}}",
            "routes[0].headers.response",
            "'Connection' frames the message",
        ),
        (
            "{request: {add: {Host: other.example}}}",
            "routes[0].headers",
            "use the route's host_rewrite",
        ),
    ],
)
def test_invalid_policy_is_a_config_error(policy: str, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(gateway_yaml({"up": ["127.0.0.1:9"]}, headers_route(policy)))
    assert any(i.path == path and fragment in i.message for i in info.value.issues), str(info.value)
