"""Loading and validating configuration: typed values out, or every problem with
its field path, line and fix."""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from meshgate.config import Address, load, loads
from meshgate.config.model import parse_duration, parse_size
from meshgate.errors import ConfigError, ConfigIssue

CANONICAL = """\
gateway:
  listen: 127.0.0.1:8080
  workers: 1
  admin: {listen: 127.0.0.1:9901}
upstreams:
  users: {endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]}
routes:
  - name: users
    match: {path_prefix: /api/users}
    upstream: users
    strip_prefix: true
"""


def _edit(old: str, new: str, doc: str = CANONICAL) -> str:
    """``doc`` with one exact piece replaced (fails loudly if the piece is gone)."""
    assert doc.count(old) == 1, f"{old!r} is not exactly once in the document"
    return doc.replace(old, new)


def _issues(text: str) -> tuple[ConfigIssue, ...]:
    with pytest.raises(ConfigError) as info:
        loads(text)
    return info.value.issues


# ---------------------------------------------------------------------------- valid


def test_canonical_document_gives_typed_values() -> None:
    config = loads(CANONICAL)

    gw = config.gateway
    assert gw.listen == Address(host="127.0.0.1", port=8080)
    assert (gw.listen.host, gw.listen.port) == ("127.0.0.1", 8080)
    assert gw.workers == 1
    assert gw.worker_count == 1
    assert gw.admin.listen == Address(host="127.0.0.1", port=9901)
    assert gw.admin.token is None
    assert gw.admin.allow_insecure_remote is False

    assert list(config.upstreams) == ["users"]
    users = config.upstreams["users"]
    assert [str(e.address) for e in users.endpoints] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert [e.weight for e in users.endpoints] == [1, 1]
    assert users.balancer == "least_request"
    assert users.timeouts.connect == 5.0
    assert users.timeouts.total is None

    (route,) = config.routes
    assert route.name == "users"
    assert route.upstream == "users"
    assert route.strip_prefix is True
    assert route.rewrite is None
    assert route.priority == 0
    assert route.match.path_prefix == "/api/users"
    assert route.match.path_kind == "prefix"
    assert route.match.prefix == "/api/users"
    assert route.match.host == ()
    assert route.match.methods == ()
    assert route.match.headers == {}


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "{}\n"], ids=repr)
def test_empty_document_is_valid_with_defaults(text: str) -> None:
    config = loads(text)

    assert config.gateway.listen == Address(host="127.0.0.1", port=8080)
    assert config.gateway.admin.listen == Address(host="127.0.0.1", port=9901)
    assert config.gateway.workers == 0
    assert config.gateway.keepalive_timeout == 75.0
    assert config.gateway.limits.max_header_bytes == 32 * 1024
    assert config.gateway.limits.max_body_bytes is None
    assert config.gateway.request_id_header == "X-Request-ID"
    assert config.gateway.via == "meshgate"
    assert config.upstreams == {}
    assert config.routes == ()


def test_text_values_are_parsed_once_into_typed_values() -> None:
    config = loads(
        """\
gateway:
  listen: ":8000"
  workers: auto
  keepalive_timeout: 250ms
  header_timeout: 2m
  limits: {max_header_bytes: 16KiB, max_body_bytes: 10MB}
  trusted_proxies: 10.0.0.0/8
  admin: {listen: "[::1]:9901", token: "0123456789abcdef"}
upstreams:
  api:
    balancer: weighted_round_robin
    endpoints: ["10.0.0.1:80", {address: "10.0.0.2:80", weight: 3}]
    timeouts: {connect: 1.5, read: 1h, total: 90s}
routes:
  - name: api
    upstream: api
    match:
      host: [API.Example.COM., "*.example.com"]
      methods: [get, POST, GET]
      path_regex: /v(?P<version>\\d+)/.*
      headers: {X-Version: "2", X-Canary: {regex: "yes|true"}, X-Debug: {present: false}}
    rewrite: /api/{version}
"""
    )
    gw = config.gateway
    assert gw.listen == Address(host="0.0.0.0", port=8000)
    assert gw.workers == 0
    assert gw.worker_count >= 1
    assert gw.keepalive_timeout == 0.25
    assert gw.header_timeout == 120.0
    assert gw.limits.max_header_bytes == 16 * 1024
    assert gw.limits.max_body_bytes == 10_000_000
    assert gw.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    assert gw.admin.listen == Address(host="::1", port=9901)
    assert str(gw.admin.listen) == "[::1]:9901"
    assert gw.admin.token is not None
    assert gw.admin.token.get_secret_value() == "0123456789abcdef"

    api = config.upstreams["api"]
    assert [(str(e.address), e.weight) for e in api.endpoints] == [
        ("10.0.0.1:80", 1),
        ("10.0.0.2:80", 3),
    ]
    assert (api.timeouts.connect, api.timeouts.read, api.timeouts.total) == (1.5, 3600.0, 90.0)

    match = config.routes[0].match
    assert match.host == ("api.example.com", "*.example.com")
    assert match.methods == ("GET", "POST")
    assert match.path_kind == "regex"
    assert match.headers["X-Version"].exact == "2"
    assert match.headers["X-Canary"].regex == "yes|true"
    assert match.headers["X-Debug"].present is False


