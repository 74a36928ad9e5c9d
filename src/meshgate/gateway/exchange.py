"""Per-request state: one :class:`Exchange` per request, from its parsed head to the
end of its response.

The request side (routing is done by the connection, see
:mod:`meshgate.gateway.protocol`), the filter-facing API
(:class:`~meshgate.gateway.contract.FilterExchange`), retries, and the accounting when
it ends live here; the upstream side (:class:`~meshgate.gateway.proxy.UpstreamSide`)
is inherited, so that neither half costs a call layer.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Callable
from random import random
from time import perf_counter
from typing import TYPE_CHECKING

from meshgate.gateway import proxy
from meshgate.gateway.clock import CLOCK
from meshgate.gateway.contract import PENDING
from meshgate.gateway.flow import BODY_BUFFER
from meshgate.gateway.http import CHUNK_END, IDEMPOTENT_METHODS, error_response
from meshgate.gateway.metrics import BUCKETS
from meshgate.gateway.upstream.pool import EWMA_WEIGHT

if TYPE_CHECKING:
    from meshgate.gateway.protocol import ClientConnection
    from meshgate.gateway.proxy import UpstreamConnection
    from meshgate.gateway.runtime import CompiledRoute, Runtime
    from meshgate.gateway.upstream.pool import Endpoint

__all__ = ["Exchange", "Reject"]

log = logging.getLogger("meshgate.gateway")

_BODY_BUFFER_LIMIT = 256 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Reject(Exception):  # noqa: N818 - control flow of the data plane, never escapes
    """Refuse the request being parsed with ``status`` (raised inside parser callbacks)."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


