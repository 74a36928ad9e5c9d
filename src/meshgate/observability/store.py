"""The collector's memory: recent traces, logs and metrics within fixed limits.

Traces are kept whole: when a limit is reached, the trace that arrived first goes
with all its spans, so a trace shown is never missing its oldest half. Logs are a
ring of records, metrics a bounded set of series with a bounded number of recent
points each. Every limit is in both items and bytes (the encoded size of what was
received plus a fixed overhead per item), and everything dropped is counted.

Indexes kept as spans arrive: traces by service, traces with an error, traces by
duration (sorted), and logs by trace id, so that the common queries of the
dashboard and ``meshgate traces`` do not scan everything.

The store is safe to use from several threads (the receiver decodes off the event
loop); every method takes one lock for a short time and returns data that later
changes do not affect.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from meshgate.observability.model import LEVELS, LogRecord, MetricSeries, Span
from meshgate.observability.otlp import MetricPoint

__all__ = ["StoreLimits", "TelemetryStore", "TraceSummary"]

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """How much the collector keeps. The oldest data goes first when one is reached."""

    max_spans: int = 100_000
    """Spans kept, over all traces."""
    max_span_bytes: int = 64 * _MIB
    """Bytes of spans kept."""
    max_traces: int = 20_000
    """Traces kept."""
    max_spans_per_trace: int = 5_000
    """Spans kept of one trace; later ones are dropped (a runaway loop is not a trace)."""
    max_logs: int = 50_000
    """Log records kept."""
    max_log_bytes: int = 32 * _MIB
    """Bytes of log records kept."""
    max_series: int = 5_000
    """Metric series (name, service and attributes) kept; new ones are dropped past it."""
    points_per_series: int = 360
    """Recent points kept of each metric series."""

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"StoreLimits.{name}={value!r}: must be a positive integer")


@dataclass(slots=True)
class _Trace:
    trace_id: str
    seq: int
    spans: list[Span] = field(default_factory=list)
    span_ids: set[str] = field(default_factory=set)
    start_ns: int = 0
    end_ns: int = 0
    services: set[str] = field(default_factory=set)
    error: bool = False
    size: int = 0
    received: float = 0.0

    @property
    def duration_ns(self) -> int:
        return max(self.end_ns - self.start_ns, 0)


@dataclass(frozen=True, slots=True)
class TraceSummary:
    """One line of a trace list: what the trace is and how it went."""

    trace_id: str
    root_service: str
    root_name: str
    start_ns: int
    duration_ns: int
    spans: int
    services: tuple[str, ...]
    error: bool
    errors: int
    """Spans that failed."""

    def to_json(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "root_service": self.root_service,
            "root_name": self.root_name,
            "start_ns": self.start_ns,
            "duration_ms": round(self.duration_ns / 1e6, 3),
            "spans": self.spans,
            "services": list(self.services),
            "error": self.error,
            "errors": self.errors,
        }


def _root(spans: list[Span]) -> Span:
    """The trace's root: a span without parent, else one whose parent was not received,
    else the earliest; ties go to the earliest start."""
    ids = {s.span_id for s in spans}
    candidates = [s for s in spans if not s.parent_id] or [
        s for s in spans if s.parent_id not in ids
    ]
    return min(candidates or spans, key=lambda s: s.start_ns)


def summarize(trace_id: str, spans: list[Span]) -> TraceSummary:
    """The summary of a trace made of ``spans`` (not empty)."""
    root = _root(spans)
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    errors = sum(1 for s in spans if s.error)
    return TraceSummary(
        trace_id=trace_id,
        root_service=root.service,
        root_name=root.name,
        start_ns=start,
        duration_ns=max(end - start, 0),
        spans=len(spans),
        services=tuple(sorted({s.service for s in spans})),
        error=errors > 0,
        errors=errors,
    )


class TelemetryStore:
    """Recent telemetry in bounded memory (see the module docstring)."""

    def __init__(self, limits: StoreLimits | None = None) -> None:
        self.limits = limits or StoreLimits()
        self._lock = threading.Lock()
        self._seq = 0
        self._version = 0
        self._traces: OrderedDict[str, _Trace] = OrderedDict()
        self._by_service: dict[str, dict[str, None]] = {}
        self._errors: dict[str, None] = {}
        self._by_duration: list[tuple[int, str]] = []
        self._span_count = 0
        self._span_bytes = 0
        self._logs: deque[LogRecord] = deque()
        self._log_bytes = 0
        self._logs_by_trace: dict[str, list[LogRecord]] = {}
        self._series: dict[tuple[str, str, tuple[tuple[str, str], ...]], MetricSeries] = {}
        self.dropped: dict[str, int] = {
            "traces_evicted": 0,
            "spans_evicted": 0,
            "spans_over_trace_limit": 0,
            "spans_duplicate": 0,
            "logs_evicted": 0,
            "series_refused": 0,
        }
        self.received: dict[str, int] = {"spans": 0, "logs": 0, "points": 0}

    # -- ingest

    def add_spans(self, spans: Iterable[Span]) -> int:
        """Keep ``spans``; the number kept (a span already kept, or past its trace's
        limit, is dropped and counted)."""
        kept = 0
        now = time.time()
        with self._lock:
            for span in spans:
                self.received["spans"] += 1
                trace = self._traces.get(span.trace_id)
                if trace is None:
                    self._seq += 1
                    trace = _Trace(span.trace_id, self._seq, received=now)
                    trace.start_ns, trace.end_ns = span.start_ns, span.end_ns
                    self._traces[span.trace_id] = trace
                    old_duration = None
                else:
                    if span.span_id in trace.span_ids:
                        self.dropped["spans_duplicate"] += 1
                        continue
                    if len(trace.spans) >= self.limits.max_spans_per_trace:
                        self.dropped["spans_over_trace_limit"] += 1
                        continue
                    old_duration = trace.duration_ns
                trace.spans.append(span)
                trace.span_ids.add(span.span_id)
                trace.size += span.size
                trace.received = now
                trace.start_ns = min(trace.start_ns, span.start_ns)
                trace.end_ns = max(trace.end_ns, span.end_ns)
                self._span_count += 1
                self._span_bytes += span.size
                if span.service not in trace.services:
                    trace.services.add(span.service)
                    self._by_service.setdefault(span.service, {})[trace.trace_id] = None
                if span.error and not trace.error:
                    trace.error = True
                    self._errors[trace.trace_id] = None
                if old_duration != trace.duration_ns:
                    if old_duration is not None:
                        self._unindex_duration(old_duration, trace.trace_id)
                    bisect.insort(self._by_duration, (trace.duration_ns, trace.trace_id))
                kept += 1
            self._evict_traces()
            if kept:
                self._version += 1
        return kept

    def _unindex_duration(self, duration: int, trace_id: str) -> None:
        index = bisect.bisect_left(self._by_duration, (duration, trace_id))
        if index < len(self._by_duration) and self._by_duration[index] == (duration, trace_id):
            del self._by_duration[index]

    def _evict_traces(self) -> None:
        limits = self.limits
        # The newest trace stays even alone over a limit: its size is bounded by
        # max_spans_per_trace, and an empty store would show nothing at all.
        while len(self._traces) > 1 and (
            len(self._traces) > limits.max_traces
            or self._span_count > limits.max_spans
            or self._span_bytes > limits.max_span_bytes
        ):
            trace_id, trace = self._traces.popitem(last=False)
            self._span_count -= len(trace.spans)
            self._span_bytes -= trace.size
            self.dropped["traces_evicted"] += 1
            self.dropped["spans_evicted"] += len(trace.spans)
            for service in trace.services:
                index = self._by_service.get(service)
                if index is not None:
                    index.pop(trace_id, None)
                    if not index:
                        del self._by_service[service]
            self._errors.pop(trace_id, None)
            self._unindex_duration(trace.duration_ns, trace_id)

    def add_logs(self, records: Iterable[LogRecord]) -> int:
        """Keep ``records``, dropping the oldest past the limits; the number kept."""
        kept = 0
        limits = self.limits
        with self._lock:
            for record in records:
                self.received["logs"] += 1
                self._logs.append(record)
                self._log_bytes += record.size
                if record.trace_id:
                    self._logs_by_trace.setdefault(record.trace_id, []).append(record)
                kept += 1
            while self._logs and (
                len(self._logs) > limits.max_logs or self._log_bytes > limits.max_log_bytes
            ):
                old = self._logs.popleft()
                self._log_bytes -= old.size
                self.dropped["logs_evicted"] += 1
                if old.trace_id:
                    same = self._logs_by_trace.get(old.trace_id)
                    # Records leave in arrival order, so the oldest of a trace is first.
                    if same:
                        same.pop(0)
                        if not same:
                            del self._logs_by_trace[old.trace_id]
            if kept:
                self._version += 1
        return kept

    def add_metric_points(self, points: Iterable[MetricPoint]) -> int:
        """Keep metric data points; the number kept (points of a new series past
        :attr:`StoreLimits.max_series` are dropped and counted)."""
        kept = 0
        with self._lock:
            for name, kind, unit, description, service, attributes, mono, t, value in points:
                self.received["points"] += 1
                key = (
                    service,
                    name,
                    tuple(sorted((k, str(v)) for k, v in attributes.items())),
                )
                series = self._series.get(key)
                if series is None:
                    if len(self._series) >= self.limits.max_series:
                        self.dropped["series_refused"] += 1
                        continue
                    series = MetricSeries(
                        name=name,
                        kind=kind,
                        unit=unit,
                        description=description,
                        service=service,
                        attributes=attributes,
                        monotonic=mono,
                        points=deque(maxlen=self.limits.points_per_series),
                    )
                    self._series[key] = series
                series.points.append((t, value))
                kept += 1
            if kept:
                self._version += 1
        return kept

    # -- reading

    @property
    def version(self) -> int:
        """A number that grows whenever something is kept: poll it to see new data."""
        return self._version

    def stats(self) -> dict[str, Any]:
        """What the store holds and what it dropped, against its limits."""
        with self._lock:
            return {
                "version": self._version,
                "traces": len(self._traces),
                "spans": self._span_count,
                "span_bytes": self._span_bytes,
                "logs": len(self._logs),
                "log_bytes": self._log_bytes,
                "series": len(self._series),
                "services": sorted(self._by_service),
                "received": dict(self.received),
                "dropped": dict(self.dropped),
                "limits": {k: getattr(self.limits, k) for k in self.limits.__dataclass_fields__},
            }

    def services(self) -> list[str]:
        """Services that sent spans, logs or metrics still kept."""
        with self._lock:
            names = set(self._by_service)
            names.update(r.service for r in self._logs)
            names.update(s.service for s in self._series.values())
        return sorted(names)

    def trace(self, trace_id: str) -> list[Span] | None:
        """The spans of one trace (any order), or None when it is not kept."""
        with self._lock:
            trace = self._traces.get(trace_id.lower())
            return None if trace is None else list(trace.spans)

    def _candidates(
        self, service: str | None, errors: bool, min_duration_ns: int | None
    ) -> Iterator[str]:
        """Trace ids that may match, newest first, from the smallest applicable index."""
        options: list[tuple[int, Iterator[str]]] = []
        if service is not None:
            index = self._by_service.get(service, {})
            options.append((len(index), reversed(index)))
        if errors:
            options.append((len(self._errors), reversed(self._errors)))
        if min_duration_ns is not None:
            at = bisect.bisect_left(self._by_duration, (min_duration_ns, ""))
            slow = self._by_duration[at:]
            # Newest first, as with the other indexes.
            ordered = sorted(slow, key=lambda d: self._traces[d[1]].seq, reverse=True)
            options.append((len(slow), (trace_id for _, trace_id in ordered)))
        if not options:
            return reversed(self._traces)
        return min(options, key=lambda o: o[0])[1]

    def find_traces(
        self,
        *,
        service: str | None = None,
        errors: bool = False,
        min_duration_ns: int | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        limit: int = 20,
    ) -> list[TraceSummary]:
        """Summaries of the newest traces (by arrival) that match every filter given:
        a span of ``service``, a failed span, at least ``min_duration_ns`` long,
        started within [``since_ns``, ``until_ns``]; at most ``limit``."""
        picked: list[tuple[str, list[Span]]] = []
        with self._lock:
            for trace_id in self._candidates(service, errors, min_duration_ns):
                trace = self._traces[trace_id]
                if service is not None and service not in trace.services:
                    continue
                if errors and not trace.error:
                    continue
                if min_duration_ns is not None and trace.duration_ns < min_duration_ns:
                    continue
                if since_ns is not None and trace.start_ns < since_ns:
                    continue
                if until_ns is not None and trace.start_ns > until_ns:
                    continue
                picked.append((trace_id, list(trace.spans)))
                if len(picked) >= limit:
                    break
        return [summarize(trace_id, spans) for trace_id, spans in picked]

    def spans_since(self, since_ns: int) -> list[Span]:
        """Every kept span that ended at or after ``since_ns``."""
        with self._lock:
            return [
                span
                for trace in self._traces.values()
                if trace.end_ns >= since_ns
                for span in trace.spans
                if span.end_ns >= since_ns
            ]

    def traces_since(self, since_ns: int) -> list[list[Span]]:
        """The spans of every kept trace that has a span ending at or after ``since_ns``."""
        with self._lock:
            return [list(t.spans) for t in self._traces.values() if t.end_ns >= since_ns]

    def logs(
        self,
        *,
        service: str | None = None,
        level: str | None = None,
        trace_id: str | None = None,
        text: str | None = None,
        since_ns: int | None = None,
        limit: int = 200,
    ) -> list[LogRecord]:
        """The newest log records (at most ``limit``, newest first) of ``service``, at
        ``level`` or above, of ``trace_id``, whose body contains ``text``
        (case-insensitive), at or after ``since_ns``."""
        floor = LEVELS.index(level) if level is not None else 0
        needle = text.lower() if text else None
        out: list[LogRecord] = []
        with self._lock:
            source: Iterable[LogRecord] = (
                reversed(self._logs_by_trace.get(trace_id.lower(), []))
                if trace_id is not None
                else reversed(self._logs)
            )
            for record in source:
                if since_ns is not None and record.time_ns < since_ns:
                    continue
                if service is not None and record.service != service:
                    continue
                if floor and LEVELS.index(record.level) < floor:
                    continue
                if needle is not None and needle not in str(record.body).lower():
                    continue
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    def metric_series(
        self, *, service: str | None = None, name: str | None = None, limit: int = 500
    ) -> list[MetricSeries]:
        """Kept metric series of ``service`` named ``name`` (a prefix match), at most
        ``limit``, each with a copy of its points."""
        out = []
        with self._lock:
            for series in self._series.values():
                if service is not None and series.service != service:
                    continue
                if name is not None and not series.name.startswith(name):
                    continue
                copy = MetricSeries(
                    series.name,
                    series.kind,
                    series.unit,
                    series.description,
                    series.service,
                    series.attributes,
                    series.monotonic,
                    deque(series.points),
                )
                out.append(copy)
                if len(out) >= limit:
                    break
        return out
