"""Load balancers: which endpoint each one picks, from the candidates it is given."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import pytest

from meshgate.config import UpstreamSettings, loads
from meshgate.gateway.upstream import balancer as balancer_module
from meshgate.gateway.upstream.balancer import (
    BALANCERS,
    ConsistentHash,
    LeastRequest,
    RoundRobin,
    Sticky,
    WeightedRoundRobin,
    cookie_value,
    endpoint_id,
)
from meshgate.gateway.upstream.pool import Endpoint, Upstream

if TYPE_CHECKING:
    from meshgate.gateway.contract import FilterExchange as Exchange

Headers = Sequence[tuple[bytes, bytes]]


def _settings(balancer: str, extra: str = "") -> UpstreamSettings:
    """An upstream's settings validated as in production (the endpoints listed here
    do not matter: balancers are given their Endpoint objects)."""
    extra = f", {extra}" if extra else ""
    text = f"upstreams:\n  up: {{balancer: {balancer}, endpoints: ['127.0.0.1:1']{extra}}}\n"
    return loads(text).upstreams["up"]


def _endpoints(*weights: int) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"10.0.0.{i}", 8080, weight) for i, weight in enumerate(weights, 1))


def _exchange(
    endpoints: Sequence[Endpoint] = (),
    headers: Headers = (),
    *,
    peer_ip: str = "192.0.2.1",
    connection_headers: Headers | None = None,
) -> Exchange:
    """What a balancer reads of :class:`meshgate.gateway.contract.FilterExchange`.

    ``connection_headers`` are the headers the client connection holds: without
    pipelining the very list of this exchange (``on_headers_complete`` hands it
    over), with pipelining those of a later request parsed in the meantime.
    """
    own = list(headers)
    client = SimpleNamespace(
        peer_ip=peer_ip,
        headers=own if connection_headers is None else list(connection_headers),
    )
    route = SimpleNamespace(upstream=SimpleNamespace(endpoints=tuple(endpoints)))
    fake = SimpleNamespace(headers=own, client=client, route=route, set_cookie=b"")
    return cast("Exchange", fake)


@pytest.fixture
def seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The balancers' random draws from a fixed seed: statistics become exact."""
    monkeypatch.setattr(balancer_module, "random", random.Random(20240611).random)


def _script(monkeypatch: pytest.MonkeyPatch, draws: Iterable[float]) -> None:
    """The balancers' random draws, scripted; a draw past the script fails the test."""
    monkeypatch.setattr(balancer_module, "random", iter(draws).__next__)


