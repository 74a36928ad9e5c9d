"""CORS at the gateway over real sockets: preflights are answered here and never reach
the upstream; actual requests from allowed origins get the CORS response headers."""

from __future__ import annotations

import asyncio
import json

import pytest

from meshgate.config import loads
from meshgate.errors import ConfigError
from tests.helpers import (
    Client,
    Message,
    RawUpstream,
    free_port,
    gateway_yaml,
    response,
    run_gateway,
)

APP = "https://app.example.com"
ADMIN = "https://admin.example.com"
EVIL = "https://evil.example.net"

CORS = (
    f"{{allow_origins: ['{APP}', '{ADMIN}'], allow_methods: [GET, POST, PUT],"
    " allow_headers: [Content-Type, X-Trace-Id], expose_headers: [X-Total, X-Page],"
    " max_age: 2m}"
)
"""Listed origins, three methods, two request headers, two exposed headers."""


def cors_route(cors: str = CORS, extra: str = "") -> str:
    return f"  - {{name: api, upstream: up, cors: {cors}{extra}}}\n"


async def upstream_handler(
    req: Message, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    w.write(response(200, b"from upstream", [("X-Total", "7"), ("X-Page", "1")]))


def preflight(
    origin: str, method: str = "PUT", headers: str | None = None
) -> list[tuple[str, str]]:
    lines = [("Origin", origin), ("Access-Control-Request-Method", method)]
    if headers is not None:
        lines.append(("Access-Control-Request-Headers", headers))
    return lines


def cors_headers(res: Message) -> dict[str, str]:
    """The response's Access-Control-* headers, by lowercase name."""
    return {k.lower(): v for k, v in res.headers if k.lower().startswith("access-control-")}


# ---------------------------------------------------------------------------- preflight


@pytest.mark.parametrize("origin", [APP, ADMIN])
async def test_preflight_from_allowed_origin_is_answered_at_the_gateway(origin: str) -> None:
    up = await RawUpstream(upstream_handler).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, cors_route())) as (_, port):
        client = await Client.connect(port)
        res = await client.request(
            "OPTIONS", "/items/1", preflight(origin, "PUT", "content-type, X-Trace-Id")
        )
        # The connection stays usable after a preflight.
        after = await client.request("GET", "/items/1")
        await client.close()

    assert res.status == 204
    assert res.body == b""
    assert res.header("Content-Length") == "0"
    assert cors_headers(res) == {
        "access-control-allow-origin": origin,
        "access-control-allow-methods": "GET, POST, PUT",
        "access-control-max-age": "120",
        # The requested headers, echoed as the browser sent them.
        "access-control-allow-headers": "content-type, X-Trace-Id",
    }
    assert res.header("Vary") == "Origin"
    assert res.header("X-Request-ID") is not None
    assert after.status == 200
    # Only the GET reached the upstream.
    assert [r.method for r in up.requests] == ["GET"]
    await up.close()


async def test_preflight_without_requested_headers_allows_none() -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, cors_route())) as (_, port):
        client = await Client.connect(port)
        res = await client.request("OPTIONS", "/", preflight(APP, "post"))
        await client.close()
    assert res.status == 204
    assert res.header("Access-Control-Allow-Origin") == APP
    assert res.header("Access-Control-Allow-Headers") is None
    assert up.requests == []
    await up.close()


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        (preflight(EVIL, "GET"), "cors_origin"),
        (preflight(APP + ":8443", "GET"), "cors_origin"),  # another origin: another port
        (preflight("http://app.example.com", "GET"), "cors_origin"),  # another scheme
        (preflight(APP, "DELETE"), "cors_method"),
        (preflight(APP, "PATCH"), "cors_method"),
        (preflight(APP, "POST", "Content-Type, X-Secret"), "cors_header"),
        (preflight(APP, "POST", "Authorization"), "cors_header"),
    ],
)
async def test_preflight_refused(lines: list[tuple[str, str]], error: str) -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, cors_route())) as (_, port):
        client = await Client.connect(port)
        res = await client.request("OPTIONS", "/items", lines)
        await client.close()
    assert res.status == 403
    assert json.loads(res.body)["error"] == error
    assert cors_headers(res) == {}
    assert up.requests == []
    await up.close()