class Exchange:
    """One request and its response.

    States: parsed -> dispatched (routed; waiting for a connection) -> attached
    (request head sent) -> response head sent -> done. ``done`` is set exactly once,
    by :meth:`finish`.
    """

    # Fields every request writes live in slots; fields only some requests touch
    # are class-level defaults, shadowed in the instance dict when set, so that
    # creating an exchange costs a handful of slot writes rather than forty.
    __slots__ = (
        "__dict__",
        "client",
        "conn",
        "done",
        "endpoint",
        "head",
        "headers",
        "http10",
        "keep_alive",
        "last_io",
        "method",
        "out",
        "req_done",
        "request_id",
        "resp_bytes",
        "resp_started",
        "reused",
        "route",
        "rt",
        "sampled",
        "status",
        "t_start",
        "t_up",
        "trace_id",
        "up_span",
        "upgrade",
        "url",
    )

    # Slots set when the head is prepared or the exchange attached.
    headers: list[tuple[bytes, bytes]]
    # Slots set by Tracer.begin once the request is routed (tracing on only).
    trace_id: bytes
    sampled: bool
    up_span: bytes
    http10: bool
    upgrade: bool
    last_io: float
    reused: bool

    aborted = ""  # why a response was cut off after its head was sent
    attempts = 0  # retries made
    has_body = False  # the request announced a body (Content-Length > 0 or chunked)
    tried: set[Endpoint] | None = None  # endpoints a retry must avoid
    upgrade_to: frozenset[bytes] = frozenset()  # the protocols a 101 may switch to
    # Trace context (hex ids) beyond the slots Tracer.begin sets when tracing is on
    # (trace_id, sampled, up_span).
    parent_span = b""  # the client's span, from its traceparent
    tracestate = b""
    replay: list[bytes] | None = None  # the body so far, kept to be sent again
    replay_size = 0
    resp_extra = b""  # header lines filters add to the response
    set_cookie = b""  # a sticky-session cookie (the last endpoint picked sets it)
    consumer: str | None = None  # the authenticated caller (set by the auth filter)
    spoofed = False  # the client sent a header the auth filter owns
    try_deadline = 0.0  # the current try's per-try timeout
    body_buf: list[bytes] | None = None
    body_size = 0
    chunks = 0  # chunks of a chunked request body so far
    chunk_wire = 0  # bytes of a chunked body as they came on the wire (framing included)
    chunked_in = False
    chunk_out = False
    deadline = 0.0
    error_bytes: bytes | None = None
    expect_continue = False
    interim = False
    no_body = False
    queued_at = 0.0
    raw_body_left = 0  # body bytes of a refused upgrade, read past the stopped parser
    retried = False
    t_up_end = 0.0
    until_close = False

    def __init__(self, client: ClientConnection, rt: Runtime, url: bytes = b"") -> None:
        self.client = client
        self.rt = rt
        self.url = url
        self.head: bytes | tuple[bytes, bytes] = b""
        self.method = b""
        self.route: CompiledRoute | None = None
        self.conn: UpstreamConnection | None = None
        self.done = False
        self.req_done = False
        self.resp_started = False
        self.keep_alive = True
        self.status = 0
        self.request_id = b""
        self.resp_bytes = 0
        self.t_start = 0.0
        self.t_up = 0.0
        self.endpoint: Endpoint | None = None
        # Response bytes held back to leave in one write with what follows them
        # in the same read from the upstream (head + body: one syscall, not two).
        self.out: list[bytes] | None = None

    # The upstream side (meshgate.gateway.proxy): sending the request on a connection
    # and relaying its response.
    attach = proxy.attach
    on_upstream_head = proxy.on_upstream_head
    on_upstream_body = proxy.on_upstream_body
    flush = proxy.flush
    on_upstream_end = proxy.on_upstream_end
    on_upstream_upgrade = proxy.on_upstream_upgrade
    on_upstream_lost = proxy.on_upstream_lost
    on_upstream_error = proxy.on_upstream_error
    _retry_stale = proxy._retry_stale

    # -- request side ---------------------------------------------------------

    def dispatch(self) -> None:
        """Start the exchange: answer a prepared error, run the route's filters, then
        ask the upstream for a connection."""
        error = self.error_bytes
        if error is not None:
            self.client.transport.write(error)
            self.finish()
            return
        route = self.route
        assert route is not None  # noqa: S101 - set whenever error_bytes is not
        chain = route.chain
        if chain is not None:
            verdict = chain.run(self)
            if verdict is not None:
                if verdict is not PENDING:
                    self.answer(verdict)  # type: ignore[arg-type]
                return  # else the chain calls filters_passed() or answer() later
        self.filters_passed()

    def filters_passed(self) -> None:
        """Past the filters: invite the body if asked, and find a connection."""
        if self.expect_continue:
            # Only now: a request refused by a filter never had its body invited.
            self.client.transport.write(_CONTINUE)
        self.route.upstream.acquire(self)  # type: ignore[union-attr]

    def answer(self, response: bytes) -> None:
        """Send a filter's own response (401, 429, a CORS preflight...) and end."""
        self.resp_started = True
        self.client.transport.write(response)
        self.finish()

    # -- filters change the upstream request through these --------------------------

    def append_request_lines(self, lines: bytes) -> None:
        """Add header lines (each ending in CRLF) to the upstream request."""
        head = self.head
        if isinstance(head, tuple):
            self.head = (head[0], head[1][:-2] + lines + b"\r\n")
        else:
            self.head = head[:-2] + lines + b"\r\n"

    def rewrite_request_headers(self, rewrite: Callable[[bytes], bytes]) -> None:
        """Replace the forwarded header lines with ``rewrite(lines)`` (each line ends
        in CRLF; the request line is kept)."""
        head = self.head
        if type(head) is tuple:
            line, rest = head
            self.head = (line, rewrite(rest[:-2]) + b"\r\n")
        else:
            assert type(head) is bytes  # noqa: S101 - narrowing for mypy
            split = head.index(b"\r\n") + 2
            self.head = head[:split] + rewrite(head[split:-2]) + b"\r\n"

    def _request_line(self) -> bytes:
        head = self.head
        if isinstance(head, tuple):
            return head[0]
        return head[: head.index(b"\r\n") + 2]

    def request_target(self) -> bytes:
        """The target (path and query) the upstream request carries now."""
        return self._request_line().split(b" ")[1]

    def set_request_target(self, target: bytes) -> None:
        """Forward ``target`` (path and query) instead of the one prepared."""
        line = self._request_line()
        method, _, rest = line.partition(b" ")
        new_line = method + b" " + target + b" " + rest.rpartition(b" ")[2]
        head = self.head
        if isinstance(head, tuple):
            self.head = (new_line, head[1])
        else:
            self.head = new_line + head[len(line) :]

    def on_request_body(self, body: bytes) -> None:
        size = self.body_size + len(body)
        self.body_size = size
        limit = self.rt.max_body
        if limit is not None and size > limit:
            raise Reject(413, "body_too_large", f"the request body is larger than {limit} bytes")
        if self.done:
            return
        replay = self.replay
        if replay is not None:
            self.replay_size += len(body)
            if self.replay_size > self.route.retry.buffer:  # type: ignore[union-attr]
                self.replay = None  # too large to send again: this request is not retried
            else:
                replay.append(body)
        conn = self.conn
        if conn is not None:
            if self.chunked_in:
                conn.transport.writelines((b"%x\r\n" % len(body), body, CHUNK_END))
            else:
                conn.transport.write(body)
            return
        buffered = self.body_buf
        if buffered is None:
            buffered = self.body_buf = []
        buffered.append(body)
        if size > _BODY_BUFFER_LIMIT:
            self.client.pause_reading_for(BODY_BUFFER)

    # -- retries --------------------------------------------------------------------

    def upstream_failed(
        self, endpoint: Endpoint, kind: str, status: int, error: str, detail: str
    ) -> None:
        """A try failed before any response reached the client: retry it, or answer.

        ``kind`` is ``connect_failure`` (the request never reached the upstream),
        ``reset`` or ``timeout``.
        """
        if self.done:
            return
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.exchange = None
            conn.transport.abort()
        retry = self.route.retry if self.route is not None else None
        if retry is not None and not self.resp_started:
            wanted = (
                retry.on_connect
                if kind == "connect_failure"
                else retry.on_reset
                if kind == "reset"
                else retry.on_timeout
            )
            if wanted and self._may_retry(kind != "connect_failure"):
                self._retry(endpoint)
                return
        self._leave_endpoint(failed=endpoint)
        self.fail(status, error, detail)

    def _may_retry(self, reached: bool) -> bool:
        """Whether this exchange may be tried again now (and take a retry from the
        budget). ``reached``: the request may have been processed by the upstream."""
        retry = self.route.retry  # type: ignore[union-attr]
        if retry is None or self.attempts >= retry.attempts or self.resp_started:
            return False
        if self.body_size and self.replay is None:
            return False  # the body is too large to send again
        # Sent twice, a non-idempotent request may act twice; only a request that says
        # it is safe (an Idempotency-Key) on a route that allows it is resent.
        if (
            reached
            and self.method not in IDEMPOTENT_METHODS
            and not (retry.idempotency_key and _has_header(self.headers, b"idempotency-key"))
        ):
            return False
        if self.deadline and CLOCK.now >= self.deadline:
            return False
        upstream = self.route.upstream  # type: ignore[union-attr]
        if not upstream.budget.try_spend():
            self.route.stats.budget_exhausted += 1  # type: ignore[union-attr]
            return False
        return True

    def _retry(self, failed: Endpoint) -> None:
        """Try again on another endpoint after a backoff with full jitter."""
        self._leave_endpoint(failed=failed)
        self.attempts += 1
        self.route.stats.retries += 1  # type: ignore[union-attr]
        tried = self.tried
        if tried is None:
            tried = self.tried = set()
        tried.add(failed)
        self.client.worker.inflight.discard(self)
        self.try_deadline = 0.0
        if self.replay is not None:
            self.body_buf = list(self.replay)  # the whole body goes again
        retry = self.route.retry  # type: ignore[union-attr]
        delay = random() * min(retry.backoff_max, retry.backoff_base * 2 ** (self.attempts - 1))  # type: ignore[union-attr]  # noqa: S311
        asyncio.get_running_loop().call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        if not self.done:
            self.route.upstream.acquire(self)  # type: ignore[union-attr]

    def _leave_endpoint(self, failed: Endpoint | None = None) -> None:
        """This try is over: the endpoint it used has one request less in flight, and
        a failure to count."""
        endpoint = self.endpoint
        if endpoint is not None:
            self.endpoint = None
            endpoint.inflight -= 1
        if failed is not None:
            failed.upstream.failed(failed, CLOCK.now)  # type: ignore[union-attr]

    def _abort_client(self, detail: str, reason: str = "upstream_failed") -> None:
        log.debug("aborting client connection: %s", detail)
        self.aborted = reason
        self.out = None
        self.keep_alive = False
        self.status = self.status or 502
        self.client.transport.abort()
        self.finish()

    # -- errors and timeouts ----------------------------------------------------

    def fail(self, status: int, error: str, detail: str, *, headers: bytes = b"") -> None:
        """End the exchange with an error response (or by closing, if one already started)."""
        if self.done:
            return
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.exchange = None
            conn.transport.abort()
        if self.resp_started:
            self._abort_client(detail)
            return
        route = self.route
        self.status = status
        # A request whose body is still arriving ends the connection: what is left
        # of it would otherwise be read and thrown away.
        self.keep_alive = self.keep_alive and (self.req_done or not self.has_body)
        self.client.transport.write(
            error_response(
                status,
                error,
                detail,
                request_id=self.request_id,
                request_id_header=self.rt.rid_name,
                route=route.name if route is not None else None,
                upstream=route.upstream.name if route is not None else None,
                close=not self.keep_alive,
                # Lines filters added (CORS, RateLimit) belong on errors too: a
                # browser must be able to read a 502 from an allowed origin.
                extra_headers=headers + self.resp_extra,
                instance=self.url,
            )
        )
        self.finish()

    @property
    def read_timeout(self) -> float:
        route = self.route
        return route.read_timeout if route is not None else 60.0

    @property
    def connect_timeout(self) -> float:
        route = self.route
        return route.connect_timeout if route is not None else 5.0

    def timed_out(self, which: str) -> None:
        route = self.route
        total = route.total_timeout if route is not None else None
        seconds = self.read_timeout if which == "read" else (total or 0.0)
        self.fail(
            504,
            "upstream_timeout",
            f"the upstream sent nothing for {seconds:g}s"
            if which == "read"
            else f"the exchange took longer than {seconds:g}s",
        )

    # -- the end ------------------------------------------------------------------

    def finish(self) -> None:
        """Record the exchange and let the connection go on to its next request."""
        if self.done:
            return
        self.done = True
        client = self.client
        worker = client.worker
        worker.inflight.discard(self)
        route = self.route
        end = perf_counter()
        # The upstream's part ends with its response, which is now unless it
        # ended earlier (a tunnel, a response delimited by the connection's end).
        t_up = self.t_up
        upstream_time = ((self.t_up_end or end) - t_up) if t_up else 0.0
        status = self.status
        total = end - self.t_start
        stats = route.stats if route is not None else self.rt.unrouted
        # RouteStats.observe, inlined: this runs for every request.
        stats.by_class[status // 100 if 100 <= status < 600 else 5] += 1
        stats.duration_buckets[bisect_left(BUCKETS, total)] += 1
        stats.duration_sum += total
        gateway_time = total - upstream_time
        if gateway_time < 0.0:
            gateway_time = 0.0
        stats.gateway_buckets[bisect_left(BUCKETS, gateway_time)] += 1
        stats.gateway_sum += gateway_time
        if upstream_time:
            stats.upstream_buckets[bisect_left(BUCKETS, upstream_time)] += 1
            stats.upstream_sum += upstream_time
        aborted = self.aborted
        if aborted:
            stats.aborted += 1
        endpoint = self.endpoint
        tracer = self.rt.tracer
        if (
            tracer is not None
            and route is not None
            and (self.sampled or (tracer.errors and (status >= 500 or aborted)))
        ):
            tracer.end(self, end, endpoint.label if endpoint is not None else "")
        if endpoint is not None:
            # The last try's endpoint: its load, latency and health.
            self.endpoint = None
            endpoint.inflight -= 1
            if status < 500:
                # Upstream.succeeded (pool.record_success), inlined: every request.
                endpoint.failures = 0
                if upstream_time:
                    ewma = endpoint.ewma
                    endpoint.ewma = (
                        ewma + (upstream_time - ewma) * EWMA_WEIGHT if ewma else upstream_time
                    )
                breaker = endpoint.upstream.breaker  # type: ignore[union-attr]
                if breaker is not None:
                    breaker.record(True, CLOCK.now)
            else:
                endpoint.upstream.failed(endpoint, CLOCK.now)  # type: ignore[union-attr]
        access = worker.access_log
        if access is not None:
            access.records.append(
                (
                    client.peer_ip,
                    self.method,
                    self.url,
                    status,
                    route.name if route is not None else "",
                    self.request_id,
                    self.resp_bytes,
                    total,
                    upstream_time,
                    aborted,
                    self.trace_id if tracer is not None and route is not None else b"",
                    self.t_start,
                )
            )
        if self.keep_alive and client.current is self and not client.closing and not client.pending:
            # The common case of ClientConnection.exchange_done, inlined.
            client.current = None
            client.idle_since = CLOCK.now
            return
        client.exchange_done(self)


def _has_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bool:
    """Whether ``headers`` has one called ``name`` (lowercase)."""
    return any(key.lower() == name for key, _ in headers)
