"""The auth filter over real sockets: JWT bearer tokens (pinned algorithms, claims,
the verified-token cache, JWKS), API keys, scopes and roles, and its config checks.

Every request goes through an in-process gateway to a RawUpstream that records what
reaches it: a refused request must leave the upstream untouched.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import datetime
import hashlib
import hmac
import importlib.metadata
import json
import logging
import re
import sys
import time
import tomllib
import types
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from jwt.algorithms import RSAAlgorithm

from meshgate.config import loads
from meshgate.errors import ConfigError
from meshgate.gateway.filters import auth as auth_module
from meshgate.gateway.filters.auth import hash_api_key
from meshgate.gateway.metrics import WorkerMetrics
from meshgate.gateway.runtime import Runtime
from tests.helpers import Client, Message, RawUpstream, gateway_yaml, response, run_gateway

# ------------------------------------------------------------------------------ keys

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
HMAC_SECRET = "a-shared-secret-of-at-least-32-bytes!!"

ISSUER = "https://issuer.test"
AUDIENCE = "meshgate-api"
API_KEY = "mg_live_4f2a9c1e7b"
OTHER_API_KEY = "mg_live_not_a_consumer"


def public_pem(private_key: Any) -> str:
    data: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data.decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    """Claims a token needs on the strict route, with ``overrides`` (None removes one)."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "user-42",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "tenant": "acme",
        "iat": now,
        "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


# ---------------------------------------------------------------------- the gateway


@dataclass
class Gateway:
    client: Client
    upstream: RawUpstream
    port: int

    async def get(self, target: str = "/", headers: list[tuple[str, str]] | None = None) -> Message:
        return await self.client.request("GET", target, headers)


def route_yaml(auth: dict[str, Any], **route: Any) -> str:
    # JSON is YAML: the PEMs' line breaks survive as \n escapes.
    settings = {"name": "api", "upstream": "up", "auth": auth, **route}
    return f"  - {json.dumps(settings)}\n"


@contextlib.asynccontextmanager
async def gateway(
    auth: dict[str, Any],
    *,
    consumers: dict[str, Any] | None = None,
    access_log: Path | None = None,
    **route: Any,
) -> AsyncIterator[Gateway]:
    up = await RawUpstream().start()
    config = gateway_yaml({"up": [up.address]}, route_yaml(auth, **route))
    if consumers is not None:
        config += f"consumers: {json.dumps(consumers)}\n"
    if access_log is not None:
        config = config.replace(
            "access_log: {enabled: false}", f"access_log: {{path: '{access_log}'}}"
        )
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        yield Gateway(client, up, port)
        await client.close()
    await up.close()


def rs256(**jwt_settings: Any) -> dict[str, Any]:
    """A strict RS256 route: issuer, audience, a required claim, sub forwarded."""
    settings = {
        "algorithms": ["RS256"],
        "keys": [{"pem": public_pem(RSA_KEY)}],
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "required_claims": ["tenant"],
        "forward_claims": {"sub": "X-User-Id"},
        **jwt_settings,
    }
    return {"jwt": settings}


CONSUMERS = {
    "app": {
        "api_keys": [hash_api_key(API_KEY)],
        "scopes": ["orders:read"],
        "roles": ["partner"],
    }
}


def assert_challenged(res: Message, error: str = "invalid_token") -> dict[str, Any]:
    """A 401 with a Bearer challenge and a JSON error body; returns the body."""
    assert res.status == 401, res.body
    challenge = res.header("WWW-Authenticate")
    assert challenge is not None
    assert challenge.startswith('Bearer realm="meshgate"')
    assert res.header("Content-Type") == "application/problem+json"
    body: dict[str, Any] = json.loads(res.body)
    assert body["error"] == error
    assert body["route"] == "api"
    return body


# -------------------------------------------------------------- valid tokens, per alg