def test_admin_may_listen_remotely_when_allowed() -> None:
    config = loads("gateway:\n  admin: {listen: 0.0.0.0:9901, allow_insecure_remote: true}\n")
    assert config.gateway.admin.listen == Address(host="0.0.0.0", port=9901)


def test_longer_prefix_declared_after_shorter_one_is_reachable() -> None:
    # Precedence sorts longer prefixes first, so declaration order does not hide them.
    config = loads(
        CANONICAL + "  - {name: api, match: {path_prefix: /api}, upstream: users}\n"
        "  - {name: deeper, match: {path_prefix: /api/users/admin}, upstream: users}\n"
    )
    assert [r.name for r in config.routes] == ["users", "api", "deeper"]


@pytest.mark.parametrize(
    ("text", "host", "port", "rendered", "loopback"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, "127.0.0.1:8080", True),
        ("localhost:80", "localhost", 80, "localhost:80", True),
        ("[::1]:443", "::1", 443, "[::1]:443", True),
        (":8000", "0.0.0.0", 8000, "0.0.0.0:8000", False),
        ("10.1.2.3:0", "10.1.2.3", 0, "10.1.2.3:0", False),
        ("api.example.com:65535", "api.example.com", 65535, "api.example.com:65535", False),
        (" 127.0.0.2:1 ", "127.0.0.2", 1, "127.0.0.2:1", True),
    ],
)
def test_address_from_text(text: str, host: str, port: int, rendered: str, loopback: bool) -> None:
    address = Address.model_validate(text)
    assert (address.host, address.port) == (host, port)
    assert str(address) == rendered
    assert address.is_loopback is loopback


@pytest.mark.parametrize(
    "auth",
    [
        "{api_key: {}, anonymous: true}",
        "{api_key: {}, scopes: [orders:read], roles: [admin]}",
        "{api_key: {}, anonymous: false, scopes: [orders:read]}",
    ],
)
def test_auth_and_consumers_that_fit_together_are_valid(auth: str) -> None:
    key_a, key_b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    config = loads(
        "upstreams:\n  u: {endpoints: ['127.0.0.1:1']}\n"
        f"routes:\n  - {{name: r, upstream: u, auth: {auth}}}\n"
        f"consumers:\n  a: {{api_keys: ['{key_a}']}}\n  b: {{api_keys: ['{key_b}']}}\n"
    )
    assert sorted(config.consumers) == ["a", "b"]


# ---------------------------------------------------------------------------- invalid

UPSTREAM_U = "upstreams:\n  u: {endpoints: ['127.0.0.1:1']}\nroutes:\n"