def _counts(pick: Callable[[], Endpoint | None], times: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(times):
        endpoint = pick()
        assert endpoint is not None
        counts[endpoint.label] += 1
    return counts


@pytest.mark.parametrize("name", ["least_request", "round_robin", "weighted_round_robin"])
def test_registry_builds_each_balancer(name: str) -> None:
    endpoints = _endpoints(1, 1)
    balancer = BALANCERS[name](_settings(name), endpoints)
    assert balancer.pick(_exchange(endpoints), endpoints) in endpoints
    assert balancer.pick(_exchange(endpoints), ()) is None


def test_registry_names() -> None:
    expected = {
        "least_request": LeastRequest,
        "round_robin": RoundRobin,
        "weighted_round_robin": WeightedRoundRobin,
        "hash": ConsistentHash,
        "sticky": Sticky,
    }
    assert expected == BALANCERS


# ---------------------------------------------------------------------------- least request


def test_least_request_without_candidates_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    _script(monkeypatch, [])
    endpoints = _endpoints(1, 1)
    assert LeastRequest(_settings("least_request"), endpoints).pick(_exchange(), ()) is None


def test_least_request_single_candidate_is_returned_without_a_draw(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _script(monkeypatch, [])
    a, b = _endpoints(1, 1)
    a.inflight = 100
    balancer = LeastRequest(_settings("least_request"), (a, b))
    assert balancer.pick(_exchange(), (a,)) is a


@pytest.mark.parametrize(
    ("draws", "busy", "expected"),
    [
        # Two distinct candidates are compared: the second draw skips the first.
        ((0.0, 0.0), 0, 1),  # a vs b, a busy -> b
        ((0.0, 0.0), 1, 0),  # a vs b, b busy -> a
        ((0.0, 0.0), 2, 0),  # a vs b, c is not compared; equal cost -> the first drawn
        ((0.99, 0.99), 2, 1),  # c vs b, c busy -> b
        ((0.5, 0.0), 1, 0),  # b vs a, b busy -> a
        ((0.5, 0.6), 1, 2),  # b vs c, b busy -> c
    ],
)
def test_least_request_compares_two_random_candidates(
    monkeypatch: pytest.MonkeyPatch, draws: tuple[float, float], busy: int, expected: int
) -> None:
    _script(monkeypatch, draws)
    endpoints = _endpoints(1, 1, 1)
    endpoints[busy].inflight = 3
    balancer = LeastRequest(_settings("least_request"), endpoints)
    assert balancer.pick(_exchange(), endpoints) is endpoints[expected]


@pytest.mark.usefixtures("seeded")
def test_least_request_picks_only_among_candidates() -> None:
    a, b, c, d = endpoints = _endpoints(1, 1, 1, 1)
    d.ejected_until = 50.0
    d.refresh()
    candidates = tuple(e for e in endpoints if e.available)
    assert candidates == (a, b, c)
    balancer = LeastRequest(_settings("least_request"), endpoints)
    counts = _counts(lambda: balancer.pick(_exchange(), candidates), 3000)
    assert set(counts) == {a.label, b.label, c.label}
    assert all(900 <= n <= 1100 for n in counts.values()), counts


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize(
    ("inflight", "ewma"),
    [
        ((0, 0, 5), (0.01, 0.01, 0.01)),  # c busy
        ((0, 0, 0), (0.01, 0.01, 0.2)),  # c slow
        ((2, 2, 0), (0.01, 0.01, 0.2)),  # c slow: 0.2 x 1 beats neither 0.01 x 3
    ],
)
def test_least_request_steers_away_from_a_busy_or_slow_endpoint(
    inflight: tuple[int, int, int], ewma: tuple[float, float, float]
) -> None:
    endpoints = _endpoints(1, 1, 1)
    for endpoint, count, latency in zip(endpoints, inflight, ewma, strict=True):
        endpoint.inflight = count
        endpoint.ewma = latency
    a, b, c = endpoints
    balancer = LeastRequest(_settings("least_request"), endpoints)
    counts = _counts(lambda: balancer.pick(_exchange(), endpoints), 3000)
    # c loses every comparison it is drawn into; a and b share the traffic.
    assert counts[c.label] == 0
    assert 1400 <= counts[a.label] <= 1600, counts
    assert 1400 <= counts[b.label] <= 1600, counts


@pytest.mark.usefixtures("seeded")
def test_least_request_graded_load_gives_graded_traffic() -> None:
    endpoints = _endpoints(1, 1, 1)
    a, b, c = endpoints
    a.inflight, b.inflight, c.inflight = 0, 1, 3
    balancer = LeastRequest(_settings("least_request"), endpoints)
    counts = _counts(lambda: balancer.pick(_exchange(), endpoints), 3000)
    # a wins whenever drawn (2/3 of picks), b only against c (1/3), c never.
    assert 1900 <= counts[a.label] <= 2100, counts
    assert 900 <= counts[b.label] <= 1100, counts
    assert counts[c.label] == 0


@pytest.mark.usefixtures("seeded")
def test_least_request_weights_bias_selection() -> None:
    endpoints = _endpoints(3, 1, 1)
    heavy, light1, light2 = endpoints
    balancer = LeastRequest(_settings("least_request"), endpoints)
    counts = _counts(lambda: balancer.pick(_exchange(), endpoints), 3000)
    # At equal load the weight-3 endpoint wins every comparison it is in.
    assert 1900 <= counts[heavy.label] <= 2100, counts
    assert 400 <= counts[light1.label] <= 600, counts
    assert 400 <= counts[light2.label] <= 600, counts


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize(
    ("heavy_inflight", "winner"),
    [
        (0, "heavy"),
        (1, "heavy"),  # cost 2/3 < 1
        (3, "light"),  # cost 4/3 > 1
        (10, "light"),
    ],
)
def test_least_request_weight_divides_the_cost(heavy_inflight: int, winner: str) -> None:
    heavy, light = endpoints = _endpoints(3, 1)
    heavy.inflight = heavy_inflight
    balancer = LeastRequest(_settings("least_request"), endpoints)
    expected = heavy if winner == "heavy" else light
    picks = {balancer.pick(_exchange(), endpoints) for _ in range(50)}
    assert picks == {expected}


# ---------------------------------------------------------------------------- round robin


def test_round_robin_cycles_in_order() -> None:
    a, b, c = endpoints = _endpoints(1, 1, 1)
    balancer = RoundRobin(_settings("round_robin"), endpoints)
    picks = [balancer.pick(_exchange(), endpoints) for _ in range(7)]
    assert picks == [a, b, c, a, b, c, a]


def test_round_robin_adapts_when_candidates_shrink_and_grow() -> None:
    a, b, c = endpoints = _endpoints(1, 1, 1)
    balancer = RoundRobin(_settings("round_robin"), endpoints)
    assert [balancer.pick(_exchange(), endpoints) for _ in range(2)] == [a, b]
    shrunk = (a, c)
    assert [balancer.pick(_exchange(), shrunk) for _ in range(4)] == [a, c, a, c]
    assert [balancer.pick(_exchange(), endpoints) for _ in range(3)] == [c, a, b]


def test_round_robin_single_and_no_candidate() -> None:
    a, b = endpoints = _endpoints(1, 1)
    balancer = RoundRobin(_settings("round_robin"), endpoints)
    assert [balancer.pick(_exchange(), (b,)) for _ in range(3)] == [b, b, b]
    assert balancer.pick(_exchange(), ()) is None
    assert balancer.pick(_exchange(), endpoints) in (a, b)


# ---------------------------------------------------------------------------- weighted round robin


def test_weighted_round_robin_is_nginx_smooth_sequence() -> None:
    endpoints = _endpoints(5, 1, 1)
    names = dict(zip(endpoints, "abc", strict=True))
    balancer = WeightedRoundRobin(_settings("weighted_round_robin"), endpoints)
    picks = [balancer.pick(_exchange(), endpoints) for _ in range(14)]
    sequence = "".join(names[e] for e in picks if e is not None)
    assert sequence == "aabacaa" * 2


def test_weighted_round_robin_has_no_long_bursts() -> None:
    endpoints = _endpoints(5, 1, 1)
    a = endpoints[0]
    balancer = WeightedRoundRobin(_settings("weighted_round_robin"), endpoints)
    picks = [balancer.pick(_exchange(), endpoints) for _ in range(70)]
    longest = max(len(list(run)) for endpoint, run in itertools.groupby(picks) if endpoint is a)
    # ...a a | a a b...: the end of one cycle and the start of the next.
    assert longest == 4


@pytest.mark.parametrize(
    "weights",
    [(1, 1, 1), (2, 1), (5, 1, 1), (3, 2, 1, 4), (7,), (1, 10)],
)
def test_weighted_round_robin_exact_shares(weights: tuple[int, ...]) -> None:
    endpoints = _endpoints(*weights)
    balancer = WeightedRoundRobin(_settings("weighted_round_robin"), endpoints)
    counts = _counts(lambda: balancer.pick(_exchange(), endpoints), sum(weights) * 10)
    assert counts == {e.label: e.weight * 10 for e in endpoints}


def test_weighted_round_robin_over_fewer_candidates() -> None:
    a, b, c = endpoints = _endpoints(5, 1, 1)
    balancer = WeightedRoundRobin(_settings("weighted_round_robin"), endpoints)
    counts = _counts(lambda: balancer.pick(_exchange(), (a, b)), 60)
    assert counts == {a.label: 50, b.label: 10}
    assert c.label not in counts
    assert balancer.pick(_exchange(), ()) is None


# ---------------------------------------------------------------------------- consistent hash

_KEYS = [f"user-{i}".encode() for i in range(3000)]


def _hash_balancer(
    endpoints: Sequence[Endpoint], hashing: str = "{header: X-User}"
) -> ConsistentHash:
    return ConsistentHash(_settings("hash", f"hash: {hashing}"), endpoints)


def _by_user(
    balancer: ConsistentHash, endpoints: Sequence[Endpoint], candidates: Sequence[Endpoint]
) -> dict[bytes, str]:
    """The endpoint label each key of :data:`_KEYS` goes to."""
    placed = {}
    for key in _KEYS:
        endpoint = balancer.pick(_exchange(endpoints, [(b"X-User", key)]), candidates)
        assert endpoint is not None
        placed[key] = endpoint.label
    return placed


def test_hash_same_key_same_endpoint() -> None:
    endpoints = _endpoints(1, 1, 1)
    balancer = _hash_balancer(endpoints)
    # Another worker: its own balancer and Endpoint objects for the same addresses.
    again = _endpoints(1, 1, 1)
    other = _hash_balancer(again)
    for key in (b"alice", b"bob", b"carol"):
        picks = {
            balancer.pick(_exchange(endpoints, [(b"X-User", key)]), endpoints) for _ in range(20)
        }
        assert len(picks) == 1
        (endpoint,) = picks
        assert endpoint is not None
        elsewhere = other.pick(_exchange(again, [(b"X-User", key)]), again)
        assert elsewhere is not None
        assert elsewhere.label == endpoint.label


def test_hash_spreads_keys_over_endpoints() -> None:
    endpoints = _endpoints(1, 1, 1)
    counts = Counter(_by_user(_hash_balancer(endpoints), endpoints, endpoints).values())
    assert set(counts) == {e.label for e in endpoints}
    # Each between 20 % and 47 % of the 3000 keys.
    assert all(600 <= n <= 1410 for n in counts.values()), counts


def test_hash_weight_gives_more_keys() -> None:
    endpoints = _endpoints(3, 1)
    heavy, light = endpoints
    counts = Counter(_by_user(_hash_balancer(endpoints), endpoints, endpoints).values())
    assert counts[heavy.label] + counts[light.label] == 3000
    assert counts[heavy.label] >= 2 * counts[light.label], counts


def test_hash_removed_endpoint_moves_only_its_keys() -> None:
    a, b, c = endpoints = _endpoints(1, 1, 1)
    balancer = _hash_balancer(endpoints)
    before = _by_user(balancer, endpoints, endpoints)
    after = _by_user(balancer, endpoints, (a, c))
    moved = {key for key in _KEYS if before[key] != after[key]}
    assert moved == {key for key in _KEYS if before[key] == b.label}
    assert b.label not in after.values()
    # b's keys are spread over both survivors, not dumped on one.
    assert {after[key] for key in moved} == {a.label, c.label}


def test_hash_added_endpoint_takes_about_a_quarter_from_the_others() -> None:
    four = _endpoints(1, 1, 1, 1)
    three = four[:3]
    before = _by_user(_hash_balancer(three), three, three)
    after = _by_user(_hash_balancer(four), four, four)
    moved = [key for key in _KEYS if before[key] != after[key]]
    assert 450 <= len(moved) <= 1050, len(moved)  # 15 % to 35 %
    # Keys only move to the new endpoint, never between two old ones.
    assert {after[key] for key in moved} == {four[3].label}


@pytest.mark.parametrize(
    ("hashing", "headers", "peer_ip", "expected"),
    [
        ("{header: X-User}", [(b"X-User", b"alice")], "", b"alice"),
        ("{header: X-User}", [(b"x-user", b"alice")], "", b"alice"),
        ("{header: x-user}", [(b"Host", b"h"), (b"X-USER", b"alice")], "", b"alice"),
        ("{header: X-User}", [(b"X-User", b"alice"), (b"X-User", b"bob")], "", b"alice"),
        ("{header: X-User}", [(b"X-Users", b"alice")], "", None),
        ("{header: X-User}", [], "198.51.100.7", None),
        ("{cookie: session}", [(b"Cookie", b"a=1; session=xyz; b=2")], "", b"xyz"),
        ("{cookie: session}", [(b"Cookie", b"a=1"), (b"Cookie", b"session=xyz")], "", b"xyz"),
        ("{cookie: session}", [(b"Cookie", b"a=1; b=2")], "", None),
        ("{cookie: session}", [(b"X-User", b"session=xyz")], "", None),
        ("{client_ip: true}", [], "198.51.100.7", b"198.51.100.7"),
        ("{client_ip: true}", [(b"X-User", b"alice")], "2001:db8::1", b"2001:db8::1"),
    ],
)
def test_hash_key(hashing: str, headers: Headers, peer_ip: str, expected: bytes | None) -> None:
    endpoints = _endpoints(1, 1, 1)
    balancer = _hash_balancer(endpoints, hashing)
    assert balancer.key(_exchange(endpoints, headers, peer_ip=peer_ip)) == expected


@pytest.mark.parametrize(
    ("hashing", "one", "other"),
    [
        ("{header: X-User}", {"headers": [(b"X-User", b"u1")]}, {"headers": [(b"X-User", b"u1")]}),
        (
            "{cookie: session}",
            {"headers": [(b"Cookie", b"session=s1; theme=dark")]},
            {"headers": [(b"cookie", b'lang=en; session="s1"')]},
        ),
        ("{client_ip: true}", {"peer_ip": "203.0.113.9"}, {"peer_ip": "203.0.113.9"}),
    ],
)
def test_hash_equal_keys_go_to_the_same_endpoint(
    hashing: str, one: dict[str, object], other: dict[str, object]
) -> None:
    endpoints = _endpoints(1, 1, 1)
    balancer = _hash_balancer(endpoints, hashing)
    first = balancer.pick(_exchange(endpoints, **one), endpoints)  # type: ignore[arg-type]
    second = balancer.pick(_exchange(endpoints, **other), endpoints)  # type: ignore[arg-type]
    assert first is not None
    assert first is second


def test_hash_client_ip_spreads_clients() -> None:
    endpoints = _endpoints(1, 1, 1)
    balancer = _hash_balancer(endpoints, "{client_ip: true}")
    counts: Counter[str] = Counter()
    for ip in range(3000):
        ex = _exchange(endpoints, peer_ip=f"10.1.{ip >> 8}.{ip & 255}")
        endpoint = balancer.pick(ex, endpoints)
        assert endpoint is not None
        counts[endpoint.label] += 1
    assert set(counts) == {e.label for e in endpoints}
    assert all(600 <= n <= 1410 for n in counts.values()), counts


def test_hash_without_key_goes_by_least_request(monkeypatch: pytest.MonkeyPatch) -> None:
    _script(monkeypatch, [0.0, 0.0] * 10)
    a, b, _c = endpoints = _endpoints(1, 1, 1)
    a.inflight = 4
    balancer = _hash_balancer(endpoints)
    # Scripted draws compare a with b; a is busy, so b.
    picks = [balancer.pick(_exchange(endpoints, [(b"Host", b"h")]), endpoints) for _ in range(10)]
    assert picks == [b] * 10


def test_hash_without_candidates_is_none() -> None:
    endpoints = _endpoints(1, 1)
    balancer = _hash_balancer(endpoints)
    assert balancer.pick(_exchange(endpoints, [(b"X-User", b"alice")]), ()) is None


@pytest.mark.parametrize(
    ("hashing", "name", "prefix"),
    [("{header: X-User}", b"X-User", b""), ("{cookie: session}", b"Cookie", b"session=")],
)
def test_hash_key_is_the_exchanges_own_with_pipelining(
    hashing: str, name: bytes, prefix: bytes
) -> None:
    """A pipelined request is picked for when the one before it is done, by which
    time the connection has parsed the next request: the key must come from the
    exchange's own headers, not the connection's latest."""
    endpoints = _endpoints(1, 1, 1)
    balancer = _hash_balancer(endpoints, hashing)
    own = prefix + b"alice"
    alone = balancer.pick(_exchange(endpoints, [(name, own)]), endpoints)
    # A second user who lives on another endpoint than alice.
    next_request = next(
        prefix + user
        for user in (b"user%d" % i for i in range(100))
        if balancer.pick(_exchange(endpoints, [(name, prefix + user)]), endpoints) is not alone
    )

    pipelined = _exchange(endpoints, [(name, own)], connection_headers=[(name, next_request)])
    assert balancer.key(pipelined) == own.rpartition(b"=")[2]
    assert balancer.pick(pipelined, endpoints) is alone


# ---------------------------------------------------------------------------- sticky


def _sticky(endpoints: Sequence[Endpoint], sticky: str | None = "{cookie: srv}") -> Sticky:
    return Sticky(_settings("sticky", f"sticky: {sticky}" if sticky else ""), endpoints)


def _cookie_line(name: str, endpoint: Endpoint, extra: str = "") -> bytes:
    return (
        f"Set-Cookie: {name}={endpoint_id(endpoint.label)}; Path=/; HttpOnly; SameSite=Lax"
        f"{extra}\r\n"
    ).encode()


def test_endpoint_id_is_short_stable_and_distinct() -> None:
    # A cookie set before a restart must still name the same endpoint after it.
    assert endpoint_id("10.0.0.1:8080") == "453469963a46"
    labels = [f"10.0.{i >> 8}.{i & 255}:8080" for i in range(1000)]
    ids = {endpoint_id(label) for label in labels}
    assert len(ids) == 1000
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in ids)


@pytest.mark.parametrize(
    ("sticky", "name", "extra"),
    [
        ("{cookie: srv}", "srv", ""),
        (None, "meshgate_sticky", ""),
        ("{cookie: srv, max_age: 1h}", "srv", "; Max-Age=3600"),
        ("{cookie: srv, max_age: 90}", "srv", "; Max-Age=90"),
    ],
)
def test_sticky_without_cookie_picks_and_sets_one(
    sticky: str | None, name: str, extra: str
) -> None:
    endpoints = _endpoints(1, 1, 1)
    balancer = _sticky(endpoints, sticky)
    ex = _exchange(endpoints, [(b"Cookie", b"theme=dark")])
    endpoint = balancer.pick(ex, endpoints)
    assert endpoint in endpoints
    assert endpoint is not None
    assert ex.set_cookie == _cookie_line(name, endpoint, extra)
    assert ex.set_cookie.endswith(b"\r\n")


def test_sticky_set_cookie_line_is_exact() -> None:
    (endpoint,) = _endpoints(1)
    balancer = _sticky((endpoint,), "{cookie: srv, max_age: 30m}")
    ex = _exchange((endpoint,))
    assert balancer.pick(ex, (endpoint,)) is endpoint
    assert ex.set_cookie == (
        b"Set-Cookie: srv=453469963a46; Path=/; HttpOnly; SameSite=Lax; Max-Age=1800\r\n"
    )


@pytest.mark.parametrize("index", [0, 1, 2])
def test_sticky_cookie_of_available_endpoint_keeps_it(index: int) -> None:
    endpoints = _endpoints(1, 1, 1)
    target = endpoints[index]
    balancer = _sticky(endpoints)
    cookie = b"theme=dark; srv=" + endpoint_id(target.label).encode()
    for _ in range(20):
        ex = _exchange(endpoints, [(b"Cookie", cookie)])
        assert balancer.pick(ex, endpoints) is target
        assert ex.set_cookie == b""


def test_sticky_cookie_of_unavailable_endpoint_moves_and_resets_cookie() -> None:
    a, b, c = endpoints = _endpoints(1, 1, 1)
    balancer = _sticky(endpoints)
    ex = _exchange(endpoints, [(b"Cookie", b"srv=" + endpoint_id(b.label).encode())])
    endpoint = balancer.pick(ex, (a, c))
    assert endpoint in (a, c)
    assert endpoint is not None
    assert ex.set_cookie == _cookie_line("srv", endpoint)


@pytest.mark.parametrize("value", [b"", b"garbage", b"453469963a4", b"453469963A46"])
def test_sticky_unknown_cookie_value_picks_and_sets_one(value: bytes) -> None:
    endpoints = _endpoints(1, 1, 1)
    balancer = _sticky(endpoints)
    ex = _exchange(endpoints, [(b"Cookie", b"srv=" + value)])
    endpoint = balancer.pick(ex, endpoints)
    assert endpoint is not None
    assert ex.set_cookie == _cookie_line("srv", endpoint)


def test_sticky_other_cookie_name_is_ignored() -> None:
    _a, b = endpoints = _endpoints(1, 1)
    balancer = _sticky(endpoints)
    ex = _exchange(endpoints, [(b"Cookie", b"meshgate_sticky=" + endpoint_id(b.label).encode())])
    endpoint = balancer.pick(ex, endpoints)
    assert endpoint is not None
    assert ex.set_cookie == _cookie_line("srv", endpoint)


def test_sticky_ids_are_stable_across_balancers() -> None:
    first = _endpoints(1, 1, 1)
    ex = _exchange(first)
    chosen = _sticky(first).pick(ex, first)
    assert chosen is not None
    assert ex.set_cookie is not None
    # The browser sends back what the first worker set; another worker (its own
    # balancer and Endpoint objects) honours it.
    value = ex.set_cookie.split(b"=", 1)[1].split(b";", 1)[0]
    second = _endpoints(1, 1, 1)
    again = _exchange(second, [(b"Cookie", b"srv=" + value)])
    picked = _sticky(second).pick(again, second)
    assert picked is not None
    assert picked.label == chosen.label
    assert again.set_cookie == b""


def test_sticky_without_candidates_is_none() -> None:
    endpoints = _endpoints(1, 1)
    ex = _exchange(endpoints, [(b"Cookie", b"srv=" + endpoint_id(endpoints[0].label).encode())])
    assert _sticky(endpoints).pick(ex, ()) is None
    assert ex.set_cookie == b""


def test_sticky_cookie_is_the_exchanges_own_with_pipelining() -> None:
    """The cookie that decides is the one this request carried, not that of a later
    pipelined request the connection has parsed since."""
    endpoints = _endpoints(1, 1, 1)
    b = endpoints[1]
    balancer = _sticky(endpoints)
    own = [(b"Cookie", b"srv=" + endpoint_id(b.label).encode())]
    ex = _exchange(endpoints, own, connection_headers=[(b"Accept", b"*/*")])
    assert balancer.pick(ex, endpoints) is b
    assert ex.set_cookie == b""


# ---------------------------------------------------------------------------- cookie_value


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"Cookie", b"a=1; session=xyz; b=2")], b"xyz"),
        ([(b"Cookie", b"session=xyz")], b"xyz"),
        ([(b"cookie", b"session=xyz")], b"xyz"),
        ([(b"COOKIE", b"session=xyz")], b"xyz"),
        ([(b"Cookie", b'session="xyz"')], b"xyz"),
        ([(b"Cookie", b'a=1; session="x y"; b=2')], b"x y"),
        ([(b"Cookie", b"  a=1 ;   session=xyz  ; b=2 ")], b"xyz"),
        ([(b"Cookie", b"a=1;session=xyz;b=2")], b"xyz"),
        ([(b"Cookie", b"a=1;\tsession=xyz")], b"xyz"),
        ([(b"Cookie", b"session=a=b")], b"a=b"),
        ([(b"Cookie", b"a=1"), (b"Host", b"h"), (b"Cookie", b"session=xyz")], b"xyz"),
        ([(b"Cookie", b"session=first"), (b"Cookie", b"session=second")], b"first"),
        ([(b"Cookie", b"session=first; session=second")], b"first"),
        ([(b"Cookie", b"xsession=1; session_id=2; session=3")], b"3"),
        ([(b"Cookie", b"a=1; b=2")], None),
        ([(b"Cookie", b"Session=xyz")], None),
        ([(b"Cookie", b"session_id=xyz")], None),
        ([(b"Cookie", b"session; a=1")], None),
        ([(b"Cookie", b"")], None),
        ([(b"Set-Cookie", b"session=xyz")], None),
        ([(b"X-Cookie", b"session=xyz")], None),
        ([(b"Host", b"example.com")], None),
        ([], None),
    ],
)
def test_cookie_value(headers: Headers, expected: bytes | None) -> None:
    assert cookie_value(headers, b"session") == expected