def _eddsa_file_key(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "ed25519.pem"
    path.write_text(public_pem(ED_KEY))
    return {"file": str(path)}


@pytest.mark.parametrize(
    ("alg", "private", "key_config"),
    [
        ("RS256", RSA_KEY, lambda _: {"pem": public_pem(RSA_KEY)}),
        ("ES256", EC_KEY, lambda _: {"pem": public_pem(EC_KEY)}),
        ("EdDSA", ED_KEY, _eddsa_file_key),
        ("HS256", HMAC_SECRET, lambda _: {"secret": HMAC_SECRET}),
    ],
    ids=["rs256-pem", "es256-pem", "eddsa-file", "hs256-secret"],
)
async def test_valid_token_passes_and_forwards_sub(
    tmp_path: Path,
    alg: str,
    private: Any,
    key_config: Callable[[Path], dict[str, str]],
) -> None:
    auth = {
        "jwt": {
            "algorithms": [alg],
            "keys": [key_config(tmp_path)],
            "forward_claims": {"sub": "X-User-Id"},
        }
    }
    token = sign(private, alg, sub=f"user-{alg}")
    async with gateway(auth) as gw:
        res = await gw.get("/me", [bearer(token), ("X-User-Id", "admin")])
    assert res.status == 200, res.body
    assert len(gw.upstream.requests) == 1
    assert gw.upstream.requests[0].all("X-User-Id") == [f"user-{alg}"]


@pytest.mark.parametrize("strip", [True, False])
async def test_spoofed_identity_headers_removed_and_authorization_stripped_on_request(
    strip: bool,
) -> None:
    token = sign()
    async with gateway(rs256(strip_authorization=strip)) as gw:
        res = await gw.get(
            "/",
            [
                ("X-User-Id", "admin"),
                bearer(token),
                ("x-user-ID", "root"),  # any spelling of the name
                ("X-Other", "kept"),
            ],
        )
    assert res.status == 200, res.body
    seen = gw.upstream.requests[0]
    assert seen.all("X-User-Id") == ["user-42"]
    assert seen.header("X-Other") == "kept"
    assert seen.all("Authorization") == ([] if strip else [f"Bearer {token}"])


# ------------------------------------------------------------------- attack corpus


def _alg_none(alg: str) -> str:
    return f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(claims())}."


def _key_confusion() -> str:
    # HS256 keyed with the RS256 route's public key PEM: what a verifier that lets
    # the token pick its algorithm would accept. PyJWT refuses to sign this.
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT'})}.{b64json(claims())}"
    mac = hmac.new(public_pem(RSA_KEY).encode(), signing_input.encode(), hashlib.sha256)
    return f"{signing_input}.{b64url(mac.digest())}"


def _tampered() -> str:
    header, _, signature = sign().split(".")
    return f"{header}.{b64json(claims(sub='admin'))}.{signature}"


def _signature_stripped() -> str:
    header, payload, _ = sign().split(".")
    return f"{header}.{payload}."


ATTACKS: dict[str, Callable[[], str]] = {
    "alg-none": lambda: _alg_none("none"),
    "alg-None": lambda: _alg_none("None"),
    "hs256-with-public-key-as-secret": _key_confusion,
    "expired": lambda: sign(exp=int(time.time()) - 3600),
    "nbf-in-future": lambda: sign(nbf=int(time.time()) + 3600),
    "wrong-audience": lambda: sign(aud="another-api"),
    "wrong-issuer": lambda: sign(iss="https://evil.test"),
    "missing-required-claim": lambda: sign(tenant=None),
    "missing-exp": lambda: sign(exp=None),
    "tampered-payload": _tampered,
    "signature-stripped": _signature_stripped,
    "signed-by-another-rsa-key": lambda: sign(OTHER_RSA_KEY),
    "malformed": lambda: "abc",
    "es256-on-rs256-route": lambda: sign(EC_KEY, "ES256"),
}


@pytest.mark.parametrize("make_token", list(ATTACKS.values()), ids=list(ATTACKS))
async def test_bad_token_is_refused_before_the_upstream(make_token: Callable[[], str]) -> None:
    async with gateway(rs256()) as gw:
        res = await gw.get("/", [bearer(make_token())])
        assert_challenged(res)
        assert 'error="invalid_token"' in (res.header("WWW-Authenticate") or "")
        assert gw.upstream.requests == []
        # The route itself is sound: a good token on the same connection passes.
        good = await gw.get("/", [bearer(sign())])
    assert good.status == 200, good.body
    assert len(gw.upstream.requests) == 1


@pytest.mark.parametrize(("seconds_ago", "status"), [(10, 200), (60, 401)])
async def test_leeway_allows_clock_skew_on_exp(seconds_ago: int, status: int) -> None:
    token = sign(exp=int(time.time()) - seconds_ago)
    async with gateway(rs256(leeway="30s")) as gw:
        first = await gw.get("/", [bearer(token)])
        again = await gw.get("/", [bearer(token)])  # the second from the cache
    assert (first.status, again.status) == (status, status)
    assert len(gw.upstream.requests) == (2 if status == 200 else 0)


RS_ES = ["RS256", "ES256"]