BAD_DOCUMENTS = [
    # unknown keys, at every level, with a suggestion when one is close
    pytest.param(
        _edit("gateway:\n", "gatway:\n"),
        "gatway",
        "unknown key 'gatway' (did you mean 'gateway'?); "
        "allowed keys: consumers, gateway, routes, upstreams",
        1,
        id="unknown-top-level-key",
    ),
    pytest.param(
        _edit("workers: 1", "workerz: 1"),
        "gateway.workerz",
        "(did you mean 'workers'?); allowed keys: access_log, admin,",
        3,
        id="unknown-gateway-key",
    ),
    pytest.param(
        _edit("workers: 1", "workers: 1\n  colour: red"),
        "gateway.colour",
        "unknown key 'colour'; allowed keys: access_log,",
        4,
        id="unknown-key-without-suggestion",
    ),
    pytest.param(
        _edit("{listen: 127.0.0.1:9901}", "{listen: 127.0.0.1:9901, tokn: x}"),
        "gateway.admin.tokn",
        "did you mean 'token'",
        4,
        id="unknown-admin-key",
    ),
    pytest.param(
        _edit('9002"]}', '9002"], balancr: round_robin}'),
        "upstreams.users.balancr",
        "(did you mean 'balancer'?); allowed keys: balancer, circuit_breaker, endpoints,",
        6,
        id="unknown-upstream-key",
    ),
    pytest.param(
        _edit("upstream: users\n", "upstraem: users\n"),
        "routes[0].upstraem",
        "(did you mean 'upstream'?); "
        "allowed keys: auth, cors, headers, host_rewrite, ip, match, mtls,",
        10,
        id="unknown-route-key",
    ),
    pytest.param(
        _edit("{path_prefix: /api/users}", "{path_prefx: /api/users}"),
        "routes[0].match.path_prefx",
        "did you mean 'path_prefix'",
        9,
        id="unknown-match-key",
    ),
    # missing and bad values
    pytest.param(
        _edit("upstream: users\n", "upstraem: users\n"),
        "routes[0].upstream",
        "this field is required; add it",
        8,
        id="missing-required-field",
    ),
    pytest.param(
        _edit("127.0.0.1:8080", "127.0.0.1:70000"),
        "gateway.listen.port",
        "less than or equal to 65535 (got 70000)",
        2,
        id="port-out-of-range",
    ),
    pytest.param(
        _edit("127.0.0.1:8080", "nohost"),
        "gateway.listen",
        "'nohost' is not an address; write 'host:port'",
        2,
        id="address-without-port",
    ),
    pytest.param(
        _edit("127.0.0.1:8080", "bad_host:8080"),
        "gateway.listen.host",
        "'bad_host' is not an IP address or host name",
        2,
        id="bad-listen-host",
    ),
    pytest.param(
        _edit("workers: 1", "workers: 1\n  keepalive_timeout: 5x"),
        "gateway.keepalive_timeout",
        "'5x' is not a duration; write seconds as a number or text like '250ms'",
        4,
        id="bad-duration",
    ),
    pytest.param(
        _edit("workers: 1", "workers: 1\n  drain_timeout: .nan"),
        "gateway.drain_timeout",
        "nan is not a duration",
        4,
        id="nan-duration",
    ),
    pytest.param(
        _edit("workers: 1", "workers: 1\n  header_timeout: -1"),
        "gateway.header_timeout",
        "a duration cannot be negative",
        4,
        id="negative-duration",
    ),
    pytest.param(
        _edit("workers: 1", "workers: 1\n  limits:\n    max_body_bytes: 10XB"),
        "gateway.limits.max_body_bytes",
        "'10XB' is not a size; write bytes as a number or text like '64KiB'",
        5,
        id="bad-size",
    ),
    pytest.param(
        _edit("workers: 1", "workers: 2000"),
        "gateway.workers",
        "less than or equal to 1024",
        3,
        id="too-many-workers",
    ),
    pytest.param(
        _edit("workers: 1", "workers: 1\n  request_id_header: X Request"),
        "gateway.request_id_header",
        "'X Request' is not a valid HTTP header name",
        4,
        id="bad-request-id-header-name",
    ),
    pytest.param(
        _edit("{path_prefix: /api/users}", "{path_prefix: /api/users, methods: [GET, GETT]}"),
        "routes[0].match.methods",
        "'GETT' is not an HTTP method; use one of DELETE, GET,",
        9,
        id="bad-method",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, match: {path_regex: '/api/(users'}}\n",
        "routes[0].match.path_regex",
        "'/api/(users' is not a valid regular expression: missing ),",
        4,
        id="bad-path-regex",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, match: {path_regex: '/caf\\u00e9'}}\n",
        "routes[0].match.path_regex",
        "is not a valid regular expression: bad escape \\u",
        4,
        id="path-regex-invalid-as-bytes",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, match: {path_regex: '(?u)/x'}}\n",
        "routes[0].match.path_regex",
        "cannot use 'u' flag with a bytes pattern",
        4,
        id="path-regex-unicode-flag",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, match: {headers: {X-A: {regex: 'a('}}}}\n",
        "routes[0].match.headers.X-A",
        "'a(' is not a valid regular expression",
        4,
        id="bad-header-regex",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, match: {headers: {X-A: '\u20ac'}}}\n",
        "routes[0].match.headers.X-A",
        "cannot appear in an HTTP header; use latin-1 characters",
        4,
        id="header-value-not-latin-1",
    ),
    pytest.param(
        UPSTREAM_U
        + "  - {name: r, upstream: u, match: {headers: {X-A: {exact: '1', present: true}}}}\n",
        "routes[0].match.headers.X-A",
        "give exactly one of exact, regex or present",
        4,
        id="header-condition-ambiguous",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, match: {host: 'bad_host!'}}\n",
        "routes[0].match.host",
        "'bad_host!' is not a host name; write 'api.example.com' or '*.example.com'",
        4,
        id="bad-host-name",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, match: {headers: {'X Bad': '1'}}}\n",
        "routes[0].match.headers",
        "'X Bad' is not a valid HTTP header name",
        4,
        id="bad-header-name",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, match: {path: api}}\n",
        "routes[0].match.path",
        "'api' must start with '/'",
        4,
        id="path-without-slash",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, match: {path: /a, path_prefix: /b}}\n",
        "routes[0].match",
        "give at most one of path, path_prefix, path_regex",
        4,
        id="two-path-kinds",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: 'bad name', upstream: u}\n",
        "routes[0].name",
        "'bad name' is not a valid name; use letters, digits",
        4,
        id="bad-route-name",
    ),
    pytest.param(
        "upstreams:\n  u: {endpoints: []}\n",
        "upstreams.u",
        "an upstream needs endpoints (a list of host:port) or a service",
        2,
        id="no-endpoints",
    ),
    pytest.param(
        _edit('"127.0.0.1:9001", "127.0.0.1:9002"', '"127.0.0.1:9001", {address: x:1, weight: 0}'),
        "upstreams.users.endpoints[1].weight",
        "greater than or equal to 1",
        6,
        id="zero-weight",
    ),
    pytest.param(
        _edit("{endpoints:", "{balancer: random, endpoints:"),
        "upstreams.users.balancer",
        "'weighted_round_robin', 'hash' or 'sticky' (got 'random')",
        6,
        id="unknown-balancer",
    ),
    pytest.param(
        # The upstream's name equals the bad field's name: the line is still the field's.
        "upstreams:\n  balancer:\n    endpoints: ['127.0.0.1:1']\n    balancer: random\n",
        "upstreams.balancer.balancer",
        "'weighted_round_robin', 'hash' or 'sticky'",
        4,
        id="upstream-named-like-its-field",
    ),
    # cross-field problems
    pytest.param(
        _edit("upstream: users\n", "upstream: user\n"),
        "routes[0].upstream",
        "no upstream named 'user' (did you mean 'users'?); known: users",
        10,
        id="dangling-upstream-with-suggestion",
    ),
    pytest.param(
        _edit("upstream: users\n", "upstream: billing\n"),
        "routes[0].upstream",
        "no upstream named 'billing'; known: users",
        10,
        id="dangling-upstream",
    ),
    pytest.param(
        "routes:\n  - {name: r, upstream: u}\n",
        "routes[0].upstream",
        "known: (none: add one under upstreams)",
        2,
        id="dangling-upstream-none-defined",
    ),
    pytest.param(
        CANONICAL + "  - name: users\n    match: {path_prefix: /other}\n    upstream: users\n",
        "routes[1].name",
        "route name 'users' is already used by routes[0]; give each route a unique name",
        12,
        id="duplicate-route-name",
    ),
    pytest.param(
        _edit('"127.0.0.1:9002"', '"127.0.0.1:9001"'),
        "upstreams.users.endpoints[1]",
        "endpoint 127.0.0.1:9001 is listed twice (also endpoints[0]); use weight",
        6,
        id="duplicate-endpoint",
    ),
    pytest.param(
        CANONICAL + "  - name: shadowed\n    match: {path_prefix: /api/users/}\n"
        "    upstream: users\n",
        "routes[1]",
        "route 'shadowed' can never match: route 'users' (routes[0]) is tried first",
        12,
        id="unreachable-identical-match",
    ),
    pytest.param(
        # /api would be tried after /api/users, but its priority puts it first.
        CANONICAL + "  - name: all\n    match: {path_prefix: /api}\n"
        "    upstream: users\n    priority: 5\n",
        "routes[0]",
        "route 'users' can never match: route 'all' (routes[1]) is tried first",
        8,
        id="unreachable-by-priority",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: any, upstream: u}\n"
        "  - {name: get-x, upstream: u, match: {path: /x, methods: [GET]}, priority: -1}\n",
        "routes[1]",
        "or give this one a higher priority",
        5,
        id="unreachable-low-priority",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: wild, upstream: u, match: {host: '*.example.com'}}\n"
        "  - {name: deep, upstream: u, match: {host: '*.eu.example.com'}, priority: -1}\n",
        "routes[1]",
        "route 'deep' can never match: route 'wild' (routes[0])",
        5,
        id="unreachable-covered-wildcard-host",
    ),
    pytest.param(
        _edit("{path_prefix: /api/users}", "{path: /api/users}"),
        "routes[0]",
        "strip_prefix needs match.path_prefix; use rewrite for other matches",
        8,
        id="strip-prefix-on-exact-path",
    ),
    pytest.param(
        _edit("    strip_prefix: true\n", "    strip_prefix: true\n    rewrite: /x\n"),
        "routes[0]",
        "give strip_prefix or rewrite, not both",
        8,
        id="strip-prefix-and-rewrite",
    ),
    pytest.param(
        _edit("strip_prefix: true", "rewrite: /v1/{id}"),
        "routes[0]",
        "rewrite uses unknown placeholder {id}; known placeholders: rest",
        8,
        id="rewrite-unknown-placeholder-prefix",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, match: {path_regex: '/u/(?P<id>\\d+)'},"
        " rewrite: '/users/{uid}'}\n",
        "routes[0]",
        "rewrite uses unknown placeholder {uid}; known placeholders: id",
        4,
        id="rewrite-unknown-placeholder-regex",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, match: {path: /a}, rewrite: '/b/{rest}'}\n",
        "routes[0]",
        "unknown placeholder {rest}; an exact path match has no placeholders",
        4,
        id="rewrite-placeholder-on-exact-path",
    ),
    pytest.param(
        _edit("strip_prefix: true", "rewrite: v1"),
        "routes[0]",
        "rewrite 'v1' must start with '/'",
        8,
        id="rewrite-without-slash",
    ),
    pytest.param(
        _edit(
            '"127.0.0.1:9002"]}',
            '{address: "127.0.0.1:9002", weight: 3}], balancer: round_robin}',
        ),
        "upstreams.users",
        "balancer is round_robin, which ignores them; set balancer: weighted_round_robin",
        6,
        id="weights-with-round-robin",
    ),
    pytest.param(
        _edit("{listen: 127.0.0.1:9901}", "{listen: 0.0.0.0:9901}"),
        "gateway.admin",
        "give it a certificate (tls: {cert, key}), or set allow_insecure_remote: true",
        4,
        id="admin-on-non-loopback",
    ),
    pytest.param(
        _edit("{listen: 127.0.0.1:9901}", "{listen: 127.0.0.1:9901, token: short}"),
        "gateway.admin",
        "the admin token is too short; use at least 16 characters",
        4,
        id="admin-token-too-short",
    ),
    pytest.param(
        _edit("{listen: 127.0.0.1:9901}", "{listen: 127.0.0.1:8080}"),
        "gateway.admin.listen",
        "the admin listener 127.0.0.1:8080 is the same as gateway.listen; give it its own port",
        4,
        id="admin-same-as-gateway",
    ),
    # auth that protects nothing, API keys that name two consumers
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, auth: {jwt: {algorithms: [HS256], "
        "keys: [{secret: s3cret}]}, anonymous: true, scopes: [orders:read]}}\n",
        "routes[0].auth",
        "anonymous: true lets callers without credentials through unchecked, so scopes and "
        "roles would protect nothing; remove anonymous to require them, or remove scopes",
        4,
        id="anonymous-with-scopes",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, auth: {api_key: {}, anonymous: true, "
        "roles: [admin]}}\nconsumers:\n  a: {api_keys: ['sha256:" + "a" * 64 + "']}\n",
        "routes[0].auth",
        "scopes and roles would protect nothing",
        4,
        id="anonymous-with-roles",
    ),
    pytest.param(
        UPSTREAM_U + "  - {name: r, upstream: u, auth: {api_key: {}}}\n"
        "consumers:\n"
        "  billing: {api_keys: ['sha256:" + "a" * 64 + "']}\n"
        "  reports:\n"
        "    api_keys: ['sha256:" + "b" * 64 + "', 'sha256:" + "a" * 64 + "']\n",
        "consumers.reports.api_keys[1]",
        "consumers 'billing' and 'reports' have the same API key (also "
        "consumers.billing.api_keys[0]), so a caller with it could not be told apart; "
        "give each consumer its own key",
        8,
        id="api-key-of-two-consumers",
    ),
    # documents that are not configurations at all
    pytest.param(
        "- gateway\n- routes\n",
        "",
        "the document must be a mapping with gateway, upstreams, routes",
        1,
        id="not-a-mapping",
    ),
    pytest.param(
        "just text\n",
        "",
        "the document must be a mapping",
        1,
        id="scalar-document",
    ),
    pytest.param(
        "gateway:\n  listen: [127.0.0.1\nroutes: {\n",
        "",
        "not valid YAML: expected ',' or ']', but got ':'; fix the syntax",
        3,
        id="invalid-yaml-flow",
    ),
    pytest.param(
        "gateway:\n  listen: 127.0.0.1:1\n bad: indentation\n",
        "",
        "not valid YAML:",
        3,
        id="invalid-yaml-indentation",
    ),
]


@pytest.mark.parametrize(("text", "path", "fragment", "line"), BAD_DOCUMENTS)
def test_bad_document_names_field_fix_and_line(
    text: str, path: str, fragment: str, line: int | None
) -> None:
    issues = _issues(text)

    found = [i for i in issues if i.path == path and fragment in i.message]
    assert found, f"no issue at {path!r} containing {fragment!r} in {issues}"
    assert found[0].line == line


@pytest.mark.parametrize(("text", "path", "fragment", "line"), BAD_DOCUMENTS)
def test_errors_never_carry_a_traceback(
    text: str, path: str, fragment: str, line: int | None
) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text, source="gateway.yaml")
    error = info.value

    rendered = str(error)
    assert rendered == error.render()
    assert "Traceback" not in rendered
    assert 'File "' not in rendered
    assert "pydantic" not in rendered
    assert "errors.pydantic.dev" not in rendered
    # Chaining would print the internal exception under the user's error.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    assert rendered.startswith("gateway.yaml: ")