async def test_options_without_request_method_is_not_a_preflight() -> None:
    up = await RawUpstream(upstream_handler).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, cors_route())) as (_, port):
        client = await Client.connect(port)
        res = await client.request("OPTIONS", "/items", [("Origin", APP)])
        await client.close()
    assert res.status == 200
    assert res.body == b"from upstream"
    assert res.header("Access-Control-Allow-Origin") == APP
    assert [r.method for r in up.requests] == ["OPTIONS"]
    await up.close()


async def test_preflight_for_route_limited_to_some_methods() -> None:
    # A browser preflights a PUT with OPTIONS: a route that matches only some methods
    # must list OPTIONS too for its CORS filter to see the preflight.
    up = await RawUpstream().start()
    route = cors_route(extra=", match: {methods: [PUT, OPTIONS]}")
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("OPTIONS", "/items", preflight(APP, "PUT"))
        await client.close()
    assert res.status == 204, res.body
    assert res.header("Access-Control-Allow-Origin") == APP
    assert up.requests == []
    await up.close()


# ---------------------------------------------------------------------------- actual requests


async def test_actual_request_from_allowed_origin_gets_cors_headers() -> None:
    up = await RawUpstream(upstream_handler).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, cors_route())) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/items", [("Origin", ADMIN)])
        await client.close()
    assert res.status == 200
    assert res.body == b"from upstream"
    assert res.header("X-Total") == "7"
    assert cors_headers(res) == {
        "access-control-allow-origin": ADMIN,
        "access-control-expose-headers": "X-Total, X-Page",
    }
    assert res.header("Vary") == "Origin"
    assert res.header("Via") == "1.1 meshgate"
    # The upstream sees the request as the client sent it.
    assert up.requests[0].header("Origin") == ADMIN
    await up.close()


@pytest.mark.parametrize("origin", [EVIL, "null", None])
async def test_actual_request_from_other_origin_passes_without_cors_headers(
    origin: str | None,
) -> None:
    up = await RawUpstream(upstream_handler).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, cors_route())) as (_, port):
        client = await Client.connect(port)
        headers = [("Origin", origin)] if origin is not None else []
        res = await client.request("GET", "/items", headers)
        await client.close()
    # The browser, seeing no CORS headers, keeps the response from the page.
    assert res.status == 200
    assert res.body == b"from upstream"
    assert cors_headers(res) == {}
    assert len(up.requests) == 1
    await up.close()


@pytest.mark.parametrize("origin", [EVIL, None])
async def test_response_without_cors_headers_still_varies_by_origin(origin: str | None) -> None:
    # The answer depends on Origin: a cache that stored this response (no
    # Access-Control-Allow-Origin) must not serve it to a request from an allowed
    # origin (Fetch standard, "CORS protocol and HTTP caches").
    up = await RawUpstream(upstream_handler).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, cors_route())) as (_, port):
        client = await Client.connect(port)
        headers = [("Origin", origin)] if origin is not None else []
        res = await client.request("GET", "/items", headers)
        await client.close()
    assert res.status == 200
    assert cors_headers(res) == {}
    vary = {v.strip().lower() for line in res.all("Vary") for v in line.split(",")}
    assert "origin" in vary, res.headers
    await up.close()


async def test_gateway_errors_carry_the_cors_headers() -> None:
    # A page must be able to read the gateway's 502 (or 429), not a CORS failure.
    dead = f"127.0.0.1:{free_port()}"
    async with run_gateway(gateway_yaml({"up": [dead]}, cors_route())) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/items", [("Origin", APP)])
        await client.close()
    assert res.status == 502
    assert json.loads(res.body)["error"] == "upstream_connect_failed"
    assert cors_headers(res)["access-control-allow-origin"] == APP
    assert res.header("Vary") == "Origin"