@pytest.mark.parametrize(
    ("algorithms", "keys", "make_token", "status"),
    [
        (RS_ES, [RSA_KEY, EC_KEY], lambda: sign(RSA_KEY, "RS256"), 200),
        # The RSA key comes first and does not fit an ES256 token: the EC key must
        # still be tried.
        (RS_ES, [RSA_KEY, EC_KEY], lambda: sign(EC_KEY, "ES256"), 200),
        (RS_ES, [EC_KEY, RSA_KEY], lambda: sign(RSA_KEY, "RS256"), 200),
        (["RS256", "EdDSA"], [RSA_KEY, ED_KEY], lambda: sign(ED_KEY, "EdDSA"), 200),
        # No configured key verifies: a 401, not a 500.
        (RS_ES, [RSA_KEY, EC_KEY], lambda: sign(OTHER_RSA_KEY, "RS256"), 401),
        (RS_ES, [EC_KEY], lambda: sign(RSA_KEY, "RS256"), 401),
    ],
    ids=[
        "rs256",
        "es256-after-rsa-key",
        "rs256-after-ec-key",
        "eddsa-after-rsa-key",
        "foreign-rs256",
        "no-rsa-key",
    ],
)
async def test_route_with_two_public_key_algorithms_tries_each_key(
    algorithms: list[str], keys: list[Any], make_token: Callable[[], str], status: int
) -> None:
    auth = {
        "jwt": {
            "algorithms": algorithms,
            "keys": [{"pem": public_pem(key)} for key in keys],
        }
    }
    async with gateway(auth) as gw:
        res = await gw.get("/", [bearer(make_token())])
    assert res.status == status, res.body
    if status == 401:
        assert_challenged(res)
    assert len(gw.upstream.requests) == (1 if status == 200 else 0)


# --------------------------------------------------------------- verified-token cache


async def test_repeated_token_is_verified_once(monkeypatch: pytest.MonkeyPatch) -> None:
    decodes = 0
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        nonlocal decodes
        decodes += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    token = sign()
    async with gateway(rs256()) as gw:
        first = await gw.get("/", [bearer(token), ("X-User-Id", "admin")])
        second = await gw.get("/", [bearer(token), ("X-User-Id", "root")])
    assert (first.status, second.status) == (200, 200)
    assert decodes == 1
    # The cached identity still forwards the claim and strips the spoofed header.
    assert [r.all("X-User-Id") for r in gw.upstream.requests] == [["user-42"], ["user-42"]]


@pytest.mark.parametrize(
    ("past_exp", "status"),
    [
        (120.0, 401),  # expired while cached
        (10.0, 200),  # past exp, but within the leeway
    ],
)
async def test_cached_token_is_checked_against_the_clock_on_each_use(
    monkeypatch: pytest.MonkeyPatch, past_exp: float, status: int
) -> None:
    now = time.time()
    token = sign(exp=int(now) + 60)
    async with gateway(rs256(leeway="30s")) as gw:
        assert (await gw.get("/", [bearer(token)])).status == 200
        # Only the filter's clock moves: PyJWT would still accept the token, so a
        # refusal can only come from the cache's own check.
        fake = types.SimpleNamespace(time=lambda: now + 60 + past_exp, monotonic=time.monotonic)
        monkeypatch.setattr(auth_module, "time", fake)
        res = await gw.get("/", [bearer(token)])
    assert res.status == status, res.body
    if status == 401:
        body = assert_challenged(res)
        assert "expired" in body["detail"]
        assert len(gw.upstream.requests) == 1


# -------------------------------------------------------------- missing credentials


async def test_missing_credentials_get_a_bearer_challenge() -> None:
    async with gateway(rs256()) as gw:
        none = await gw.get("/", [("X-User-Id", "admin")])
        basic = await gw.get("/", [("Authorization", "Basic dXNlcjpwYXNz")])
    for res in (none, basic):
        assert res.status == 401
        assert res.header("WWW-Authenticate") == 'Bearer realm="meshgate"'
        body = json.loads(res.body)
        assert body["error"] == "unauthorized"
        assert "Bearer" in body["detail"]
    assert gw.upstream.requests == []


async def test_anonymous_route_lets_callers_without_credentials_through() -> None:
    async with gateway({**rs256(), "anonymous": True}) as gw:
        anon = await gw.get("/", [("X-User-Id", "admin")])
        known = await gw.get("/", [bearer(sign()), ("X-User-Id", "admin")])
        bad = await gw.get("/", [bearer(sign(OTHER_RSA_KEY))])
    assert (anon.status, known.status) == (200, 200)
    anon_seen, known_seen = gw.upstream.requests
    assert anon_seen.all("X-User-Id") == []
    assert known_seen.all("X-User-Id") == ["user-42"]
    # Bad credentials are still refused.
    assert_challenged(bad)
    assert len(gw.upstream.requests) == 2