def test_every_issue_is_reported_at_once_sorted_by_line() -> None:
    # Written in the reverse of the order in which the model validates fields.
    text = """\
routes:
  - name: r
    upstream: u
    colour: red
upstreams:
  u: {endpoints: ["127.0.0.1:1"], balancr: round_robin}
gateway:
  workerz: 2
  listen: 127.0.0.1:99999
"""
    with pytest.raises(ConfigError) as info:
        loads(text, source="gw.yaml")
    error = info.value

    assert [(i.path, i.line) for i in error.issues] == [
        ("routes[0].colour", 4),
        ("upstreams.u.balancr", 6),
        ("gateway.workerz", 8),
        ("gateway.listen.port", 9),
    ]
    lines = error.render().splitlines()
    assert lines[0] == "gw.yaml: 4 problems in the configuration"
    assert lines[1:] == [f"  {issue}" for issue in error.issues]
    assert lines[1].startswith("  routes[0].colour (line 4): unknown key 'colour'")
    assert lines[4] == (
        "  gateway.listen.port (line 9): Input should be less than or equal to 65535 (got 99999)"
    )


def test_cross_field_issues_are_all_reported_sorted_by_line() -> None:
    text = CANONICAL + (
        "  - {name: orders, match: {path_prefix: /orders}, upstream: order}\n"
        "  - {name: users, match: {path_prefix: /other}, upstream: users}\n"
    )
    text = _edit('"127.0.0.1:9002"', '"127.0.0.1:9001"', text)

    issues = _issues(text)

    assert [(i.path, i.line) for i in issues] == [
        ("upstreams.users.endpoints[1]", 6),
        ("routes[1].upstream", 12),
        ("routes[2].name", 13),
    ]


