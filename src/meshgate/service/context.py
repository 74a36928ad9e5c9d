"""What a request carries from service to service: its id, its W3C trace context,
its deadline and the calling service.

The request id, deadline and caller each live in a :class:`contextvars.ContextVar`,
set by the service's middleware for the request being handled and read by
:class:`~meshgate.service.ServiceClient` for the calls it makes, so that propagation
needs no argument threading.

The trace context is OpenTelemetry's: :data:`current_trace` reads the span that is
current in the OpenTelemetry context (the request's server span, or a span of the
code's own inside it), and setting it makes a :class:`TraceContext` the current
span, for code that continues a trace it received some other way (an event's
``traceparent``).
"""

from __future__ import annotations

import os
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace

__all__ = [
    "DEADLINE_HEADER",
    "TraceContext",
    "current_caller",
    "current_deadline",
    "current_request_id",
    "current_trace",
    "remaining",
]

DEADLINE_HEADER = "X-Meshgate-Deadline-Ms"
"""Milliseconds the caller still waits for the answer (relative, so that the clocks
of two machines need not agree)."""

_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A W3C trace context (``traceparent``): the trace, this span, and the sampling flag."""

    trace_id: str
    span_id: str
    sampled: bool = True

    @classmethod
    def parse(cls, header: str | None) -> TraceContext | None:
        """The context of a ``traceparent`` header; None when absent or invalid
        (W3C Trace Context: an invalid header is ignored and a new trace starts)."""
        if not header:
            return None
        match = _TRACEPARENT_RE.match(header.strip().lower())
        if match is None:
            return None
        version, trace_id, span_id, flags = match.groups()
        if version == "ff" or trace_id == "0" * 32 or span_id == "0" * 16:
            return None
        return cls(trace_id, span_id, bool(int(flags, 16) & 1))

    @classmethod
    def new(cls) -> TraceContext:
        """The root span of a new trace."""
        return cls(os.urandom(16).hex(), os.urandom(8).hex())

    @classmethod
    def of(cls, span: trace.Span) -> TraceContext | None:
        """The context of an OpenTelemetry span; None for an invalid one (no trace)."""
        ctx = span.get_span_context()
        if not ctx.is_valid:
            return None
        return cls(f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", ctx.trace_flags.sampled)

    def child(self) -> TraceContext:
        """A new span in the same trace (for an outgoing call)."""
        return TraceContext(self.trace_id, os.urandom(8).hex(), self.sampled)

    def header(self) -> str:
        """The ``traceparent`` header value."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def span(self) -> trace.Span:
        """This context as an OpenTelemetry span that records nothing: made current,
        the spans started under it are its children, and calls carry it on."""
        return trace.NonRecordingSpan(
            trace.SpanContext(
                int(self.trace_id, 16),
                int(self.span_id, 16),
                is_remote=False,
                trace_flags=trace.TraceFlags(1 if self.sampled else 0),
            )
        )


class _CurrentTrace:
    """The trace span current in the OpenTelemetry context, with the interface of a
    ``ContextVar[TraceContext | None]`` (``get``, ``set``, ``reset``)."""

    __slots__ = ()

    name = "meshgate_trace"

    def get(self, default: TraceContext | None = None) -> TraceContext | None:
        """The current span's context, or ``default`` outside any trace."""
        found = TraceContext.of(trace.get_current_span())
        return default if found is None else found

    def set(self, value: TraceContext | None) -> object:
        """Make ``value`` the current span (None: no trace) until :meth:`reset` with
        the token returned."""
        span = trace.INVALID_SPAN if value is None else value.span()
        return otel_context.attach(trace.set_span_in_context(span))

    def reset(self, token: object) -> None:
        """Undo the :meth:`set` that gave ``token``."""
        otel_context.detach(token)  # type: ignore[arg-type]


current_request_id: ContextVar[str | None] = ContextVar("meshgate_request_id", default=None)
"""The id of the request being handled (``X-Request-ID``)."""
current_trace = _CurrentTrace()
"""The trace span of the request being handled (or of the span the code started
inside it), from the OpenTelemetry context; ``get()`` is None outside any trace."""
current_deadline: ContextVar[float | None] = ContextVar("meshgate_deadline", default=None)
"""When (``time.monotonic()``) the caller stops waiting for the request being handled."""
current_caller: ContextVar[str | None] = ContextVar("meshgate_caller", default=None)
"""The verified name of the service that called, when it sent an identity token."""


def remaining() -> float | None:
    """Seconds left before the current request's deadline (may be negative); None
    without a deadline."""
    deadline = current_deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def parse_deadline(header: str | None) -> float | None:
    """The deadline (monotonic) a :data:`DEADLINE_HEADER` value gives, or None."""
    if not header:
        return None
    try:
        millis = int(header.strip())
    except ValueError:
        return None
    if millis < 0:
        millis = 0
    return time.monotonic() + millis / 1000
