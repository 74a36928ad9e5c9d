"""The collector's bounded memory: limits, eviction of whole traces, and its indexes."""

from __future__ import annotations

import itertools

import pytest

from meshgate.observability.model import LogRecord, Span
from meshgate.observability.otlp import PROTOBUF, decode_traces
from meshgate.observability.store import StoreLimits, TelemetryStore
from tests.observability.otel import MS, System, shop_trace

_ids = itertools.count(1)
T0 = 1_700_000_000 * 1_000_000_000


def make_span(
    trace: int,
    service: str = "users",
    *,
    start_ms: float = 0,
    ms: float = 10,
    parent: str = "",
    error: bool = False,
    size: int = 100,
    span_id: str | None = None,
) -> Span:
    start = T0 + int(start_ms * MS)
    return Span(
        trace_id=f"{trace:032x}",
        span_id=span_id or f"{next(_ids):016x}",
        parent_id=parent,
        name="op",
        kind="server",
        service=service,
        instance="",
        start_ns=start,
        end_ns=start + int(ms * MS),
        status="error" if error else "unset",
        size=size,
    )


def log(service: str, level: str, body: str, trace: int = 0, size: int = 100) -> LogRecord:
    return LogRecord(
        time_ns=T0 + next(_ids),
        service=service,
        instance="",
        level=level,
        severity_text="",
        body=body,
        attributes={},
        trace_id=f"{trace:032x}" if trace else "",
        size=size,
    )


def ids(summaries: list) -> list[int]:  # type: ignore[type-arg]
    return [int(s.trace_id, 16) for s in summaries]


def test_traces_are_listed_newest_first_and_filtered_by_every_index() -> None:
    store = TelemetryStore()
    store.add_spans([make_span(1, "users", ms=5)])
    store.add_spans([make_span(2, "orders", ms=300, error=True)])
    store.add_spans([make_span(3, "users", ms=250), make_span(3, "orders", start_ms=1, ms=20)])
    store.add_spans([make_span(4, "users", ms=50, error=True)])
    assert ids(store.find_traces()) == [4, 3, 2, 1]
    assert ids(store.find_traces(service="users")) == [4, 3, 1]
    assert ids(store.find_traces(errors=True)) == [4, 2]
    assert ids(store.find_traces(min_duration_ns=200 * MS)) == [3, 2]
    assert ids(store.find_traces(service="orders", min_duration_ns=200 * MS)) == [3, 2]
    assert ids(store.find_traces(service="users", errors=True, min_duration_ns=40 * MS)) == [4]
    assert ids(store.find_traces(limit=2)) == [4, 3]
    assert ids(store.find_traces(service="nobody")) == []
    assert ids(store.find_traces(since_ns=T0 + 1, until_ns=T0 + 10 * MS)) == []
    assert ids(store.find_traces(until_ns=T0)) == [4, 3, 2, 1]


def test_a_late_span_updates_the_trace_in_every_index() -> None:
    store = TelemetryStore()
    root = make_span(7, "gateway", ms=10)
    store.add_spans([root])
    assert ids(store.find_traces(min_duration_ns=100 * MS)) == []
    store.add_spans([make_span(7, "users", start_ms=5, ms=200, parent=root.span_id, error=True)])
    assert ids(store.find_traces(min_duration_ns=100 * MS)) == [7]
    assert ids(store.find_traces(service="users")) == [7]
    assert ids(store.find_traces(errors=True)) == [7]
    (summary,) = store.find_traces()
    assert (summary.root_service, summary.spans, summary.errors) == ("gateway", 2, 1)
    assert summary.duration_ns == 205 * MS
    assert summary.services == ("gateway", "users")


def test_whole_traces_leave_oldest_first_and_leave_no_index_behind() -> None:
    store = TelemetryStore(StoreLimits(max_traces=2))
    store.add_spans([make_span(1, "a", ms=500, error=True)])
    store.add_spans([make_span(2, "b")])
    store.add_spans([make_span(3, "b")])
    assert ids(store.find_traces()) == [3, 2]
    assert store.trace(f"{1:032x}") is None
    assert store.find_traces(errors=True) == []
    assert store.find_traces(service="a") == []
    assert store.find_traces(min_duration_ns=100 * MS) == []
    stats = store.stats()
    assert (stats["traces"], stats["spans"], stats["span_bytes"]) == (2, 2, 200)
    assert stats["services"] == ["b"]
    assert stats["dropped"]["traces_evicted"] == 1


@pytest.mark.parametrize(
    ("limits", "kept"),
    [
        (StoreLimits(max_spans=5), [3, 2]),  # 2 + 2 + 2 spans: the first trace goes
        (StoreLimits(max_span_bytes=450), [3, 2]),
        (StoreLimits(max_span_bytes=150), [3]),
    ],
)
def test_span_count_and_byte_limits_evict_whole_traces(
    limits: StoreLimits, kept: list[int]
) -> None:
    store = TelemetryStore(limits)
    for trace in (1, 2, 3):
        store.add_spans([make_span(trace, size=100), make_span(trace, start_ms=1, size=100)])
    assert ids(store.find_traces()) == kept
    for trace in kept:
        spans = store.trace(f"{trace:032x}")
        assert spans is not None
        assert len(spans) == 2