def test_single_issue_render() -> None:
    error = ConfigError([ConfigIssue("", "the document must be a mapping")])
    assert error.render() == (
        "1 problem in the configuration\n  (document): the document must be a mapping"
    )


# ---------------------------------------------------------------------------- files


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(CANONICAL, encoding="utf-8")

    assert load(path) == loads(CANONICAL)
    assert load(str(path)).routes[0].name == "users"


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load(path)
    error = info.value

    assert error.source == str(path)
    assert error.issues == (ConfigIssue("", f"no such file {str(path)!r}; check the path"),)
    assert error.render().startswith(f"{path}: 1 problem in the configuration")
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_load_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(_edit("workers: 1", "workerz: 1"), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path)

    assert info.value.source == str(path)
    assert str(info.value).splitlines()[1].startswith("  gateway.workerz (line 3): ")


def test_load_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as info:
        load(path)

    (issue,) = info.value.issues
    assert issue.message.startswith("cannot read the file: ")


# ---------------------------------------------------------------------------- scalars


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (5, 5.0),
        (1.5, 1.5),
        ("1.5", 1.5),
        ("0", 0.0),
        ("250ms", 0.25),
        ("5s", 5.0),
        ("2m", 120.0),
        ("0.5m", 30.0),
        ("1h", 3600.0),
        (" 5 s ", 5.0),
    ],
    ids=repr,
)
def test_parse_duration(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert result == seconds
    assert type(result) is float


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "a duration is a number of seconds"),
        (False, "a duration is a number of seconds"),
        (None, "None is not a duration"),
        ("5x", "'5x' is not a duration"),
        ("1d", "'1d' is not a duration"),
        ("5 sec", "'5 sec' is not a duration"),
        ("", "'' is not a duration"),
        ("ms", "'ms' is not a duration"),
        ("-1s", "'-1s' is not a duration"),
        ("1e3", "'1e3' is not a duration"),
        ([5], "[5] is not a duration"),
        (-1, "a duration cannot be negative, got -1"),
        (-0.5, "a duration cannot be negative"),
        (math.nan, "nan is not a duration"),
    ],
    ids=repr,
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match="duration") as info:
        parse_duration(value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1024, 1024),
        ("1024", 1024),
        ("10B", 10),
        ("1KB", 1000),
        ("1K", 1000),
        ("1kb", 1000),
        ("1KiB", 1024),
        ("1kib", 1024),
        ("64KiB", 65536),
        ("10MB", 10_000_000),
        ("10MiB", 10 * 1024**2),
        ("1GB", 1_000_000_000),
        ("2GiB", 2 * 1024**3),
        (" 2 KiB ", 2048),
    ],
    ids=repr,
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "a size is a number of bytes"),
        (False, "a size is a number of bytes"),
        (1.5, "1.5 is not a size"),
        ("1.5KB", "'1.5KB' is not a size"),
        ("10XB", "'10XB' is not a size"),
        ("1TB", "'1TB' is not a size"),
        ("KB", "'KB' is not a size"),
        ("", "'' is not a size"),
        ("-1", "'-1' is not a size"),
        (None, "None is not a size"),
        (-1, "a size cannot be negative, got -1"),
    ],
    ids=repr,
)
def test_parse_size_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match="size") as info:
        parse_size(value)
    assert message in str(info.value)