async def test_upstream_cors_headers_give_way_to_the_gateways() -> None:
    async def own_cors(req: Message, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(
            response(
                200,
                b"ok",
                [
                    ("Access-Control-Allow-Origin", "*"),
                    ("access-control-allow-credentials", "true"),
                    ("X-Kept", "1"),
                ],
            )
        )

    up = await RawUpstream(own_cors).start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, cors_route())) as (_, port):
        client = await Client.connect(port)
        allowed = await client.request("GET", "/items", [("Origin", APP)])
        other = await client.request("GET", "/items", [("Origin", EVIL)])
        await client.close()
    # One Allow-Origin, the gateway's: browsers refuse a response with two.
    assert allowed.all("Access-Control-Allow-Origin") == [APP]
    assert cors_headers(allowed) == {
        "access-control-allow-origin": APP,
        "access-control-expose-headers": "X-Total, X-Page",
    }
    assert allowed.header("X-Kept") == "1"
    assert allowed.body == b"ok"
    assert cors_headers(other) == {}
    assert other.header("X-Kept") == "1"
    await up.close()


async def test_any_origin_is_answered_with_a_star() -> None:
    up = await RawUpstream().start()
    route = cors_route("{allow_origins: ['*'], allow_headers: ['*']}")
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        client = await Client.connect(port)
        pre = await client.request("OPTIONS", "/", preflight(EVIL, "DELETE", "X-Anything"))
        res = await client.request("GET", "/", [("Origin", EVIL)])
        await client.close()
    assert pre.status == 204
    assert pre.header("Access-Control-Allow-Origin") == "*"
    assert pre.header("Access-Control-Allow-Headers") == "X-Anything"
    assert pre.header("Access-Control-Allow-Credentials") is None
    assert res.status == 200
    assert res.header("Access-Control-Allow-Origin") == "*"
    assert res.header("Access-Control-Allow-Credentials") is None
    assert [r.method for r in up.requests] == ["GET"]
    await up.close()


async def test_credentials_echo_the_origin() -> None:
    up = await RawUpstream().start()
    route = cors_route(f"{{allow_origins: ['{APP}'], allow_credentials: true}}")
    async with run_gateway(gateway_yaml({"up": [up.address]}, route)) as (_, port):
        client = await Client.connect(port)
        pre = await client.request("OPTIONS", "/", preflight(APP, "GET"))
        res = await client.request("GET", "/", [("Origin", APP), ("Cookie", "s=1")])
        await client.close()
    for reply in (pre, res):
        assert reply.header("Access-Control-Allow-Origin") == APP
        assert reply.header("Access-Control-Allow-Credentials") == "true"
        assert reply.header("Vary") == "Origin"
    assert pre.header("Access-Control-Max-Age") == "600"  # the default
    assert up.requests[0].header("Cookie") == "s=1"
    await up.close()


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("cors", "path", "fragment"),
    [
        (
            "{allow_origins: ['*'], allow_credentials: true}",
            "routes[0].cors",
            "allow_credentials cannot be used with the '*' origin",
        ),
        ("{allow_origins: []}", "routes[0].cors.allow_origins", ""),
        ("{allow_origins: ['*'], max_age: soon}", "routes[0].cors.max_age", "not a duration"),
    ],
)
def test_invalid_settings_are_config_errors(cors: str, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(gateway_yaml({"up": ["127.0.0.1:9"]}, cors_route(cors)))
    assert any(i.path == path and fragment in i.message for i in info.value.issues), str(info.value)


def test_single_values_may_be_written_without_a_list() -> None:
    cors = f"{{allow_origins: '{APP}', allow_methods: PUT, allow_headers: '*'}}"
    settings = loads(gateway_yaml({"up": ["127.0.0.1:9"]}, cors_route(cors))).routes[0].cors
    assert settings is not None
    assert (settings.allow_origins, settings.allow_methods, settings.allow_headers) == (
        (APP,),
        ("PUT",),
        ("*",),
    )
