"""The compiled router: precedence, conditions, the segment index, path rewriting."""

from __future__ import annotations

import functools
import random
import re
from typing import Any

import pytest

from meshgate.config import MatchSettings, RouteSettings, loads
from meshgate.gateway.router import RouteMatch, Router
from meshgate.routing import covers, precedence_key, segment_covers

Headers = tuple[tuple[str, str], ...]

_UPSTREAMS = "upstreams:\n  u: {endpoints: ['127.0.0.1:1']}\nroutes:\n"


def _settings(routes: str) -> tuple[RouteSettings, ...]:
    """Routes validated as in production, from YAML lines under ``routes:``."""
    return loads(_UPSTREAMS + routes).routes


def _router(routes: str) -> Router:
    # As meshgate.gateway.runtime.Runtime wraps them, without upstream targets.
    return Router([RouteMatch(route, i) for i, route in enumerate(_settings(routes))])


def _match(
    router: Router, method: str, path: str, host: str = "", headers: Headers = ()
) -> tuple[RouteMatch, re.Match[bytes] | None] | None:
    raw = tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)
    return router.match(method.encode(), path.encode(), host.encode(), raw)


def _winner(router: Router, method: str, path: str, host: str, headers: Headers) -> str | None:
    found = _match(router, method, path, host, headers)
    return found[0].name if found else None


# ---------------------------------------------------------------------------- routing table

SCENARIOS = {
    # Declared worst-first: precedence, not file order, decides.
    "kinds": r"""
  - {name: root, upstream: u}
  - {name: short, upstream: u, match: {path_prefix: /api}}
  - {name: long, upstream: u, match: {path_prefix: /api/users}}
  - {name: regex, upstream: u, match: {path_regex: '/api/users(/\d+)?'}}
  - {name: exact, upstream: u, match: {path: /api/users}}
""",
    "segments": """
  - {name: api, upstream: u, match: {path_prefix: /api}}
  - {name: v1, upstream: u, match: {path_prefix: /v1/}}
  - {name: home, upstream: u, match: {path: /}}
""",
    "hosts": """
  - {name: any, upstream: u}
  - {name: any-exact-path, upstream: u, match: {path: /x}}
  - {name: wild, upstream: u, match: {host: '*.example.com'}}
  - {name: exact, upstream: u, match: {host: [API.example.com., other.org]}}
  - {name: longwild, upstream: u, match: {host: '*.eu.example.com'}}
""",
    "methods": """
  - {name: other, upstream: u}
  - {name: write, upstream: u, match: {methods: post}}
  - {name: read, upstream: u, match: {methods: [GET, head]}}
""",
    "headers": """
  - {name: default, upstream: u}
  - {name: v2, upstream: u, match: {headers: {X-Version: "2"}}}
  - {name: canary, upstream: u, match: {headers: {X-Canary: {regex: "yes|true"}}}}
  - {name: debug, upstream: u, match: {headers: {X-Debug: {present: true}}}}
  - {name: both, upstream: u, match: {headers: {X-Version: "2", X-Canary: {regex: "yes|true"}}}}
  - name: anon
    upstream: u
    match: {path_prefix: /public, headers: {Authorization: {present: false}}}
""",
    "priority": r"""
  - {name: exact, upstream: u, match: {path: /admin}}
  - {name: block, upstream: u, match: {path_prefix: /admin, methods: [POST]}, priority: 10}
  - {name: gets, upstream: u, match: {methods: [GET]}}
  - {name: fallback, upstream: u, match: {path_regex: '/health|/admin'}, priority: -1}
""",
    "declaration-order": r"""
  - {name: first, upstream: u, match: {path_regex: '/items/.*'}}
  - {name: second, upstream: u, match: {path_regex: '/items/\d+'}}
  - {name: ab, upstream: u, match: {host: [a.com, b.com]}}
  - {name: bc, upstream: u, match: {host: [b.com, c.com]}}
  - {name: hx, upstream: u, match: {path: /h, headers: {X-A: '1'}}}
  - {name: hy, upstream: u, match: {path: /h, headers: {X-B: '1'}}}
""",
}