# ---------------------------------------------------------------------------- frozen


@pytest.mark.parametrize(
    ("where", "attribute", "value"),
    [
        (lambda c: c, "routes", ()),
        (lambda c: c.gateway, "workers", 4),
        (lambda c: c.gateway.listen, "port", 1),
        (lambda c: c.gateway.admin, "allow_insecure_remote", True),
        (lambda c: c.upstreams["users"], "balancer", "weighted_round_robin"),
        (lambda c: c.upstreams["users"].endpoints[0], "weight", 2),
        (lambda c: c.routes[0], "upstream", "other"),
        (lambda c: c.routes[0].match, "path_prefix", "/"),
    ],
    ids=["config", "gateway", "address", "admin", "upstream", "endpoint", "route", "match"],
)
def test_models_are_frozen(where: Any, attribute: str, value: object) -> None:
    config = loads(CANONICAL)
    model = where(config)
    before = getattr(model, attribute)

    with pytest.raises(ValidationError, match="frozen"):
        setattr(model, attribute, value)
    assert getattr(model, attribute) == before


def test_sequences_in_models_are_tuples() -> None:
    config = loads(CANONICAL)
    assert isinstance(config.routes, tuple)
    assert isinstance(config.upstreams["users"].endpoints, tuple)
    assert isinstance(config.routes[0].match.methods, tuple)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("path_prefix", "/a//b", "write '/a/b'"),
        ("path_prefix", "/a/./b", "write '/a/b'"),
        ("path", "/%7euser", "write '/~user'"),
        ("path", "/café", "write '/caf%C3%A9'"),
        ("path", "/a%zz", "not followed by two hex digits"),
    ],
)
def test_route_paths_must_be_written_normalized(field: str, value: str, fragment: str) -> None:
    doc = (
        "upstreams: {up: {endpoints: ['127.0.0.1:9']}}\n"
        f"routes:\n  - {{name: r, upstream: up, match: {{{field}: '{value}'}}}}\n"
    )
    with pytest.raises(ConfigError) as err:
        loads(doc)
    assert f"routes[0].match.{field}" in str(err.value)
    assert fragment in str(err.value)