# ----------------------------------------------------------------- scopes and roles


@pytest.mark.parametrize(
    ("route", "token_claims", "status"),
    [
        ({"scopes": ["users:read"]}, {"scope": "users:read users:write"}, 200),
        ({"scopes": ["users:read"]}, {"scp": ["users:read"]}, 200),
        ({"scopes": ["users:read"]}, {"scope": "users:write"}, 403),
        ({"scopes": ["users:read"]}, {}, 403),
        ({"scopes": ["users:read", "users:write"]}, {"scope": "users:read"}, 403),
        ({"roles": ["admin", "ops"]}, {"roles": ["admin"]}, 200),
        ({"roles": ["admin", "ops"]}, {"roles": ["guest"]}, 403),
        ({"roles": ["admin", "ops"]}, {}, 403),
    ],
    ids=[
        "scope-string",
        "scp-list",
        "scope-missing",
        "no-scope-claim",
        "one-of-two-scopes",
        "role-matches",
        "role-missing",
        "no-roles-claim",
    ],
)
async def test_scopes_and_roles_are_enforced_with_403(
    route: dict[str, Any], token_claims: dict[str, Any], status: int
) -> None:
    async with gateway({**rs256(), **route}) as gw:
        res = await gw.get("/", [bearer(sign(**token_claims))])
    assert res.status == status, res.body
    if status == 403:
        body = json.loads(res.body)
        assert body["error"] == "forbidden"
        # The detail names what is missing.
        wanted = set(route.get("scopes", ())) - set(token_claims.get("scope", "").split())
        for name in wanted or route.get("roles", ()):
            assert name in body["detail"]
        assert gw.upstream.requests == []
    else:
        assert len(gw.upstream.requests) == 1


# --------------------------------------------------------------------------- API keys


async def test_api_key_in_header_names_the_consumer() -> None:
    async with gateway({"api_key": {}}, consumers=CONSUMERS) as gw:
        res = await gw.get("/", [("X-API-Key", API_KEY), ("X-Consumer", "admin")])
    assert res.status == 200, res.body
    seen = gw.upstream.requests[0]
    assert seen.all("X-Consumer") == ["app"]


@pytest.mark.parametrize(
    ("auth", "headers"),
    [
        ({"api_key": {}}, lambda: [("X-API-Key", API_KEY)]),
        ({"api_key": {}}, lambda: [("x-api-KEY", API_KEY)]),
        ({"api_key": {"header": "X-Partner-Key"}}, lambda: [("X-Partner-Key", API_KEY)]),
        # Judged by the token, but the key it also carries is not forwarded either.
        # The token is signed when the test runs: at collection it could expire first.
        ({**rs256(), "api_key": {}}, lambda: [bearer(sign()), ("X-API-Key", API_KEY)]),
        ({"api_key": {}, "anonymous": True}, lambda: [("X-API-Key", API_KEY)]),
    ],
    ids=["default-header", "any-spelling", "custom-header", "with-a-token", "anonymous-route"],
)
async def test_api_key_in_header_is_not_forwarded(
    auth: dict[str, Any], headers: Callable[[], list[tuple[str, str]]]
) -> None:
    async with gateway(auth, consumers=CONSUMERS) as gw:
        res = await gw.get("/items", [*headers(), ("X-Other", "kept")])
    assert res.status == 200, res.body
    seen = gw.upstream.requests[0]
    assert all(API_KEY not in value for _, value in seen.headers), seen.headers
    assert seen.header("X-Other") == "kept"


async def test_unknown_api_key_is_refused() -> None:
    async with gateway({"api_key": {}}, consumers=CONSUMERS) as gw:
        wrong = await gw.get("/", [("X-API-Key", OTHER_API_KEY)])
        # The stored hash is not a key.
        stored = await gw.get("/", [("X-API-Key", hash_api_key(API_KEY))])
        missing = await gw.get("/")
    assert_challenged(wrong, "invalid_api_key")
    assert_challenged(stored, "invalid_api_key")
    assert missing.status == 401
    assert "X-API-Key" in json.loads(missing.body)["detail"]
    assert gw.upstream.requests == []


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (f"/items?page=2&api_key={API_KEY}&sort=asc", "/items?page=2&sort=asc"),
        (f"/items?api_key={API_KEY}", "/items"),
        (f"/items?page=2&api_key={API_KEY}", "/items?page=2"),
        (f"/items?api_key={API_KEY}&api_key={API_KEY}&x=1", "/items?x=1"),
    ],
    ids=["among-others", "alone", "last", "repeated"],
)
async def test_api_key_in_query_is_not_forwarded(target: str, forwarded: str) -> None:
    auth = {"api_key": {"header": None, "query": "api_key"}}
    async with gateway(auth, consumers=CONSUMERS) as gw:
        res = await gw.get(target)
    assert res.status == 200, res.body
    seen = gw.upstream.requests[0]
    assert seen.target == forwarded
    assert API_KEY not in seen.target
    assert seen.all("X-Consumer") == ["app"]