@functools.cache
def _scenario(name: str) -> Router:
    return _router(SCENARIOS[name])


def _case(
    scenario: str,
    method: str,
    path: str,
    expected: str | None,
    *,
    host: str = "",
    headers: Headers = (),
    name: str,
) -> Any:
    request = (method, path, host, headers)
    return pytest.param(scenario, request, expected, id=f"{scenario}:{name}")


ROUTING = [
    # exact, then regex, then prefix (longer first), whatever the file order
    _case("kinds", "GET", "/api/users", "exact", name="exact-beats-regex-and-prefix"),
    _case("kinds", "GET", "/api/users/7", "regex", name="regex-beats-prefix"),
    _case("kinds", "GET", "/api/users/x", "long", name="regex-fails-longer-prefix"),
    _case("kinds", "GET", "/api/users/7/x", "long", name="regex-is-anchored"),
    _case("kinds", "GET", "/api/users/", "long", name="trailing-slash-is-not-exact"),
    _case("kinds", "GET", "/api/usersx", "short", name="prefix-is-segment-wise"),
    _case("kinds", "GET", "/api/orders", "short", name="shorter-prefix"),
    _case("kinds", "GET", "/api", "short", name="prefix-equal-path"),
    _case("kinds", "GET", "/apix", "root", name="not-a-segment"),
    _case("kinds", "GET", "/", "root", name="root"),
    _case("kinds", "GET", "/API/users", "root", name="paths-are-case-sensitive"),
    # segment-wise prefixes
    _case("segments", "GET", "/api", "api", name="prefix-itself"),
    _case("segments", "GET", "/api/", "api", name="prefix-slash"),
    _case("segments", "GET", "/api/x/y", "api", name="below-prefix"),
    _case("segments", "GET", "/apix", None, name="longer-segment"),
    _case("segments", "GET", "/ap", None, name="shorter-segment"),
    _case("segments", "GET", "/x/api", None, name="prefix-not-at-start"),
    _case("segments", "GET", "/v1", "v1", name="trailing-slash-prefix-matches-bare"),
    _case("segments", "GET", "/v1/x", "v1", name="trailing-slash-prefix-below"),
    _case("segments", "GET", "/v10", None, name="trailing-slash-prefix-segment-wise"),
    _case("segments", "GET", "/", "home", name="exact-root"),
    # hosts: exact, then wildcard (longer suffix first), then any host
    _case("hosts", "GET", "/", "exact", host="api.example.com", name="exact-host"),
    _case("hosts", "GET", "/", "exact", host="other.org", name="second-exact-host"),
    _case("hosts", "GET", "/x", "exact", host="api.example.com", name="host-beats-exact-path"),
    _case("hosts", "GET", "/x", "any-exact-path", host="x.org", name="any-host-exact-path"),
    _case("hosts", "GET", "/", "wild", host="a.example.com", name="wildcard-one-label"),
    _case("hosts", "GET", "/", "wild", host="a.b.example.com", name="wildcard-two-labels"),
    _case("hosts", "GET", "/", "wild", host="eu.example.com", name="wildcard-not-longer"),
    _case("hosts", "GET", "/", "longwild", host="x.eu.example.com", name="longer-wildcard"),
    _case("hosts", "GET", "/", "any", host="example.com", name="wildcard-needs-a-label"),
    _case("hosts", "GET", "/", "any", host="notexample.com", name="wildcard-on-label-boundary"),
    _case("hosts", "GET", "/", "any", host="api.example.com.evil", name="suffix-must-end"),
    _case("hosts", "GET", "/", "any", host="", name="no-host"),
    # methods
    _case("methods", "GET", "/", "read", name="get"),
    _case("methods", "HEAD", "/", "read", name="head-normalized-upper"),
    _case("methods", "POST", "/", "write", name="single-method"),
    _case("methods", "DELETE", "/", "other", name="unlisted-method"),
    _case("methods", "get", "/", "other", name="methods-are-case-sensitive"),
    # headers: more conditions first; names case-insensitive, values exact
    _case("headers", "GET", "/", "v2", headers=(("X-Version", "2"),), name="exact"),
    _case("headers", "GET", "/", "v2", headers=(("x-version", "2"),), name="name-any-case"),
    _case("headers", "GET", "/", "default", headers=(("X-Version", "3"),), name="exact-differs"),
    _case("headers", "GET", "/", "default", headers=(("X-Version", "2 "),), name="exact-is-exact"),
    _case(
        "headers",
        "GET",
        "/",
        "both",
        headers=(("X-Canary", "yes"), ("X-Version", "2")),
        name="more-conditions-first",
    ),
    _case("headers", "GET", "/", "canary", headers=(("X-Canary", "true"),), name="regex"),
    _case("headers", "GET", "/", "default", headers=(("X-Canary", "yess"),), name="regex-anchored"),
    _case("headers", "GET", "/", "default", headers=(("X-Canary", "YES"),), name="regex-case"),
    _case("headers", "GET", "/", "debug", headers=(("X-Debug", ""),), name="present-empty"),
    _case("headers", "GET", "/", "default", name="present-missing"),
    _case("headers", "GET", "/public/a", "anon", name="absent"),
    _case(
        "headers",
        "GET",
        "/public/a",
        "default",
        headers=(("authorization", "Bearer x"),),
        name="absent-but-present",
    ),
    _case(
        "headers",
        "GET",
        "/public",
        "anon",
        headers=(("X-Debug", "1"),),
        name="longer-prefix-before-header-count",
    ),
    # Only the first field of a repeated header is looked at.
    _case(
        "headers",
        "GET",
        "/",
        "default",
        headers=(("X-Version", "3"), ("X-Version", "2")),
        name="first-of-repeated-header",
    ),
    # explicit priority overrides everything else
    _case("priority", "POST", "/admin", "block", name="priority-beats-exact-path"),
    _case("priority", "POST", "/admin/x", "block", name="priority-prefix"),
    _case("priority", "GET", "/admin", "exact", name="priority-route-does-not-match"),
    _case("priority", "GET", "/health", "gets", name="negative-priority-last"),
    _case("priority", "PUT", "/health", "fallback", name="negative-priority-reached"),
    _case("priority", "PUT", "/admin", "exact", name="exact-before-negative-priority"),
    _case("priority", "PUT", "/other", None, name="nothing"),
    # the order in the file breaks the remaining ties
    _case("declaration-order", "GET", "/items/1", "first", name="regex-tie"),
    _case("declaration-order", "GET", "/x", "ab", host="b.com", name="host-tie"),
    _case("declaration-order", "GET", "/x", "bc", host="c.com", name="host-no-tie"),
    _case(
        "declaration-order",
        "GET",
        "/h",
        "hx",
        headers=(("X-B", "1"), ("X-A", "1")),
        name="header-tie",
    ),
    _case("declaration-order", "GET", "/h", "hy", headers=(("X-B", "1"),), name="header-no-tie"),
]