def test_duplicate_spans_and_spans_past_the_trace_limit_are_dropped_and_counted() -> None:
    store = TelemetryStore(StoreLimits(max_spans_per_trace=3))
    first = make_span(1)
    assert store.add_spans([first, first]) == 1
    assert store.add_spans([make_span(1, start_ms=i) for i in range(5)]) == 2
    dropped = store.stats()["dropped"]
    assert (dropped["spans_duplicate"], dropped["spans_over_trace_limit"]) == (1, 3)
    assert store.stats()["received"]["spans"] == 7


def test_version_grows_only_when_something_is_kept() -> None:
    store = TelemetryStore()
    span = make_span(1)
    store.add_spans([span])
    version = store.version
    store.add_spans([span])
    assert store.version == version
    store.add_logs([log("users", "info", "hi")])
    assert store.version == version + 1


def test_logs_filter_by_service_level_trace_and_text_newest_first() -> None:
    store = TelemetryStore()
    store.add_logs(
        [
            log("users", "debug", "cache miss", trace=1),
            log("users", "error", "database down", trace=1),
            log("orders", "warn", "slow query", trace=2),
            log("orders", "info", "started"),
        ]
    )
    bodies = lambda records: [r.body for r in records]  # noqa: E731
    assert bodies(store.logs()) == ["started", "slow query", "database down", "cache miss"]
    assert bodies(store.logs(service="users")) == ["database down", "cache miss"]
    assert bodies(store.logs(level="warn")) == ["slow query", "database down"]
    assert bodies(store.logs(trace_id=f"{1:032X}")) == ["database down", "cache miss"]
    assert bodies(store.logs(trace_id=f"{1:032x}", level="error")) == ["database down"]
    assert bodies(store.logs(text="QUERY")) == ["slow query"]
    assert bodies(store.logs(limit=1)) == ["started"]


def test_logs_leave_oldest_first_by_count_and_bytes_with_their_trace_index() -> None:
    store = TelemetryStore(StoreLimits(max_logs=3, max_log_bytes=1000))
    store.add_logs([log("a", "info", str(i), trace=1 + i % 2) for i in range(5)])
    assert [r.body for r in store.logs()] == ["4", "3", "2"]
    assert [r.body for r in store.logs(trace_id=f"{1:032x}")] == ["4", "2"]
    assert [r.body for r in store.logs(trace_id=f"{2:032x}")] == ["3"]
    store.add_logs([log("a", "info", "big", size=950)])
    assert [r.body for r in store.logs()] == ["big"]
    assert store.logs(trace_id=f"{1:032x}") == []
    assert store.stats()["dropped"]["logs_evicted"] == 5


def test_metric_series_keep_recent_points_and_refuse_new_series_past_the_limit() -> None:
    store = TelemetryStore(StoreLimits(max_series=2, points_per_series=2))
    point = ("requests", "sum", "1", "", "users", {"route": "/a"}, True)
    store.add_metric_points([(*point, t, float(t)) for t in (1, 2, 3)])
    store.add_metric_points([("requests", "sum", "1", "", "users", {"route": "/b"}, True, 1, 1.0)])
    assert store.add_metric_points([("other", "gauge", "", "", "orders", {}, False, 1, 1)]) == 0
    series = store.metric_series(service="users", name="req")
    assert [(s.attributes["route"], list(s.points)) for s in series] == [
        ("/a", [(2, 2.0), (3, 3.0)]),
        ("/b", [(1, 1.0)]),
    ]
    assert store.stats()["dropped"]["series_refused"] == 1
    assert store.services() == ["users"]


def test_sdk_traces_round_trip_through_the_store() -> None:
    system = System()
    try:
        slow = shop_trace(system, orders_ms=400, fail_users=True)
        fast = shop_trace(system, orders_ms=10)
        store = TelemetryStore()
        store.add_spans(decode_traces(system.trace_payload(), PROTOBUF))
    finally:
        system.close()
    assert [s.trace_id for s in store.find_traces()] == [fast, slow]
    assert [s.trace_id for s in store.find_traces(min_duration_ns=200 * MS)] == [slow]
    assert [s.trace_id for s in store.find_traces(errors=True)] == [slow]
    (summary,) = store.find_traces(service="users", errors=True)
    assert (summary.root_service, summary.root_name) == ("gateway", "GET /api/orders")
    assert summary.services == ("gateway", "orders", "users")


@pytest.mark.parametrize("field", ["max_spans", "max_logs", "points_per_series"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=f"StoreLimits.{field}=0: must be a positive integer"):
        StoreLimits(**{field: 0})