@pytest.mark.parametrize("value", ["a b", "bad\r\nX-Injected: 1", "*.wild", "host:port"])
def test_host_rewrite_must_be_a_host(value: str) -> None:
    doc = (
        "upstreams: {up: {endpoints: ['127.0.0.1:9']}}\n"
        f"routes:\n  - {{name: r, upstream: up, host_rewrite: {value!r}}}\n"
    )
    with pytest.raises(ConfigError) as err:
        loads(doc)
    assert "routes[0].host_rewrite" in str(err.value)


# ---------------------------------------------------------------------------- services


def test_a_service_route_gets_an_upstream_of_that_name() -> None:
    config = loads("routes:\n  - {name: users, service: users, match: {path_prefix: /u}}\n")
    route = config.routes[0]
    assert (route.upstream, route.service) == ("users", "users")
    upstream = config.upstreams["users"]
    assert upstream.service == "users"
    assert upstream.endpoints == ()
    assert upstream.balancer == "least_request"


def test_a_service_route_uses_the_configured_upstream_of_that_name() -> None:
    config = loads(
        "upstreams:\n  users: {service: users, balancer: round_robin}\n"
        "routes:\n  - {name: a, service: users, match: {path_prefix: /a}}\n"
        "  - {name: b, upstream: users}\n"
    )
    assert config.upstreams["users"].balancer == "round_robin"
    assert [r.upstream for r in config.routes] == ["users", "users"]


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        pytest.param(
            "upstreams:\n  users: {endpoints: ['127.0.0.1:1']}\n"
            "routes:\n  - {name: a, service: users}\n",
            "routes[0].service",
            "upstream 'users' does not take its endpoints from service 'users'",
            id="static-upstream-of-that-name",
        ),
        pytest.param(
            "upstreams:\n  users: {service: users}\n"
            "routes:\n  - {name: a, service: users, upstream: users}\n",
            "routes[0]",
            "give upstream or service, not both",
            id="both",
        ),
        pytest.param(
            "upstreams:\n  users: {service: users, endpoints: ['127.0.0.1:1']}\n",
            "upstreams.users",
            "give endpoints or service, not both",
            id="endpoints-and-service",
        ),
        pytest.param(
            "gateway: {registry: {enabled: false}}\nroutes:\n  - {name: a, service: users}\n",
            "upstreams.users.service",
            "the registry, which is disabled",
            id="registry-disabled",
        ),
        pytest.param(
            "routes:\n  - {name: a, match: {path_prefix: /a}}\n",
            "routes[0].upstream",
            "or give service: (a name in the registry)",
            id="neither",
        ),
        pytest.param(
            "gateway: {registry: {token: short}}\n",
            "gateway.registry.token",
            "too short",
            id="short-registry-token",
        ),
    ],
)
def test_bad_service_settings(text: str, path: str, fragment: str) -> None:
    issues = _issues(text)
    assert any(i.path == path and fragment in i.message for i in issues), issues