@pytest.mark.parametrize(("scenario", "request_", "expected"), ROUTING)
def test_routing_table(
    scenario: str, request_: tuple[str, str, str, Headers], expected: str | None
) -> None:
    assert _winner(_scenario(scenario), *request_) == expected


def test_declaration_order_breaks_ties_both_ways() -> None:
    first = r"  - {name: a, upstream: u, match: {path_regex: '/items/.*'}}" + "\n"
    second = r"  - {name: b, upstream: u, match: {path_regex: '/items/\d+'}}" + "\n"

    assert _winner(_router(first + second), "GET", "/items/1", "", ()) == "a"
    assert _winner(_router(second + first), "GET", "/items/1", "", ()) == "b"
    assert _winner(_router(second + first), "GET", "/items/x", "", ()) == "a"


def test_config_hosts_are_lowercased_and_undotted() -> None:
    router = _scenario("hosts")
    (exact,) = [r for r in router.routes if r.name == "exact"]

    assert exact.settings.match.host == ("api.example.com", "other.org")
    assert exact.exact_hosts == frozenset({b"api.example.com", b"other.org"})
    assert router.needs_host is True
    assert _router("  - {name: a, upstream: u}\n").needs_host is False


def test_regex_match_object_is_returned() -> None:
    router = _router(
        r"  - {name: user, upstream: u, match: {path_regex: '/users/(?P<id>\d+)'}}" + "\n"
    )
    found = _match(router, "GET", "/users/42")

    assert found is not None
    route, m = found
    assert route.name == "user"
    assert m is not None
    assert m.group("id") == b"42"
    assert _match(router, "GET", "/users/42/x") is None


