"""Traces as trees, and RED numbers and the service map derived from real SDK spans."""

from __future__ import annotations

import pytest

from meshgate.observability.errors import QueryError
from meshgate.observability.model import Span
from meshgate.observability.otlp import PROTOBUF, decode_traces
from meshgate.observability.query import (
    parse_duration,
    parse_since,
    percentile,
    service_map,
    service_red,
    trace_edges,
    waterfall,
)
from meshgate.observability.store import TelemetryStore
from tests.observability.otel import MS, System, shop_trace
from tests.observability.test_store import T0, make_span


def decoded(system: System) -> list[Span]:
    return decode_traces(system.trace_payload(), PROTOBUF)


def test_a_trace_is_a_tree_in_start_order_with_offsets_and_self_times(system: System) -> None:
    shop_trace(system, T0, orders_ms=40)
    tree = waterfall(decoded(system))
    assert tree["span_count"] == 6
    assert tree["duration_ms"] == 50.0
    (root,) = tree["spans"]
    assert (root["name"], root["depth"], root["offset_ms"]) == ("GET /api/orders", 0, 0.0)
    (upstream,) = root["children"]
    (orders,) = upstream["children"]
    assert [c["name"] for c in orders["children"]] == ["SELECT orders", "GET users"]
    assert [c["offset_ms"] for c in orders["children"]] == [3.0, 24.0]
    assert orders["children"][1]["children"][0]["depth"] == 4
    # orders: 40 ms less 20 (SELECT) and 10 (GET users) covered by children, plus
    # its SELECT span's 20 ms and the client span's 10 - 5 ms.
    shares = {s["service"]: s["self_ms"] for s in tree["services"]}
    assert shares == {"orders": 35.0, "gateway": 10.0, "users": 5.0}
    assert tree["services"][0]["service"] == "orders"


def test_spans_whose_parent_never_came_and_parent_cycles_are_still_shown() -> None:
    a = make_span(1, span_id="a" * 16, parent="b" * 16, start_ms=5)
    b = make_span(1, span_id="b" * 16, parent="a" * 16, start_ms=1)
    orphan = make_span(1, span_id="c" * 16, parent="d" * 16)
    tree = waterfall([a, b, orphan])
    names = []

    def walk(nodes: list[dict]) -> None:  # type: ignore[type-arg]
        for n in nodes:
            names.append(n["span_id"])
            walk(n["children"])

    walk(tree["spans"])
    assert sorted(names) == ["a" * 16, "b" * 16, "c" * 16]
    assert tree["spans"][0]["span_id"] == "c" * 16


def test_edges_come_from_client_server_pairs_and_from_named_peers(system: System) -> None:
    shop_trace(system)
    edges = sorted((e.caller, e.callee, e.duration_ms) for e in trace_edges(decoded(system)))
    assert edges == [
        ("gateway", "orders", 48.0),  # timed by the gateway's client span
        ("orders", "postgresql", 20.0),  # db.system: the database sends no spans
        ("orders", "users", 10.0),  # one call, though both peer.service and a child say so
    ]


def test_a_parent_in_another_service_without_client_span_is_a_call() -> None:
    parent = make_span(1, "web", ms=30)
    child = make_span(1, "users", ms=12, parent=parent.span_id)
    assert [(e.caller, e.callee, e.duration_ms) for e in trace_edges([parent, child])] == [
        ("web", "users", 12.0)
    ]


def test_the_service_map_gives_rate_error_ratio_and_p99_per_edge(system: System) -> None:
    now = T0 + 60_000 * MS
    for i in range(9):
        shop_trace(system, T0 + i * 1000 * MS, orders_ms=10 + i)
    shop_trace(system, T0 + 9000 * MS, orders_ms=400, fail_users=True)
    store = TelemetryStore()
    store.add_spans(decoded(system))
    result = service_map(store.traces_since(T0), window_s=60, now_ns=now)
    edges = {(e["caller"], e["callee"]): e for e in result["edges"]}
    assert set(edges) == {("gateway", "orders"), ("orders", "users"), ("orders", "postgresql")}
    users = edges[("orders", "users")]
    assert (users["requests"], users["errors"], users["error_ratio"]) == (10, 1, 0.1)
    assert users["rate"] == round(10 / 60, 4)
    assert users["p99_ms"] == 100.0  # 400 / 4, the slowest call
    nodes = {n["service"]: n for n in result["nodes"]}
    assert nodes["postgresql"]["instrumented"] is False
    assert nodes["orders"]["instances"] == ["orders-1"]
    assert nodes["orders"]["requests"] == 10
    # Outside the window: nothing.
    later = service_map(store.traces_since(T0), window_s=10, now_ns=now + 120_000 * MS)
    assert later == {"window_s": 10, "nodes": [], "edges": []}


def test_red_per_service_counts_what_it_served_with_instances_and_series(system: System) -> None:
    for i in range(4):
        shop_trace(system, T0 + i * 10_000 * MS, orders_ms=20, instance=str(1 + i % 2))
    shop_trace(system, T0 + 35_000 * MS, orders_ms=200, fail_users=True, instance="1")
    now = T0 + 40_000 * MS
    traces = [decoded(system)]
    red = {e["service"]: e for e in service_red(traces, window_s=40, now_ns=now, step_s=10)}
    assert set(red) == {"gateway", "orders", "users"}
    orders = red["orders"]
    assert (orders["requests"], orders["errors"], orders["error_ratio"]) == (5, 1, 0.2)
    assert orders["rate"] == 0.125
    assert (orders["p50_ms"], orders["p99_ms"]) == (20.0, 200.0)
    assert [(i["instance"], i["requests"]) for i in orders["instances"]] == [
        ("orders-1", 3),
        ("orders-2", 2),
    ]
    assert [b["requests"] for b in orders["series"]] == [1, 1, 1, 2]
    assert [b["errors"] for b in orders["series"]] == [0, 0, 0, 1]
    only = service_red(traces, window_s=40, now_ns=now, service="users")
    assert [e["service"] for e in only] == ["users"]
    assert "series" not in only[0]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("200ms", 0.2), ("1.5s", 1.5), ("5m", 300.0), ("2h", 7200.0), ("3", 3.0), ("250us", 250e-6)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "fast", "-1s", "1 week", "ms"])
def test_bad_durations_name_the_parameter_and_the_form(text: str) -> None:
    with pytest.raises(QueryError, match=rf"slow={text!r}: write a duration such as 200ms"):
        parse_duration(text, "slow")


def test_since_takes_an_age_or_a_unix_time() -> None:
    assert parse_since("15m", now=10_000.0) == int(9_100 * 1e9)
    assert parse_since("1700000000.5") == 1_700_000_000_500_000_000
    with pytest.raises(QueryError, match="since='yesterday': write how long ago"):
        parse_since("yesterday")


def test_percentiles_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (
        50.0,
        99.0,
        100.0,
    )
    assert percentile([], 0.99) == 0.0
    assert percentile([7.0], 0.01) == 7.0