# ------------------------------------------------------------------- failures and staleness


@pytest.mark.usefixtures("seeded")
def test_failures_steer_least_request_only_without_passive_health() -> None:
    endpoints = _endpoints(1, 1, 1)
    c = endpoints[2]
    for endpoint in endpoints:
        endpoint.ewma = 0.01
    c.failures = 2
    # Without outlier detection, failures are the only defence: c is avoided.
    plain = LeastRequest(_settings("least_request", "health: {passive: null}"), endpoints)
    assert _counts(lambda: plain.pick(_exchange(), endpoints), 3000)[c.label] == 0
    # With it, c keeps its share, so that its failures add up to an ejection
    # (steering away would keep a dead endpoint "available" for ever).
    detected = LeastRequest(_settings("least_request"), endpoints)
    counts = _counts(lambda: detected.pick(_exchange(), endpoints), 3000)
    assert 850 <= counts[c.label] <= 1150, counts


def test_stale_latency_is_refreshed_from_the_best_peer() -> None:
    upstream = Upstream("up", _settings("least_request"), _endpoints(1, 1, 1))
    a, b, c = upstream.endpoints
    a.ewma, b.ewma, c.ewma = 0.0002, 0.0003, 0.015  # c answered one slow request
    upstream.tick(100.0, 0.1)
    # a and b keep being measured; c, avoided, is not.
    for step in range(1, 12):
        a.ewma = 0.0002 + step * 1e-7
        b.ewma = 0.0003 + step * 1e-7
        upstream.tick(100.0 + step * 0.1, 0.1)
    assert c.ewma == pytest.approx(a.ewma)
    assert a.ewma == pytest.approx(0.0002 + 11e-7)  # measured ones are left alone
    # Once refreshed, c competes: least request gives it a share again.
    balancer = LeastRequest(_settings("least_request"), upstream.endpoints)
    counts = _counts(lambda: balancer.pick(_exchange(), upstream.endpoints), 300)
    assert counts[c.label] > 50, counts


def test_latency_is_not_refreshed_while_it_is_measured_or_all_idle() -> None:
    upstream = Upstream("up", _settings("least_request"), _endpoints(1, 1))
    a, b = upstream.endpoints
    a.ewma, b.ewma = 0.001, 0.02
    for step in range(30):
        b.ewma = 0.02 + step * 1e-6  # b is slow, and measured as such
        upstream.tick(200.0 + step * 0.1, 0.1)
    assert b.ewma == pytest.approx(0.02 + 29e-6)
    # Nothing measured at all (an idle upstream): nothing to compare with.
    for step in range(30):
        upstream.tick(300.0 + step * 0.1, 0.1)
    assert (a.ewma, b.ewma) == (0.001, pytest.approx(0.02 + 29e-6))