def test_no_routes_match_nothing() -> None:
    router = Router([])
    assert router.routes == ()
    assert _match(router, "GET", "/") is None


# ---------------------------------------------------------------------------- precedence


PRECEDENCE_ROUTES = r"""
  - {name: root-get, upstream: u, match: {methods: [GET]}}
  - {name: one-header-later, upstream: u, match: {path_prefix: /a, headers: {X-C: '1'}}}
  - {name: neg, upstream: u, match: {path: /neg, methods: [POST]}, priority: -1}
  - {name: one-header, upstream: u, match: {path_prefix: /a, headers: {X-A: '1'}}}
  - {name: two-headers, upstream: u, match: {path_prefix: /a, headers: {X-A: '1', X-B: '2'}}}
  - {name: methods, upstream: u, match: {path_prefix: /a, methods: [GET]}}
  - {name: long-prefix, upstream: u, match: {path_prefix: /a/b}}
  - {name: regex, upstream: u, match: {path_regex: '/y.*'}}
  - {name: exact-path, upstream: u, match: {path: /x}}
  - {name: host-wild, upstream: u, match: {host: '*.a.com'}}
  - {name: host-longwild, upstream: u, match: {host: '*.b.a.com'}}
  - {name: host-exact, upstream: u, match: {host: [a.com, '*.z.com']}}
  - {name: priority, upstream: u, match: {path_prefix: /z}, priority: 10}
"""

# The order of the module docstring: priority; exact host, wildcard host (longer
# first), any host; exact path, regex, prefix (longer first); methods; more
# header conditions; the file.
PRECEDENCE_ORDER = [
    "priority",
    "host-exact",
    "host-longwild",
    "host-wild",
    "exact-path",
    "regex",
    "long-prefix",
    "methods",
    "two-headers",
    "one-header-later",
    "one-header",
    "root-get",
    "neg",
]


def test_precedence_key_orders_routes_as_documented() -> None:
    routes = _settings(PRECEDENCE_ROUTES)
    ordered = sorted(range(len(routes)), key=lambda i: precedence_key(routes[i], i))

    assert [routes[i].name for i in ordered] == PRECEDENCE_ORDER


def test_router_keeps_routes_in_precedence_order() -> None:
    router = _router(PRECEDENCE_ROUTES)
    assert [r.name for r in router.routes] == PRECEDENCE_ORDER


@pytest.mark.parametrize(
    ("route", "index", "key"),
    [
        ("{name: r, upstream: u}", 0, (0, 2, 0, 2, -1, 1, 0, 0)),
        ("{name: r, upstream: u, match: {path: /a/b}}", 3, (0, 2, 0, 0, 0, 1, 0, 3)),
        ("{name: r, upstream: u, match: {path_regex: /a.*}}", 1, (0, 2, 0, 1, 0, 1, 0, 1)),
        (
            (
                "{name: r, upstream: u, priority: 3, match: {host: '*.a.com', path_prefix: /ab/,"
                " methods: GET, headers: {X-A: '1'}}}"
            ),
            4,
            (-3, 1, -7, 2, -3, 0, -1, 4),
        ),
        (
            "{name: r, upstream: u, match: {host: ['*.long.example.com', x.org]}}",
            0,
            (0, 0, 0, 2, -1, 1, 0, 0),
        ),
    ],
)
def test_precedence_key_values(route: str, index: int, key: tuple[int, ...]) -> None:
    (settings,) = _settings(f"  - {route}\n")
    assert precedence_key(settings, index) == key


