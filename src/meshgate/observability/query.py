"""What is asked of the collector: traces as trees, and aggregates derived from spans.

- :func:`waterfall`: one trace as a tree of spans with offsets from its start;
- :func:`service_red`: per service, the rate, errors and p50/p99 duration of the
  requests it served (its server and consumer spans, and root spans), overall and
  as a time series for charts;
- :func:`service_map`: the calls between services, caller -> callee, each with
  rate, error ratio and p99, from client/server span pairs, parent-child links
  across services, and client spans naming a callee that sent no spans
  (``peer.service``, ``server.address``, ``db.system``);
- :func:`parse_duration` and :func:`parse_since` read the query parameters.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from meshgate.observability.errors import QueryError
from meshgate.observability.model import Span

__all__ = [
    "Edge",
    "parse_duration",
    "parse_since",
    "percentile",
    "service_map",
    "service_red",
    "waterfall",
]

_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h|d)?\s*")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    None: 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_ENTRY_KINDS = frozenset({"server", "consumer"})
_CALL_KINDS = frozenset({"client", "producer"})
_PEER_KEYS = ("peer.service", "server.address", "net.peer.name", "db.system", "messaging.system")


def parse_duration(value: str, parameter: str = "duration") -> float:
    """Seconds in ``value``: ``200ms``, ``1.5s``, ``5m``, ``2h``, or a bare number of seconds.

    Raises:
        QueryError: anything else, naming ``parameter``.
    """
    match = _DURATION_RE.fullmatch(value)
    if match is None:
        raise QueryError(parameter, value, "write a duration such as 200ms, 1.5s, 5m or 1h")
    return float(match[1]) * _UNITS[match[2]]


def parse_since(value: str, parameter: str = "since", now: float | None = None) -> int:
    """Unix nanoseconds for ``value``: a duration ago (``15m``) or unix seconds
    (``1717171717.5``, which is any number above 10^9).

    Raises:
        QueryError: anything else, naming ``parameter``.
    """
    now = time.time() if now is None else now
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None and number > 1e9:
        return int(number * 1e9)
    try:
        ago = parse_duration(value, parameter)
    except QueryError:
        raise QueryError(
            parameter, value, "write how long ago (15m, 2h) or a unix time in seconds"
        ) from None
    return int((now - ago) * 1e9)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(math.ceil(q * len(ordered)), 1)
    return ordered[rank - 1]


def waterfall(spans: list[Span]) -> dict[str, Any]:
    """One trace as a tree: the trace's summary fields and ``spans``, the roots (spans
    without a parent, or whose parent was not received) each with ``children``,
    siblings in start order. Each node has ``offset_ms`` from the trace's start and
    ``depth``; ``services`` gives every service's share of the trace."""
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[Span]] = defaultdict(list)
    roots: list[Span] = []
    for span in spans:
        if span.parent_id and span.parent_id in by_id and span.parent_id != span.span_id:
            children[span.parent_id].append(span)
        else:
            roots.append(span)
    seen: set[str] = set()

    def node(span: Span, depth: int) -> dict[str, Any]:
        seen.add(span.span_id)
        out = span.to_json()
        out["offset_ms"] = round((span.start_ns - start) / 1e6, 3)
        out["depth"] = depth
        kids = sorted(children.get(span.span_id, ()), key=lambda s: (s.start_ns, s.span_id))
        # A parent cycle (bad data) must not recurse forever.
        out["children"] = [node(k, depth + 1) for k in kids if k.span_id not in seen]
        return out

    tree = [node(r, 0) for r in sorted(roots, key=lambda s: (s.start_ns, s.span_id))]
    # Spans only reachable through a cycle are shown as roots rather than lost.
    tree.extend(node(s, 0) for s in spans if s.span_id not in seen)
    duration = max(end - start, 0)
    return {
        "trace_id": spans[0].trace_id,
        "start_ns": start,
        "duration_ms": round(duration / 1e6, 3),
        "span_count": len(spans),
        "services": _self_times(spans, by_id, children, duration),
        "error": any(s.error for s in spans),
        "spans": tree,
    }