async def test_api_key_in_query_is_removed_after_a_prefix_is_stripped() -> None:
    auth = {"api_key": {"header": None, "query": "api_key"}}
    async with gateway(
        auth, consumers=CONSUMERS, match={"path_prefix": "/api"}, strip_prefix=True
    ) as gw:
        res = await gw.get(f"/api/items?api_key={API_KEY}&x=1")
        bad = await gw.get(f"/api/items?api_key={OTHER_API_KEY}")
    assert res.status == 200, res.body
    assert [r.target for r in gw.upstream.requests] == ["/items?x=1"]
    assert_challenged(bad, "invalid_api_key")


async def test_api_key_query_parameter_is_removed_when_the_header_also_carries_one() -> None:
    auth = {"api_key": {"header": "X-API-Key", "query": "api_key"}}
    async with gateway(auth, consumers=CONSUMERS) as gw:
        res = await gw.get(f"/items?api_key={API_KEY}&x=1", [("X-API-Key", API_KEY)])
    assert res.status == 200, res.body
    assert gw.upstream.requests[0].target == "/items?x=1"


@pytest.mark.parametrize(
    ("route", "status"),
    [
        ({"scopes": ["orders:read"]}, 200),
        ({"scopes": ["orders:write"]}, 403),
        ({"roles": ["partner", "admin"]}, 200),
        ({"roles": ["admin"]}, 403),
    ],
)
async def test_consumer_scopes_and_roles_are_enforced(route: dict[str, Any], status: int) -> None:
    async with gateway({"api_key": {}, **route}, consumers=CONSUMERS) as gw:
        res = await gw.get("/", [("X-API-Key", API_KEY)])
    assert res.status == status, res.body
    assert len(gw.upstream.requests) == (1 if status == 200 else 0)
    if status == 403:
        assert json.loads(res.body)["error"] == "forbidden"


async def test_route_with_jwt_and_api_key_accepts_either() -> None:
    auth = {**rs256(), "api_key": {}}
    async with gateway(auth, consumers=CONSUMERS) as gw:
        by_token = await gw.get("/", [bearer(sign()), ("X-Consumer", "app")])
        by_key = await gw.get("/", [("X-API-Key", API_KEY), ("X-User-Id", "admin")])
    assert (by_token.status, by_key.status) == (200, 200)
    token_seen, key_seen = gw.upstream.requests
    assert token_seen.all("X-User-Id") == ["user-42"]
    assert token_seen.all("X-Consumer") == []
    assert key_seen.all("X-Consumer") == ["app"]
    assert key_seen.all("X-User-Id") == []


# ------------------------------------------------------------------------------ JWKS