# ---------------------------------------------------------------------------- segment index

# A varied table whose first segments overlap: the index must skip only what
# cannot match, never reorder.
PROPERTY_ROUTES = r"""
  - {name: root, upstream: u, match: {methods: [GET]}}
  - {name: api, upstream: u, match: {path_prefix: /api}}
  - {name: api-users, upstream: u, match: {path_prefix: /api/users}}
  - {name: api-users-exact, upstream: u, match: {path: /api/users, methods: [POST]}}
  - {name: api-regex, upstream: u, match: {path_regex: '/api/(users|orders)/\d+'}}
  - {name: any-regex, upstream: u, match: {path_regex: '/[a-z]+/v2(/.*)?'}}
  - {name: api-v2, upstream: u, match: {path_prefix: /api, headers: {X-Version: '2'}}}
  - name: api-canary
    upstream: u
    match: {path_prefix: /api, headers: {X-Canary: {present: true}}}
  - {name: host-api, upstream: u, match: {host: api.example.com, path_prefix: /static}}
  - {name: host-wild, upstream: u, match: {host: '*.example.com', path: /static/x}}
  - {name: static, upstream: u, match: {path_prefix: /static, methods: [GET, HEAD]}}
  - {name: home, upstream: u, match: {path: /}}
  - {name: admin, upstream: u, match: {path_prefix: /admin}, priority: 5}
  - {name: low, upstream: u, match: {path_prefix: /apix, methods: [DELETE]}, priority: -2}
  - {name: ver, upstream: u, match: {path_regex: '/v\d+/.*', headers: {X-Version: {regex: '\d'}}}}
"""

_SEGMENTS = ["api", "users", "orders", "1", "42", "v2", "static", "x", "admin", "apix", "v1", ""]
_HOSTS = ["", "api.example.com", "a.example.com", "example.com", "other.org"]
_METHODS = ["GET", "HEAD", "POST", "DELETE", "PUT"]
_HEADERS = [("X-Version", "2"), ("x-version", "3"), ("X-Canary", "yes"), ("Accept", "*/*")]


def _takes(route: RouteSettings, method: str, path: str, host: str, headers: Headers) -> bool:
    """Whether ``route`` takes the request, straight from the documented semantics."""
    m = route.match
    if m.methods and method not in m.methods:
        return False
    if m.host and not any(
        host == h or (h.startswith("*.") and host.endswith(h[1:]) and len(host) > len(h) - 1)
        for h in m.host
    ):
        return False
    if m.path_kind == "exact":
        if path != m.path:
            return False
    elif m.path_kind == "regex":
        if re.fullmatch(m.path_regex or "", path) is None:
            return False
    elif m.prefix not in ("/", path) and not path.startswith(m.prefix + "/"):
        return False
    for name, cond in m.headers.items():
        value = next((v for k, v in headers if k.lower() == name.lower()), None)
        if cond.present is not None:
            holds = (value is not None) == cond.present
        elif value is None:
            holds = False
        elif cond.exact is not None:
            holds = value == cond.exact
        else:
            holds = re.fullmatch(cond.regex or "", value) is not None
        if not holds:
            return False
    return True


