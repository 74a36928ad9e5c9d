"""A route that protects a prefix stays protected however the path or the credentials
are spelled: encoded slashes and backslashes, ``;`` path parameters, two
Authorization headers, header names that only differ by ``_`` and ``-``.

Every case runs over real sockets against a gateway with a public route ``/`` and an
``/admin`` route behind an API key or a JWT; the upstreams record what reached them.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest

from meshgate.gateway.filters.auth import hash_api_key
from tests.helpers import Client, RawUpstream, build_request, run_gateway

KEY = "k-3f9a-admin-key"
SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def protected_config(
    public: RawUpstream, admin: RawUpstream, *, gateway: dict[str, Any] | None = None
) -> str:
    doc = {
        "gateway": {"listen": "127.0.0.1:0", "access_log": {"enabled": False}, **(gateway or {})},
        "upstreams": {
            "pub": {"endpoints": [public.address]},
            "adm": {"endpoints": [admin.address]},
        },
        "consumers": {"ops": {"api_keys": [hash_api_key(KEY)]}},
        "routes": [
            {"name": "public", "upstream": "pub", "match": {"path_prefix": "/"}},
            {
                "name": "admin",
                "upstream": "adm",
                "match": {"path_prefix": "/admin"},
                "auth": {"api_key": {}},
            },
        ],
    }
    return json.dumps(doc)


async def _upstreams() -> tuple[RawUpstream, RawUpstream]:
    return await RawUpstream().start(), await RawUpstream().start()


# ---------------------------------------------------------------------------- paths

ENCODED_SEPARATORS = [
    "/admin%2Fsecret",
    "/admin%2fsecret",
    "/x/..%2Fadmin%2Fsecret",
    "/admin%5Csecret",
    "/admin%5csecret",
    "/%2Fadmin/secret",
]


@pytest.mark.parametrize("target", ENCODED_SEPARATORS)
async def test_encoded_separators_are_400_by_default(target: str) -> None:
    public, admin = await _upstreams()
    async with run_gateway(protected_config(public, admin)) as (_, port):
        client = await Client.connect(port)
        await client.send(build_request("GET", target))
        res = await client.read()
        assert res.status == 400, res.body
        body = json.loads(res.body)
        assert body["error"] == "bad_path"
        assert "encoded_slashes" in body["detail"]
        assert await client.closed()
    assert public.requests == []
    assert admin.requests == []


@pytest.mark.parametrize("target", ["/admin\\secret", "/x\\..\\admin", "/admin\\"])
async def test_backslashes_are_400(target: str) -> None:
    public, admin = await _upstreams()
    async with run_gateway(protected_config(public, admin)) as (_, port):
        client = await Client.connect(port)
        await client.send(build_request("GET", target))
        res = await client.read()
        assert res.status == 400, res.body
        assert "backslash" in json.loads(res.body)["detail"]
    assert public.requests == []
    assert admin.requests == []


PARAMETERS = [
    ("/admin;jsessionid=1/secret", "/admin;jsessionid=1/secret"),
    ("/admin;x", "/admin;x"),
    ("/public/..;/admin/secret", "/admin/secret"),
    ("/x;a=b/..;c/admin;d/secret", "/admin;d/secret"),
    ("/%2e%2e;/admin", "/admin"),
]


@pytest.mark.parametrize(("target", "forwarded"), PARAMETERS)
async def test_path_parameters_do_not_hide_a_protected_prefix(target: str, forwarded: str) -> None:
    public, admin = await _upstreams()
    async with run_gateway(protected_config(public, admin)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", target)
        assert res.status == 401, res.body
        assert json.loads(res.body)["route"] == "admin"
        res = await client.request("GET", target, [("X-API-Key", KEY)])
        assert res.status == 200, res.body
    assert public.requests == []
    # Forwarded with its parameters (an upstream may use them), dot segments resolved.
    assert [r.target for r in admin.requests] == [forwarded]


@pytest.mark.parametrize(
    ("mode", "target", "forwarded"),
    [
        ("decode", "/admin%2Fsecret", "/admin/secret"),
        ("decode", "/x%2F..%2Fadmin", "/admin"),
        ("keep", "/admin%2Fsecret", "/admin%2Fsecret"),
        ("keep", "/admin%2fa%5Cb", "/admin%2Fa%5Cb"),
    ],
)
async def test_encoded_slashes_when_allowed_meet_the_policy_of_their_decoded_path(
    mode: str, target: str, forwarded: str
) -> None:
    public, admin = await _upstreams()
    config = protected_config(public, admin, gateway={"encoded_slashes": mode})
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", target)
        assert res.status == 401, res.body
        res = await client.request("GET", target, [("X-API-Key", KEY)])
        assert res.status == 200, res.body
    assert public.requests == []
    assert [r.target for r in admin.requests] == [forwarded]


async def test_the_query_is_forwarded_untouched_beside_a_normalized_path() -> None:
    public, admin = await _upstreams()
    async with run_gateway(protected_config(public, admin)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/a;p=1/./b?x=%2F&y=\\")
        assert res.status == 200, res.body
    assert [r.target for r in public.requests] == ["/a;p=1/b?x=%2F&y=\\"]


# ---------------------------------------------------------------------------- Authorization


def jwt_config(public: RawUpstream, admin: RawUpstream) -> str:
    doc = {
        "gateway": {"listen": "127.0.0.1:0", "access_log": {"enabled": False}},
        "upstreams": {
            "pub": {"endpoints": [public.address]},
            "adm": {"endpoints": [admin.address]},
        },
        "routes": [
            {"name": "public", "upstream": "pub", "match": {"path_prefix": "/"}},
            {
                "name": "admin",
                "upstream": "adm",
                "match": {"path_prefix": "/admin"},
                "auth": {
                    "jwt": {
                        "algorithms": ["HS256"],
                        "keys": [{"secret": SECRET}],
                        "forward_claims": {"sub": "X-User-Id"},
                    }
                },
            },
        ],
    }
    return json.dumps(doc)


def token(sub: str) -> str:
    # Signed when the test runs, never at collection: it expires.
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")


@pytest.mark.parametrize("route", ["/admin/x", "/public"])
async def test_two_authorization_headers_are_400_on_every_route(route: str) -> None:
    public, admin = await _upstreams()
    async with run_gateway(jwt_config(public, admin)) as (_, port):
        client = await Client.connect(port)
        forged = jwt.encode({"sub": "admin"}, "not-the-secret-but-long-enough-xxxxxx")
        headers = [
            ("Authorization", f"Bearer {forged}"),
            ("Authorization", f"Bearer {token('alice')}"),
        ]
        await client.send(build_request("GET", route, headers))
        res = await client.read()
        assert res.status == 400, res.body
        body = json.loads(res.body)
        assert body["error"] == "bad_authorization"
        assert "more than one Authorization" in body["detail"]
        assert await client.closed()
    assert public.requests == []
    assert admin.requests == []


async def test_the_verified_credential_is_the_one_forwarded() -> None:
    public, admin = await _upstreams()
    async with run_gateway(jwt_config(public, admin)) as (_, port):
        client = await Client.connect(port)
        good = token("alice")
        res = await client.request("GET", "/admin/x", [("Authorization", f"Bearer {good}")])
        assert res.status == 200, res.body
    (request,) = admin.requests
    assert request.all("Authorization") == [f"Bearer {good}"]
    assert request.all("X-User-Id") == ["alice"]


async def test_two_api_keys_are_refused() -> None:
    public, admin = await _upstreams()
    async with run_gateway(protected_config(public, admin)) as (_, port):
        client = await Client.connect(port)
        headers = [("X-API-Key", KEY), ("X-API-Key", "k-someone-elses-key")]
        res = await client.request("GET", "/admin/x", headers)
        assert res.status == 400, res.body
        assert "more than one X-API-Key" in json.loads(res.body)["detail"]
    assert admin.requests == []


# ---------------------------------------------------------------------------- header names

UNDERSCORE_SPOOFS = [
    "X_User_Id",
    "x_user-id",
    "X-User_Id",
    "X_Forwarded_For",
    "X-Forwarded_Host",
    "X_Request_ID",
]


@pytest.mark.parametrize("name", UNDERSCORE_SPOOFS)
async def test_headers_that_collide_with_the_gateways_own_once_underscores_are_dashes_are_dropped(
    name: str,
) -> None:
    public, admin = await _upstreams()
    async with run_gateway(jwt_config(public, admin)) as (_, port):
        client = await Client.connect(port)
        headers = [(name, "admin"), ("Authorization", f"Bearer {token('alice')}")]
        res = await client.request("GET", "/admin/x", headers)
        assert res.status == 200, res.body
        res = await client.request("GET", "/page", [(name, "admin")])
        assert res.status == 200, res.body
    for request in (*admin.requests, *public.requests):
        names = [key.lower() for key, _ in request.headers]
        assert name.lower() not in names, request.headers
    assert admin.requests[0].all("X-User-Id") == ["alice"]


async def test_other_underscore_headers_are_forwarded() -> None:
    public, admin = await _upstreams()
    async with run_gateway(jwt_config(public, admin)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/page", [("X_Custom_Thing", "1"), ("my_header", "2")])
        assert res.status == 200, res.body
    (request,) = public.requests
    assert request.header("X_Custom_Thing") == "1"
    assert request.header("my_header") == "2"