@pytest.mark.parametrize(
    ("rules", "fragment"),
    [
        ("{request: {add: {Host: evil.example}}}", "request rules cannot change Host"),
        ("{request: {rename: {X-Target: host}}}", "request rules cannot change Host"),
        ("{request: {remove: [Content-Length]}}", "frames the message"),
        ("{response: {rename: {X-Len: Transfer-Encoding}}}", "frames the message"),
    ],
)
def test_header_rules_cannot_touch_framing_or_host(rules: str, fragment: str) -> None:
    doc = (
        "upstreams: {up: {endpoints: ['127.0.0.1:9']}}\n"
        f"routes:\n  - {{name: r, upstream: up, headers: {rules}}}\n"
    )
    with pytest.raises(ConfigError) as err:
        loads(doc)
    assert "routes[0].headers" in str(err.value)
    assert fragment in str(err.value)


def test_unreadable_redis_tls_files_are_a_config_error() -> None:
    from meshgate.gateway.runtime import compile_config

    doc = (
        "upstreams: {up: {endpoints: ['127.0.0.1:9']}}\n"
        "routes:\n  - {name: r, upstream: up, rate_limit: {rate: 5/s, "
        "redis: 'rediss://127.0.0.1:6379/0?ssl_ca_certs=/nonexistent/ca.pem'}}\n"
    )
    with pytest.raises(ConfigError) as err:
        compile_config(loads(doc))
    assert "routes[0].rate_limit.redis" in str(err.value)
    assert "No such file or directory" in str(err.value)


@pytest.mark.parametrize(
    ("doc", "path", "line"),
    [
        (
            (
                "upstreams: {api: {endpoints: ['127.0.0.1:9']}}\n"
                "routes:\n  - name: a\n    upstream: api\n    on: x\n"
            ),
            "routes[0].true",
            5,
        ),
        (
            (
                "upstreams:\n  api: {endpoints: ['127.0.0.1:9'], no: 1}\n"
                "routes:\n  - {name: a, upstream: api}\n"
            ),
            "upstreams.api.false",
            2,
        ),
    ],
)
def test_a_key_yaml_reads_as_a_boolean_is_named_at_its_line(doc: str, path: str, line: int) -> None:
    issues = _issues(doc)
    assert [(i.path, i.line) for i in issues] == [(path, line)]
    assert "YAML reads unquoted on, off, yes and no as booleans" in issues[0].message