def _requests(count: int, seed: int, bases: list[str]) -> list[tuple[str, str, str, Headers]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        segments = [rnd.choice(_SEGMENTS) for _ in range(rnd.randint(0, 4))]
        if rnd.random() < 0.3:
            # Start at a route's own path or prefix, so that rare routes are hit too.
            segments = [rnd.choice(bases), *segments[:1]]
        path = "/" + "/".join(s.strip("/") for s in segments if s.strip("/"))
        if rnd.random() < 0.1 and path != "/":
            path += "/"
        headers = tuple(rnd.sample(_HEADERS, rnd.randint(0, 2)))
        out.append((rnd.choice(_METHODS), path, rnd.choice(_HOSTS), headers))
    return out


def test_segment_index_never_changes_the_winner() -> None:
    router = _router(PROPERTY_ROUTES)
    bases = sorted({r.settings.match.path or r.settings.match.prefix for r in router.routes})
    winners: set[str | None] = set()

    for method, path, host, headers in _requests(3000, seed=20240611, bases=bases):
        linear = next(
            (r.name for r in router.routes if _takes(r.settings, method, path, host, headers)),
            None,
        )
        indexed = _winner(router, method, path, host, headers)
        assert indexed == linear, (method, path, host, headers)
        winners.add(indexed)

    # The sample is varied enough to exercise every route and the no-match case.
    assert winners == {r.name for r in router.routes} | {None}


# ---------------------------------------------------------------------------- upstream path


@pytest.mark.parametrize(
    ("route", "path", "upstream_path"),
    [
        ("{path_prefix: /api/users}, strip_prefix: true", "/api/users/1", "/1"),
        ("{path_prefix: /api/users}, strip_prefix: true", "/api/users", "/"),
        ("{path_prefix: /api/users}, strip_prefix: true", "/api/users/", "/"),
        ("{path_prefix: /api/users}, strip_prefix: true", "/api/users/a/b/", "/a/b/"),
        ("{path_prefix: /api/users/}, strip_prefix: true", "/api/users/1", "/1"),
        ("{path_prefix: /}, strip_prefix: true", "/a/b", "/a/b"),
        ("{path_prefix: /api}", "/api/x", "/api/x"),
        ("{path: /old}, rewrite: /new", "/old", "/new"),
        ("{path_prefix: /api}, rewrite: '/v2{rest}'", "/api/x/y", "/v2/x/y"),
        ("{path_prefix: /api}, rewrite: '/v2{rest}'", "/api", "/v2"),
        ("{path_prefix: /}, rewrite: '/static{rest}'", "/a/b", "/static/a/b"),
        ("{path_prefix: /api}, rewrite: '/fixed'", "/api/x", "/fixed"),
        # {rest} keeps its leading slash; a template slash before it doubles it.
        ("{path_prefix: /api}, rewrite: '/v2/{rest}'", "/api/x", "/v2//x"),
        (
            (
                r"{path_regex: '/users/(?P<id>\d+)/posts/(?P<post>\d+)'},"
                " rewrite: '/v2/posts/{post}/by/{id}'"
            ),
            "/users/7/posts/9",
            "/v2/posts/9/by/7",
        ),
        ("{path_regex: '/files(?P<sub>/.*)?'}, rewrite: '/store{sub}'", "/files", "/store"),
        ("{path_regex: '/files(?P<sub>/.*)?'}, rewrite: '/store{sub}'", "/files/a/b", "/store/a/b"),
        (
            "{path_regex: '/(?P<rest>[a-z]+)/x'}, rewrite: '/y/{rest}'",
            "/abc/x",
            "/y/abc",
        ),
        ("{path_regex: '/(?P<a>a+)'}, rewrite: '/{a}-{a}'", "/aa", "/aa-aa"),
    ],
)
def test_upstream_path(route: str, path: str, upstream_path: str) -> None:
    router = _router(f"  - {{name: r, upstream: u, match: {route}}}\n")
    found = _match(router, "GET", path)

    assert found is not None
    matched, m = found
    assert matched.upstream_path(path.encode(), m) == upstream_path.encode()


# ---------------------------------------------------------------------------- covers


def _m(**fields: Any) -> MatchSettings:
    return MatchSettings.model_validate(fields)


def _covers_id(value: object) -> str:
    if isinstance(value, MatchSettings):
        fields = value.model_dump(exclude_defaults=True)
        return ",".join(f"{k}={v}" for k, v in fields.items()) or "any"
    return str(value)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # paths
        (_m(), _m(path="/x"), True),
        (_m(), _m(path_prefix="/a"), True),
        (_m(), _m(path_regex="/.*"), True),
        (_m(path_prefix="/api"), _m(path_prefix="/api/users"), True),
        (_m(path_prefix="/api"), _m(path_prefix="/api/"), True),
        (_m(path_prefix="/api"), _m(path="/api"), True),
        (_m(path_prefix="/api"), _m(path="/api/"), True),
        (_m(path_prefix="/api"), _m(path_prefix="/apix"), False),
        (_m(path_prefix="/api"), _m(path="/apix"), False),
        (_m(path_prefix="/api/users"), _m(path_prefix="/api"), False),
        (_m(path_prefix="/api"), _m(), False),
        (_m(path_prefix="/api"), _m(path_regex="/api/.*"), False),
        (_m(path="/a"), _m(path="/a"), True),
        (_m(path="/a"), _m(path="/b"), False),
        (_m(path="/a"), _m(path_prefix="/a"), False),
        (_m(path="/a"), _m(path_regex="/a"), False),
        (_m(path_regex="/a.*"), _m(path_regex="/a.*"), True),
        (_m(path_regex="/a.*"), _m(path_regex="/ab.*"), False),
        (_m(path_regex="/a.*"), _m(path="/a"), False),
        (_m(path_regex=".*"), _m(path_prefix="/a"), False),
        # hosts
        (_m(), _m(host="x.com"), True),
        (_m(host="x.com"), _m(), False),
        (_m(host="x.com"), _m(host="X.com"), True),
        (_m(host="x.com"), _m(host="y.com"), False),
        (_m(host="*.x.com"), _m(host="a.x.com"), True),
        (_m(host="*.x.com"), _m(host="a.b.x.com"), True),
        (_m(host="*.x.com"), _m(host="*.a.x.com"), True),
        (_m(host="*.x.com"), _m(host="*.x.com"), True),
        (_m(host="*.x.com"), _m(host="x.com"), False),
        (_m(host="*.a.x.com"), _m(host="*.x.com"), False),
        (_m(host="a.x.com"), _m(host="*.x.com"), False),
        (_m(host=["x.com", "y.com"]), _m(host="y.com"), True),
        (_m(host="x.com"), _m(host=["x.com", "z.com"]), False),
        # methods
        (_m(), _m(methods="GET"), True),
        (_m(methods=["GET", "POST"]), _m(methods="get"), True),
        (_m(methods="GET"), _m(methods=["GET", "POST"]), False),
        (_m(methods="GET"), _m(), False),
        # headers
        (_m(), _m(headers={"X-A": "1"}), True),
        (_m(headers={"X-A": "1"}), _m(headers={"x-a": "1"}), True),
        (_m(headers={"X-A": "1"}), _m(headers={"X-A": "1", "X-B": "2"}), True),
        (_m(headers={"X-A": "1"}), _m(headers={"X-A": "2"}), False),
        (_m(headers={"X-A": "1"}), _m(), False),
        (_m(headers={"X-A": {"present": True}}), _m(headers={"X-A": "1"}), False),
        (_m(headers={"X-A": {"regex": "a"}}), _m(headers={"X-A": {"regex": "a"}}), True),
        # all conditions together
        (
            _m(host="*.x.com", methods=["GET", "HEAD"], path_prefix="/a"),
            _m(host="b.x.com", methods="GET", path="/a/b", headers={"X-A": "1"}),
            True,
        ),
        (
            _m(host="*.x.com", methods=["GET", "HEAD"], path_prefix="/a"),
            _m(host="b.x.com", methods="GET", path="/b"),
            False,
        ),
    ],
    ids=_covers_id,
)
def test_covers(a: MatchSettings, b: MatchSettings, expected: bool) -> None:
    assert covers(a, b) is expected


def test_covers_is_reflexive_for_every_match_kind() -> None:
    for route in _settings(PROPERTY_ROUTES):
        assert covers(route.match, route.match), route.name


@pytest.mark.parametrize(
    ("prefix", "path", "expected"),
    [
        ("/", "/", True),
        ("/", "/anything/at/all", True),
        ("/api", "/api", True),
        ("/api", "/api/", True),
        ("/api", "/api/x", True),
        ("/api", "/apix", False),
        ("/api", "/ap", False),
        ("/api", "/", False),
        ("/api/v1", "/api/v1/x", True),
        ("/api/v1", "/api/v10", False),
    ],
)
def test_segment_covers(prefix: str, path: str, expected: bool) -> None:
    assert segment_covers(prefix, path) is expected