class Jwks:
    """A JWKS endpoint on a RawUpstream (closed by the conftest fixture): serves
    ``keys`` and counts the fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.server = RawUpstream(self._handle)

    async def _handle(
        self, request: Message, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        body = json.dumps({"keys": self.keys}).encode()
        writer.write(response(200, body, [("Content-Type", "application/json")]))

    def publish(self, *entries: tuple[str, Any]) -> None:
        self.keys = [
            {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}
            for kid, key in entries
        ]

    @property
    def fetches(self) -> int:
        return len(self.server.requests)

    async def start(self) -> str:
        await self.server.start()
        return f"http://127.0.0.1:{self.server.port}/jwks"


def jwks_auth(url: str, min_refresh: str) -> dict[str, Any]:
    return {
        "jwt": {
            "algorithms": ["RS256"],
            "jwks_url": url,
            "jwks_min_refresh": min_refresh,
            "forward_claims": {"sub": "X-User-Id"},
        }
    }


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The JWKS fetch honours proxy variables; the test endpoint is on loopback.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


async def test_jwks_key_by_kid_and_unknown_kid() -> None:
    jwks = Jwks()
    jwks.publish(("k1", RSA_KEY))
    url = await jwks.start()
    async with gateway(jwks_auth(url, "60s")) as gw:
        ok = await gw.get("/", [bearer(sign(kid="k1"))])
        unknown = await gw.get("/", [bearer(sign(OTHER_RSA_KEY, kid="k9"))])
        # A known kid with a signature by another key.
        forged = await gw.get("/", [bearer(sign(OTHER_RSA_KEY, kid="k1"))])
    assert ok.status == 200, ok.body
    assert gw.upstream.requests[0].all("X-User-Id") == ["user-42"]
    assert_challenged(unknown)
    assert_challenged(forged)
    assert len(gw.upstream.requests) == 1
    assert jwks.fetches == 1


async def test_unknown_kids_cannot_flood_the_jwks_endpoint() -> None:
    jwks = Jwks()
    jwks.publish(("k1", RSA_KEY))
    url = await jwks.start()
    async with gateway(jwks_auth(url, "60s")) as gw:
        clients = [await Client.connect(gw.port) for _ in range(20)]
        # All at once, before any key was fetched: one fetch serves them all.
        burst = await asyncio.gather(
            *(
                c.request("GET", "/", [bearer(sign(OTHER_RSA_KEY, kid=f"unknown-{i}"))])
                for i, c in enumerate(clients)
            )
        )
        # Then one after another, within jwks_min_refresh: no fetch at all.
        later = [
            await c.request("GET", "/", [bearer(sign(OTHER_RSA_KEY, kid=f"later-{i}"))])
            for i, c in enumerate(clients)
        ]
        ok = await gw.get("/", [bearer(sign(kid="k1"))])
        for c in clients:
            await c.close()
    for res in burst + later:
        assert_challenged(res)
    assert ok.status == 200, ok.body
    assert jwks.fetches == 1
    assert len(gw.upstream.requests) == 1


async def test_jwks_key_rotation_is_picked_up_on_an_unknown_kid() -> None:
    jwks = Jwks()
    jwks.publish(("k1", RSA_KEY))
    url = await jwks.start()
    async with gateway(jwks_auth(url, "0s")) as gw:
        before = await gw.get("/", [bearer(sign(kid="k1", sub="old"))])
        jwks.publish(("k2", OTHER_RSA_KEY))
        after = await gw.get("/", [bearer(sign(OTHER_RSA_KEY, kid="k2", sub="new"))])
        # k1 was withdrawn: a token it signed (not seen before) is refused now.
        retired = await gw.get("/", [bearer(sign(kid="k1", sub="late"))])
    assert before.status == 200, before.body
    assert after.status == 200, after.body
    assert_challenged(retired)
    assert [r.all("X-User-Id") for r in gw.upstream.requests] == [["old"], ["new"]]
    assert jwks.fetches >= 2


@pytest.mark.parametrize(
    ("min_refresh", "status", "fetches"),
    [("0s", 200, 2), ("60s", 401, 1)],
    ids=["refetched", "rate-limited"],
)
async def test_unknown_kid_refetches_the_jwks_beside_a_configured_key_without_kid(
    min_refresh: str, status: int, fetches: int
) -> None:
    jwks = Jwks()  # publishes no key yet
    url = await jwks.start()
    auth = jwks_auth(url, min_refresh)
    auth["jwt"]["keys"] = [{"pem": public_pem(RSA_KEY)}]  # no kid: tried for any kid
    async with gateway(auth) as gw:
        # The first token needs the JWKS (never fetched yet); the configured key signs it.
        first = await gw.get("/", [bearer(sign(kid="any", sub="configured"))])
        jwks.publish(("k2", OTHER_RSA_KEY))  # the issuer rotates a key in
        rotated = await gw.get("/", [bearer(sign(OTHER_RSA_KEY, kid="k2", sub="rotated"))])
        # A kid the configured key verifies needs no fetch.
        again = await gw.get("/", [bearer(sign(kid="other", sub="configured-2"))])
    assert first.status == 200, first.body
    assert rotated.status == status, rotated.body
    assert again.status == 200, again.body
    assert jwks.fetches == fetches
    subs = [r.header("X-User-Id") for r in gw.upstream.requests]
    rotated_subs = ["rotated"] if status == 200 else []
    assert subs == ["configured", *rotated_subs, "configured-2"]


# ---------------------------------------------------------------------- no secrets logged


async def test_tokens_and_keys_never_appear_in_logs(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshgate")
    access_log = tmp_path / "access.log"
    secrets = {
        "valid": sign(),
        "expired": sign(exp=int(time.time()) - 3600),
        "foreign": sign(OTHER_RSA_KEY),
        "tampered": _tampered(),
        "confused": _key_confusion(),
        "none": _alg_none("none"),
    }
    auth = {**rs256(), "api_key": {"query": "api_key"}}
    async with gateway(auth, consumers=CONSUMERS, access_log=access_log) as gw:
        for token in secrets.values():
            await gw.get("/", [bearer(token)])
            await gw.get(f"/?access_token={token}", [bearer(token)])
        await gw.get(f"/q?api_key={API_KEY}")
        await gw.get(f"/q?api_key={OTHER_API_KEY}")
        await gw.get("/h", [("X-API-Key", API_KEY)])
        await asyncio.sleep(0.3)  # one access log flush tick
    logged = caplog.text + access_log.read_text()
    assert access_log.read_text().count("\n") == 2 * len(secrets) + 3
    for name, token in secrets.items():
        for part in token.split("."):
            if len(part) > 8:
                assert part not in logged, name
    assert API_KEY not in logged
    assert OTHER_API_KEY not in logged


# ---------------------------------------------------------------------- config errors


def _config(auth: dict[str, Any], consumers: dict[str, Any] | None = None) -> str:
    text = gateway_yaml({"up": ["127.0.0.1:9"]}, route_yaml(auth))
    if consumers is not None:
        text += f"consumers: {json.dumps(consumers)}\n"
    return text


@pytest.mark.parametrize(
    ("auth", "consumers", "message"),
    [
        (
            {"jwt": {"algorithms": ["HS256", "RS256"], "keys": [{"secret": HMAC_SECRET}]}},
            None,
            "HS256 cannot be accepted together with public-key algorithms",
        ),
        (
            {"jwt": {"algorithms": ["HS256"], "keys": [{"pem": public_pem(RSA_KEY)}]}},
            None,
            "HS256 needs secret keys",
        ),
        (
            {"jwt": {"algorithms": ["RS256"], "keys": [{"secret": HMAC_SECRET}]}},
            None,
            "RS256, ES256 and EdDSA need pem or file keys",
        ),
        (
            {"jwt": {"algorithms": ["RS256"], "jwks_url": "ftp://issuer.test/jwks"}},
            None,
            "must be an http(s) URL",
        ),
        (
            {"jwt": {"algorithms": ["none"], "keys": [{"pem": public_pem(RSA_KEY)}]}},
            None,
            "routes[0].auth.jwt.algorithms",
        ),
        ({"jwt": {"algorithms": ["RS256"]}}, None, "give keys, a jwks_url, or both"),
        ({"anonymous": True}, None, "give jwt, api_key, or both"),
        ({"api_key": {}}, None, "none is configured: add consumers"),
        ({"api_key": {}}, {"app": {"api_keys": [API_KEY]}}, "sha256:<64 hex digits>"),
        (
            {"api_key": {}},
            {"app": {"api_keys": ["md5:" + hashlib.md5(b"k").hexdigest()]}},  # noqa: S324
            "sha256:<64 hex digits>",
        ),
        ({"api_key": {"header": None}}, CONSUMERS, "give a header, a query parameter"),
    ],
    ids=[
        "hs256-with-rs256",
        "hs256-with-pem",
        "rs256-with-secret",
        "jwks-url-not-http",
        "alg-none",
        "no-keys",
        "no-method",
        "api-key-without-consumers",
        "consumer-key-in-clear",
        "consumer-key-md5",
        "api-key-nowhere",
    ],
)
def test_unsafe_or_incomplete_auth_config_is_refused_at_load(
    auth: dict[str, Any], consumers: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        loads(_config(auth, consumers), "test.yaml")
    assert message in str(caught.value)


# ------------------------------------------------------------------ bad keys, at build


def _write(tmp_path: Path, name: str, data: bytes) -> dict[str, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return {"file": str(path)}


def _private_pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


def _der(key: Any) -> bytes:
    data: bytes = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


BAD_KEYS: dict[str, tuple[str, Callable[[Path], dict[str, str]], str, str]] = {
    # id: (the route's algorithm, the bad key, its field, what the message says)
    "missing-file": ("RS256", lambda p: {"file": str(p / "gone.pem")}, "file", "no such file"),
    "directory": ("RS256", lambda p: {"file": str(p)}, "file", "cannot read"),
    "file-not-pem": (
        "RS256",
        lambda p: _write(p, "key.pem", b"hello\n"),
        "file",
        "is not a PEM public key or certificate",
    ),
    "der-file": ("RS256", lambda p: _write(p, "key.der", _der(RSA_KEY)), "file", "not PEM text"),
    "private-key-file": (
        "RS256",
        lambda p: _write(p, "key.pem", _private_pem(RSA_KEY)),
        "file",
        "holds a private key; give only its public key",
    ),
    "truncated-pem": (
        "RS256",
        lambda _: {"pem": public_pem(RSA_KEY)[:120]},
        "pem",
        "is not a PEM public key or certificate",
    ),
    "private-key-pem": (
        "RS256",
        lambda _: {"pem": _private_pem(RSA_KEY).decode()},
        "pem",
        "holds a private key",
    ),
    "ec-key-on-rs256-route": (
        "RS256",
        lambda _: {"pem": public_pem(EC_KEY)},
        "pem",
        "holds a key for ES256, but the route accepts only RS256; add ES256",
    ),
    "p384-key-on-es256-route": (
        "ES256",
        lambda _: {"pem": public_pem(ec.generate_private_key(ec.SECP384R1()))},
        "pem",
        "ES256 verifies only P-256",
    ),
    "x25519-key": (
        "EdDSA",
        lambda _: {"pem": public_pem(x25519.X25519PrivateKey.generate())},
        "pem",
        "which no JWT algorithm here uses",
    ),
}
GOOD_KEYS = {"RS256": RSA_KEY, "ES256": EC_KEY, "EdDSA": ED_KEY}


def _two_routes(auth: dict[str, Any]) -> str:
    """The auth route second, so that its path says which route it is."""
    other = {"name": "other", "upstream": "up", "match": {"path_prefix": "/other"}}
    routes = f"  - {json.dumps(other)}\n" + route_yaml(auth, match={"path_prefix": "/api"})
    return gateway_yaml({"up": ["127.0.0.1:9"]}, routes)


@pytest.mark.parametrize(
    ("alg", "bad_key", "field", "message"), list(BAD_KEYS.values()), ids=list(BAD_KEYS)
)
def test_bad_key_is_a_config_error_naming_its_field_when_the_route_is_built(
    tmp_path: Path,
    alg: str,
    bad_key: Callable[[Path], dict[str, str]],
    field: str,
    message: str,
) -> None:
    key = bad_key(tmp_path)
    auth = {"jwt": {"algorithms": [alg], "keys": [{"pem": public_pem(GOOD_KEYS[alg])}, key]}}
    config = loads(_two_routes(auth), "test.yaml")  # what `meshgate check` sees: valid

    with pytest.raises(ConfigError) as caught:
        Runtime(config, WorkerMetrics())  # what the gateway builds at startup and reload

    [issue] = caught.value.issues
    assert issue.path == f"routes[1].auth.jwt.keys[1].{field}"
    assert message in issue.message
    # A key pasted by mistake is never repeated in the error.
    assert "MII" not in str(caught.value)


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    keys = [{"file": str(tmp_path / "gone.pem")}, {"pem": public_pem(RSA_KEY)}, {"pem": "x"}]
    config = loads(_two_routes({"jwt": {"algorithms": ["RS256"], "keys": keys}}))

    with pytest.raises(ConfigError) as caught:
        Runtime(config, WorkerMetrics())

    assert [i.path for i in caught.value.issues] == [
        "routes[1].auth.jwt.keys[0].file",
        "routes[1].auth.jwt.keys[2].pem",
    ]


def test_key_in_a_certificate_is_accepted(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(RSA_KEY.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(RSA_KEY, hashes.SHA256())
    )
    key = _write(tmp_path, "cert.pem", cert.public_bytes(serialization.Encoding.PEM))
    config = loads(_two_routes({"jwt": {"algorithms": ["RS256"], "keys": [key]}}))
    Runtime(config, WorkerMetrics()).close()


# ---------------------------------------------------------------------------- packaging


def _distribution(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_what_the_filter_imports_is_a_runtime_dependency() -> None:
    # Lazy imports (httpx, for JWKS) count: a route may need them at any time.
    folder = Path(auth_module.__file__).parent
    sources = [folder / name for name in ("auth.py", "_jwt.py", "_jwks.py", "_credentials.py")]
    tree = ast.Module(
        body=[node for p in sources for node in ast.parse(p.read_text("utf-8")).body],
        type_ignores=[],
    )
    modules = {
        alias.name.partition(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.partition(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and not node.level
    }
    third_party = modules - set(sys.stdlib_module_names) - {"meshgate"}
    installed = importlib.metadata.packages_distributions()
    needed = {_distribution(d) for module in third_party for d in installed.get(module, [module])}
    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    declared = {
        _distribution(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])
        for requirement in pyproject["project"]["dependencies"]
    }
    assert {"pyjwt", "cryptography", "httpx"} <= needed
    assert needed <= declared, f"missing from [project] dependencies: {needed - declared}"