def _self_times(
    spans: list[Span],
    by_id: dict[str, Span],
    children: dict[str, list[Span]],
    duration_ns: int,
) -> list[dict[str, Any]]:
    """Each service's self time in the trace (its spans' time not covered by their
    children), largest first: where the time went."""
    totals: dict[str, int] = defaultdict(int)
    for span in spans:
        covered = _covered(span, children.get(span.span_id, ()))
        totals[span.service] += max(span.duration_ns - covered, 0)
    total = sum(totals.values()) or 1
    return [
        {
            "service": service,
            "self_ms": round(ns / 1e6, 3),
            "share": round(ns / total, 4),
        }
        for service, ns in sorted(totals.items(), key=lambda kv: -kv[1])
    ]


def _covered(span: Span, kids: Iterable[Span]) -> int:
    """Nanoseconds of ``span`` during which at least one child ran (clipped to it)."""
    intervals = sorted(
        (max(k.start_ns, span.start_ns), min(k.end_ns, span.end_ns))
        for k in kids
        if k.end_ns > span.start_ns and k.start_ns < span.end_ns
    )
    covered = 0
    current_start = current_end = None
    for begin, finish in intervals:
        if current_end is None or begin > current_end:
            if current_end is not None and current_start is not None:
                covered += current_end - current_start
            current_start, current_end = begin, finish
        else:
            current_end = max(current_end, finish)
    if current_end is not None and current_start is not None:
        covered += current_end - current_start
    return covered


@dataclass(slots=True)
class _Samples:
    count: int = 0
    errors: int = 0
    durations: list[float] = field(default_factory=list)

    def add(self, duration_ms: float, error: bool) -> None:
        self.count += 1
        self.errors += error
        self.durations.append(duration_ms)

    def summary(self, window_s: float) -> dict[str, Any]:
        return {
            "requests": self.count,
            "errors": self.errors,
            "rate": round(self.count / window_s, 4),
            "error_ratio": round(self.errors / self.count, 4) if self.count else 0.0,
            "p50_ms": round(percentile(self.durations, 0.50), 3),
            "p99_ms": round(percentile(self.durations, 0.99), 3),
        }


def _is_entry(span: Span, by_id: dict[str, Span]) -> bool:
    """Whether ``span`` is a request its service served: a server or consumer span,
    or a span whose parent is in another service or was not received."""
    if span.kind in _ENTRY_KINDS:
        return True
    parent = by_id.get(span.parent_id) if span.parent_id else None
    return parent is None or parent.service != span.service


def service_red(
    traces: list[list[Span]],
    *,
    window_s: float,
    now_ns: int | None = None,
    step_s: float | None = None,
    service: str | None = None,
) -> list[dict[str, Any]]:
    """Per service (or only ``service``): the requests it served that ended within the
    last ``window_s`` seconds: ``rate`` per second, ``errors``, ``error_ratio``,
    ``p50_ms``, ``p99_ms``, and its ``instances`` with their own numbers; with
    ``step_s``, also ``series``: the same per step, oldest first, for charts."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    since = now_ns - int(window_s * 1e9)
    steps = max(math.ceil(window_s / step_s), 1) if step_s else 0
    totals: dict[str, _Samples] = defaultdict(_Samples)
    instances: dict[str, dict[str, _Samples]] = defaultdict(lambda: defaultdict(_Samples))
    series: dict[str, list[_Samples]] = {}
    for spans in traces:
        by_id = {s.span_id: s for s in spans}
        for span in spans:
            if span.end_ns < since or span.end_ns > now_ns:
                continue
            if service is not None and span.service != service:
                continue
            if not _is_entry(span, by_id):
                continue
            ms = span.duration_ns / 1e6
            totals[span.service].add(ms, span.error)
            instances[span.service][span.instance or "?"].add(ms, span.error)
            if steps and step_s:
                buckets = series.setdefault(span.service, [_Samples() for _ in range(steps)])
                index = min(int((span.end_ns - since) / 1e9 / step_s), steps - 1)
                buckets[index].add(ms, span.error)
    out = []
    for name in sorted(totals):
        entry: dict[str, Any] = {"service": name, **totals[name].summary(window_s)}
        entry["instances"] = [
            {"instance": inst, **samples.summary(window_s)}
            for inst, samples in sorted(instances[name].items())
        ]
        if steps and step_s:
            start_s = since / 1e9
            entry["series"] = [
                {"time": round(start_s + (i + 1) * step_s, 3), **b.summary(step_s)}
                for i, b in enumerate(series[name])
            ]
        out.append(entry)
    return out


@dataclass(frozen=True, slots=True)
class Edge:
    """A call from one service to another (or to a dependency that sent no spans)."""

    caller: str
    callee: str
    duration_ms: float
    error: bool


def _peer(span: Span) -> str | None:
    for key in _PEER_KEYS:
        value = span.attributes.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def trace_edges(spans: list[Span]) -> list[Edge]:
    """The calls between services in one trace.

    A span whose parent is in another service is a call from the parent's service;
    when the parent is a client or producer span, the call is timed by it (the
    caller's view, network included), else by the child. A client or producer span
    with no child in another service is a call to what its attributes name
    (``peer.service``, ``server.address``, ``net.peer.name``, ``db.system``,
    ``messaging.system``), if anything."""
    by_id = {s.span_id: s for s in spans}
    edges: list[Edge] = []
    answered: set[str] = set()
    for span in spans:
        parent = by_id.get(span.parent_id) if span.parent_id else None
        if parent is None or parent.service == span.service:
            continue
        if parent.kind in _CALL_KINDS:
            if parent.span_id in answered:
                continue  # a retry's second server span is not a second call
            answered.add(parent.span_id)
            edges.append(Edge(parent.service, span.service, parent.duration_ns / 1e6, parent.error))
        else:
            edges.append(Edge(parent.service, span.service, span.duration_ns / 1e6, span.error))
    for span in spans:
        if span.kind not in _CALL_KINDS or span.span_id in answered:
            continue
        callee = _peer(span)
        if callee is not None and callee != span.service:
            edges.append(Edge(span.service, callee, span.duration_ns / 1e6, span.error))
    return edges


def service_map(
    traces: list[list[Span]], *, window_s: float, now_ns: int | None = None
) -> dict[str, Any]:
    """The system map over the last ``window_s`` seconds: ``nodes`` (services that sent
    spans, with their instances and RED numbers, and dependencies only named by
    callers) and ``edges`` (caller -> callee with ``rate``, ``error_ratio``,
    ``p99_ms``), from the traces that ended in the window."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    since = now_ns - int(window_s * 1e9)
    recent = [t for t in traces if t and max(s.end_ns for s in t) >= since]
    samples: dict[tuple[str, str], _Samples] = defaultdict(_Samples)
    for spans in recent:
        for edge in trace_edges([s for s in spans if s.end_ns >= since]):
            samples[(edge.caller, edge.callee)].add(edge.duration_ms, edge.error)
    red = {e["service"]: e for e in service_red(recent, window_s=window_s, now_ns=now_ns)}
    instrumented = {s.service for t in recent for s in t if s.end_ns >= since}
    nodes = []
    for name in sorted(instrumented | {n for pair in samples for n in pair}):
        entry = red.get(name)
        nodes.append(
            {
                "service": name,
                "instrumented": name in instrumented,
                "instances": [i["instance"] for i in entry["instances"]] if entry else [],
                **(
                    {k: entry[k] for k in ("rate", "error_ratio", "p50_ms", "p99_ms", "requests")}
                    if entry
                    else {}
                ),
            }
        )
    edges = [
        {"caller": caller, "callee": callee, **s.summary(window_s)}
        for (caller, callee), s in sorted(samples.items())
    ]
    return {"window_s": window_s, "nodes": nodes, "edges": edges}
